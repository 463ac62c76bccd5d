#include "evmesh/envelope.hpp"

#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "evmesh/error.hpp"

namespace json = boost::json;
using namespace evmesh;

namespace {

constexpr std::string_view sample_traceparent
  = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

bool is_decode_error(const caf::error& err) {
  return err.category() == caf::atom("evmesh")
         && err.code() == static_cast<uint8_t>(errc::decode_error);
}

envelope decode_ok(std::string_view bytes,
                   const transport_metadata& meta = {}) {
  auto env = decode_envelope(bytes, meta);
  EXPECT_TRUE(env) << render(env.error()) << " for " << bytes;
  return env ? *env : envelope{};
}

} // namespace

TEST(envelope, decodes_every_native_field) {
  auto env = decode_ok(R"({
    "id": "evt-1", "topic": "order.confirmed",
    "payload": {"order_id": "A-1", "quantity": 2},
    "idempotency_key": "idem-1", "tenant": "acme",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "vendor=x", "key": "A-1",
    "headers": {"x-source": "checkout"},
    "produced_at": "2026-01-02T03:04:05Z", "attempt": 3,
    "content_type": "application/json"})");
  EXPECT_EQ(env.id, "evt-1");
  EXPECT_EQ(env.topic, "order.confirmed");
  EXPECT_EQ(env.payload, json::parse(R"({"order_id": "A-1", "quantity": 2})"));
  EXPECT_EQ(env.idempotency_key, "idem-1");
  EXPECT_EQ(env.tenant, "acme");
  EXPECT_EQ(env.traceparent, sample_traceparent);
  EXPECT_EQ(env.tracestate, "vendor=x");
  EXPECT_EQ(env.key, "A-1");
  EXPECT_EQ(env.headers,
            (std::map<std::string, std::string>{{"x-source", "checkout"}}));
  EXPECT_EQ(env.produced_at, "2026-01-02T03:04:05Z");
  EXPECT_EQ(env.attempt, 3u);
  EXPECT_EQ(env.content_type, "application/json");
  EXPECT_TRUE(env.extra.empty());
  EXPECT_EQ(env.format, wire_format::native);
}

TEST(envelope, round_trips_native_fields_and_keeps_unknown_fields) {
  envelope original;
  original.id = "evt-7";
  original.topic = "order.shipped";
  original.payload
    = json::parse(R"({"items": [1, 2, {"sku": "x"}], "n": null})");
  original.idempotency_key = "k";
  original.tenant = "t1";
  original.traceparent = sample_traceparent;
  original.tracestate = "a=b";
  original.key = "order-7";
  original.headers = {{"h1", "v1"}, {"h2", ""}};
  original.produced_at = "2026-01-02T03:04:05Z";
  original.attempt = 4;
  original.content_type = "application/json";
  original.extra["schema_version"] = 3;
  original.extra["origin"] = json::parse(R"({"service": "checkout"})");
  auto decoded = decode_ok(encode_envelope(original));
  EXPECT_EQ(decoded.id, original.id);
  EXPECT_EQ(decoded.topic, original.topic);
  EXPECT_EQ(decoded.payload, original.payload);
  EXPECT_EQ(decoded.idempotency_key, original.idempotency_key);
  EXPECT_EQ(decoded.tenant, original.tenant);
  EXPECT_EQ(decoded.traceparent, original.traceparent);
  EXPECT_EQ(decoded.tracestate, original.tracestate);
  EXPECT_EQ(decoded.key, original.key);
  EXPECT_EQ(decoded.headers, original.headers);
  EXPECT_EQ(decoded.produced_at, original.produced_at);
  EXPECT_EQ(decoded.attempt, original.attempt);
  EXPECT_EQ(decoded.content_type, original.content_type);
  EXPECT_EQ(decoded.extra, original.extra);
}

TEST(envelope, unknown_input_fields_survive_decode_and_encode) {
  auto env = decode_ok(
    R"({"topic": "a.b", "payload": 1, "x_custom": {"deep": [true]}, "v": 2})");
  ASSERT_EQ(env.extra.size(), 2u);
  EXPECT_EQ(env.extra.at("x_custom"), json::parse(R"({"deep": [true]})"));
  auto reencoded = json::parse(encode_envelope(env)).as_object();
  EXPECT_EQ(reencoded.at("x_custom"), json::parse(R"({"deep": [true]})"));
  EXPECT_EQ(reencoded.at("v"), 2);
}

TEST(envelope,
     encode_omits_empty_optional_fields_but_always_writes_topic_and_payload) {
  envelope env;
  env.topic = "a";
  auto obj = json::parse(encode_envelope(env)).as_object();
  EXPECT_EQ(obj.size(), 2u);
  EXPECT_EQ(obj.at("topic"), "a");
  EXPECT_TRUE(obj.at("payload").is_null());
}

TEST(envelope, extra_fields_never_overwrite_known_fields) {
  envelope env;
  env.topic = "real.topic";
  env.payload = "real";
  env.extra["topic"] = "fake.topic";
  env.extra["payload"] = "fake";
  env.extra["attempt"] = 99;
  env.extra["specversion"] = "1.0";
  auto obj = json::parse(encode_envelope(env)).as_object();
  EXPECT_EQ(obj.at("topic"), "real.topic");
  EXPECT_EQ(obj.at("payload"), "real");
  EXPECT_FALSE(obj.contains("attempt"));
  EXPECT_FALSE(obj.contains("specversion"));
}

// The decoder reads a plain native envelope (known fields only, each once,
// of the right type) straight from the parser's events, and everything else
// through a parsed tree; one unknown field is enough to take the second
// path. Both must make the same envelope, down to the payload's storage
// (it stays valid and unchanged after the envelope moves).
TEST(envelope, plain_native_envelopes_decode_as_envelopes_with_extra_fields) {
  const std::string long_text(5000, 'x');
  const std::string long_escaped = [] {
    std::string s;
    for (int i = 0; i < 700; ++i)
      s += R"(a\"b\\c\u00e9\n)";
    return s;
  }();
  std::string many_keys = "{";
  for (int i = 0; i < 60; ++i)
    many_keys += (i > 0 ? "," : "") + std::string{"\"k"} + std::to_string(i)
                 + "\":[" + std::to_string(i) + ",{\"s\":\""
                 + long_text.substr(0, 40) + "\"}]";
  many_keys += "}";
  const std::vector<std::string> inputs{
    R"({"topic":"a"})",
    R"({"id":"evt-1","topic":"order.confirmed","payload":{"order_id":"A-1","quantity":2},"idempotency_key":"idem-1","tenant":"acme","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","tracestate":"vendor=x","key":"A-1","headers":{"x-source":"checkout","empty":""},"produced_at":"2026-01-02T03:04:05Z","attempt":3,"content_type":"application/json"})",
    R"({"topic":"a","payload":[1,2.5,-3,true,false,null,"s",{"n":{"m":[[]]}},18446744073709551615,-9223372036854775808,1e300]})",
    R"({"topic":"a","payload":"just a string"})",
    R"({"topic":"a","payload":42})",
    R"({"topic":"a","payload":-1.5e-300})",
    R"({"topic":"a","payload":true})",
    R"({"topic":"a","payload":null})",
    R"({"topic":"a","payload":{}})",
    R"({"topic":"a","payload":[]})",
    R"({"topic":"a","payload":{"dup":1,"dup":2}})",
    R"({"payload":{"x":1},"topic":"after.payload"})",
    R"({"id":12345,"topic":"a"})",
    R"({"id":-7,"topic":"a"})",
    R"({"id":18446744073709551615,"topic":"a"})",
    R"({"id":null,"topic":"a","tenant":null,"headers":null,"attempt":null,"key":null})",
    R"({"topic":"a","attempt":0})",
    R"({"topic":"a","attempt":4294967295})",
    R"({"topic":"a\u00e9\"\\\/b","key":"k\n","headers":{"h\u0041":"v\t\u20ac"},"payload":{"k\u0042ey":"v\u00e9\ud83d\ude00"}})",
    R"({"topic":"a","headers":{"same":"1","same":"2","other":"3"}})",
    "  {\n \"topic\" : \"a\" ,\t\"payload\" : { \"x\" : [ 1 , 2 ] } }  \n",
    R"({"topic":"a","payload":{"text":")" + long_text + R"("}})",
    R"({"topic":"a","payload":")" + long_escaped + R"("})",
    R"({"topic":"a","key":")" + long_escaped + R"(","headers":{")"
      + long_escaped + R"(":")" + long_escaped + R"("}})",
    R"({"topic":"a","payload":{")" + long_escaped + R"(":1}})",
    R"({"topic":"a","payload":)" + many_keys + "}",
  };
  for (const auto& in : inputs) {
    auto plain = decode_envelope(in);
    ASSERT_TRUE(plain) << render(plain.error()) << " for " << in;
    auto slow_in = in.substr(0, in.rfind('}')) + R"(,"zz_unknown":1})";
    auto slow = decode_envelope(slow_in);
    ASSERT_TRUE(slow) << render(slow.error()) << " for " << slow_in;
    ASSERT_EQ(slow->extra.size(), 1u) << slow_in;
    // Moving the envelope keeps the payload and its storage.
    envelope a = std::move(*plain);
    envelope b = std::move(*slow);
    EXPECT_EQ(a.id, b.id) << in;
    EXPECT_EQ(a.topic, b.topic) << in;
    EXPECT_EQ(a.payload, b.payload) << in;
    EXPECT_EQ(json::serialize(a.payload), json::serialize(b.payload)) << in;
    EXPECT_EQ(a.idempotency_key, b.idempotency_key) << in;
    EXPECT_EQ(a.tenant, b.tenant) << in;
    EXPECT_EQ(a.traceparent, b.traceparent) << in;
    EXPECT_EQ(a.tracestate, b.tracestate) << in;
    EXPECT_EQ(a.key, b.key) << in;
    EXPECT_EQ(a.headers, b.headers) << in;
    EXPECT_EQ(a.produced_at, b.produced_at) << in;
    EXPECT_EQ(a.attempt, b.attempt) << in;
    EXPECT_EQ(a.content_type, b.content_type) << in;
    EXPECT_TRUE(a.extra.empty()) << in;
    EXPECT_EQ(a.format, wire_format::native) << in;
    EXPECT_EQ(dedupe_key(a), dedupe_key(b)) << in;
    // A handler's copy of the payload outlives the envelope.
    json::value copy = a.payload;
    auto before = json::serialize(copy);
    a = envelope{};
    EXPECT_EQ(json::serialize(copy), before) << in;
  }
}

TEST(envelope, accepts_integer_ids_of_outbox_rows) {
  auto env = decode_ok(R"({"id": 42, "topic": "a", "payload": {}})");
  EXPECT_EQ(env.id, "42");
}

TEST(envelope, null_optional_fields_count_as_absent) {
  auto env = decode_ok(
    R"({"topic": "a", "tenant": null, "headers": null, "attempt": null})");
  EXPECT_EQ(env.tenant, "");
  EXPECT_TRUE(env.headers.empty());
  EXPECT_EQ(env.attempt, 0u);
}

TEST(envelope, decodes_cloudevents_structured_json) {
  auto env = decode_ok(R"({
    "specversion": "1.0", "id": "ce-1", "source": "/checkout",
    "type": "order.confirmed", "subject": "A-1",
    "time": "2026-01-02T03:04:05Z", "datacontenttype": "application/json",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "v=1", "partitionkey": "A-1", "myext": 5,
    "data": {"order_id": "A-1"}})");
  EXPECT_EQ(env.format, wire_format::cloudevents);
  EXPECT_EQ(env.id, "ce-1");
  EXPECT_EQ(env.topic, "order.confirmed");
  EXPECT_EQ(env.payload, json::parse(R"({"order_id": "A-1"})"));
  EXPECT_EQ(env.content_type, "application/json");
  EXPECT_EQ(env.traceparent, sample_traceparent);
  EXPECT_EQ(env.tracestate, "v=1");
  EXPECT_EQ(env.key, "A-1");
  EXPECT_EQ(env.produced_at, "2026-01-02T03:04:05Z");
  EXPECT_EQ(env.extra.at("source"), "/checkout");
  EXPECT_EQ(env.extra.at("subject"), "A-1");
  EXPECT_EQ(env.extra.at("time"), "2026-01-02T03:04:05Z");
  EXPECT_EQ(env.extra.at("myext"), 5);
  EXPECT_FALSE(env.extra.contains("specversion"));
  // Re-encoding yields a native envelope that decodes to the same event.
  auto again = decode_ok(encode_envelope(env));
  EXPECT_EQ(again.format, wire_format::native);
  EXPECT_EQ(again.topic, env.topic);
  EXPECT_EQ(again.payload, env.payload);
  EXPECT_EQ(again.extra, env.extra);
}

TEST(envelope, cloudevents_data_base64_becomes_a_string_payload) {
  auto env = decode_ok(R"({"specversion": "1.0", "id": "1", "source": "s",
    "type": "blob.stored", "datacontenttype": "application/octet-stream",
    "data_base64": "AAEC"})");
  EXPECT_EQ(env.payload, "AAEC");
  EXPECT_EQ(env.content_type, "application/octet-stream");
}

TEST(envelope, decodes_nestjs_events_with_string_and_object_patterns) {
  auto env = decode_ok(R"({"pattern": "order_created", "data": {"id": 1}})");
  EXPECT_EQ(env.format, wire_format::nestjs);
  EXPECT_EQ(env.topic, "order_created");
  EXPECT_EQ(env.payload, json::parse(R"({"id": 1})"));
  EXPECT_EQ(env.id, "");
  auto obj = decode_ok(
    R"({"pattern": {"role": "order", "cmd": "create"}, "data": [1], "id": "n-1"})");
  EXPECT_EQ(obj.format, wire_format::nestjs);
  // Keys sorted, as NestJS builds routes from object patterns.
  EXPECT_EQ(obj.topic, R"({"cmd":"create","role":"order"})");
  EXPECT_EQ(obj.payload, json::parse("[1]"));
  EXPECT_EQ(obj.id, "n-1");
}

TEST(envelope, a_topic_field_makes_pattern_and_data_ordinary_extra_fields) {
  auto env = decode_ok(R"({"topic": "t", "pattern": "p", "data": 1})");
  EXPECT_EQ(env.format, wire_format::native);
  EXPECT_EQ(env.topic, "t");
  EXPECT_EQ(env.extra.at("pattern"), "p");
  EXPECT_EQ(env.extra.at("data"), 1);
}

TEST(envelope, transport_metadata_fills_empty_fields) {
  transport_metadata meta;
  meta.subject = "orders.created";
  meta.traceparent = sample_traceparent;
  meta.tracestate = "m=1";
  meta.key = "kafka-key";
  auto env = decode_ok(R"({"payload": {"a": 1}})", meta);
  EXPECT_EQ(env.topic, "orders.created");
  EXPECT_EQ(env.traceparent, sample_traceparent);
  EXPECT_EQ(env.tracestate, "m=1");
  EXPECT_EQ(env.key, "kafka-key");
}

TEST(envelope, envelope_fields_win_over_transport_metadata) {
  transport_metadata meta;
  meta.subject = "from.broker";
  meta.traceparent = "00-11111111111111111111111111111111-2222222222222222-01";
  meta.tracestate = "broker=1";
  meta.key = "broker-key";
  auto env = decode_ok(R"({"topic": "from.envelope", "key": "env-key",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "env=1"})",
                       meta);
  EXPECT_EQ(env.topic, "from.envelope");
  EXPECT_EQ(env.key, "env-key");
  EXPECT_EQ(env.traceparent, sample_traceparent);
  EXPECT_EQ(env.tracestate, "env=1");
}

TEST(envelope, broker_tracestate_is_not_attached_to_a_different_traceparent) {
  transport_metadata meta;
  meta.traceparent = "00-11111111111111111111111111111111-2222222222222222-01";
  meta.tracestate = "broker=1";
  auto env = decode_ok(R"({"topic": "t",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})",
                       meta);
  EXPECT_EQ(env.traceparent, sample_traceparent);
  EXPECT_EQ(env.tracestate, "");
}

TEST(envelope, subject_fills_a_nestjs_or_cloudevent_without_topic) {
  transport_metadata meta;
  meta.subject = "subj";
  auto env = decode_ok(R"({"specversion": "1.0", "id": "1", "source": "s"})",
                       meta);
  EXPECT_EQ(env.topic, "subj");
  EXPECT_TRUE(env.payload.is_null());
}

struct malformed_case {
  const char* name;
  std::string input;
  const char* message_part;
};

TEST(envelope, malformed_inputs_yield_decode_errors_never_crashes) {
  std::vector<malformed_case> cases{
    {"not json", "not json", "malformed JSON at byte 0"},
    {"empty", "", "empty input"},
    {"truncated", R"({"topic": "a", "payload": {"x": )",
     "malformed JSON at byte"},
    {"trailing comma", R"({"topic": "a",})", "malformed JSON at byte 14"},
    {"trailing garbage", R"({"topic": "a"} x)", "unexpected data after"},
    {"two documents", R"({"topic": "a"}{"topic": "b"})", "byte 14"},
    {"top-level array", R"([{"topic": "a"}])",
     "must be a JSON object, got an array"},
    {"top-level string", R"("order.confirmed")",
     "must be a JSON object, got a string"},
    {"top-level null", "null", "got null"},
    {"negative attempt", R"({"topic": "a", "attempt": -1})",
     "field 'attempt' must be a non-negative integer, got a number -1"},
    {"string attempt", R"({"topic": "a", "attempt": "x"})",
     "field 'attempt' must be a non-negative integer, got a string \"x\""},
    {"fractional attempt", R"({"topic": "a", "attempt": 1.5})",
     "field 'attempt' must be a non-negative integer"},
    {"huge attempt", R"({"topic": "a", "attempt": 4294967296})",
     "field 'attempt' is too large"},
    {"headers not strings", R"({"topic": "a", "headers": {"retry": 3}})",
     "header 'retry' is a number"},
    {"headers not an object", R"({"topic": "a", "headers": ["x"]})",
     "field 'headers' must be an object of strings"},
    {"topic not a string", R"({"topic": 5})", "field 'topic' must be a string"},
    {"tenant not a string", R"({"topic": "a", "tenant": {}})",
     "field 'tenant' must be a string, got an object"},
    {"missing topic", R"({"payload": {}})",
     "envelope has no topic and the transport gave no subject"},
    {"empty topic", R"({"topic": "", "payload": {}})", "has no topic"},
    {"cloudevent wrong version", R"({"specversion": "0.3", "type": "a"})",
     "field 'specversion' must be \"1.0\""},
    {"cloudevent data twice",
     R"({"specversion": "1.0", "type": "a", "data": 1, "data_base64": "AA=="})",
     "both 'data' and 'data_base64'"},
    {"cloudevent type not a string", R"({"specversion": "1.0", "type": 1})",
     "field 'type' must be a string"},
    {"nestjs pattern array", R"({"pattern": [1], "data": 1})",
     "field 'pattern' must be a string or an object"},
    {"invalid escape", R"({"topic": "\x"})", "malformed JSON"},
    {"deep nesting", std::string(5000, '[') + std::string(5000, ']'),
     "malformed JSON"},
    {"nul byte", std::string{"{\"topic\": \"a\"\0}", 15}, "malformed JSON"},
  };
  for (const auto& c : cases) {
    auto env = decode_envelope(c.input);
    ASSERT_FALSE(env) << c.name;
    EXPECT_TRUE(is_decode_error(env.error())) << c.name;
    auto text = render(env.error());
    EXPECT_EQ(text.rfind("decode_error: ", 0), 0u) << c.name << ": " << text;
    EXPECT_NE(text.find(c.message_part), std::string::npos)
      << c.name << ": " << text;
  }
}

TEST(envelope, truncation_at_every_byte_never_crashes) {
  auto full = std::string{
    R"({"id": "1", "topic": "a.b", "payload": {"x": [1, 2.5, "s"]}, "headers": {"h": "v"}, "attempt": 2})"};
  for (size_t n = 0; n < full.size(); ++n) {
    auto env = decode_envelope(std::string_view{full}.substr(0, n));
    ASSERT_FALSE(env) << n;
    EXPECT_TRUE(is_decode_error(env.error())) << n;
  }
  EXPECT_TRUE(decode_envelope(full));
}

TEST(envelope, dedupe_key_prefers_idempotency_key_then_id_then_a_content_hash) {
  envelope env;
  env.topic = "order.confirmed";
  env.payload = json::parse(R"({"order_id": "A-1"})");
  env.id = "evt-1";
  env.idempotency_key = "idem-1";
  EXPECT_EQ(dedupe_key(env), "idem-1");
  env.idempotency_key.clear();
  EXPECT_EQ(dedupe_key(env), "evt-1");
  env.id.clear();
  auto hashed = dedupe_key(env);
  ASSERT_EQ(hashed.size(), 18u);
  EXPECT_EQ(hashed.substr(0, 2), "h:");
  EXPECT_EQ(hashed.find_first_not_of("0123456789abcdef", 2), std::string::npos);
}

TEST(envelope, content_hash_is_stable_and_depends_on_topic_and_payload) {
  envelope a;
  a.topic = "t";
  a.payload = json::parse(R"({"n": 1})");
  auto b = a;
  EXPECT_EQ(dedupe_key(a), dedupe_key(b));
  // Decoded copies of the same bytes agree as well.
  auto bytes = encode_envelope(a);
  EXPECT_EQ(dedupe_key(decode_ok(bytes)), dedupe_key(decode_ok(bytes)));
  b.payload = json::parse(R"({"n": 2})");
  EXPECT_NE(dedupe_key(a), dedupe_key(b));
  auto c = a;
  c.topic = "u";
  EXPECT_NE(dedupe_key(a), dedupe_key(c));
}

TEST(envelope, content_hash_is_fnv1a_64_of_topic_nul_and_serialized_payload) {
  envelope env;
  env.topic = "";
  env.payload = nullptr;
  // FNV-1a 64 of "\0null".
  uint64_t h = 14695981039346656037ull;
  for (char c : std::string{"\0null", 5}) {
    h ^= static_cast<uint8_t>(c);
    h *= 1099511628211ull;
  }
  char expected[19];
  std::snprintf(expected, sizeof(expected), "h:%016llx",
                static_cast<unsigned long long>(h));
  EXPECT_EQ(dedupe_key(env), expected);
}

TEST(error, names_every_code_and_retries_only_transient_ones) {
  struct error_case {
    errc code;
    const char* name;
    bool retryable;
  };
  std::vector<error_case> cases{
    {errc::none, "none", false},
    {errc::decode_error, "decode_error", false},
    {errc::invalid_traceparent, "invalid_traceparent", false},
    {errc::invalid_config, "invalid_config", false},
    {errc::invalid_url, "invalid_url", false},
    {errc::invalid_pattern, "invalid_pattern", false},
    {errc::duplicate_subscription, "duplicate_subscription", false},
    {errc::unavailable, "unavailable", true},
    {errc::io_error, "io_error", true},
    {errc::not_found, "not_found", false},
    {errc::invalid_state, "invalid_state", false},
    {errc::too_large, "too_large", false},
  };
  for (const auto& c : cases) {
    EXPECT_STREQ(to_string(c.code), c.name);
    EXPECT_EQ(is_retryable(c.code), c.retryable) << c.name;
    if (c.code != errc::none) {
      EXPECT_EQ(is_retryable(make_error(c.code, "x")), c.retryable) << c.name;
    }
  }
}

TEST(error, renders_evmesh_errors_with_their_message) {
  auto err = make_error(errc::invalid_config,
                        "retry.max_attempts must be >= 1");
  EXPECT_EQ(err.category(), caf::atom("evmesh"));
  EXPECT_EQ(err.code(), static_cast<uint8_t>(errc::invalid_config));
  EXPECT_EQ(render(err), "invalid_config: retry.max_attempts must be >= 1");
  EXPECT_EQ(render(caf::error{static_cast<uint8_t>(errc::unavailable),
                              caf::atom("evmesh")}),
            "unavailable");
}

TEST(error, foreign_errors_are_rendered_by_caf_and_never_retryable) {
  caf::error foreign{static_cast<uint8_t>(errc::unavailable),
                     caf::atom("other")};
  EXPECT_FALSE(is_retryable(foreign));
  EXPECT_EQ(render(foreign), caf::to_string(foreign));
  EXPECT_FALSE(is_retryable(caf::error{}));
}
