#include <string>

#include <caf/atom.hpp>
#include <gtest/gtest.h>

#include "evmesh/stores.hpp"

using namespace evmesh;

namespace {

errc code_of(const caf::error& err) {
  if (err.category() != caf::atom("evmesh"))
    return errc::none;
  return static_cast<errc>(err.code());
}

// A strict UTF-8 check, independent of the implementation's.
bool valid_utf8(const std::string& s) {
  size_t i = 0;
  auto byte = [&](size_t j) { return static_cast<unsigned char>(s[j]); };
  while (i < s.size()) {
    auto c = byte(i);
    size_t len = c < 0x80           ? 1
                 : (c >> 5) == 0x6  ? 2
                 : (c >> 4) == 0xE  ? 3
                 : (c >> 3) == 0x1E ? 4
                                    : 0;
    if (len == 0 || i + len > s.size())
      return false;
    for (size_t j = 1; j < len; ++j)
      if ((byte(i + j) & 0xC0) != 0x80)
        return false;
    i += len;
  }
  return true;
}

const std::string ellipsis = "\xE2\x80\xA6";

std::string repeat(const std::string& s, size_t n) {
  std::string out;
  for (size_t i = 0; i < n; ++i)
    out += s;
  return out;
}

dead_letter_record full_record() {
  dead_letter_record rec;
  rec.id = 42;
  rec.category = "retries_exhausted";
  rec.reason = "inventory service timed out";
  rec.consumer = "order_events";
  rec.pattern = "order.*";
  rec.topic = "order.confirmed";
  rec.key = "order-17";
  rec.idempotency_key = "evt-0001";
  rec.transport = "inproc";
  rec.position = "inproc:orders#42";
  rec.node = "node-a";
  rec.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  rec.original = R"({"id":"evt-0001","topic":"order.confirmed","payload":)"
                 R"({"note":"line\nbreak \"quoted\" caf\u00e9"}})";
  rec.original_decoded = true;
  rec.replayed_ms = 1700000009000;
  rec.add_error(1, 1700000000000, "timeout after 5s");
  rec.add_error(2, 1700000001000, "connection reset — caf\xC3\xA9");
  rec.add_error(3, 1700000003000, "inventory service timed out");
  return rec;
}

void expect_equal(const dead_letter_record& x, const dead_letter_record& y) {
  EXPECT_EQ(x.id, y.id);
  EXPECT_EQ(x.category, y.category);
  EXPECT_EQ(x.reason, y.reason);
  EXPECT_EQ(x.attempts, y.attempts);
  EXPECT_EQ(x.first_failure_ms, y.first_failure_ms);
  EXPECT_EQ(x.last_failure_ms, y.last_failure_ms);
  ASSERT_EQ(x.errors.size(), y.errors.size());
  for (size_t i = 0; i < x.errors.size(); ++i) {
    EXPECT_EQ(x.errors[i].attempt, y.errors[i].attempt);
    EXPECT_EQ(x.errors[i].at_ms, y.errors[i].at_ms);
    EXPECT_EQ(x.errors[i].message, y.errors[i].message);
  }
  EXPECT_EQ(x.consumer, y.consumer);
  EXPECT_EQ(x.pattern, y.pattern);
  EXPECT_EQ(x.topic, y.topic);
  EXPECT_EQ(x.key, y.key);
  EXPECT_EQ(x.idempotency_key, y.idempotency_key);
  EXPECT_EQ(x.transport, y.transport);
  EXPECT_EQ(x.position, y.position);
  EXPECT_EQ(x.node, y.node);
  EXPECT_EQ(x.traceparent, y.traceparent);
  EXPECT_EQ(x.original, y.original);
  EXPECT_EQ(x.original_decoded, y.original_decoded);
  EXPECT_EQ(x.replayed_ms, y.replayed_ms);
}

} // namespace

TEST(dead_letter_record, keeps_only_the_last_five_errors_oldest_first) {
  dead_letter_record rec;
  for (uint32_t attempt = 1; attempt <= 7; ++attempt)
    rec.add_error(attempt, 1000 * attempt, "error " + std::to_string(attempt));
  ASSERT_EQ(rec.errors.size(), dead_letter_limits::max_errors);
  for (size_t i = 0; i < rec.errors.size(); ++i) {
    auto attempt = static_cast<uint32_t>(i + 3);
    EXPECT_EQ(rec.errors[i].attempt, attempt);
    EXPECT_EQ(rec.errors[i].at_ms, 1000 * attempt);
    EXPECT_EQ(rec.errors[i].message, "error " + std::to_string(attempt));
  }
}

TEST(dead_letter_record, remembers_first_and_last_failure_beyond_the_bound) {
  dead_letter_record rec;
  for (uint32_t attempt = 1; attempt <= 7; ++attempt)
    rec.add_error(attempt, 1000 * attempt, "boom");
  EXPECT_EQ(rec.first_failure_ms, 1000);
  EXPECT_EQ(rec.last_failure_ms, 7000);
  EXPECT_EQ(rec.attempts, 7u);
}

TEST(dead_letter_record, keeps_an_error_of_exactly_the_limit_unchanged) {
  dead_letter_record rec;
  auto msg = std::string(dead_letter_limits::max_error_bytes, 'x');
  rec.add_error(1, 1, msg);
  EXPECT_EQ(rec.errors.back().message, msg);
}

TEST(dead_letter_record, truncates_long_errors_on_a_utf8_boundary) {
  dead_letter_record rec;
  rec.add_error(1, 1, repeat("\xE2\x82\xAC", 2000)); // "€" is 3 bytes
  auto& msg = rec.errors.back().message;
  EXPECT_LE(msg.size(), dead_letter_limits::max_error_bytes);
  EXPECT_GT(msg.size(), dead_letter_limits::max_error_bytes - 8);
  EXPECT_TRUE(valid_utf8(msg));
  EXPECT_TRUE(msg.ends_with(ellipsis));
}

TEST(dead_letter_record, drops_a_sequence_the_limit_would_split) {
  // Byte 1021 (where the cut before the ellipsis falls) is the middle of
  // the first "€": the whole sequence goes.
  dead_letter_record rec;
  rec.add_error(1, 1, std::string(1020, 'a') + repeat("\xE2\x82\xAC", 10));
  EXPECT_EQ(rec.errors.back().message, std::string(1020, 'a') + ellipsis);
}

TEST(dead_letter_record, replaces_invalid_utf8_in_errors) {
  dead_letter_record rec;
  rec.add_error(1, 1, "bad \xFF\xC3 bytes");
  EXPECT_TRUE(valid_utf8(rec.errors.back().message));
  EXPECT_EQ(rec.errors.back().message, "bad \xEF\xBF\xBD\xEF\xBF\xBD bytes");
}

TEST(dead_letter_record, round_trips_through_json) {
  auto rec = full_record();
  auto json = to_json(rec);
  auto back = dead_letter_from_json(json);
  ASSERT_TRUE(back) << render(back.error());
  expect_equal(rec, *back);
}

TEST(dead_letter_record, json_uses_member_names_and_keeps_original_verbatim) {
  auto json = to_json(full_record());
  for (auto name : {"\"id\"", "\"category\"", "\"reason\"", "\"attempts\"",
                    "\"first_failure_ms\"", "\"last_failure_ms\"", "\"errors\"",
                    "\"consumer\"", "\"pattern\"", "\"topic\"", "\"key\"",
                    "\"idempotency_key\"", "\"transport\"", "\"position\"",
                    "\"node\"", "\"traceparent\"", "\"original\"",
                    "\"original_decoded\"", "\"replayed_ms\""})
    EXPECT_NE(json.find(name), std::string::npos) << name;
}

TEST(dead_letter_record, round_trips_original_bytes_that_are_not_utf8) {
  dead_letter_record rec;
  rec.category = "decode_error";
  rec.original = std::string("\x00\x01\xFF\xFE{not json", 13);
  auto json = to_json(rec);
  EXPECT_TRUE(valid_utf8(json));
  auto back = dead_letter_from_json(json);
  ASSERT_TRUE(back) << render(back.error());
  EXPECT_EQ(back->original, rec.original);
  EXPECT_FALSE(back->original_decoded);
}

TEST(dead_letter_record, decoding_garbage_is_a_decode_error) {
  for (auto input :
       {"", "not json", "{\"id\": 1", "[1, 2, 3]", "42",
        R"({"attempts": "three"})", R"({"attempts": -1})", R"({"errors": 5})",
        R"({"errors": [1]})", R"({"errors": [{"message": 7}]})",
        R"({"original_decoded": "yes"})", R"({"original_base64": "@@@"})"}) {
    auto rec = dead_letter_from_json(input);
    ASSERT_FALSE(rec) << input;
    EXPECT_EQ(code_of(rec.error()), errc::decode_error) << input;
  }
}

TEST(dead_letter_record, decoding_stays_bounded_for_oversized_input) {
  std::string json = R"({"category": "permanent", "errors": [)";
  for (int i = 1; i <= 9; ++i) {
    if (i > 1)
      json += ',';
    json += R"({"attempt": )" + std::to_string(i) + R"(, "at_ms": 1, )"
            + R"("message": ")" + std::string(3000, 'x') + "\"}";
  }
  json += "]}";
  auto rec = dead_letter_from_json(json);
  ASSERT_TRUE(rec) << render(rec.error());
  ASSERT_EQ(rec->errors.size(), dead_letter_limits::max_errors);
  EXPECT_EQ(rec->errors.front().attempt, 5u);
  for (auto& err : rec->errors)
    EXPECT_LE(err.message.size(), dead_letter_limits::max_error_bytes);
}
