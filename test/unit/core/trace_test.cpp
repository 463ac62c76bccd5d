#include "evmesh/trace.hpp"

#include <algorithm>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/error.hpp"

using namespace evmesh;

namespace {

constexpr const char* valid_sampled
  = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
constexpr const char* valid_unsampled
  = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

struct parse_case {
  const char* name;
  std::string text;
  bool valid;
  const char* message_part = "";
};

std::string hex(const trace_id& x) {
  return to_hex(x.data(), x.size());
}

std::string hex(const span_id& x) {
  return to_hex(x.data(), x.size());
}

template <size_t N>
bool all_zero(const std::array<uint8_t, N>& xs) {
  for (auto x : xs)
    if (x != 0)
      return false;
  return true;
}

} // namespace

TEST(traceparent, accepts_and_rejects_the_w3c_forms) {
  std::string base = valid_sampled;
  std::vector<parse_case> cases{
    {"sampled", valid_sampled, true},
    {"unsampled", valid_unsampled, true},
    {"other flag bits",
     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff", true},
    {"future version, exact length",
     "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", true},
    {"future version with extra fields",
     "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future",
     true},
    {"future version, extra without dash",
     "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", false,
     "must start with '-'"},
    {"version 00 with extra fields", base + "-extra", false,
     "exactly 55 characters"},
    {"version 00 one char longer", base + "0", false, "exactly 55"},
    {"empty", "", false, "expected 55 characters"},
    {"one char short", base.substr(0, 54), false, "got 54"},
    {"version ff", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
     false, "version ff"},
    {"uppercase version",
     "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", false,
     "version"},
    {"uppercase trace id",
     "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", false,
     "trace id"},
    {"uppercase span id",
     "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01", false,
     "parent id"},
    {"uppercase flags",
     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A", false, "flags"},
    {"non-hex trace id",
     "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", false,
     "trace id"},
    {"all-zero trace id",
     "00-00000000000000000000000000000000-00f067aa0ba902b7-01", false,
     "all-zero trace id"},
    {"all-zero span id",
     "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", false,
     "all-zero parent id"},
    {"underscore separators",
     "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01", false,
     "'-' at positions"},
    {"misplaced separator",
     "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01", false,
     "'-' at positions"},
    {"short trace id", "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
     false},
    {"whitespace padded", " " + base.substr(0, 54), false},
  };
  for (const auto& c : cases) {
    auto res = parse_traceparent(c.text);
    EXPECT_EQ(static_cast<bool>(res), c.valid) << c.name;
    if (!res) {
      EXPECT_EQ(res.error().code(),
                static_cast<uint8_t>(errc::invalid_traceparent))
        << c.name;
      auto text = render(res.error());
      EXPECT_NE(text.find(c.message_part), std::string::npos)
        << c.name << ": " << text;
    }
  }
}

TEST(traceparent, rejects_uppercase_hex) {
  EXPECT_FALSE(parse_traceparent(
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"));
}

TEST(traceparent, parses_version_ids_and_flags) {
  auto res = parse_traceparent(valid_sampled);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->version, 0);
  EXPECT_EQ(hex(res->trace), "4bf92f3577b34da6a3ce929d0e0e4736");
  EXPECT_EQ(hex(res->parent), "00f067aa0ba902b7");
  EXPECT_EQ(res->flags, 1);
  auto future = parse_traceparent(
    "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-rest");
  ASSERT_TRUE(future);
  EXPECT_EQ(future->version, 0xcc);
  EXPECT_EQ(future->flags, 3);
}

TEST(traceparent, error_messages_quote_the_input) {
  auto res = parse_traceparent("garbage");
  ASSERT_FALSE(res);
  EXPECT_NE(render(res.error()).find("'garbage'"), std::string::npos);
}

TEST(traceparent, formats_lowercase_version_00) {
  auto res = parse_traceparent(valid_sampled);
  ASSERT_TRUE(res);
  EXPECT_EQ(format_traceparent(res->trace, res->parent, res->flags),
            valid_sampled);
  uint8_t bytes[] = {0x00, 0xab, 0xff, 0x10};
  EXPECT_EQ(to_hex(bytes, 4), "00abff10");
}

TEST(trace_context, continues_the_producers_trace_with_a_fresh_span) {
  auto ctx = continue_trace(valid_sampled, "vendor=1,other=2");
  EXPECT_FALSE(ctx.is_root);
  EXPECT_EQ(hex(ctx.trace), "4bf92f3577b34da6a3ce929d0e0e4736");
  EXPECT_EQ(hex(ctx.parent), "00f067aa0ba902b7");
  EXPECT_FALSE(all_zero(ctx.span));
  EXPECT_NE(ctx.span, ctx.parent);
  EXPECT_EQ(ctx.flags, 1);
  EXPECT_EQ(ctx.tracestate, "vendor=1,other=2");
  EXPECT_EQ(ctx.traceparent(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-" + hex(ctx.span) + "-01");
}

TEST(trace_context, keeps_the_unsampled_flag) {
  auto ctx = continue_trace(valid_unsampled);
  EXPECT_FALSE(ctx.is_root);
  EXPECT_EQ(ctx.flags, 0);
  EXPECT_EQ(ctx.traceparent().substr(53), "00");
}

TEST(trace_context, forwards_a_future_version_as_version_00) {
  auto ctx = continue_trace(
    "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more");
  EXPECT_FALSE(ctx.is_root);
  EXPECT_EQ(ctx.traceparent().substr(0, 3), "00-");
  EXPECT_EQ(ctx.traceparent().size(), 55u);
}

TEST(trace_context, invalid_or_missing_traceparent_starts_a_new_root) {
  for (const char* text :
       {"", "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}) {
    auto ctx = continue_trace(text, "vendor=1");
    EXPECT_TRUE(ctx.is_root) << text;
    EXPECT_FALSE(all_zero(ctx.trace)) << text;
    EXPECT_FALSE(all_zero(ctx.span)) << text;
    EXPECT_TRUE(all_zero(ctx.parent)) << text;
    EXPECT_EQ(ctx.flags, 1) << text;
    EXPECT_EQ(ctx.tracestate, "") << text;
    EXPECT_TRUE(parse_traceparent(ctx.traceparent())) << text;
  }
}

TEST(trace_context, new_roots_are_sampled_and_distinct) {
  auto a = new_root_trace("s=1");
  auto b = new_root_trace();
  EXPECT_TRUE(a.is_root);
  EXPECT_EQ(a.flags, 1);
  EXPECT_EQ(a.tracestate, "s=1");
  EXPECT_NE(a.trace, b.trace);
  EXPECT_NE(a.span, b.span);
}

TEST(trace_context, child_of_links_to_the_parent_span) {
  auto parent = continue_trace(valid_unsampled, "x=1");
  auto child = child_of(parent);
  EXPECT_EQ(child.trace, parent.trace);
  EXPECT_EQ(child.parent, parent.span);
  EXPECT_NE(child.span, parent.span);
  EXPECT_EQ(child.flags, parent.flags);
  EXPECT_EQ(child.tracestate, "x=1");
  EXPECT_FALSE(child.is_root);
}

TEST(trace_ids, are_never_zero_and_rarely_repeat) {
  std::vector<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    auto span = new_span_id();
    auto trace = new_trace_id();
    ASSERT_FALSE(all_zero(span));
    ASSERT_FALSE(all_zero(trace));
    seen.push_back(hex(trace));
  }
  std::sort(seen.begin(), seen.end());
  EXPECT_EQ(std::unique(seen.begin(), seen.end()), seen.end());
}
