#include "evmesh/pattern.hpp"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/error.hpp"

using namespace evmesh;

namespace {

struct match_case {
  const char* pattern;
  const char* topic;
  bool expected;
};

std::vector<uint32_t> ids_for(const topic_matcher& m, std::string_view topic) {
  std::vector<uint32_t> out;
  m.match(topic, out);
  return out;
}

} // namespace

TEST(pattern_matches, follows_nats_wildcard_rules) {
  std::vector<match_case> cases{
    // Exact patterns.
    {"order.confirmed", "order.confirmed", true},
    {"order.confirmed", "order.confirmed.v2", false},
    {"order.confirmed", "order", false},
    {"order", "order", true},
    {"order", "orders", false},
    // '*' matches exactly one token.
    {"order.*", "order.confirmed", true},
    {"order.*", "order", false},
    {"order.*", "order.confirmed.v2", false},
    {"*.confirmed", "order.confirmed", true},
    {"*.confirmed", "confirmed", false},
    {"order.*.v2", "order.confirmed.v2", true},
    {"order.*.v2", "order.confirmed.v3", false},
    {"*", "order", true},
    {"*", "order.confirmed", false},
    {"*.*", "a.b", true},
    // '>' matches one or more trailing tokens.
    {"order.>", "order.confirmed", true},
    {"order.>", "order.confirmed.v2.x", true},
    {"order.>", "order", false},
    {">", "order", true},
    {">", "a.b.c", true},
    {"*.>", "a", false},
    {"*.>", "a.b", true},
    {"order.*.>", "order.x.y", true},
    {"order.*.>", "order.x", false},
    // Tokens compare whole, not by prefix.
    {"ord.*", "order.x", false},
    // Invalid topics never match.
    {">", "", false},
    {"*", "", false},
    {"a.*", "a.", false},
    {"a.>", "a..b", false},
    {"*.b", ".b", false},
    // Invalid patterns never match.
    {"a..b", "a..b", false},
    {"a*", "a*", false},
    {"a.>.b", "a.x.b", false},
    {"", "", false},
    // Wildcard characters in a topic are plain characters.
    {"a.*", "a.*", true},
    {"a.b", "a.*", false},
  };
  for (const auto& c : cases)
    EXPECT_EQ(pattern_matches(c.pattern, c.topic), c.expected)
      << "pattern '" << c.pattern << "', topic '" << c.topic << "'";
}

TEST(validate_pattern, accepts_valid_patterns) {
  for (const char* p : {"a", "a.b.c", "*", ">", "a.*", "*.b", "a.*.>", "*.*.>",
                        "order-created_v2", "a.b-c.*"})
    EXPECT_FALSE(validate_pattern(p)) << p;
}

TEST(validate_pattern, names_the_pattern_and_the_broken_rule) {
  struct error_case {
    const char* pattern;
    const char* message_part;
  };
  std::vector<error_case> cases{
    {"", "must not be empty"},
    {"a..b", "empty token"},
    {".a", "empty token"},
    {"a.", "empty token"},
    {".", "empty token"},
    {"a.>.b", "'>' must be the last token"},
    {">.a", "'>' must be the last token"},
    {"a*", "must be whole tokens"},
    {"a.b*", "must be whole tokens"},
    {"a.>b", "must be whole tokens"},
    {"a.**", "must be whole tokens"},
    {"a.*>", "must be whole tokens"},
  };
  for (const auto& c : cases) {
    auto err = validate_pattern(c.pattern);
    ASSERT_TRUE(err) << c.pattern;
    EXPECT_EQ(err.code(), static_cast<uint8_t>(errc::invalid_pattern))
      << c.pattern;
    EXPECT_FALSE(is_retryable(err));
    auto text = render(err);
    EXPECT_NE(text.find(std::string{"'"} + c.pattern + "'"), std::string::npos)
      << text;
    EXPECT_NE(text.find(c.message_part), std::string::npos) << text;
  }
}

TEST(topic_matcher, an_empty_matcher_matches_nothing) {
  topic_matcher m;
  EXPECT_TRUE(m.empty());
  EXPECT_TRUE(ids_for(m, "a.b").empty());
  auto made = topic_matcher::make({});
  ASSERT_TRUE(made);
  EXPECT_TRUE(made->empty());
}

TEST(topic_matcher, mixes_exact_and_wildcard_patterns_in_ascending_id_order) {
  auto m = topic_matcher::make({
    {"order.*", 7},
    {"order.confirmed", 3},
    {">", 9},
    {"order.>", 1},
    {"*.confirmed", 5},
    {"order.shipped", 2},
    {"invoice.*.paid", 4},
    {"*.*.paid", 6},
  });
  ASSERT_TRUE(m) << render(m.error());
  EXPECT_FALSE(m->empty());
  EXPECT_EQ(ids_for(*m, "order.confirmed"),
            (std::vector<uint32_t>{1, 3, 5, 7, 9}));
  EXPECT_EQ(ids_for(*m, "order.shipped"), (std::vector<uint32_t>{1, 2, 7, 9}));
  EXPECT_EQ(ids_for(*m, "order.confirmed.v2"), (std::vector<uint32_t>{1, 9}));
  EXPECT_EQ(ids_for(*m, "order"), (std::vector<uint32_t>{9}));
  EXPECT_EQ(ids_for(*m, "invoice.42.paid"), (std::vector<uint32_t>{4, 6, 9}));
  EXPECT_EQ(ids_for(*m, "refund.42.paid"), (std::vector<uint32_t>{6, 9}));
  EXPECT_TRUE(ids_for(*m, "").empty());
  EXPECT_TRUE(ids_for(*m, "order..confirmed").empty());
}

TEST(topic_matcher, agrees_with_pattern_matches) {
  std::vector<std::pair<std::string, uint32_t>> patterns{
    {"a", 0}, {"a.b", 1},   {"a.*", 2},   {"a.>", 3},   {"*.b", 4},    {"*", 5},
    {">", 6}, {"a.*.c", 7}, {"*.*.*", 8}, {"a.b.>", 9}, {"x.y.z", 10},
  };
  auto m = topic_matcher::make(patterns);
  ASSERT_TRUE(m);
  for (const char* topic : {"a", "b", "a.b", "a.c", "b.b", "a.b.c", "a.x.c",
                            "x.y.z", "a.b.c.d", "q.r.s", "", "a..b"}) {
    std::vector<uint32_t> expected;
    for (const auto& [pattern, id] : patterns)
      if (pattern_matches(pattern, topic))
        expected.push_back(id);
    EXPECT_EQ(ids_for(*m, topic), expected) << topic;
  }
}

TEST(topic_matcher, deduplicates_ids_shared_by_several_patterns) {
  auto m = topic_matcher::make({
    {"order.confirmed", 2},
    {"order.*", 2},
    {"order.>", 2},
    {"order.*", 1},
    {"order.confirmed", 1},
  });
  ASSERT_TRUE(m);
  EXPECT_EQ(ids_for(*m, "order.confirmed"), (std::vector<uint32_t>{1, 2}));
}

TEST(topic_matcher, appends_without_touching_existing_output) {
  auto m = topic_matcher::make({{"a.*", 3}, {"a.b", 1}});
  ASSERT_TRUE(m);
  std::vector<uint32_t> out{9, 0};
  m->match("a.b", out);
  EXPECT_EQ(out, (std::vector<uint32_t>{9, 0, 1, 3}));
}

TEST(topic_matcher, rejects_an_invalid_pattern) {
  auto m = topic_matcher::make({{"a.b", 1}, {"a.>.c", 2}});
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code(), static_cast<uint8_t>(errc::invalid_pattern));
  EXPECT_NE(render(m.error()).find("'a.>.c'"), std::string::npos);
}

TEST(topic_matcher, survives_moves) {
  auto made = topic_matcher::make({{"a.*", 1}, {"b", 2}});
  ASSERT_TRUE(made);
  topic_matcher m = std::move(*made);
  EXPECT_EQ(ids_for(m, "a.x"), (std::vector<uint32_t>{1}));
  EXPECT_EQ(ids_for(m, "b"), (std::vector<uint32_t>{2}));
}
