#include "evmesh/envelope.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <boost/json.hpp>
#include <boost/json/basic_parser_impl.hpp>

#include "evmesh/error.hpp"

namespace evmesh {

namespace {

namespace json = boost::json;

// Payloads nest deeper than Boost.JSON's default limit of 32 in practice; the
// parser keeps its own stack, so a larger limit costs no native recursion.
constexpr size_t max_json_depth = 128;

// Values quoted in error messages are cut to this many characters.
constexpr size_t max_quoted = 48;

caf::error fail(std::string message) {
  return make_error(errc::decode_error, std::move(message));
}

const char* kind_name(json::kind k) noexcept {
  switch (k) {
    case json::kind::null:
      return "null";
    case json::kind::bool_:
      return "a boolean";
    case json::kind::int64:
    case json::kind::uint64:
    case json::kind::double_:
      return "a number";
    case json::kind::string:
      return "a string";
    case json::kind::array:
      return "an array";
    case json::kind::object:
      return "an object";
  }
  return "an unknown JSON kind";
}

std::string quote(const json::value& v) {
  auto text = json::serialize(v);
  if (text.size() > max_quoted) {
    text.resize(max_quoted);
    text += "...";
  }
  return text;
}

std::string field_error(std::string_view field, std::string_view expected,
                        const json::value& got) {
  std::string msg = "field '";
  msg += field;
  msg += "' must be ";
  msg += expected;
  msg += ", got ";
  msg += kind_name(got.kind());
  if (!got.is_null() && !got.is_object() && !got.is_array()) {
    msg += ' ';
    msg += quote(got);
  }
  return msg;
}

// Optional string fields: JSON null counts as absent.
caf::error read_string(std::string_view field, const json::value& v,
                       std::string& out) {
  if (v.is_null())
    return {};
  if (auto* str = v.if_string()) {
    out.assign(str->data(), str->size());
    return {};
  }
  return fail(field_error(field, "a string", v));
}

// Outbox rows often use integer primary keys as the event id.
caf::error read_id(std::string_view field, const json::value& v,
                   std::string& out) {
  if (auto* i = v.if_int64()) {
    out = std::to_string(*i);
    return {};
  }
  if (auto* u = v.if_uint64()) {
    out = std::to_string(*u);
    return {};
  }
  return read_string(field, v, out);
}

caf::error read_attempt(const json::value& v, uint32_t& out) {
  constexpr auto max = std::numeric_limits<uint32_t>::max();
  auto bad = [&] {
    return fail(field_error("attempt", "a non-negative integer", v));
  };
  switch (v.kind()) {
    case json::kind::null:
      return {};
    case json::kind::int64: {
      auto x = v.get_int64();
      if (x < 0)
        return bad();
      if (static_cast<uint64_t>(x) > max)
        return fail("field 'attempt' is too large: " + std::to_string(x));
      out = static_cast<uint32_t>(x);
      return {};
    }
    case json::kind::uint64: {
      auto x = v.get_uint64();
      if (x > max)
        return fail("field 'attempt' is too large: " + std::to_string(x));
      out = static_cast<uint32_t>(x);
      return {};
    }
    case json::kind::double_: {
      // JavaScript producers may write 2.0; accept integral values only.
      auto x = v.get_double();
      if (!std::isfinite(x) || x < 0 || std::floor(x) != x)
        return bad();
      if (x > static_cast<double>(max))
        return fail("field 'attempt' is too large: " + quote(v));
      out = static_cast<uint32_t>(x);
      return {};
    }
    default:
      return bad();
  }
}

caf::error read_headers(const json::value& v,
                        std::map<std::string, std::string>& out) {
  if (v.is_null())
    return {};
  auto* obj = v.if_object();
  if (obj == nullptr)
    return fail(field_error("headers", "an object of strings", v));
  for (const auto& kv : *obj) {
    auto* str = kv.value().if_string();
    if (str == nullptr) {
      std::string msg
        = "field 'headers' must be an object of strings; header '";
      msg += kv.key();
      msg += "' is ";
      msg += kind_name(kv.value().kind());
      return fail(std::move(msg));
    }
    out.insert_or_assign(std::string{kv.key()},
                         std::string{str->data(), str->size()});
  }
  return {};
}

enum class native_field {
  unknown,
  id,
  topic,
  payload,
  idempotency_key,
  tenant,
  traceparent,
  tracestate,
  key,
  headers,
  produced_at,
  attempt,
  content_type,
};

native_field classify(std::string_view name) noexcept {
  struct entry {
    std::string_view name;
    native_field field;
  };
  static constexpr entry table[] = {
    {"id", native_field::id},
    {"topic", native_field::topic},
    {"payload", native_field::payload},
    {"idempotency_key", native_field::idempotency_key},
    {"tenant", native_field::tenant},
    {"traceparent", native_field::traceparent},
    {"tracestate", native_field::tracestate},
    {"key", native_field::key},
    {"headers", native_field::headers},
    {"produced_at", native_field::produced_at},
    {"attempt", native_field::attempt},
    {"content_type", native_field::content_type},
  };
  for (const auto& e : table)
    if (e.name == name)
      return e.field;
  return native_field::unknown;
}

// The storage of one decoded payload: its first bytes come from a buffer
// inside the resource, so one heap block (made by make_shared_resource) holds
// the resource and a small payload whole; the rest comes from the heap and
// is freed piece by piece. The buffer is used only while `set_payload` copies
// the payload in, on the decoding thread (`filling`); every later allocation
// (a handler copying the payload shares its storage) goes to the heap, so
// the resource, once shared, has no mutable state and is safe to use from
// several threads at once.
//
// Sized for the heap block: make_shared_resource's wrapper (16 bytes) and
// this resource (vtable, count, buffer) make a 168-byte request, a 176-byte
// block for glibc's malloc. The buffer is not over-aligned: allocations are
// aligned by address, which costs at most a few bytes of the buffer.
class payload_resource final : public json::memory_resource {
public:
  static constexpr size_t inline_bytes = 140;

  /// Set by `set_payload` around the copy into a fresh resource.
  static inline thread_local bool filling = false;

private:
  bool owns(const void* p) const noexcept {
    auto x = reinterpret_cast<uintptr_t>(p);
    auto lo = reinterpret_cast<uintptr_t>(buffer_);
    return x >= lo && x < lo + inline_bytes;
  }

  void* do_allocate(size_t n, size_t align) override {
    if (filling && align <= alignof(std::max_align_t)) {
      auto base = reinterpret_cast<uintptr_t>(buffer_);
      auto at = ((base + used_ + align - 1) & ~(align - 1)) - base;
      if (at + n <= inline_bytes) {
        used_ = static_cast<uint32_t>(at + n);
        return buffer_ + at;
      }
    }
    return ::operator new (n, std::align_val_t{align});
  }

  void do_deallocate(void* p, size_t n, size_t align) override {
    if (!owns(p)) // inline bytes go with the resource
      ::operator delete (p, n, std::align_val_t{align});
  }

  bool do_is_equal(const json::memory_resource& other) const noexcept override {
    return this == &other;
  }

  uint32_t used_ = 0;
  unsigned char buffer_[inline_bytes];
};

static_assert(sizeof(payload_resource) <= 152,
              "payload_resource outgrew its 176-byte heap block");

// Sets `env.payload` to a copy of `v` (which lives in the decoder's scratch
// arena) in a storage of its own: one allocation for a small payload instead
// of one per object, array and long string. `env.payload` is re-created
// rather than assigned, as assigning a value of another storage would copy
// it again into the default one.
void set_payload(envelope& env, const json::value& v) {
  switch (v.kind()) {
    case json::kind::object:
    case json::kind::array:
    case json::kind::string:
      break;
    default: // scalars allocate nothing
      env.payload = v;
      return;
  }
  auto sp = json::make_shared_resource<payload_resource>();
  struct fill_scope {
    fill_scope() {
      payload_resource::filling = true;
    }
    ~fill_scope() {
      payload_resource::filling = false;
    }
  };
  std::optional<json::value> copy;
  {
    fill_scope scope;
    copy.emplace(v, sp);
  }
  std::destroy_at(&env.payload);
  std::construct_at(&env.payload, std::move(*copy));
}

// -- native fast path ----------------------------------------------------------

// Decodes the common native envelope straight from the parser's events:
// known fields only, each at most once, each of the type it should have,
// with the payload built in its own storage as it is read. That skips the
// scratch tree (which costs about three times the tokenizing) and the copy
// out of it. Anything else - another wire format, unknown fields (kept in
// `extra` by the general path), a field of the wrong type, a duplicate,
// malformed JSON - makes the handler give up, and `decode_impl` decodes the
// bytes again the general way, which also words every error. The result is
// the same envelope the general path makes.
class native_handler {
public:
  static constexpr size_t max_object_size = static_cast<size_t>(-1);
  static constexpr size_t max_array_size = static_cast<size_t>(-1);
  static constexpr size_t max_key_size = static_cast<size_t>(-1);
  static constexpr size_t max_string_size = static_cast<size_t>(-1);

  explicit native_handler(json::storage_ptr scratch)
    : payload_(std::move(scratch), temp_, sizeof(temp_)) {
  }

  /// Starts a document that fills `env`.
  void start(envelope& env) noexcept {
    env_ = &env;
    depth_ = 0;
    seen_ = 0;
    field_ = native_field::unknown;
    in_payload_ = false;
    in_headers_ = false;
    key_.clear();
    header_.clear();
    value_.clear();
  }

  /// Frees what a document the handler gave up on left behind.
  void abandon() noexcept {
    payload_.reset();
    storage_ = {};
  }

  // -- structure --------------------------------------------------------------

  bool on_document_begin(json::error_code&) {
    return true;
  }

  bool on_document_end(json::error_code&) {
    return true;
  }

  bool on_object_begin(json::error_code& ec) {
    const bool headers = depth_ == 1 && field_ == native_field::headers;
    if (starts_payload())
      begin_payload();
    ++depth_;
    if (depth_ == 1 || in_payload_)
      return true; // the envelope itself, or inside the payload
    if (headers) {
      in_headers_ = true;
      return true;
    }
    return give_up(ec);
  }

  bool on_object_end(size_t n, json::error_code&) {
    --depth_;
    if (depth_ == 0)
      return true;
    if (in_headers_) {
      in_headers_ = false;
      return true;
    }
    payload_.push_object(n);
    return end_payload_value();
  }

  bool on_array_begin(json::error_code& ec) {
    if (starts_payload())
      begin_payload();
    ++depth_;
    return in_payload_ || give_up(ec);
  }

  bool on_array_end(size_t n, json::error_code&) {
    --depth_;
    payload_.push_array(n);
    return end_payload_value();
  }

  // -- keys -------------------------------------------------------------------

  bool on_key_part(json::string_view s, size_t, json::error_code&) {
    if (in_payload_)
      payload_.push_chars(s);
    else
      key_.append(s.data(), s.size());
    return true;
  }

  bool on_key(json::string_view s, size_t, json::error_code& ec) {
    if (in_payload_) {
      payload_.push_key(s);
      return true;
    }
    key_.append(s.data(), s.size());
    if (in_headers_) {
      header_.swap(key_);
      key_.clear();
      return true;
    }
    // depth 1: a field of the envelope
    field_ = classify(key_);
    key_.clear();
    if (field_ == native_field::unknown)
      return give_up(ec);
    auto bit = 1u << static_cast<unsigned>(field_);
    if ((seen_ & bit) != 0)
      return give_up(ec); // a duplicate: the general path decides
    seen_ |= bit;
    return true;
  }

  // -- scalars ----------------------------------------------------------------

  bool on_string_part(json::string_view s, size_t, json::error_code& ec) {
    if (starts_payload())
      begin_payload();
    if (in_payload_) {
      payload_.push_chars(s);
      return true;
    }
    if (in_headers_) {
      value_.append(s.data(), s.size());
      return true;
    }
    return append_to_field(s, ec);
  }

  bool on_string(json::string_view s, size_t, json::error_code& ec) {
    if (starts_payload())
      begin_payload();
    if (in_payload_) {
      payload_.push_string(s);
      return end_payload_value();
    }
    if (in_headers_) {
      value_.append(s.data(), s.size());
      env_->headers.insert_or_assign(std::move(header_), std::move(value_));
      header_.clear();
      value_.clear();
      return true;
    }
    return append_to_field(s, ec);
  }

  bool on_number_part(json::string_view, json::error_code&) {
    return true;
  }

  bool on_int64(int64_t x, json::string_view, json::error_code& ec) {
    return on_integer(x, ec);
  }

  bool on_uint64(uint64_t x, json::string_view, json::error_code& ec) {
    return on_integer(x, ec);
  }

  bool on_double(double x, json::string_view, json::error_code& ec) {
    if (push_payload_scalar([&] { payload_.push_double(x); }))
      return true;
    return give_up(ec);
  }

  bool on_bool(bool x, json::error_code& ec) {
    if (push_payload_scalar([&] { payload_.push_bool(x); }))
      return true;
    return give_up(ec);
  }

  bool on_null(json::error_code& ec) {
    if (push_payload_scalar([&] { payload_.push_null(); }))
      return true;
    // JSON null counts as absent for every other field.
    return depth_ == 1 || give_up(ec);
  }

  bool on_comment_part(json::string_view, json::error_code& ec) {
    return give_up(ec);
  }

  bool on_comment(json::string_view, json::error_code& ec) {
    return give_up(ec);
  }

private:
  // Stops the parse; `decode_impl` falls back to the general path.
  static bool give_up(json::error_code& ec) {
    ec = json::error::extra_data; // any error: the caller only checks it
    return false;
  }

  // The string field the current depth-1 value goes to, if any.
  std::string* string_target() noexcept {
    if (depth_ != 1 || in_payload_)
      return nullptr;
    switch (field_) {
      case native_field::id:
        return &env_->id;
      case native_field::topic:
        return &env_->topic;
      case native_field::idempotency_key:
        return &env_->idempotency_key;
      case native_field::tenant:
        return &env_->tenant;
      case native_field::traceparent:
        return &env_->traceparent;
      case native_field::tracestate:
        return &env_->tracestate;
      case native_field::key:
        return &env_->key;
      case native_field::produced_at:
        return &env_->produced_at;
      case native_field::content_type:
        return &env_->content_type;
      default:
        return nullptr;
    }
  }

  // Appends (part of) a depth-1 string value to its field.
  bool append_to_field(json::string_view s, json::error_code& ec) {
    auto* out = string_target();
    if (out == nullptr)
      return give_up(ec);
    out->append(s.data(), s.size());
    return true;
  }

  // An integer: part of the payload, an outbox row's numeric `id`, or the
  // `attempt` (a negative or too large one is an error the general path
  // words).
  template <class Int>
  bool on_integer(Int x, json::error_code& ec) {
    if (push_payload_scalar([&] {
          if constexpr (std::is_signed_v<Int>)
            payload_.push_int64(x);
          else
            payload_.push_uint64(x);
        }))
      return true;
    if (depth_ == 1 && field_ == native_field::id) {
      env_->id = std::to_string(x);
      return true;
    }
    if (depth_ == 1 && field_ == native_field::attempt
        && std::in_range<uint32_t>(x)) {
      env_->attempt = static_cast<uint32_t>(x);
      return true;
    }
    return give_up(ec);
  }

  // Whether the value that starts here is the payload itself.
  bool starts_payload() const noexcept {
    return depth_ == 1 && field_ == native_field::payload && !in_payload_;
  }

  // Builds the payload in a storage of its own from here on.
  void begin_payload() {
    in_payload_ = true;
    storage_ = json::make_shared_resource<payload_resource>();
    payload_.reset(storage_);
    payload_resource::filling = true;
  }

  // A scalar that is the payload or part of it: pushes it and returns true;
  // false when the scalar belongs to another field.
  template <class Push>
  bool push_payload_scalar(Push push) {
    if (starts_payload())
      begin_payload();
    if (!in_payload_)
      return false;
    push();
    return end_payload_value();
  }

  // After a value inside the payload: when it was the payload itself, moves
  // it into the envelope.
  bool end_payload_value() {
    if (depth_ > 1)
      return true; // still inside the payload
    payload_resource::filling = false;
    in_payload_ = false;
    auto v = payload_.release();
    std::destroy_at(&env_->payload);
    std::construct_at(&env_->payload, std::move(v));
    storage_ = {};
    return true;
  }

  envelope* env_ = nullptr;
  int depth_ = 0;
  unsigned seen_ = 0;
  native_field field_ = native_field::unknown;
  bool in_payload_ = false;
  bool in_headers_ = false;
  std::string key_;
  std::string header_;
  std::string value_;
  json::storage_ptr storage_;
  unsigned char temp_[1024];
  json::value_stack payload_;
};

// Applies one known native field; `v` may be moved from.
caf::error apply_native(native_field f, std::string_view name, json::value& v,
                        envelope& env) {
  switch (f) {
    case native_field::id:
      return read_id(name, v, env.id);
    case native_field::topic:
      return read_string(name, v, env.topic);
    case native_field::payload:
      set_payload(env, v);
      return {};
    case native_field::idempotency_key:
      return read_string(name, v, env.idempotency_key);
    case native_field::tenant:
      return read_string(name, v, env.tenant);
    case native_field::traceparent:
      return read_string(name, v, env.traceparent);
    case native_field::tracestate:
      return read_string(name, v, env.tracestate);
    case native_field::key:
      return read_string(name, v, env.key);
    case native_field::headers:
      return read_headers(v, env.headers);
    case native_field::produced_at:
      return read_string(name, v, env.produced_at);
    case native_field::attempt:
      return read_attempt(v, env.attempt);
    case native_field::content_type:
      return read_string(name, v, env.content_type);
    case native_field::unknown:
      break;
  }
  return {};
}

caf::error decode_native(json::object& obj, envelope& env) {
  env.format = wire_format::native;
  for (auto& kv : obj) {
    auto f = classify(kv.key());
    if (f == native_field::unknown) {
      env.extra.emplace(kv.key(), std::move(kv.value()));
      continue;
    }
    if (auto err = apply_native(f, kv.key(), kv.value(), env))
      return err;
  }
  return {};
}

// NestJS routes object patterns by their JSON with keys sorted, so equal
// patterns written in different key orders name the same topic.
json::value sorted_keys(const json::value& v) {
  if (auto* obj = v.if_object()) {
    std::vector<const json::key_value_pair*> items;
    items.reserve(obj->size());
    for (const auto& kv : *obj)
      items.push_back(&kv);
    std::sort(items.begin(), items.end(),
              [](auto* x, auto* y) { return x->key() < y->key(); });
    json::object result;
    result.reserve(items.size());
    for (auto* kv : items)
      result.emplace(kv->key(), sorted_keys(kv->value()));
    return result;
  }
  if (auto* arr = v.if_array()) {
    json::array result;
    result.reserve(arr->size());
    for (const auto& x : *arr)
      result.push_back(sorted_keys(x));
    return result;
  }
  return v;
}

caf::error read_pattern(const json::value& v, std::string& topic) {
  switch (v.kind()) {
    case json::kind::string:
      topic.assign(v.get_string().data(), v.get_string().size());
      return {};
    case json::kind::int64:
    case json::kind::uint64:
    case json::kind::double_:
      topic = json::serialize(v);
      return {};
    case json::kind::object:
      topic = json::serialize(sorted_keys(v));
      return {};
    default:
      return fail(field_error("pattern", "a string or an object", v));
  }
}

caf::error decode_nestjs(json::object& obj, envelope& env) {
  env.format = wire_format::nestjs;
  for (auto& kv : obj) {
    auto name = kv.key();
    if (name == "pattern") {
      if (auto err = read_pattern(kv.value(), env.topic))
        return err;
      continue;
    }
    if (name == "data") {
      set_payload(env, kv.value());
      continue;
    }
    // Everything else reads as in the native envelope, except the fields
    // `pattern` and `data` stand for.
    auto f = classify(name);
    if (f == native_field::unknown || f == native_field::topic
        || f == native_field::payload) {
      env.extra.emplace(name, std::move(kv.value()));
      continue;
    }
    if (auto err = apply_native(f, name, kv.value(), env))
      return err;
  }
  return {};
}

caf::error decode_cloudevent(json::object& obj, envelope& env) {
  env.format = wire_format::cloudevents;
  auto* version = obj.at("specversion").if_string();
  if (version == nullptr || *version != "1.0") {
    auto msg = field_error("specversion", "\"1.0\" (CloudEvents 1.0)",
                           obj.at("specversion"));
    return fail(std::move(msg));
  }
  if (obj.contains("data") && obj.contains("data_base64"))
    return fail("CloudEvent has both 'data' and 'data_base64'; "
                "at most one is allowed");
  for (auto& kv : obj) {
    auto name = kv.key();
    auto& v = kv.value();
    caf::error err;
    if (name == "specversion") {
      // Consumed by the detection; writing it back would turn the native
      // encoding into a CloudEvent again.
    } else if (name == "id") {
      err = read_id(name, v, env.id);
    } else if (name == "type") {
      err = read_string(name, v, env.topic);
    } else if (name == "data") {
      set_payload(env, v);
    } else if (name == "data_base64") {
      if (!v.is_string())
        err = fail(field_error(name, "a base64 string", v));
      else
        set_payload(env, v);
    } else if (name == "datacontenttype") {
      err = read_string(name, v, env.content_type);
    } else if (name == "traceparent") {
      err = read_string(name, v, env.traceparent);
    } else if (name == "tracestate") {
      err = read_string(name, v, env.tracestate);
    } else if (name == "partitionkey") {
      err = read_string(name, v, env.key);
    } else if (name == "time") {
      err = read_string(name, v, env.produced_at);
      if (!err)
        env.extra.emplace(name, v);
    } else {
      env.extra.emplace(name, std::move(v));
    }
    if (err)
      return err;
  }
  return {};
}

void fill_gaps(envelope& env, const transport_metadata& meta) {
  if (env.topic.empty())
    env.topic = meta.subject;
  if (env.key.empty())
    env.key = meta.key;
  const bool had_traceparent = !env.traceparent.empty();
  if (!had_traceparent)
    env.traceparent = meta.traceparent;
  // A tracestate belongs to its traceparent: take the broker's only when it
  // travels with the traceparent the envelope ends up with.
  if (env.tracestate.empty()
      && (!had_traceparent || meta.traceparent.empty()
          || env.traceparent == meta.traceparent))
    env.tracestate = meta.tracestate;
}

// Fills what the envelope left open from `meta`; a topic is required.
caf::expected<envelope> finish(envelope&& env, const transport_metadata& meta) {
  fill_gaps(env, meta);
  if (env.topic.empty())
    return fail("envelope has no topic and the transport gave no subject");
  return std::move(env);
}

caf::expected<envelope> decode_impl(std::string_view bytes,
                                    const transport_metadata& meta) {
  if (bytes.empty())
    return fail("empty input: expected a JSON object");
  // The parsed tree is scratch: the fields are copied out of it (the payload
  // and unknown fields into default storage by the assignments below, as the
  // storages differ), so it lives in a per-thread bump allocator over a
  // reused buffer, and the parser keeps its stack between calls. That is a
  // dozen fewer heap allocations per message.
  struct scratch_space {
    unsigned char buffer[8192];
    json::monotonic_resource arena{buffer, sizeof(buffer)};
    json::parser parser{json::storage_ptr{}, options()};
    static json::parse_options options() {
      json::parse_options opts;
      opts.max_depth = max_json_depth;
      return opts;
    }
  };
  thread_local scratch_space scratch;
  struct release_on_exit {
    scratch_space& s;
    ~release_on_exit() {
      s.parser.reset();
      s.arena.release();
    }
  };
  {
    // The common case first: a plain native envelope, decoded as it is read.
    thread_local json::basic_parser<native_handler> fast{
      scratch_space::options(), json::storage_ptr{}};
    envelope env;
    auto& handler = fast.handler();
    handler.start(env);
    fast.reset();
    json::error_code ec;
    size_t consumed = 0;
    {
      struct filling_off {
        ~filling_off() {
          payload_resource::filling = false;
        }
      } off;
      consumed = fast.write_some(false, bytes.data(), bytes.size(), ec);
    }
    if (!ec && consumed == bytes.size()) {
      return finish(std::move(env), meta);
    }
    handler.abandon();
  }
  auto& parser = scratch.parser;
  parser.reset(json::storage_ptr{&scratch.arena});
  release_on_exit release{scratch}; // runs after `root` is destroyed
  json::error_code ec;
  auto consumed = parser.write_some(bytes.data(), bytes.size(), ec);
  if (ec)
    return fail("malformed JSON at byte " + std::to_string(consumed) + ": "
                + ec.message());
  if (consumed != bytes.size())
    return fail("malformed JSON at byte " + std::to_string(consumed)
                + ": unexpected data after the JSON value");
  auto root = parser.release(); // in the arena's storage
  auto* obj = root.if_object();
  if (obj == nullptr)
    return fail(std::string{"envelope must be a JSON object, got "}
                + kind_name(root.kind()));
  envelope env;
  caf::error err;
  if (obj->contains("specversion"))
    err = decode_cloudevent(*obj, env);
  else if (obj->contains("pattern") && obj->contains("data")
           && !obj->contains("topic"))
    err = decode_nestjs(*obj, env);
  else
    err = decode_native(*obj, env);
  if (err)
    return err;
  return finish(std::move(env), meta);
}

} // namespace

caf::expected<envelope> decode_envelope(std::string_view bytes,
                                        const transport_metadata& meta) {
  try {
    return decode_impl(bytes, meta);
  } catch (const std::exception& ex) {
    return fail(std::string{"cannot decode envelope: "} + ex.what());
  } catch (...) {
    return fail("cannot decode envelope: unknown exception");
  }
}

std::string encode_envelope(const envelope& env) {
  json::object obj;
  obj.reserve(12 + env.extra.size());
  auto put = [&](std::string_view name, const std::string& value) {
    if (!value.empty())
      obj.emplace(name, value);
  };
  put("id", env.id);
  obj.emplace("topic", env.topic);
  obj.emplace("payload", env.payload);
  put("idempotency_key", env.idempotency_key);
  put("tenant", env.tenant);
  put("traceparent", env.traceparent);
  put("tracestate", env.tracestate);
  put("key", env.key);
  if (!env.headers.empty()) {
    json::object headers;
    headers.reserve(env.headers.size());
    for (const auto& [name, value] : env.headers)
      headers.emplace(name, value);
    obj.emplace("headers", std::move(headers));
  }
  put("produced_at", env.produced_at);
  if (env.attempt != 0)
    obj.emplace("attempt", env.attempt);
  put("content_type", env.content_type);
  for (const auto& kv : env.extra) {
    // Known fields are authoritative; `specversion` would make the decoder
    // read this native envelope as a CloudEvent.
    if (classify(kv.key()) != native_field::unknown
        || kv.key() == "specversion")
      continue;
    obj.emplace(kv.key(), kv.value());
  }
  return json::serialize(obj);
}

std::string dedupe_key(const envelope& env) {
  if (!env.idempotency_key.empty())
    return env.idempotency_key;
  if (!env.id.empty())
    return env.id;
  constexpr uint64_t fnv_offset = 14695981039346656037ull;
  constexpr uint64_t fnv_prime = 1099511628211ull;
  uint64_t hash = fnv_offset;
  auto feed = [&hash](std::string_view bytes) {
    for (auto c : bytes) {
      hash ^= static_cast<uint8_t>(c);
      hash *= fnv_prime;
    }
  };
  feed(env.topic);
  feed(std::string_view{"\0", 1});
  feed(json::serialize(env.payload));
  static constexpr char digits[] = "0123456789abcdef";
  std::string result = "h:";
  result.resize(2 + 16);
  for (size_t i = 0; i < 16; ++i)
    result[2 + i] = digits[(hash >> (60 - 4 * i)) & 0xF];
  return result;
}

} // namespace evmesh
