#include <atomic>
#include <filesystem>
#include <sstream>
#include <string>

#include <gtest/gtest.h>
#include <unistd.h>

#include "evmesh/error.hpp"
#include "evmesh/stores.hpp"

#include "dlq.hpp"
#include "text.hpp"

using namespace evmesh;
using namespace evmesh::cli;

namespace {

bool contains(const std::string& haystack, std::string_view needle) {
  return haystack.find(needle) != std::string::npos;
}

/// A fresh directory under the system temp directory, removed at scope end.
struct temp_dir {
  std::filesystem::path path;

  temp_dir() {
    static std::atomic<int> counter{0};
    path = std::filesystem::temp_directory_path()
           / ("evmesh_cli_test_" + std::to_string(getpid()) + "_"
              + std::to_string(counter++));
    std::filesystem::create_directories(path);
  }

  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

dead_letter_record make_record(std::string topic, std::string category,
                               int64_t last_failure_ms) {
  dead_letter_record rec;
  rec.category = std::move(category);
  rec.reason = "inventory service timed out\nafter 30s";
  rec.attempts = 5;
  rec.first_failure_ms = last_failure_ms - 60'000;
  rec.last_failure_ms = last_failure_ms;
  rec.add_error(4, last_failure_ms - 1000, "connection reset");
  rec.add_error(5, last_failure_ms, "inventory service timed out");
  rec.consumer = "order_events";
  rec.pattern = "order.*";
  rec.topic = std::move(topic);
  rec.key = "o-17";
  rec.idempotency_key = "evt-1";
  rec.transport = "inproc";
  rec.position = "inproc:orders#42";
  rec.node = "node-1";
  rec.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  rec.original = R"({"id":"evt-1","topic":"order.confirmed",)"
                 R"("payload":{"order_id":"o-17","quantity":2}})";
  rec.original_decoded = true;
  return rec;
}

} // namespace

// -- text helpers ---------------------------------------------------------------

TEST(cli_text, formats_and_parses_times) {
  EXPECT_EQ(format_time_ms(0), "-");
  EXPECT_EQ(format_time_ms(1714564800123), "2024-05-01T12:00:00.123Z");
  const int64_t now = 1714564800000;
  struct row {
    std::string_view text;
    int64_t expected;
  };
  const row rows[] = {
    {"2024-05-01T12:00:00Z", 1714564800000},
    {"2024-05-01T12:00:00.5Z", 1714564800500},
    {"2024-05-01t12:00:00.123z", 1714564800123},
    {"2024-05-01T14:00:00+02:00", 1714564800000},
    {"2024-05-01T11:30:00-00:30", 1714564800000},
    {"2024-05-01", 1714521600000},
    {"1714564800000", 1714564800000},
    {"2h", now - 7'200'000},
    {"1h30m", now - 5'400'000},
  };
  for (const auto& r : rows) {
    auto ms = parse_time_ms(r.text, now);
    ASSERT_TRUE(ms) << r.text << ": " << render(ms.error());
    EXPECT_EQ(*ms, r.expected) << r.text;
  }
  for (std::string_view bad : {"", "yesterday", "2024-05-01T12:00:00",
                               "2024-13-01", "2024-05-01T12:00Z", "-5m"}) {
    auto ms = parse_time_ms(bad, now);
    ASSERT_FALSE(ms) << bad;
    EXPECT_TRUE(contains(message_of(ms.error()), "RFC 3339")) << bad;
  }
}

TEST(cli_text, pretty_prints_json_in_order) {
  auto x = pretty_json(R"({"b":1,"a":[true,null,{"c":"x"}],"e":{},"f":[]})");
  ASSERT_TRUE(x);
  EXPECT_EQ(*x, "{\n"
                "  \"b\": 1,\n"
                "  \"a\": [\n"
                "    true,\n"
                "    null,\n"
                "    {\n"
                "      \"c\": \"x\"\n"
                "    }\n"
                "  ],\n"
                "  \"e\": {},\n"
                "  \"f\": []\n"
                "}");
  EXPECT_FALSE(pretty_json("not json"));
  EXPECT_FALSE(pretty_json(""));
}

TEST(cli_text, cleans_and_truncates_cells) {
  EXPECT_EQ(one_line("a\nb\t\tc  "), "a b c");
  EXPECT_EQ(one_line("bad\xff byte"), "bad? byte");
  EXPECT_EQ(truncate_text("hello", 5), "hello");
  EXPECT_EQ(truncate_text("hello world", 6), "hello…");
  EXPECT_EQ(truncate_text("äöüäöü", 4), "äöü…");
  EXPECT_EQ(display_width("äöü"), 3u);
  EXPECT_EQ(printable("a\x01\nb\xff"), "a\\x01\nb\\xff");
}

TEST(cli_text, renders_aligned_tables) {
  auto table = render_table({"ID", "NAME"}, {{"1", "x"}, {"100", "yz"}});
  EXPECT_EQ(table, "ID   NAME\n"
                   "1    x\n"
                   "100  yz\n");
}

// -- dlq commands ---------------------------------------------------------------

TEST(cli_dlq, missing_store_is_reported_and_not_created) {
  temp_dir dir;
  auto path = (dir.path / "state" / "dlq.db").string();
  auto store = open_existing_store("sqlite://" + path);
  ASSERT_FALSE(store);
  auto msg = message_of(store.error());
  EXPECT_TRUE(contains(msg, "no dead-letter store at " + path)) << msg;
  EXPECT_TRUE(contains(msg, "has the service run here?")) << msg;
  EXPECT_FALSE(std::filesystem::exists(path));
  std::ostringstream out;
  std::ostringstream err;
  dlq_list_options opts;
  opts.db = "sqlite://" + path;
  EXPECT_EQ(dlq_list(opts, out, err), exit_failure);
  EXPECT_TRUE(contains(err.str(), "no dead-letter store")) << err.str();
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(cli_dlq, lists_filters_and_shows_records) {
  temp_dir dir;
  auto url = "sqlite://" + (dir.path / "dlq.db").string();
  {
    auto store = make_dead_letter_store(url);
    ASSERT_TRUE(store) << render(store.error());
    for (auto rec :
         {make_record("order.confirmed", "retries_exhausted", 1714564800000),
          make_record("order.cancelled", "permanent", 1714564900000),
          make_record("order.confirmed", "decode_error", 1714565000000)}) {
      ASSERT_TRUE((*store)->write(rec));
    }
  }
  std::ostringstream out;
  std::ostringstream err;
  dlq_list_options list;
  list.db = url;
  ASSERT_EQ(dlq_list(list, out, err), 0) << err.str();
  auto table = out.str();
  EXPECT_TRUE(contains(table, "ID")) << table;
  EXPECT_TRUE(contains(table, "REASON")) << table;
  EXPECT_TRUE(contains(table, "2024-05-01T12:00:00.000Z")) << table;
  EXPECT_TRUE(contains(table, "inventory service timed out after 30s"))
    << table;
  EXPECT_EQ(std::count(table.begin(), table.end(), '\n'), 4) << table;
  // Newest first.
  EXPECT_LT(table.find("decode_error"), table.find("retries_exhausted"));
  // Filters and JSON lines.
  out.str("");
  list.query.topic = "order.confirmed";
  list.query.since_ms = 1714564900000;
  list.json = true;
  ASSERT_EQ(dlq_list(list, out, err), 0) << err.str();
  auto lines = out.str();
  ASSERT_EQ(std::count(lines.begin(), lines.end(), '\n'), 1) << lines;
  auto rec = dead_letter_from_json(lines.substr(0, lines.size() - 1));
  ASSERT_TRUE(rec) << render(rec.error());
  EXPECT_EQ(rec->category, "decode_error");
  // Show.
  out.str("");
  dlq_show_options show;
  show.db = url;
  show.id = rec->id;
  ASSERT_EQ(dlq_show(show, out, err), 0) << err.str();
  auto text = out.str();
  for (std::string_view part :
       {"dead letter ", "decode_error", "order_events", "order.*",
        "inproc:orders#42", "node-1", "00-4bf92f3577b34da6a3ce929d0e0e4736",
        "attempt 4 at", "connection reset",
        "original envelope:", "    \"order_id\": \"o-17\""}) {
    EXPECT_TRUE(contains(text, part)) << "lacks " << part << ":\n" << text;
  }
  show.id = 9999;
  err.str("");
  EXPECT_EQ(dlq_show(show, out, err), exit_failure);
  EXPECT_TRUE(contains(err.str(), "no dead letter with id 9999")) << err.str();
}

TEST(cli_dlq, shows_undecodable_originals_verbatim) {
  auto rec = make_record("t", "decode_error", 1);
  rec.original = "not json\x01";
  rec.original_decoded = false;
  auto text = describe_record(rec);
  EXPECT_TRUE(contains(text, "not JSON")) << text;
  EXPECT_TRUE(contains(text, "  not json\\x01")) << text;
}
