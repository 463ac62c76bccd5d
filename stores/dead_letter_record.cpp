#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include <boost/json.hpp>

#include "evmesh/stores.hpp"

namespace evmesh {

idempotency_store::~idempotency_store() = default;

caf::error idempotency_store::flush() {
  return caf::error{};
}

bool idempotency_store::remote() const noexcept {
  return false;
}

void idempotency_store::try_begin_many(std::span<const std::string_view> keys,
                                       caf::timespan lease,
                                       std::span<claim_result> out) {
  auto n = std::min(keys.size(), out.size());
  for (size_t i = 0; i < n; ++i)
    out[i] = try_begin(keys[i], lease);
}

caf::error idempotency_store::finish_many(std::span<const finish_op> ops,
                                          caf::timespan keep,
                                          std::span<caf::error> errors) {
  auto n = std::min(ops.size(), errors.size());
  caf::error first;
  for (size_t i = 0; i < n; ++i) {
    errors[i] = ops[i].kind == finish_op::commit ? commit(ops[i].key, keep)
                                                 : abort(ops[i].key);
    if (errors[i] && !first)
      first = errors[i];
  }
  return first;
}

dead_letter_store::~dead_letter_store() = default;

namespace {

namespace json = boost::json;

constexpr std::string_view ellipsis = "\xE2\x80\xA6"; // U+2026

bool is_continuation(unsigned char c) noexcept {
  return (c & 0xC0) == 0x80;
}

/// Length of the well-formed UTF-8 sequence at `s[i]`, or 0 if it is not one
/// (overlongs, surrogates and code points above U+10FFFF are ill-formed).
size_t utf8_sequence_length(std::string_view s, size_t i) noexcept {
  auto at = [&](size_t j) { return static_cast<unsigned char>(s[j]); };
  auto c = at(i);
  if (c < 0x80)
    return 1;
  size_t len = 0;
  unsigned char lo = 0x80;
  unsigned char hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0)
      lo = 0xA0;
    else if (c == 0xED)
      hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0)
      lo = 0x90;
    else if (c == 0xF4)
      hi = 0x8F;
  } else {
    return 0;
  }
  if (i + len > s.size())
    return 0;
  if (at(i + 1) < lo || at(i + 1) > hi)
    return 0;
  for (size_t j = 2; j < len; ++j)
    if (!is_continuation(at(i + j)))
      return 0;
  return len;
}

bool is_valid_utf8(std::string_view s) noexcept {
  for (size_t i = 0; i < s.size();) {
    auto len = utf8_sequence_length(s, i);
    if (len == 0)
      return false;
    i += len;
  }
  return true;
}

/// Replaces ill-formed bytes with U+FFFD so that the JSON we write is always
/// valid UTF-8 (error messages come from arbitrary libraries).
std::string sanitize_utf8(std::string_view s) {
  if (is_valid_utf8(s))
    return std::string{s};
  std::string out;
  out.reserve(s.size() + 8);
  for (size_t i = 0; i < s.size();) {
    auto len = utf8_sequence_length(s, i);
    if (len == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      out.append(s.substr(i, len));
      i += len;
    }
  }
  return out;
}

/// Cuts `s` to at most `max_bytes`, ending in an ellipsis when cut, without
/// splitting a UTF-8 sequence.
std::string truncate_utf8(std::string_view s, size_t max_bytes) {
  if (s.size() <= max_bytes)
    return std::string{s};
  if (max_bytes < ellipsis.size())
    return std::string{};
  auto cut = max_bytes - ellipsis.size();
  // s[cut] is the first byte dropped; if it continues a sequence, drop that
  // sequence entirely. A well-formed sequence has at most 3 continuations.
  auto pos = cut;
  for (int steps = 0; pos > 0 && steps < 3
                      && is_continuation(static_cast<unsigned char>(s[pos]));
       ++steps)
    --pos;
  if (is_continuation(static_cast<unsigned char>(s[pos])))
    pos = cut; // not UTF-8 anyway: cut at the byte limit
  std::string out{s.substr(0, pos)};
  out += ellipsis;
  return out;
}

std::string base64_encode(std::string_view in) {
  static constexpr char alphabet[]
    = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  auto byte = [&](size_t j) {
    return static_cast<uint32_t>(static_cast<unsigned char>(in[j]));
  };
  for (; i + 3 <= in.size(); i += 3) {
    auto n = (byte(i) << 16) | (byte(i + 1) << 8) | byte(i + 2);
    out += alphabet[(n >> 18) & 63];
    out += alphabet[(n >> 12) & 63];
    out += alphabet[(n >> 6) & 63];
    out += alphabet[n & 63];
  }
  if (auto rest = in.size() - i; rest > 0) {
    auto n = byte(i) << 16;
    if (rest == 2)
      n |= byte(i + 1) << 8;
    out += alphabet[(n >> 18) & 63];
    out += alphabet[(n >> 12) & 63];
    out += rest == 2 ? alphabet[(n >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

std::optional<std::string> base64_decode(std::string_view in) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z')
      return c - 'A';
    if (c >= 'a' && c <= 'z')
      return c - 'a' + 26;
    if (c >= '0' && c <= '9')
      return c - '0' + 52;
    if (c == '+')
      return 62;
    if (c == '/')
      return 63;
    return -1;
  };
  if (in.size() % 4 != 0)
    return std::nullopt;
  std::string out;
  out.reserve(in.size() / 4 * 3);
  for (size_t i = 0; i < in.size(); i += 4) {
    auto last = i + 4 == in.size();
    int v[4];
    int pad = 0;
    for (size_t j = 0; j < 4; ++j) {
      auto c = in[i + j];
      if (c == '=' && last && j >= 2) {
        v[j] = 0;
        ++pad;
      } else if (pad > 0 || (v[j] = value(c)) < 0) {
        return std::nullopt;
      }
    }
    auto n
      = static_cast<uint32_t>((v[0] << 18) | (v[1] << 12) | (v[2] << 6) | v[3]);
    out += static_cast<char>((n >> 16) & 0xFF);
    if (pad < 2)
      out += static_cast<char>((n >> 8) & 0xFF);
    if (pad < 1)
      out += static_cast<char>(n & 0xFF);
  }
  return out;
}

// -- decoding helpers ---------------------------------------------------------

/// Collects the first decoding problem; later reads become no-ops.
struct reader {
  const json::object& obj;
  std::string problem;

  const json::value* field(std::string_view name) {
    if (!problem.empty())
      return nullptr;
    auto i = obj.find(name);
    if (i == obj.end() || i->value().is_null())
      return nullptr;
    return &i->value();
  }

  void fail(std::string_view name, std::string_view expected) {
    if (problem.empty()) {
      problem = "field '";
      problem += name;
      problem += "' must be ";
      problem += expected;
    }
  }

  void read(std::string_view name, std::string& out) {
    if (auto v = field(name)) {
      if (auto s = v->if_string())
        out.assign(s->data(), s->size());
      else
        fail(name, "a string");
    }
  }

  void read(std::string_view name, bool& out) {
    if (auto v = field(name)) {
      if (auto b = v->if_bool())
        out = *b;
      else
        fail(name, "a boolean");
    }
  }

  template <class Int>
  void read(std::string_view name, Int& out) {
    if (auto v = field(name)) {
      if (auto x = to_int<Int>(*v))
        out = *x;
      else
        fail(name, "an integer in range");
    }
  }

  template <class Int>
  static std::optional<Int> to_int(const json::value& v) {
    using lim = std::numeric_limits<Int>;
    if (auto i = v.if_int64()) {
      if (*i < static_cast<int64_t>(lim::min())
          || (*i > 0
              && static_cast<uint64_t>(*i) > static_cast<uint64_t>(lim::max())))
        return std::nullopt;
      return static_cast<Int>(*i);
    }
    if (auto u = v.if_uint64()) {
      if (*u > static_cast<uint64_t>(lim::max()))
        return std::nullopt;
      return static_cast<Int>(*u);
    }
    return std::nullopt;
  }
};

} // namespace

void dead_letter_record::add_error(uint32_t attempt, int64_t at_ms,
                                   std::string_view message) {
  if (errors.size() >= dead_letter_limits::max_errors) {
    auto excess = errors.size() - dead_letter_limits::max_errors + 1;
    errors.erase(errors.begin(),
                 errors.begin() + static_cast<std::ptrdiff_t>(excess));
  }
  errors.push_back(
    attempt_error{attempt, at_ms,
                  truncate_utf8(sanitize_utf8(message),
                                dead_letter_limits::max_error_bytes)});
  // The first error is evicted after max_errors hops: keep its time here.
  if (first_failure_ms == 0 || at_ms < first_failure_ms)
    first_failure_ms = at_ms;
  last_failure_ms = std::max(last_failure_ms, at_ms);
  attempts = std::max(attempts, attempt);
}

bool matches(const dead_letter_query& q, const dead_letter_record& rec) {
  return (q.topic.empty() || q.topic == rec.topic)
         && (q.consumer.empty() || q.consumer == rec.consumer)
         && (q.category.empty() || q.category == rec.category)
         && (q.key.empty() || q.key == rec.key)
         && (q.since_ms == 0 || rec.last_failure_ms >= q.since_ms)
         && (q.until_ms == 0 || rec.last_failure_ms <= q.until_ms);
}

std::string to_json(const dead_letter_record& rec) {
  json::object obj;
  auto str = [&](std::string_view name, const std::string& value) {
    obj[name] = sanitize_utf8(value);
  };
  obj["id"] = rec.id;
  str("category", rec.category);
  str("reason", rec.reason);
  obj["attempts"] = rec.attempts;
  obj["first_failure_ms"] = rec.first_failure_ms;
  obj["last_failure_ms"] = rec.last_failure_ms;
  json::array errors;
  errors.reserve(rec.errors.size());
  for (auto& err : rec.errors) {
    json::object e;
    e["attempt"] = err.attempt;
    e["at_ms"] = err.at_ms;
    e["message"] = sanitize_utf8(err.message);
    errors.emplace_back(std::move(e));
  }
  obj["errors"] = std::move(errors);
  str("consumer", rec.consumer);
  str("pattern", rec.pattern);
  str("topic", rec.topic);
  str("key", rec.key);
  str("idempotency_key", rec.idempotency_key);
  str("transport", rec.transport);
  str("position", rec.position);
  str("node", rec.node);
  str("traceparent", rec.traceparent);
  // Verbatim: bytes that are not UTF-8 cannot be a JSON string, so they travel
  // base64-encoded in `original_base64` instead.
  if (is_valid_utf8(rec.original))
    obj["original"] = rec.original;
  else
    obj["original_base64"] = base64_encode(rec.original);
  obj["original_decoded"] = rec.original_decoded;
  obj["replayed_ms"] = rec.replayed_ms;
  return json::serialize(obj);
}

caf::expected<dead_letter_record>
dead_letter_from_json(std::string_view input) {
  auto fail = [](std::string what) {
    return make_error(errc::decode_error,
                      "invalid dead-letter record: " + std::move(what));
  };
  try {
    json::parse_options opts;
    opts.allow_invalid_utf8 = true; // tolerate records written by other tools
    boost::system::error_code ec;
    auto val = json::parse(json::string_view{input.data(), input.size()}, ec,
                           json::storage_ptr{}, opts);
    if (ec)
      return fail("not JSON (" + ec.message() + ")");
    auto obj = val.if_object();
    if (obj == nullptr)
      return fail("expected a JSON object");
    dead_letter_record rec;
    reader rd{*obj, {}};
    rd.read("id", rec.id);
    rd.read("category", rec.category);
    rd.read("reason", rec.reason);
    rd.read("attempts", rec.attempts);
    rd.read("first_failure_ms", rec.first_failure_ms);
    rd.read("last_failure_ms", rec.last_failure_ms);
    rd.read("consumer", rec.consumer);
    rd.read("pattern", rec.pattern);
    rd.read("topic", rec.topic);
    rd.read("key", rec.key);
    rd.read("idempotency_key", rec.idempotency_key);
    rd.read("transport", rec.transport);
    rd.read("position", rec.position);
    rd.read("node", rec.node);
    rd.read("traceparent", rec.traceparent);
    rd.read("original", rec.original);
    rd.read("original_decoded", rec.original_decoded);
    rd.read("replayed_ms", rec.replayed_ms);
    std::string encoded;
    rd.read("original_base64", encoded);
    if (!rd.problem.empty())
      return fail(std::move(rd.problem));
    if (!encoded.empty()) {
      auto decoded = base64_decode(encoded);
      if (!decoded)
        return fail("field 'original_base64' is not valid base64");
      rec.original = std::move(*decoded);
    }
    if (auto v = obj->find("errors");
        v != obj->end() && !v->value().is_null()) {
      auto arr = v->value().if_array();
      if (arr == nullptr)
        return fail("field 'errors' must be an array");
      // Stay bounded even if the producer of this JSON was not.
      auto skip = arr->size() > dead_letter_limits::max_errors
                    ? arr->size() - dead_letter_limits::max_errors
                    : size_t{0};
      for (size_t i = skip; i < arr->size(); ++i) {
        auto e = (*arr)[i].if_object();
        if (e == nullptr)
          return fail("entries of 'errors' must be objects");
        attempt_error err;
        reader erd{*e, {}};
        erd.read("attempt", err.attempt);
        erd.read("at_ms", err.at_ms);
        erd.read("message", err.message);
        if (!erd.problem.empty())
          return fail("errors[" + std::to_string(i) + "]: " + erd.problem);
        if (err.message.size() > dead_letter_limits::max_error_bytes)
          err.message = truncate_utf8(err.message,
                                      dead_letter_limits::max_error_bytes);
        rec.errors.push_back(std::move(err));
      }
    }
    return rec;
  } catch (const std::exception& ex) {
    return fail(ex.what());
  } catch (...) {
    return fail("unknown exception while decoding");
  }
}

} // namespace evmesh
