#include "evmesh/amqp.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include <amqp.h>
#include <amqp_framing.h>
#include <amqp_tcp_socket.h>
#include <boost/json.hpp>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "evmesh/config.hpp"
#include "evmesh/error.hpp"
#include "evmesh/pattern.hpp"

#include "delivery_assembler.hpp"

namespace evmesh {

namespace {

using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

// Channels of one connection: consuming (acks go here), publishing with
// confirms, and topology declarations (a failed passive declare closes its
// channel; it must not take the other two with it).
constexpr amqp_channel_t consume_ch = 1;
constexpr amqp_channel_t publish_ch = 2;
constexpr amqp_channel_t topology_ch = 3;

// Acks are sent in batches (one `multiple` basic.ack per batch where the
// delivery tags allow it): the I/O thread sends what collected once a quarter
// of the prefetch window (at most 256) is waiting, or this long after the
// first ack of a batch, whichever comes first. Either way the broker keeps at
// least three quarters of the window in flight, so throughput does not wait
// for acks, while one write (and one wake-up of the I/O thread) serves a whole
// batch instead of every message.
constexpr auto ack_delay = 2ms;
// Acks of deliveries completed out of order wait for the earlier ones (one
// `multiple` ack then covers them all), but no longer than this: behind a
// long-running handler they go out one by one.
constexpr auto ack_hold_max = 20ms;

// Header names evmesh writes and reads.
constexpr const char* key_header = "evmesh-key";
constexpr const char* subject_header = "evmesh-subject";
constexpr const char* marker_header = "evmesh-envelope";

// -- URL ----------------------------------------------------------------------

struct amqp_settings {
  std::string host;
  int port = 5672;
  std::string user = "guest";
  std::string password = "guest";
  std::string vhost = "/";
  std::string shown; // the URL for messages, password masked
  std::string queue;
  std::string exchange = "evmesh";
  std::string routing_key;
  bool nestjs = false;
  uint16_t prefetch = 256;
  bool create = true;
  bool quorum = false;
  bool persistent = true;
  caf::timespan confirm_timeout = 5s;
  caf::timespan connect_timeout = 2s;
  int heartbeat = 10;

  std::string retry_queue() const {
    return queue + ".retry";
  }

  std::string dlq() const {
    return queue + ".dlq";
  }
};

std::string percent_decode(std::string_view in) {
  std::string out;
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '%' && i + 2 < in.size()) {
      auto hex = std::string{in.substr(i + 1, 2)};
      char* end = nullptr;
      auto x = std::strtol(hex.c_str(), &end, 16);
      if (end == hex.c_str() + 2) {
        out += static_cast<char>(x);
        i += 2;
        continue;
      }
    }
    out += in[i];
  }
  return out;
}

caf::error url_error(std::string_view url, std::string what) {
  return make_error(errc::invalid_url,
                    "bad AMQP URL '" + std::string{url} + "': " + what
                      + " (expected amqp://[user:pass@]host[:port][/vhost]"
                        "?queue=Q[&prefetch=N], see docs/transports/amqp.md)");
}

caf::expected<int64_t> to_int(std::string_view url, std::string_view key,
                              std::string_view v, int64_t min, int64_t max) {
  int64_t x = 0;
  try {
    size_t used = 0;
    x = std::stoll(std::string{v}, &used);
    if (used != v.size())
      throw std::invalid_argument{"trailing"};
  } catch (...) {
    return url_error(url, std::string{key} + "=" + std::string{v}
                            + " is not an integer");
  }
  if (x < min || x > max)
    return url_error(url, std::string{key} + " must be in ["
                            + std::to_string(min) + ", " + std::to_string(max)
                            + "]");
  return x;
}

caf::expected<bool> to_bool(std::string_view url, std::string_view key,
                            const std::string& v) {
  if (v == "true")
    return true;
  if (v == "false")
    return false;
  return url_error(url, std::string{key} + " must be true or false");
}

caf::expected<amqp_settings> parse_amqp_url(std::string_view url) {
  constexpr std::string_view prefix = "amqp://";
  if (url.substr(0, 8) == "amqps://")
    return url_error(url, "amqps:// (TLS) is not supported yet; use amqp://");
  if (url.substr(0, prefix.size()) != prefix)
    return url_error(url, "the scheme must be amqp://");
  amqp_settings s;
  auto rest = url.substr(prefix.size());
  auto q = rest.find('?');
  auto hier = rest.substr(0, q);
  auto slash = hier.find('/');
  auto authority = hier.substr(0, slash);
  if (slash != std::string_view::npos) {
    auto path = hier.substr(slash + 1);
    if (!path.empty())
      s.vhost = percent_decode(path);
  }
  std::string masked_auth;
  if (auto at = authority.rfind('@'); at != std::string_view::npos) {
    auto cred = authority.substr(0, at);
    authority = authority.substr(at + 1);
    auto colon = cred.find(':');
    s.user = percent_decode(cred.substr(0, colon));
    s.password = colon == std::string_view::npos
                   ? std::string{}
                   : percent_decode(cred.substr(colon + 1));
    masked_auth = s.user + ":***@";
  }
  if (authority.empty())
    return url_error(url, "no host");
  if (auto colon = authority.rfind(':'); colon != std::string_view::npos) {
    auto port = to_int(url, "port", authority.substr(colon + 1), 1, 65535);
    if (!port)
      return port.error();
    s.port = static_cast<int>(*port);
    authority = authority.substr(0, colon);
  }
  s.host = std::string{authority};
  s.shown = "amqp://" + masked_auth + s.host + ":" + std::to_string(s.port)
            + "/" + (s.vhost == "/" ? std::string{"%2F"} : s.vhost);
  std::string query;
  if (q != std::string_view::npos)
    query = std::string{rest.substr(q + 1)};
  std::string_view qs = query;
  while (!qs.empty()) {
    auto amp = qs.find('&');
    auto kv = qs.substr(0, amp);
    qs = amp == std::string_view::npos ? std::string_view{}
                                       : qs.substr(amp + 1);
    if (kv.empty())
      continue;
    auto eq = kv.find('=');
    auto k = kv.substr(0, eq);
    auto v = eq == std::string_view::npos ? std::string{}
                                          : percent_decode(kv.substr(eq + 1));
    auto dur = [&](caf::timespan& out) -> caf::error {
      auto d = parse_duration(v);
      if (!d || d->count() <= 0)
        return url_error(url, std::string{k} + "=" + v
                                + " is not a positive duration (e.g. 5s, "
                                  "500ms)");
      out = *d;
      return {};
    };
    if (k == "queue") {
      s.queue = v;
    } else if (k == "prefetch") {
      auto x = to_int(url, k, v, 1, 65535);
      if (!x)
        return x.error();
      s.prefetch = static_cast<uint16_t>(*x);
    } else if (k == "exchange") {
      s.exchange = v;
    } else if (k == "routing_key") {
      s.routing_key = v;
    } else if (k == "format") {
      if (v != "native" && v != "nestjs")
        return url_error(url, "format must be native or nestjs");
      s.nestjs = v == "nestjs";
    } else if (k == "create") {
      auto x = to_bool(url, k, v);
      if (!x)
        return x.error();
      s.create = *x;
    } else if (k == "queue_type") {
      if (v != "classic" && v != "quorum")
        return url_error(url, "queue_type must be classic or quorum");
      s.quorum = v == "quorum";
    } else if (k == "persistent") {
      auto x = to_bool(url, k, v);
      if (!x)
        return x.error();
      s.persistent = *x;
    } else if (k == "confirm_timeout") {
      if (auto err = dur(s.confirm_timeout))
        return err;
    } else if (k == "connect_timeout") {
      if (auto err = dur(s.connect_timeout))
        return err;
    } else if (k == "heartbeat") {
      caf::timespan hb;
      if (auto err = dur(hb))
        return err;
      auto secs = std::chrono::duration_cast<std::chrono::seconds>(hb).count();
      if (secs < 1 || secs > 600)
        return url_error(url, "heartbeat must be between 1s and 600s");
      s.heartbeat = static_cast<int>(secs);
    } else {
      return url_error(url, "unknown parameter '" + std::string{k} + "'");
    }
  }
  if (s.queue.size() > 240)
    return url_error(url, "queue names are limited to 240 characters here "
                          "(RabbitMQ allows 255, minus '.retry')");
  if (s.queue.rfind("amq.", 0) == 0)
    return url_error(url, "queue names starting with 'amq.' are reserved by "
                          "RabbitMQ");
  return s;
}

// -- rabbitmq-c helpers --------------------------------------------------------

amqp_bytes_t bytes_of(const std::string& s) {
  return amqp_bytes_t{s.size(), const_cast<char*>(s.data())};
}

std::string str_of(amqp_bytes_t b) {
  if (b.len == 0 || b.bytes == nullptr)
    return {};
  return std::string{static_cast<const char*>(b.bytes), b.len};
}

timeval to_timeval(caf::timespan d) {
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(d).count();
  timeval tv;
  tv.tv_sec = static_cast<time_t>(us / 1'000'000);
  tv.tv_usec = static_cast<suseconds_t>(us % 1'000'000);
  return tv;
}

// The broker's reply code of a server exception (0 otherwise).
int reply_code(const amqp_rpc_reply_t& r) {
  if (r.reply_type != AMQP_RESPONSE_SERVER_EXCEPTION)
    return 0;
  if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD)
    return static_cast<amqp_connection_close_t*>(r.reply.decoded)->reply_code;
  if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD)
    return static_cast<amqp_channel_close_t*>(r.reply.decoded)->reply_code;
  return 0;
}

std::string describe(const amqp_rpc_reply_t& r) {
  switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
      return "ok";
    case AMQP_RESPONSE_NONE:
      return "no reply from the broker";
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
      return amqp_error_string2(r.library_error);
    case AMQP_RESPONSE_SERVER_EXCEPTION:
      if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
        auto* m = static_cast<amqp_connection_close_t*>(r.reply.decoded);
        return std::to_string(m->reply_code) + " " + str_of(m->reply_text);
      }
      if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        auto* m = static_cast<amqp_channel_close_t*>(r.reply.decoded);
        return std::to_string(m->reply_code) + " " + str_of(m->reply_text);
      }
      return "unexpected method from the broker";
  }
  return "unknown reply";
}

bool is_ok(const amqp_rpc_reply_t& r) {
  return r.reply_type == AMQP_RESPONSE_NORMAL;
}

const amqp_field_value_t* find_field(const amqp_table_t& t,
                                     std::string_view key) {
  for (int i = 0; i < t.num_entries; ++i) {
    auto& e = t.entries[i];
    if (std::string_view{static_cast<const char*>(e.key.bytes), e.key.len}
        == key)
      return &e.value;
  }
  return nullptr;
}

const amqp_field_value_t* find_header(const amqp_basic_properties_t& p,
                                      std::string_view key) {
  if ((p._flags & AMQP_BASIC_HEADERS_FLAG) == 0)
    return nullptr;
  return find_field(p.headers, key);
}

std::string field_string(const amqp_field_value_t* v) {
  if (v == nullptr)
    return {};
  if (v->kind == AMQP_FIELD_KIND_UTF8 || v->kind == AMQP_FIELD_KIND_BYTES)
    return str_of(v->value.bytes);
  return {};
}

int64_t field_int(const amqp_field_value_t* v) {
  if (v == nullptr)
    return 0;
  switch (v->kind) {
    case AMQP_FIELD_KIND_I8:
      return v->value.i8;
    case AMQP_FIELD_KIND_U8:
      return v->value.u8;
    case AMQP_FIELD_KIND_I16:
      return v->value.i16;
    case AMQP_FIELD_KIND_U16:
      return v->value.u16;
    case AMQP_FIELD_KIND_I32:
      return v->value.i32;
    case AMQP_FIELD_KIND_U32:
      return v->value.u32;
    case AMQP_FIELD_KIND_I64:
      return v->value.i64;
    case AMQP_FIELD_KIND_U64:
    case AMQP_FIELD_KIND_TIMESTAMP:
      return static_cast<int64_t>(v->value.u64);
    default:
      return 0;
  }
}

amqp_table_entry_t string_entry(const char* key, const std::string& value) {
  amqp_table_entry_t e;
  e.key = amqp_cstring_bytes(key);
  e.value.kind = AMQP_FIELD_KIND_UTF8;
  e.value.value.bytes = bytes_of(value);
  return e;
}

/// How often the broker delivered a message before, from its headers:
/// x-death counts (our retry queue, or any dead-lettering on the way),
/// x-delivery-count of quorum queues, or the redelivered flag.
uint32_t delivery_count(const amqp_basic_properties_t& p, bool redelivered) {
  int64_t before = 0;
  if (auto* death = find_header(p, "x-death");
      death != nullptr && death->kind == AMQP_FIELD_KIND_ARRAY) {
    auto& arr = death->value.array;
    for (int i = 0; i < arr.num_entries; ++i)
      if (arr.entries[i].kind == AMQP_FIELD_KIND_TABLE)
        before += std::max<int64_t>(
          0, field_int(find_field(arr.entries[i].value.table, "count")));
  }
  if (auto* dc = find_header(p, "x-delivery-count"))
    before += std::max<int64_t>(0, field_int(dc));
  else if (redelivered)
    before += 1;
  return static_cast<uint32_t>(std::min<int64_t>(before + 1, UINT32_MAX));
}

/// What a message published by another client (NestJS, a shell script)
/// says in its AMQP properties and lacks in its body: `id` from message_id,
/// `headers` from string headers and correlation_id. evmesh's own native
/// messages carry everything in the body and are left verbatim.
struct foreign_fields {
  std::string message_id;
  std::vector<std::pair<std::string, std::string>> headers;

  bool empty() const {
    return message_id.empty() && headers.empty();
  }
};

/// Collects `foreign_fields` from `p` (nothing for native messages).
void collect_foreign(const amqp_basic_properties_t& p, foreign_fields& out) {
  out.message_id.clear();
  out.headers.clear();
  if (field_string(find_header(p, marker_header)) == "native")
    return;
  if (p._flags & AMQP_BASIC_MESSAGE_ID_FLAG)
    out.message_id = str_of(p.message_id);
  if (p._flags & AMQP_BASIC_CORRELATION_ID_FLAG)
    out.headers.emplace_back("correlation_id", str_of(p.correlation_id));
  if (p._flags & AMQP_BASIC_HEADERS_FLAG) {
    for (int i = 0; i < p.headers.num_entries; ++i) {
      auto& e = p.headers.entries[i];
      auto key = str_of(e.key);
      if (key.rfind("x-", 0) == 0 || key.rfind("evmesh-", 0) == 0
          || key == "traceparent" || key == "tracestate")
        continue;
      if (e.value.kind == AMQP_FIELD_KIND_UTF8)
        out.headers.emplace_back(std::move(key), str_of(e.value.value.bytes));
    }
  }
}

/// Gives a foreign message's JSON body the fields `f` its properties had.
void merge_foreign(const foreign_fields& f, std::string& body) {
  if (f.empty())
    return;
  boost::json::error_code ec;
  auto v = boost::json::parse(body, ec);
  auto* obj = ec ? nullptr : v.if_object();
  if (obj == nullptr || obj->contains("specversion"))
    return; // not ours to touch: the codec reports bad bodies
  bool changed = false;
  if (!f.message_id.empty() && !obj->contains("id")) {
    (*obj)["id"] = f.message_id;
    changed = true;
  }
  if (!f.headers.empty()) {
    auto& h = (*obj)["headers"];
    if (h.is_null())
      h = boost::json::object{};
    if (auto* ho = h.if_object()) {
      for (auto& [k, val] : f.headers)
        if (!ho->contains(k)) {
          (*ho)[k] = val;
          changed = true;
        }
    }
  }
  if (changed)
    body = boost::json::serialize(v);
}

/// `order.>` (NATS-style, as handlers write it) → `order.#` (AMQP topic).
std::string binding_key(const std::string& pattern) {
  std::string out;
  size_t start = 0;
  while (start <= pattern.size()) {
    auto dot = pattern.find('.', start);
    auto token = pattern.substr(
      start, dot == std::string::npos ? std::string::npos : dot - start);
    if (!out.empty())
      out += '.';
    out += token == ">" ? std::string{"#"} : token;
    if (dot == std::string::npos)
      break;
    start = dot + 1;
  }
  return out;
}

/// The envelope as a NestJS event: `{"pattern": topic, "data": payload}`
/// plus the envelope's other fields (the codec reads them back) except `id`:
/// NestJS takes a packet with an `id` for a request and answers to its
/// reply queue. The id travels as the AMQP message_id instead.
std::string encode_nestjs(const envelope& env) {
  auto native = boost::json::parse(encode_envelope(env));
  boost::json::object out;
  out["pattern"] = env.topic;
  out["data"] = env.payload;
  for (auto& kv : native.as_object())
    if (kv.key() != "topic" && kv.key() != "payload" && kv.key() != "id")
      out[kv.key()] = kv.value();
  return boost::json::serialize(out);
}

// -- connections ---------------------------------------------------------------

struct conn_deleter {
  void operator()(amqp_connection_state_t c) const {
    amqp_destroy_connection(c);
  }
};

using conn_ptr = std::unique_ptr<amqp_connection_state_t_, conn_deleter>;

// Answers a channel.close the broker sent and reopens the channel.
caf::error reopen_channel(amqp_connection_state_t c, amqp_channel_t ch) {
  amqp_channel_close_ok_t ok{};
  amqp_send_method(c, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
  amqp_channel_open(c, ch);
  auto r = amqp_get_rpc_reply(c);
  if (!is_ok(r))
    return make_error(errc::unavailable, "amqp: cannot reopen channel "
                                           + std::to_string(ch) + ": "
                                           + describe(r));
  return {};
}

caf::expected<conn_ptr> open_connection(const amqp_settings& s,
                                        const std::string& name) {
  conn_ptr c{amqp_new_connection()};
  if (!c)
    return make_error(errc::io_error, "amqp: out of memory");
  auto* sock = amqp_tcp_socket_new(c.get());
  if (sock == nullptr)
    return make_error(errc::io_error, "amqp: cannot create a socket");
  auto tv = to_timeval(s.connect_timeout);
  if (auto rc = amqp_socket_open_noblock(sock, s.host.c_str(), s.port, &tv);
      rc != AMQP_STATUS_OK)
    return make_error(errc::unavailable,
                      "cannot connect to " + s.shown + ": "
                        + amqp_error_string2(rc)
                        + " (connection refused or no answer within "
                        + format_duration(s.connect_timeout)
                        + ") — is rabbitmq-server running there?");
  auto handshake = to_timeval(std::max<caf::timespan>(s.connect_timeout, 5s));
  amqp_set_handshake_timeout(c.get(), &handshake);
  std::string product = "evmesh";
  amqp_table_entry_t props_entries[] = {
    string_entry("connection_name", name),
    string_entry("product", product),
  };
  amqp_table_t props{2, props_entries};
  auto r = amqp_login_with_properties(c.get(), s.vhost.c_str(), 0, 131072,
                                      s.heartbeat, &props,
                                      AMQP_SASL_METHOD_PLAIN, s.user.c_str(),
                                      s.password.c_str());
  if (!is_ok(r)) {
    auto code = reply_code(r);
    auto why = describe(r);
    if (code == AMQP_ACCESS_REFUSED
        || (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION
            && (r.library_error == AMQP_STATUS_CONNECTION_CLOSED
                || r.library_error == AMQP_STATUS_SOCKET_ERROR)))
      return make_error(errc::invalid_config,
                        "cannot connect to " + s.shown
                          + ": authentication failed for user '" + s.user
                          + "' (" + why
                          + ") — check user:pass@ in the URL (RabbitMQ's "
                            "guest user may only connect from localhost)");
    if (code == AMQP_NOT_ALLOWED)
      return make_error(errc::invalid_config,
                        "cannot connect to " + s.shown + ": vhost '" + s.vhost
                          + "' does not exist or user '" + s.user
                          + "' may not use it (" + why
                          + ") — create it (rabbitmqctl add_vhost) and grant "
                            "permissions, or fix the URL path");
    return make_error(errc::unavailable, "cannot connect to " + s.shown
                                           + ": login failed: " + why);
  }
  auto rpc = to_timeval(std::max<caf::timespan>(s.confirm_timeout, 5s));
  amqp_set_rpc_timeout(c.get(), &rpc);
  for (auto ch : {consume_ch, publish_ch, topology_ch}) {
    amqp_channel_open(c.get(), ch);
    r = amqp_get_rpc_reply(c.get());
    if (!is_ok(r))
      return make_error(errc::unavailable, "amqp: cannot open a channel on "
                                             + s.shown + ": " + describe(r));
  }
  amqp_confirm_select(c.get(), publish_ch);
  r = amqp_get_rpc_reply(c.get());
  if (!is_ok(r))
    return make_error(errc::unavailable,
                      "amqp: the broker refused publisher confirms on "
                        + s.shown + ": " + describe(r));
  if (!s.exchange.empty() && s.exchange.rfind("amq.", 0) != 0) {
    amqp_exchange_declare(c.get(), topology_ch, bytes_of(s.exchange),
                          amqp_cstring_bytes("topic"), 0, 1, 0, 0,
                          amqp_empty_table);
    r = amqp_get_rpc_reply(c.get());
    if (!is_ok(r))
      return make_error(errc::invalid_config,
                        "amqp: cannot declare the topic exchange '" + s.exchange
                          + "' on " + s.shown + ": " + describe(r)
                          + " — it may exist with another type; choose "
                            "another exchange= or delete it");
  }
  return c;
}

// Declares (or checks) a queue on the topology channel. `passive` only checks
// existence; a 404 then yields errc::not_found (and the channel reopened).
caf::error declare_queue(amqp_connection_state_t c, const amqp_settings& s,
                         const std::string& name, bool passive,
                         amqp_table_t args) {
  amqp_queue_declare(c, topology_ch, bytes_of(name), passive ? 1 : 0, 1, 0, 0,
                     args);
  auto r = amqp_get_rpc_reply(c);
  if (is_ok(r))
    return {};
  auto code = reply_code(r);
  auto why = describe(r);
  if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION
      && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD)
    if (auto err = reopen_channel(c, topology_ch))
      return err;
  if (code == AMQP_NOT_FOUND)
    return make_error(errc::not_found, "amqp: queue '" + name
                                         + "' does not exist in vhost '"
                                         + s.vhost + "' on " + s.shown);
  if (code == AMQP_PRECONDITION_FAILED)
    return make_error(errc::invalid_config,
                      "amqp: queue '" + name + "' exists on " + s.shown
                        + " with other arguments (" + why
                        + ") — delete it and let evmesh declare it, or "
                          "declare it as docs/transports/amqp.md shows");
  return make_error(errc::unavailable, "amqp: cannot declare queue '" + name
                                         + "' on " + s.shown + ": " + why);
}

struct message_box {
  amqp_message_t m{};
  bool owned = false;
  ~message_box() {
    if (owned)
      amqp_destroy_message(&m);
  }
};

// The deliveries of the consuming channel in delivery order (tags only grow
// on a channel) with what became of them: still open, acked by the caller
// but not yet on the wire, or settled on the wire (a nack, a single ack, a
// retry's ack). Acks go out as one `multiple` basic.ack for the longest
// prefix with nothing open (every tag below it is settled, so the broker acks
// exactly those); acks above the first open delivery wait for it to settle
// (see flush_window). No allocation per message: entries sit in a deque,
// settled ones leave from the front, and the deque is compacted when a
// long-held delivery at the front lets settled ones pile up behind it.
// Each open delivery keeps what a retry copy needs (encoded properties,
// routing key, body) until it is settled; the buffer then goes back to a
// pool of spares the next deliveries reuse (all on the I/O thread).
class delivery_window {
public:
  void add(uint64_t tag, internal::retained_delivery copy) {
    tags_.push_back({tag, open, std::move(copy)});
    ++open_;
  }

  /// What open delivery `tag` retained (nullptr when it is not open).
  const internal::retained_delivery* message(uint64_t tag) {
    auto* e = find(tag);
    return e != nullptr && e->state == open ? &e->copy : nullptr;
  }

  /// A buffer for the next delivery's retained copy (a spare when there is
  /// one).
  internal::retained_delivery spare() {
    if (spares_.empty())
      return {};
    auto r = std::move(spares_.back());
    spares_.pop_back();
    return r;
  }

  /// The caller acked `tag`; false when it is not an open delivery.
  bool mark_acked(uint64_t tag) {
    auto* e = find(tag);
    if (e == nullptr || e->state != open)
      return false;
    e->state = acked;
    recycle(e->copy);
    --open_;
    ++waiting_;
    return true;
  }

  /// A terminal frame for `tag` is on the wire (nack, single ack).
  void mark_done(uint64_t tag) {
    auto* e = find(tag);
    if (e == nullptr || e->state == done)
      return;
    if (e->state == open) {
      --open_;
      recycle(e->copy);
    } else {
      --waiting_;
    }
    e->state = done;
  }

  /// Pops the prefix without open deliveries; returns the highest acked tag
  /// in it (one `multiple` ack covers them all), 0 when there is none.
  uint64_t take_prefix() {
    uint64_t top = 0;
    while (!tags_.empty() && tags_.front().state != open) {
      if (tags_.front().state == acked) {
        top = tags_.front().tag;
        --waiting_;
      }
      tags_.pop_front();
    }
    if (tags_.size() > 1024 && tags_.size() > 4 * (open_ + waiting_))
      compact();
    return top;
  }

  /// Acked deliveries waiting behind an open one.
  size_t waiting() const {
    return waiting_;
  }

  /// Calls `send(tag)` for every waiting ack (to send it singly), in order,
  /// and marks them done; stops at the first `send` returning false.
  template <class F>
  void send_waiting(F send) {
    for (auto& e : tags_) {
      if (waiting_ == 0)
        break;
      if (e.state != acked)
        continue;
      if (!send(e.tag))
        return;
      e.state = done;
      --waiting_;
    }
  }

  void clear() {
    tags_.clear();
    open_ = 0;
    waiting_ = 0;
  }

private:
  enum state_t : uint8_t { open, acked, done };

  struct entry {
    uint64_t tag;
    state_t state;
    internal::retained_delivery copy;
  };

  // Keeps the buffer of a settled delivery for reuse: at most max_spares of
  // them, none larger than 64 KiB.
  void recycle(internal::retained_delivery& copy) {
    if (spares_.size() < max_spares && copy.data.capacity() >= 64
        && copy.data.capacity() <= 65536)
      spares_.push_back(std::move(copy));
    copy.data = std::string{};
  }

  static constexpr size_t max_spares = 1024;

  entry* find(uint64_t tag) {
    auto i
      = std::lower_bound(tags_.begin(), tags_.end(), tag,
                         [](const entry& e, uint64_t t) { return e.tag < t; });
    if (i == tags_.end() || i->tag != tag)
      return nullptr;
    return &*i;
  }

  void compact() {
    std::deque<entry> kept;
    for (auto& e : tags_)
      if (e.state != done)
        kept.push_back(std::move(e));
    tags_.swap(kept);
  }

  std::deque<entry> tags_;
  std::vector<internal::retained_delivery> spares_;
  size_t open_ = 0;
  size_t waiting_ = 0;
};

// "amqp:Q#<gen>.<dtag>" without temporaries.
void append_uint(std::string& out, uint64_t x) {
  char buf[24];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), x);
  static_cast<void>(ec);
  out.append(buf, end);
}

// -- the transport -------------------------------------------------------------

std::atomic<uint64_t> next_tag{1};
std::atomic<uint64_t> next_consumer{1};

// A delivery read from the broker, waiting for poll.
struct ready_message {
  raw_message raw;
  uint64_t gen = 0;
  uint64_t dtag = 0;
};

// A delivery handed out by poll, waiting for its terminal action (what a
// retry needs of it stays in the I/O thread's delivery_window).
struct held_message {
  uint64_t gen = 0;
  uint64_t dtag = 0;
};

// The deliveries handed out by poll and not settled yet, by tag. Tags only
// grow (poll hands them out in order under the transport's lock), so entries
// sit in a deque in tag order: a lookup is a binary search, settled entries
// leave from the front, and the deque is compacted when a long-held delivery
// at the front lets settled ones pile up behind it. No allocation per
// message, unlike a hash map's node.
class held_queue {
public:
  void push(uint64_t tag, held_message h) {
    entries_.push_back({tag, h, true});
    ++live_;
  }

  /// The unsettled delivery `tag` (nullptr when there is none).
  const held_message* find(uint64_t tag) const {
    auto i = lower_bound(tag);
    if (i == entries_.end() || i->tag != tag || !i->live)
      return nullptr;
    return &i->h;
  }

  /// Takes the unsettled delivery `tag` out; false when there is none.
  bool take(uint64_t tag, held_message& out) {
    auto i = lower_bound(tag);
    if (i == entries_.end() || i->tag != tag || !i->live)
      return false;
    out = i->h;
    i->live = false;
    --live_;
    while (!entries_.empty() && !entries_.front().live)
      entries_.pop_front();
    if (entries_.size() > 1024 && entries_.size() > 4 * live_) {
      std::deque<entry> kept;
      for (auto& e : entries_)
        if (e.live)
          kept.push_back(e);
      entries_.swap(kept);
    }
    return true;
  }

  void clear() {
    entries_.clear();
    live_ = 0;
  }

private:
  struct entry {
    uint64_t tag;
    held_message h;
    bool live;
  };

  std::deque<entry>::const_iterator lower_bound(uint64_t tag) const {
    return std::lower_bound(entries_.begin(), entries_.end(), tag,
                            [](const entry& e, uint64_t t) {
                              return e.tag < t;
                            });
  }

  std::deque<entry>::iterator lower_bound(uint64_t tag) {
    return std::lower_bound(entries_.begin(), entries_.end(), tag,
                            [](const entry& e, uint64_t t) {
                              return e.tag < t;
                            });
  }

  std::deque<entry> entries_;
  size_t live_ = 0;
};

// What the I/O thread publishes.
struct outgoing {
  std::string exchange;
  std::string routing_key;
  std::string body;
  std::string message_id;
  std::string correlation_id;
  std::string type;
  std::string expiration;
  std::vector<std::pair<std::string, std::string>> headers;
  bool persistent = true;
  bool mandatory = true;
};

class amqp_transport : public transport {
public:
  amqp_transport(amqp_settings s, conn_ptr conn, std::string node)
    : settings_(std::move(s)), node_(std::move(node)), conn_(std::move(conn)) {
    event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    ack_batch_ = std::clamp<size_t>(settings_.prefetch / 4, 1, 256);
    connected_ = true;
    gen_ = 1;
    io_ = std::thread{[this] { io_main(); }};
  }

  ~amqp_transport() override {
    close();
    if (event_fd_ >= 0)
      ::close(event_fd_);
  }

  std::string_view scheme() const noexcept override {
    return "amqp";
  }

  transport_capabilities capabilities() const noexcept override {
    return {true, true, true, true};
  }

  bool connected() const noexcept override {
    return connected_;
  }

  caf::error subscribe(const std::vector<std::string>& patterns) override {
    if (subscribed_)
      return make_error(errc::invalid_state,
                        "amqp transport: subscribed twice");
    if (closed_)
      return make_error(errc::invalid_state,
                        "amqp transport: subscribe after close");
    if (settings_.queue.empty())
      return make_error(errc::invalid_config,
                        "amqp: " + settings_.shown
                          + " has no queue= — name the queue the processes "
                            "of this service share");
    std::vector<std::string> keys;
    for (auto& p : patterns)
      keys.push_back(binding_key(p));
    auto err = call_io(
      [this, keys]() -> caf::error {
        bindings_ = keys;
        if (!conn_)
          return make_error(errc::unavailable,
                            "amqp: not connected to " + settings_.shown);
        if (auto e = setup_consumer())
          return e;
        consuming_ = true;
        return {};
      },
      settings_.confirm_timeout * 4);
    if (err)
      return err;
    subscribed_ = true;
    return {};
  }

  caf::error poll(size_t max, std::vector<raw_message>& out) override {
    return poll_through_batch(max, out);
  }

  caf::error poll_into(size_t max, raw_batch& out) override {
    if (!subscribed_)
      return make_error(errc::invalid_state,
                        "amqp transport: poll before subscribe");
    if (closed_)
      return make_error(errc::invalid_state,
                        "amqp transport: poll after close (make a new "
                        "transport to consume again)");
    std::lock_guard guard{mtx_};
    size_t n = 0;
    while (n < max && ready_head_ < ready_.size()) {
      auto& r = ready_[ready_head_++];
      r.raw.tag = next_tag++;
      held_.push(r.raw.tag, held_message{r.gen, r.dtag});
      out.add() = std::move(r.raw);
      ++n;
    }
    if (ready_head_ == ready_.size()) {
      ready_.clear(); // keeps its capacity for the I/O thread (flush_ready)
      ready_head_ = 0;
    }
    // The source waits for a wakeup whenever it got fewer than it asked for
    // (or nothing is left): the I/O thread calls it when it queues more.
    waiting_ = n < max || ready_.empty();
    return {};
  }

  caf::error ack(uint64_t tag) override {
    // Acks bypass the command queue: they collect in acks_in_ and the I/O
    // thread sends them in batches (see ack_delay). The first ack of a batch
    // wakes it (to start the batch's clock), a full batch wakes it again.
    held_message h;
    bool wake = false;
    bool current = false;
    {
      std::lock_guard guard{mtx_};
      if (!held_.take(tag, h))
        return not_ours("ack", tag);
      current = h.gen == gen_;
      if (current) {
        acks_in_.push_back({h.gen, h.dtag});
        auto n = acks_in_.size();
        wake = n == 1 || n == ack_batch_;
      }
    }
    if (!current)
      return lost_connection_error();
    if (wake)
      signal();
    return {};
  }

  caf::error nack(uint64_t tag, caf::timespan delay) override {
    held_message h;
    if (auto err = take(tag, "nack", h))
      return err;
    auto ms = std::chrono::ceil<std::chrono::milliseconds>(delay).count();
    if (ms <= 0) {
      post(command{command::nack, h.gen, h.dtag, {}});
      return {};
    }
    auto held = std::make_shared<held_message>(std::move(h));
    post(
      command{command::run, 0, 0, [this, held, ms] { io_retry(*held, ms); }});
    return {};
  }

  caf::error dead_letter(uint64_t tag, const dead_letter_record& rec) override {
    uint64_t gen = 0;
    {
      std::lock_guard guard{mtx_};
      auto* h = held_.find(tag);
      if (h == nullptr)
        return not_ours("dead_letter", tag);
      gen = h->gen;
    }
    if (gen != gen_)
      return lost_connection_error();
    outgoing out;
    out.exchange = "";
    out.routing_key = settings_.dlq();
    out.body = to_json(rec);
    out.persistent = true;
    out.headers = {{"evmesh-category", rec.category},
                   {"evmesh-consumer", rec.consumer},
                   {"evmesh-pattern", rec.pattern},
                   {"evmesh-topic", rec.topic},
                   {"evmesh-queue", settings_.queue},
                   {"evmesh-attempts", std::to_string(rec.attempts)},
                   {"evmesh-reason", rec.reason.substr(0, 512)}};
    if (!rec.traceparent.empty())
      out.headers.emplace_back("traceparent", rec.traceparent);
    if (auto err = publish_confirmed(std::move(out)))
      return make_error(errc::unavailable,
                        "amqp: publishing the dead letter to '"
                          + settings_.dlq()
                          + "' was not confirmed: " + render(err));
    return {};
  }

  caf::error extend(uint64_t tag) override {
    // RabbitMQ has no per-message ack deadline to extend (only the channel's
    // consumer_timeout, 30 minutes by default).
    std::lock_guard guard{mtx_};
    if (held_.find(tag) == nullptr)
      return not_ours("extend", tag);
    return {};
  }

  caf::error publish(const envelope& env) override {
    if (closed_)
      return make_error(errc::invalid_state,
                        "amqp transport: publish after close");
    outgoing out;
    out.exchange = settings_.exchange;
    out.routing_key = settings_.routing_key.empty() ? env.topic
                                                    : settings_.routing_key;
    out.body = settings_.nestjs ? encode_nestjs(env) : encode_envelope(env);
    out.persistent = settings_.persistent;
    out.message_id = env.id;
    out.type = env.topic;
    if (auto i = env.headers.find("correlation_id"); i != env.headers.end())
      out.correlation_id = i->second;
    out.headers.emplace_back(marker_header,
                             settings_.nestjs ? "nestjs" : "native");
    if (!env.traceparent.empty())
      out.headers.emplace_back("traceparent", env.traceparent);
    if (!env.tracestate.empty())
      out.headers.emplace_back("tracestate", env.tracestate);
    if (!env.key.empty())
      out.headers.emplace_back(key_header, env.key);
    for (auto& [k, v] : env.headers)
      if (k.rfind("x-", 0) != 0 && k.rfind("evmesh-", 0) != 0
          && k != "traceparent" && k != "tracestate")
        out.headers.emplace_back(k, v);
    return publish_confirmed(std::move(out));
  }

  void set_wakeup(std::function<void()> fn) override {
    std::lock_guard guard{mtx_};
    wakeup_ = std::move(fn);
  }

  caf::error close() override {
    if (closed_.exchange(true))
      return {};
    {
      std::lock_guard guard{mtx_};
      stop_ = true;
      wakeup_ = nullptr;
    }
    signal();
    if (io_.joinable())
      io_.join();
    std::vector<ready_message> ready;
    {
      std::lock_guard guard{mtx_};
      ready.swap(ready_);
      ready_head_ = 0;
      held_.clear();
    }
    return {};
  }

private:
  struct command {
    enum kind_t { nack, run } kind;
    uint64_t gen;
    uint64_t dtag;
    std::function<void()> fn;
  };

  struct pending_confirm {
    std::string exchange;
    std::string routing_key;
    bool returned = false;
    std::function<void(caf::error)> done;
  };

  // -- called from other threads ----------------------------------------------

  caf::error not_ours(const char* what, uint64_t tag) const {
    return make_error(errc::invalid_state,
                      std::string{"amqp transport: "} + what + " of tag "
                        + std::to_string(tag)
                        + " which is not an unacked delivery of this "
                          "consumer");
  }

  caf::error lost_connection_error() const {
    return make_error(errc::unavailable,
                      "amqp: the connection that delivered this message was "
                      "lost; the broker delivers it again");
  }

  caf::error take(uint64_t tag, const char* what, held_message& out) {
    {
      std::lock_guard guard{mtx_};
      if (!held_.take(tag, out))
        return not_ours(what, tag);
    }
    if (out.gen != gen_)
      return lost_connection_error();
    return {};
  }

  void signal() {
    uint64_t one = 1;
    auto rc = ::write(event_fd_, &one, sizeof(one));
    static_cast<void>(rc);
  }

  void post(command c) {
    bool was_empty = false;
    {
      std::lock_guard guard{mtx_};
      was_empty = commands_.empty();
      commands_.push_back(std::move(c));
    }
    if (was_empty)
      signal();
  }

  // Runs `fn` on the I/O thread and waits (bounded) for its result.
  caf::error call_io(std::function<caf::error()> fn, caf::timespan limit) {
    auto result = std::make_shared<std::promise<caf::error>>();
    auto fut = result->get_future();
    post(command{command::run, 0, 0,
                 [fn = std::move(fn), result] { result->set_value(fn()); }});
    if (fut.wait_for(limit) != std::future_status::ready)
      return make_error(errc::unavailable,
                        "amqp: no answer from the I/O thread within "
                          + format_duration(limit) + " (" + settings_.shown
                          + ")");
    return fut.get();
  }

  caf::error publish_confirmed(outgoing out) {
    auto result = std::make_shared<std::promise<caf::error>>();
    auto fut = result->get_future();
    auto msg = std::make_shared<outgoing>(std::move(out));
    post(command{command::run, 0, 0, [this, msg, result] {
                   io_publish(*msg, nullptr, [result](caf::error err) {
                     result->set_value(std::move(err));
                   });
                 }});
    if (fut.wait_for(settings_.confirm_timeout) != std::future_status::ready)
      return make_error(errc::unavailable,
                        "amqp: the broker did not confirm the publish to '"
                          + msg->routing_key + "' within "
                          + format_duration(settings_.confirm_timeout));
    return fut.get();
  }

  // -- the I/O thread ----------------------------------------------------------

  void io_main() {
    auto backoff = 250ms;
    auto next_attempt = clock_type::now();
    for (;;) {
      std::deque<command> cmds;
      bool stopping = false;
      {
        std::lock_guard guard{mtx_};
        cmds.swap(commands_);
        stopping = stop_;
        take_acks(stopping || !cmds.empty());
      }
      // Acks first: a command's own settlement (a nack, a retry's ack) comes
      // after the acks the source sent before it.
      flush_acks(stopping);
      for (auto& c : cmds)
        run(c);
      flush_window(stopping);
      if (stopping && commands_empty()) {
        shutdown();
        return;
      }
      if (!conn_) {
        if (clock_type::now() >= next_attempt) {
          if (reconnect()) {
            backoff = 250ms;
          } else {
            next_attempt = clock_type::now() + backoff;
            backoff = std::min<std::chrono::milliseconds>(backoff * 2, 5s);
          }
        } else {
          wait_event(std::chrono::duration_cast<std::chrono::milliseconds>(
            next_attempt - clock_type::now()));
        }
        continue;
      }
      pump(pump_timeout());
    }
  }

  // Moves the acks the source collected into acks_ when a batch is full, its
  // time is up, or `now` (a command or close is waiting). Caller holds mtx_.
  void take_acks(bool now) {
    if (acks_in_.empty()) {
      ack_due_.reset();
      return;
    }
    if (!now && acks_in_.size() < ack_batch_) {
      auto t = clock_type::now();
      if (!ack_due_)
        ack_due_ = t + ack_delay;
      if (t < *ack_due_)
        return;
    }
    for (auto [gen, dtag] : acks_in_)
      if (gen == gen_)
        acks_.push_back(dtag);
    acks_in_.clear();
    ack_due_.reset();
  }

  // How long pump may wait for the socket: until the pending ack batch or
  // the acks waiting behind an open delivery are due, else 1s (heartbeats
  // are checked at least that often).
  int pump_timeout() const {
    std::optional<clock_type::time_point> due = ack_due_;
    if (window_.waiting() > 0 && held_since_) {
      auto t = *held_since_ + ack_hold_max;
      if (!due || t < *due)
        due = t;
    }
    if (!due)
      return 1000;
    auto left
      = std::chrono::ceil<std::chrono::milliseconds>(*due - clock_type::now());
    return static_cast<int>(std::clamp<int64_t>(left.count(), 0, 1000));
  }

  // Nothing left to do before shutdown: no commands and no acks (an ack that
  // raced with close() is still sent).
  bool commands_empty() {
    std::lock_guard guard{mtx_};
    return commands_.empty() && acks_in_.empty();
  }

  void wait_event(std::chrono::milliseconds limit) {
    pollfd fd{event_fd_, POLLIN, 0};
    ::poll(&fd, 1, static_cast<int>(std::max<int64_t>(limit.count(), 1)));
    drain_event();
  }

  void drain_event() {
    // One read resets an eventfd counter (not in semaphore mode).
    uint64_t x = 0;
    auto rc = ::read(event_fd_, &x, sizeof(x));
    static_cast<void>(rc);
  }

  void run(command& c) {
    switch (c.kind) {
      case command::nack:
        if (conn_ && c.gen == gen_) {
          window_.mark_done(c.dtag);
          if (auto rc = amqp_basic_nack(conn_.get(), consume_ch, c.dtag, 0, 1);
              rc != AMQP_STATUS_OK)
            connection_lost(std::string{"nack: "} + amqp_error_string2(rc));
        }
        break;
      case command::run:
        c.fn();
        break;
    }
  }

  // Records the acks taken from the source in the window and sends what
  // can go (flush_window). `force`: nothing may wait (closing).
  void flush_acks(bool force = false) {
    if (!conn_) {
      acks_.clear();
      return;
    }
    for (auto t : acks_)
      if (window_.mark_acked(t))
        window_dirty_ = true;
    acks_.clear();
    flush_window(force);
  }

  // Sends one `multiple` basic.ack for the settled prefix of the window.
  // Acks above the first open delivery wait for it (so out-of-order
  // completions still cost one frame per batch) unless more than a batch of
  // them waits, they waited ack_hold_max, or `force`: then they go as single
  // acks (the broker must not keep a long-running delivery's successors
  // unacked, nor hand them out again after a close).
  void flush_window(bool force = false) {
    if (!conn_)
      return;
    auto waiting = window_.waiting();
    if (!window_dirty_ && !force && waiting == 0)
      return;
    window_dirty_ = false;
    int rc = AMQP_STATUS_OK;
    if (auto top = window_.take_prefix(); top != 0) {
      rc = amqp_basic_ack(conn_.get(), consume_ch, top, 1);
      held_since_.reset();
    }
    waiting = window_.waiting();
    if (rc == AMQP_STATUS_OK && waiting > 0) {
      auto now = clock_type::now();
      if (!held_since_)
        held_since_ = now;
      if (force || waiting > ack_batch_ || now - *held_since_ >= ack_hold_max) {
        window_.send_waiting([&](uint64_t tag) {
          rc = amqp_basic_ack(conn_.get(), consume_ch, tag, 0);
          return rc == AMQP_STATUS_OK;
        });
        held_since_.reset();
      }
    } else if (waiting == 0) {
      held_since_.reset();
    }
    if (rc != AMQP_STATUS_OK)
      connection_lost(std::string{"ack: "} + amqp_error_string2(rc));
  }

  // Reads what the broker sent; waits up to `timeout_ms` for the socket or a
  // command.
  void pump(int timeout_ms) {
    auto* c = conn_.get();
    auto buffered = [](amqp_connection_state_t x) {
      return amqp_frames_enqueued(x) || amqp_data_in_buffer(x);
    };
    bool read = true;
    if (!buffered(c)) {
      pollfd fds[2] = {{amqp_get_sockfd(c), POLLIN, 0}, {event_fd_, POLLIN, 0}};
      auto n = ::poll(fds, 2, timeout_ms);
      if (fds[1].revents != 0)
        drain_event();
      // Woken for commands or acks only: no read (a recv(2) that finds
      // nothing, then rabbitmq-c's poll(2)), unless rabbitmq-c's heartbeat
      // bookkeeping, done in its reads, is due.
      read = n <= 0 || fds[0].revents != 0
             || clock_type::now() - last_read_ >= 250ms;
    }
    if (read) {
      last_read_ = clock_type::now();
      for (int i = 0; i < 1024 && conn_; ++i) {
        amqp_frame_t frame;
        timeval zero{0, 0};
        auto rc = amqp_simple_wait_frame_noblock(conn_.get(), &frame, &zero);
        if (rc == AMQP_STATUS_TIMEOUT)
          break;
        if (rc != AMQP_STATUS_OK) {
          connection_lost(amqp_error_string2(rc));
          break;
        }
        handle_frame(frame);
        // What one recv(2) brought is handled: back to poll(2), which
        // returns at once when more came, instead of a recv that finds
        // nothing.
        if (conn_ && !buffered(conn_.get()))
          break;
      }
    }
    flush_ready();
    // Confirms of retry copies settle their originals, which may free a
    // prefix of waiting acks.
    flush_window();
    if (conn_)
      amqp_maybe_release_buffers(conn_.get());
  }

  // A delivery's content frames, as they come (see delivery_assembler).
  void handle_content(const amqp_frame_t& frame) {
    std::string err;
    if (frame.frame_type == AMQP_FRAME_HEADER) {
      auto* p = static_cast<amqp_basic_properties_t*>(
        frame.payload.properties.decoded);
      err = assembler_.header(*p, frame.payload.properties.body_size);
      if (err.empty())
        take_header(*p);
    } else {
      err = assembler_.body(frame.payload.body_fragment);
    }
    if (!err.empty()) {
      connection_lost("reading a message: " + err);
      return;
    }
    if (assembler_.complete())
      take_delivery();
  }

  void handle_frame(const amqp_frame_t& frame) {
    if (frame.channel == consume_ch
        && (frame.frame_type == AMQP_FRAME_HEADER
            || frame.frame_type == AMQP_FRAME_BODY)) {
      handle_content(frame);
      return;
    }
    if (frame.frame_type != AMQP_FRAME_METHOD)
      return;
    auto* decoded = frame.payload.method.decoded;
    switch (frame.payload.method.id) {
      case AMQP_BASIC_DELIVER_METHOD: {
        auto* d = static_cast<amqp_basic_deliver_t*>(decoded);
        if (auto err = assembler_.deliver(d->delivery_tag, d->redelivered != 0,
                                          d->routing_key, window_.spare());
            !err.empty())
          connection_lost("reading a message: " + err);
        return;
      }
      case AMQP_BASIC_ACK_METHOD: {
        auto* a = static_cast<amqp_basic_ack_t*>(decoded);
        confirm(a->delivery_tag, a->multiple != 0, true);
        return;
      }
      case AMQP_BASIC_NACK_METHOD: {
        auto* n = static_cast<amqp_basic_nack_t*>(decoded);
        confirm(n->delivery_tag, n->multiple != 0, false);
        return;
      }
      case AMQP_BASIC_RETURN_METHOD: {
        auto* ret = static_cast<amqp_basic_return_t*>(decoded);
        auto rk = str_of(ret->routing_key);
        message_box box;
        auto r = amqp_read_message(conn_.get(), frame.channel, &box.m, 0);
        if (!is_ok(r)) {
          connection_lost("reading a returned message: " + describe(r));
          return;
        }
        box.owned = true;
        // Returns come before the confirm of their publish, in publish
        // order: the first unreturned pending publish with this key is it.
        for (auto& [seq, p] : pending_)
          if (!p.returned && p.routing_key == rk) {
            p.returned = true;
            break;
          }
        return;
      }
      case AMQP_CHANNEL_CLOSE_METHOD: {
        auto* m = static_cast<amqp_channel_close_t*>(decoded);
        auto why = std::to_string(m->reply_code) + " " + str_of(m->reply_text);
        amqp_channel_close_ok_t ok{};
        amqp_send_method(conn_.get(), frame.channel,
                         AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        connection_lost("the broker closed channel "
                        + std::to_string(frame.channel) + ": " + why);
        return;
      }
      case AMQP_CONNECTION_CLOSE_METHOD: {
        auto* m = static_cast<amqp_connection_close_t*>(decoded);
        auto why = std::to_string(m->reply_code) + " " + str_of(m->reply_text);
        amqp_connection_close_ok_t ok{};
        amqp_send_method(conn_.get(), 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        connection_lost("the broker closed the connection: " + why);
        return;
      }
      case AMQP_BASIC_CANCEL_METHOD:
        connection_lost("the broker cancelled the consumer of queue '"
                        + settings_.queue + "' (queue deleted?)");
        return;
      default:
        return;
    }
  }

  // The content header of the delivery under way: what the runtime gets
  // from the properties (they live in rabbitmq-c's frame pool only until
  // the next amqp_maybe_release_buffers).
  void take_header(const amqp_basic_properties_t& p) {
    auto& raw = building_.raw;
    raw = raw_message{};
    auto subject = field_string(find_header(p, subject_header));
    raw.subject = subject.empty() ? assembler_.routing_key()
                                  : std::move(subject);
    raw.traceparent = field_string(find_header(p, "traceparent"));
    raw.tracestate = field_string(find_header(p, "tracestate"));
    raw.key = field_string(find_header(p, key_header));
    raw.delivery_count = delivery_count(p, assembler_.redelivered());
    collect_foreign(p, foreign_);
  }

  // The delivery under way is complete: queue it for poll.
  void take_delivery() {
    auto dtag = assembler_.delivery_tag();
    auto [body, copy] = assembler_.take();
    auto& r = building_;
    r.gen = gen_;
    r.dtag = dtag;
    r.raw.bytes = std::move(body);
    auto& pos = r.raw.position;
    pos.reserve(settings_.queue.size() + 32);
    pos += "amqp:";
    pos += settings_.queue;
    pos += '#';
    append_uint(pos, r.gen);
    pos += '.';
    append_uint(pos, dtag);
    merge_foreign(foreign_, r.raw.bytes);
    window_.add(dtag, std::move(copy));
    incoming_.push_back(std::move(r));
  }

  void flush_ready() {
    if (incoming_.empty())
      return;
    std::function<void()> wake;
    {
      std::lock_guard guard{mtx_};
      if (ready_.empty()) {
        ready_.swap(incoming_); // the usual case: no moves
        ready_head_ = 0;
      } else {
        for (auto& r : incoming_)
          ready_.push_back(std::move(r));
      }
      if (waiting_) {
        waiting_ = false;
        wake = wakeup_;
      }
    }
    incoming_.clear();
    if (wake)
      wake();
  }

  void confirm(uint64_t seq, bool multiple, bool ok) {
    auto end = multiple ? pending_.upper_bound(seq) : pending_.find(seq);
    if (!multiple && end != pending_.end())
      ++end;
    auto begin = multiple ? pending_.begin() : pending_.find(seq);
    std::vector<pending_confirm> done;
    for (auto i = begin; i != end;) {
      done.push_back(std::move(i->second));
      i = pending_.erase(i);
    }
    for (auto& p : done) {
      if (!ok)
        p.done(make_error(errc::unavailable,
                          "the broker refused the message (basic.nack)"));
      else if (p.returned)
        p.done(make_error(errc::invalid_config,
                          "no queue is bound for routing key '" + p.routing_key
                            + "' on exchange '"
                            + (p.exchange.empty() ? "(default)" : p.exchange)
                            + "' of " + settings_.shown
                            + " — the message was returned unroutable; start "
                              "a consumer (which binds its queue) first"));
      else
        p.done({});
    }
  }

  // Publishes on the confirm channel; `done` runs on this thread once the
  // broker confirmed (or the connection failed). `props_base`, when given,
  // supplies the properties to start from (a retry copy).
  void io_publish(const outgoing& out, const amqp_basic_properties_t* base,
                  std::function<void(caf::error)> done) {
    if (!conn_) {
      done(make_error(errc::unavailable, "amqp: not connected to "
                                           + settings_.shown
                                           + " (reconnecting)"));
      return;
    }
    amqp_basic_properties_t props{};
    std::vector<amqp_table_entry_t> entries;
    if (base != nullptr) {
      props = *base;
      if (props._flags & AMQP_BASIC_HEADERS_FLAG)
        for (int i = 0; i < base->headers.num_entries; ++i)
          entries.push_back(base->headers.entries[i]);
    } else {
      props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG;
      props.content_type = amqp_cstring_bytes("application/json");
      if (!out.message_id.empty()) {
        props._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
        props.message_id = bytes_of(out.message_id);
      }
      if (!out.correlation_id.empty()) {
        props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
        props.correlation_id = bytes_of(out.correlation_id);
      }
      if (!out.type.empty()) {
        props._flags |= AMQP_BASIC_TYPE_FLAG;
        props.type = bytes_of(out.type);
      }
    }
    props._flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
    props.delivery_mode = out.persistent ? 2 : 1;
    if (!out.expiration.empty()) {
      props._flags |= AMQP_BASIC_EXPIRATION_FLAG;
      props.expiration = bytes_of(out.expiration);
    } else {
      props._flags &= static_cast<amqp_flags_t>(~AMQP_BASIC_EXPIRATION_FLAG);
    }
    for (auto& [k, v] : out.headers) {
      amqp_table_entry_t e;
      e.key = bytes_of(k);
      e.value.kind = AMQP_FIELD_KIND_UTF8;
      e.value.value.bytes = bytes_of(v);
      entries.push_back(e);
    }
    if (!entries.empty()) {
      props._flags |= AMQP_BASIC_HEADERS_FLAG;
      props.headers.num_entries = static_cast<int>(entries.size());
      props.headers.entries = entries.data();
    }
    auto seq = next_seq_++;
    auto rc
      = amqp_basic_publish(conn_.get(), publish_ch, bytes_of(out.exchange),
                           bytes_of(out.routing_key), out.mandatory ? 1 : 0, 0,
                           &props, bytes_of(out.body));
    if (rc != AMQP_STATUS_OK) {
      done(make_error(errc::unavailable, std::string{"amqp: publish failed: "}
                                           + amqp_error_string2(rc)));
      connection_lost(std::string{"publish: "} + amqp_error_string2(rc));
      return;
    }
    pending_.emplace(seq, pending_confirm{out.exchange, out.routing_key, false,
                                          std::move(done)});
  }

  // nack with a delay: a copy goes to the retry queue with the delay as
  // per-message TTL; once the broker confirmed it, the original is acked.
  void io_retry(held_message& h, int64_t ms) {
    if (!conn_ || h.gen != gen_)
      return; // the broker requeued the original with the lost channel
    auto* kept = window_.message(h.dtag);
    if (kept == nullptr)
      return; // cannot happen: held deliveries are open in the window
    amqp_pool_t pool;
    init_amqp_pool(&pool, 4096);
    auto pool_guard = std::unique_ptr<amqp_pool_t, void (*)(amqp_pool_t*)>{
      &pool, [](amqp_pool_t* p) { empty_amqp_pool(p); }};
    void* decoded = nullptr;
    if (auto rc = amqp_decode_properties(AMQP_BASIC_CLASS, &pool,
                                         kept->properties(), &decoded);
        rc != AMQP_STATUS_OK || decoded == nullptr) {
      // Cannot happen either: the bytes were encoded from decoded properties.
      spdlog::warn("amqp: the kept properties of delivery {} do not decode "
                   "({}); it is redelivered at once instead of after {} ms",
                   h.dtag, amqp_error_string2(rc), ms);
      window_.mark_done(h.dtag);
      window_dirty_ = true;
      if (amqp_basic_nack(conn_.get(), consume_ch, h.dtag, 0, 1)
          != AMQP_STATUS_OK)
        connection_lost("nack after a bad retry copy");
      return;
    }
    auto& base = *static_cast<amqp_basic_properties_t*>(decoded);
    auto copy = std::make_shared<outgoing>();
    copy->exchange = "";
    copy->routing_key = settings_.retry_queue();
    copy->body = str_of(kept->body());
    copy->expiration = std::to_string(ms);
    copy->persistent = !(base._flags & AMQP_BASIC_DELIVERY_MODE_FLAG)
                       || base.delivery_mode == 2;
    if (find_header(base, subject_header) == nullptr)
      copy->headers.emplace_back(subject_header,
                                 std::string{kept->routing_key()});
    auto gen = h.gen;
    auto dtag = h.dtag;
    io_publish(*copy, &base, [this, gen, dtag, copy](caf::error err) {
      if (!conn_ || gen != gen_)
        return;
      int rc = AMQP_STATUS_OK;
      window_.mark_done(dtag);
      window_dirty_ = true;
      if (err) {
        spdlog::warn("amqp: the retry copy was not confirmed ({}); the "
                     "message is redelivered at once instead",
                     render(err));
        rc = amqp_basic_nack(conn_.get(), consume_ch, dtag, 0, 1);
      } else {
        rc = amqp_basic_ack(conn_.get(), consume_ch, dtag, 0);
      }
      if (rc != AMQP_STATUS_OK)
        connection_lost(std::string{"ack after retry: "}
                        + amqp_error_string2(rc));
    });
  }

  caf::error setup_consumer() {
    auto* c = conn_.get();
    auto& s = settings_;
    auto err = declare_queue(c, s, s.queue, true, amqp_empty_table);
    if (err && err.code() == static_cast<uint8_t>(errc::not_found)
        && err.category() == caf::atom("evmesh")) {
      if (!s.create)
        return make_error(errc::invalid_config,
                          "amqp: queue '" + s.queue
                            + "' does not exist in "
                              "vhost '"
                            + s.vhost + "' on " + s.shown
                            + " and create=false — declare it first (or drop "
                              "create=false to let evmesh declare it)");
      std::string type = "quorum";
      amqp_table_entry_t q_entries[] = {string_entry("x-queue-type", type)};
      amqp_table_t args = s.quorum ? amqp_table_t{1, q_entries}
                                   : amqp_empty_table;
      err = declare_queue(c, s, s.queue, false, args);
    }
    if (err)
      return err;
    std::string empty;
    amqp_table_entry_t retry_entries[] = {
      string_entry("x-dead-letter-exchange", empty),
      string_entry("x-dead-letter-routing-key", s.queue),
    };
    if (auto e = declare_queue(c, s, s.retry_queue(), false,
                               amqp_table_t{2, retry_entries}))
      return e;
    if (auto e = declare_queue(c, s, s.dlq(), false, amqp_empty_table))
      return e;
    if (!s.exchange.empty())
      for (auto& key : bindings_) {
        amqp_queue_bind(c, topology_ch, bytes_of(s.queue), bytes_of(s.exchange),
                        bytes_of(key), amqp_empty_table);
        auto r = amqp_get_rpc_reply(c);
        if (!is_ok(r))
          return make_error(errc::invalid_config,
                            "amqp: cannot bind queue '" + s.queue
                              + "' to exchange '" + s.exchange + "' with '"
                              + key + "': " + describe(r));
      }
    amqp_basic_qos(c, consume_ch, 0, s.prefetch, 0);
    auto r = amqp_get_rpc_reply(c);
    if (!is_ok(r))
      return make_error(errc::unavailable,
                        "amqp: basic.qos failed: " + describe(r));
    auto tag = "evmesh-" + (node_.empty() ? std::string{"node"} : node_) + "-"
               + std::to_string(getpid()) + "-"
               + std::to_string(next_consumer++);
    amqp_basic_consume(c, consume_ch, bytes_of(s.queue), bytes_of(tag), 0, 0, 0,
                       amqp_empty_table);
    r = amqp_get_rpc_reply(c);
    if (!is_ok(r))
      return make_error(errc::unavailable, "amqp: cannot consume from queue '"
                                             + s.queue + "': " + describe(r));
    return {};
  }

  void connection_lost(const std::string& why) {
    if (!conn_)
      return;
    if (!stop_)
      spdlog::warn("amqp: lost the connection to {} ({}); reconnecting "
                   "(unacked messages return to the queue)",
                   settings_.shown, why);
    connected_ = false;
    ++gen_;
    conn_.reset();
    next_seq_ = 1;
    auto pending = std::move(pending_);
    pending_.clear();
    for (auto& [seq, p] : pending)
      p.done(make_error(errc::unavailable,
                        "amqp: the connection was lost before the broker "
                        "confirmed: "
                          + why));
    incoming_.clear();
    assembler_.reset();
    window_.clear();
    window_dirty_ = false;
    held_since_.reset();
    acks_.clear();
    std::vector<ready_message> dropped;
    {
      std::lock_guard guard{mtx_};
      dropped.swap(ready_);
      ready_head_ = 0;
      acks_in_.clear(); // their channel is gone; the broker requeued them
    }
    ack_due_.reset();
  }

  bool reconnect() {
    auto c = open_connection(settings_, connection_name());
    if (!c) {
      spdlog::debug("amqp: reconnecting failed: {}", render(c.error()));
      return false;
    }
    conn_ = std::move(*c);
    next_seq_ = 1;
    if (consuming_) {
      if (auto err = setup_consumer()) {
        spdlog::warn("amqp: reconnected to {} but cannot consume again: {}",
                     settings_.shown, render(err));
        conn_.reset();
        return false;
      }
    }
    connected_ = true;
    spdlog::info("amqp: reconnected to {}", settings_.shown);
    return true;
  }

  std::string connection_name() const {
    return "evmesh:" + (node_.empty() ? std::string{"node"} : node_);
  }

  void shutdown() {
    if (!conn_)
      return;
    // Wait (bounded) for outstanding confirms, so a retry copy and its acked
    // original never both survive.
    auto deadline = clock_type::now() + settings_.confirm_timeout;
    while (conn_ && !pending_.empty() && clock_type::now() < deadline)
      pump(50);
    if (!conn_)
      return;
    flush_window(true); // no acked message may return with the channel
    if (!conn_)
      return;
    // Closing the consuming channel hands unacked messages back at once.
    amqp_channel_close(conn_.get(), consume_ch, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn_.get(), AMQP_REPLY_SUCCESS);
    auto pending = std::move(pending_);
    pending_.clear();
    for (auto& [seq, p] : pending)
      p.done(make_error(errc::unavailable, "amqp: transport closed"));
    conn_.reset();
    connected_ = false;
  }

  amqp_settings settings_;
  std::string node_;
  std::atomic<bool> closed_{false};
  bool subscribed_ = false;
  std::atomic<bool> connected_{false};
  // Incremented for every connection: deliveries of an older one cannot be
  // settled any more (their tags belong to a dead channel).
  std::atomic<uint64_t> gen_{0};
  int event_fd_ = -1;
  std::thread io_;

  // Owned by the I/O thread.
  conn_ptr conn_;
  uint64_t next_seq_ = 1;
  std::map<uint64_t, pending_confirm> pending_;
  std::vector<ready_message> incoming_;
  internal::delivery_assembler assembler_; // the delivery being read
  clock_type::time_point last_read_;       // the last read in pump
  ready_message building_;                 // its message for poll
  foreign_fields foreign_;    // what its properties add to a foreign body
  delivery_window window_;    // deliveries without a terminal frame sent
  bool window_dirty_ = false; // something settled since the last flush
  std::optional<clock_type::time_point> held_since_; // acks wait since
  std::vector<uint64_t> acks_; // acks taken for the next flush
  std::optional<clock_type::time_point> ack_due_; // the pending batch's due
  size_t ack_batch_ = 1;
  std::vector<std::string> bindings_;
  bool consuming_ = false;

  std::mutex mtx_; // guards everything below
  std::deque<command> commands_;
  // Acks from the source (connection generation, delivery tag), not yet
  // taken by the I/O thread.
  std::vector<std::pair<uint64_t, uint64_t>> acks_in_;
  // Deliveries for poll: ready_[ready_head_..] (the I/O thread swaps its
  // incoming_ in when poll emptied it).
  std::vector<ready_message> ready_;
  size_t ready_head_ = 0;
  held_queue held_;
  bool waiting_ = true;
  std::atomic<bool> stop_{false};
  std::function<void()> wakeup_;
};

// -- the dead-letter queue as a store ------------------------------------------

// The id of a dead letter in `Q.dlq`: FNV-1a (64 bit) of the message body,
// keeping the low 53 bits (exact as a JSON number), never 0. Stable across
// reads; identical bodies share an id.
int64_t dlq_id_of(std::string_view body) {
  uint64_t h = 14695981039346656037ull;
  for (unsigned char c : body) {
    h ^= c;
    h *= 1099511628211ull;
  }
  auto id = static_cast<int64_t>(h & ((uint64_t{1} << 53) - 1));
  return id == 0 ? 1 : id;
}

// `Q.dlq` of a URL's `queue=Q` as a `dead_letter_store`. Every call opens
// its own connection. Reads take each message with basic.get (manual ack)
// and close the channel, which returns the unacked ones in their order;
// `remove` and `mark_replayed` ack the one message with the id first, so
// replayed and purged records leave the queue.
class amqp_dead_letter_store : public dead_letter_store {
public:
  explicit amqp_dead_letter_store(amqp_settings s) : s_(std::move(s)) {
    s_.exchange.clear(); // declares nothing
  }

  caf::expected<int64_t> write(const dead_letter_record& rec) override {
    auto conn = connect();
    if (!conn)
      return conn.error();
    auto* c = conn->get();
    auto body = to_json(rec);
    std::vector<std::pair<std::string, std::string>> hdrs{
      {"evmesh-category", rec.category},
      {"evmesh-consumer", rec.consumer},
      {"evmesh-topic", rec.topic},
      {"evmesh-queue", s_.queue},
      {"evmesh-attempts", std::to_string(rec.attempts)}};
    std::vector<amqp_table_entry_t> entries;
    for (auto& [k, v] : hdrs)
      entries.push_back(string_entry(k.c_str(), v));
    amqp_basic_properties_t props{};
    props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_HEADERS_FLAG
                   | AMQP_BASIC_CONTENT_TYPE_FLAG;
    props.delivery_mode = 2;
    props.content_type = amqp_cstring_bytes("application/json");
    props.headers.num_entries = static_cast<int>(entries.size());
    props.headers.entries = entries.data();
    auto dlq = s_.dlq();
    if (auto rc = amqp_basic_publish(c, publish_ch, amqp_empty_bytes,
                                     bytes_of(dlq), 1, 0, &props,
                                     bytes_of(body));
        rc != AMQP_STATUS_OK)
      return make_error(errc::unavailable,
                        "amqp: writing a dead letter to '" + dlq
                          + "' failed: " + amqp_error_string2(rc));
    // Wait (bounded) for the confirm; a basic.return means unroutable.
    auto deadline = clock_type::now() + s_.confirm_timeout;
    bool returned = false;
    for (;;) {
      auto left = deadline - clock_type::now();
      if (left <= caf::timespan::zero())
        return make_error(errc::unavailable,
                          "amqp: writing a dead letter to '" + dlq
                            + "' was not confirmed within "
                            + format_duration(s_.confirm_timeout));
      auto tv = to_timeval(std::chrono::duration_cast<caf::timespan>(left));
      amqp_frame_t frame{};
      auto rc = amqp_simple_wait_frame_noblock(c, &frame, &tv);
      if (rc == AMQP_STATUS_TIMEOUT)
        continue;
      if (rc != AMQP_STATUS_OK)
        return make_error(errc::unavailable,
                          "amqp: writing a dead letter to '" + dlq
                            + "': " + amqp_error_string2(rc));
      if (frame.frame_type != AMQP_FRAME_METHOD || frame.channel != publish_ch)
        continue;
      auto id = frame.payload.method.id;
      if (id == AMQP_BASIC_RETURN_METHOD) {
        returned = true;
        amqp_message_t m{};
        if (is_ok(amqp_read_message(c, publish_ch, &m, 0)))
          amqp_destroy_message(&m);
      } else if (id == AMQP_BASIC_ACK_METHOD) {
        break;
      } else if (id == AMQP_BASIC_NACK_METHOD) {
        return make_error(errc::unavailable, "amqp: the broker refused the "
                                             "dead letter for '"
                                               + dlq + "' (nack)");
      }
    }
    if (returned)
      return make_error(errc::not_found, "amqp: the dead letter could not be "
                                         "routed to '"
                                           + dlq + "' on " + s_.shown);
    amqp_connection_close(c, AMQP_REPLY_SUCCESS);
    return dlq_id_of(body);
  }

  caf::expected<std::vector<dead_letter_record>>
  list(const dead_letter_query& q) override {
    auto recs = read(0);
    if (!recs)
      return recs.error();
    // The queue is oldest first; list newest first.
    std::vector<dead_letter_record> result;
    for (auto i = recs->rbegin(); i != recs->rend(); ++i) {
      if (q.limit != 0 && result.size() >= q.limit)
        break;
      if (matches(q, *i))
        result.push_back(std::move(*i));
    }
    return result;
  }

  caf::expected<dead_letter_record> get(int64_t id) override {
    auto recs = read(0);
    if (!recs)
      return recs.error();
    for (auto& r : *recs)
      if (r.id == id)
        return std::move(r);
    return not_found(id);
  }

  caf::error mark_replayed(int64_t id, int64_t) override {
    return settle(id);
  }

  caf::error remove(int64_t id) override {
    return settle(id);
  }

private:
  caf::error not_found(int64_t id) const {
    return make_error(errc::not_found,
                      "no dead letter #" + std::to_string(id) + " in '"
                        + s_.dlq() + "' on " + s_.shown
                        + " (replayed, purged, or never written)");
  }

  caf::error settle(int64_t id) {
    if (id <= 0)
      return not_found(id);
    auto acked = read(id);
    if (!acked)
      return acked.error();
    for (auto& r : *acked)
      if (r.id == id)
        return {};
    return not_found(id);
  }

  caf::expected<conn_ptr> connect() {
    auto conn = open_connection(s_, "evmesh:dlq-store");
    if (!conn)
      return conn.error();
    if (auto err = declare_queue(conn->get(), s_, s_.dlq(), true,
                                 amqp_empty_table))
      return err;
    return conn;
  }

  // Reads every record of `Q.dlq` (oldest first, ids set) and returns them
  // all to the queue, except the first one whose id is `ack_id` (if not 0):
  // that one is acked before the channel closes.
  caf::expected<std::vector<dead_letter_record>> read(int64_t ack_id) {
    auto conn = connect();
    if (!conn)
      return conn.error();
    auto* c = conn->get();
    auto dlq = s_.dlq();
    auto deadline = clock_type::now() + 60s;
    std::vector<dead_letter_record> result;
    bool acked = false;
    for (;;) {
      if (clock_type::now() > deadline)
        return make_error(errc::unavailable,
                          "amqp: reading '" + dlq + "' did not finish in 60s");
      auto r = amqp_basic_get(c, consume_ch, bytes_of(dlq), 0);
      if (!is_ok(r))
        return make_error(errc::io_error,
                          "amqp: cannot read '" + dlq + "': " + describe(r));
      if (r.reply.id != AMQP_BASIC_GET_OK_METHOD)
        break; // get-empty
      auto* ok = static_cast<amqp_basic_get_ok_t*>(r.reply.decoded);
      auto dtag = ok->delivery_tag;
      auto more = ok->message_count;
      message_box box;
      auto rr = amqp_read_message(c, consume_ch, &box.m, 0);
      if (!is_ok(rr))
        return make_error(errc::io_error,
                          "amqp: cannot read '" + dlq + "': " + describe(rr));
      box.owned = true;
      auto body = str_of(box.m.body);
      auto rec = dead_letter_from_json(body);
      if (!rec)
        return make_error(errc::decode_error,
                          "amqp: a message in '" + dlq
                            + "' is not a dead-letter record: "
                            + render(rec.error()));
      rec->id = dlq_id_of(body);
      if (ack_id != 0 && !acked && rec->id == ack_id) {
        if (auto rc = amqp_basic_ack(c, consume_ch, dtag, 0);
            rc != AMQP_STATUS_OK)
          return make_error(errc::unavailable,
                            "amqp: cannot ack dead letter #"
                              + std::to_string(ack_id) + " in '" + dlq
                              + "': " + amqp_error_string2(rc));
        acked = true;
      }
      result.push_back(std::move(*rec));
      amqp_maybe_release_buffers(c);
      if (more == 0 || acked)
        break; // the messages present when the read began
    }
    // channel.close is answered after the ack was processed; it returns
    // the other messages to the queue.
    auto closed = amqp_channel_close(c, consume_ch, AMQP_REPLY_SUCCESS);
    if (acked && !is_ok(closed))
      return make_error(errc::unavailable,
                        "amqp: settling dead letter #" + std::to_string(ack_id)
                          + " in '" + dlq
                          + "' was not confirmed: " + describe(closed));
    amqp_connection_close(c, AMQP_REPLY_SUCCESS);
    return result;
  }

  amqp_settings s_;
};

} // namespace

void register_amqp_transport() {
  register_dead_letter_store(
    "amqp", [](std::string_view url) -> caf::expected<dead_letter_store_ptr> {
      auto s = parse_amqp_url(url);
      if (!s)
        return s.error();
      if (s->queue.empty())
        return make_error(errc::invalid_url,
                          "amqp: a dead-letter store URL needs queue=Q: its "
                          "dead-letter queue 'Q.dlq' is read, e.g. "
                            + s->shown + "?queue=orders");
      return dead_letter_store_ptr{
        std::make_shared<amqp_dead_letter_store>(std::move(*s))};
    });
  auto factory
    = [](std::string_view url,
         const transport_environment& env) -> caf::expected<transport_ptr> {
    auto settings = parse_amqp_url(url);
    if (!settings)
      return settings.error();
    auto name = "evmesh:" + (env.node.empty() ? std::string{"node"} : env.node);
    auto conn = open_connection(*settings, name);
    if (!conn)
      return conn.error();
    return transport_ptr{std::make_shared<amqp_transport>(
      std::move(*settings), std::move(*conn), env.node)};
  };
  register_transport("amqp", factory);
  // Registered only to answer with a clear "not supported yet".
  register_transport("amqps", factory);
}

caf::expected<std::vector<dead_letter_record>>
amqp_dead_letters(std::string_view url, size_t max) {
  auto s = parse_amqp_url(url);
  if (!s)
    return s.error();
  if (s->queue.empty())
    return make_error(errc::invalid_config,
                      "amqp: " + s->shown
                        + " has no queue= — the DLQ is queue=Q's 'Q.dlq'");
  s->exchange.clear(); // the reader declares nothing
  auto conn = open_connection(*s, "evmesh:dlq-reader");
  if (!conn)
    return conn.error();
  auto* c = conn->get();
  auto dlq = s->dlq();
  if (auto err = declare_queue(c, *s, dlq, true, amqp_empty_table))
    return err;
  // basic.get without ack, then closing the connection, returns every
  // message to the queue in its original order: a non-destructive read.
  std::vector<dead_letter_record> result;
  while (result.size() < max) {
    auto r = amqp_basic_get(c, consume_ch, bytes_of(dlq), 0);
    if (!is_ok(r))
      return make_error(errc::io_error,
                        "amqp: cannot read '" + dlq + "': " + describe(r));
    if (r.reply.id != AMQP_BASIC_GET_OK_METHOD)
      break; // get-empty
    message_box box;
    auto rr = amqp_read_message(c, consume_ch, &box.m, 0);
    if (!is_ok(rr))
      return make_error(errc::io_error,
                        "amqp: cannot read '" + dlq + "': " + describe(rr));
    box.owned = true;
    auto rec = dead_letter_from_json(str_of(box.m.body));
    if (!rec)
      return make_error(errc::decode_error,
                        "amqp: a message in '" + dlq
                          + "' is not a dead-letter record: "
                          + render(rec.error()));
    result.push_back(std::move(*rec));
    amqp_maybe_release_buffers(c);
  }
  amqp_channel_close(c, consume_ch, AMQP_REPLY_SUCCESS);
  amqp_connection_close(c, AMQP_REPLY_SUCCESS);
  return result;
}

} // namespace evmesh
