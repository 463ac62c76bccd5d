// The Kafka transport's per-partition offset table against a std::map.
#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "offset_table.hpp"

using evmesh::kafka_detail::offset_table;

namespace {

struct info {
  int state = 0;
  uint64_t tag = 0;
};

// Everything the table holds, in the order for_each visits it.
std::vector<std::pair<int64_t, int>> contents(offset_table<info>& t) {
  std::vector<std::pair<int64_t, int>> out;
  t.for_each(
    [&](int64_t off, const info& x) { out.emplace_back(off, x.state); });
  return out;
}

} // namespace

TEST(kafka_offset_table, finds_what_was_inserted_and_nothing_else) {
  offset_table<info> t;
  EXPECT_TRUE(t.empty());
  EXPECT_EQ(t.find(0), nullptr);
  t[5].state = 1;
  t[300].state = 2; // another page
  EXPECT_FALSE(t.empty());
  ASSERT_NE(t.find(5), nullptr);
  EXPECT_EQ(t.find(5)->state, 1);
  EXPECT_EQ(t.find(300)->state, 2);
  EXPECT_EQ(t.find(6), nullptr);
  EXPECT_EQ(t.find(299), nullptr);
  EXPECT_FALSE(t.contains(4));
  EXPECT_TRUE(t.contains(300));
  EXPECT_EQ(t.lowest(), 5);
  // operator[] on an existing entry keeps it.
  EXPECT_EQ(t[5].state, 1);
}

TEST(kafka_offset_table, erasing_the_last_entry_of_a_page_frees_it) {
  offset_table<info> t;
  t[10].state = 1;
  t[1000].state = 2;
  t.erase(10); // the cached page goes away
  EXPECT_EQ(t.find(10), nullptr);
  EXPECT_EQ(t.lowest(), 1000);
  t[10].state = 3; // and comes back empty
  EXPECT_EQ(t.find(10)->state, 3);
  EXPECT_EQ(t.find(11), nullptr);
  t.erase(10);
  t.erase(1000);
  t.erase(1000); // absent: harmless
  EXPECT_TRUE(t.empty());
}

TEST(kafka_offset_table, large_gaps_cost_nothing_and_keep_their_order) {
  // A compacted topic: offsets billions apart.
  offset_table<info> t;
  t[int64_t{1} << 40].state = 3;
  t[7].state = 1;
  t[int64_t{1} << 33].state = 2;
  auto c = contents(t);
  ASSERT_EQ(c.size(), 3u);
  EXPECT_EQ(c[0].first, 7);
  EXPECT_EQ(c[1].first, int64_t{1} << 33);
  EXPECT_EQ(c[2].first, int64_t{1} << 40);
  t.erase_below(int64_t{1} << 34);
  EXPECT_EQ(t.lowest(), int64_t{1} << 40);
  EXPECT_EQ(contents(t).size(), 1u);
}

TEST(kafka_offset_table, agrees_with_a_map_under_random_operations) {
  // Offsets drift upwards as a partition is consumed: inserts ahead,
  // settles in between, the terminal prefix dropped, now and then a revoke
  // forgets a range or a replay goes back.
  offset_table<info> t;
  std::map<int64_t, int> model;
  std::mt19937_64 rng{7122026};
  int64_t head = 0;
  for (int step = 0; step < 200'000; ++step) {
    auto r = rng() % 100;
    if (r < 40) {
      auto off = head++;
      t[off].state = 1;
      model[off] = 1;
    } else if (r < 70 && !model.empty() && head > model.begin()->first) {
      // Settle an offset somewhere in the window.
      auto span = static_cast<uint64_t>(head - model.begin()->first);
      auto off = model.begin()->first + static_cast<int64_t>(rng() % span);
      auto* x = t.find(off);
      auto m = model.find(off);
      ASSERT_EQ(x != nullptr, m != model.end()) << off;
      if (x != nullptr) {
        x->state = 2;
        m->second = 2;
      }
    } else if (r < 90) {
      // Drop the terminal prefix, as the watermark does.
      while (!model.empty() && model.begin()->second == 2) {
        ASSERT_EQ(t.lowest(), model.begin()->first);
        t.erase(t.lowest());
        model.erase(model.begin());
      }
    } else if (r < 95) {
      auto off = head - static_cast<int64_t>(rng() % 600);
      t.erase(off);
      model.erase(off);
    } else if (r < 97) {
      auto below = head - static_cast<int64_t>(rng() % 2000);
      t.erase_below(below);
      model.erase(model.begin(), model.lower_bound(below));
    } else if (r < 98) {
      head += static_cast<int64_t>(rng() % 5000); // a gap
    } else {
      head = std::max<int64_t>(0, head - static_cast<int64_t>(rng() % 700));
    }
    ASSERT_EQ(t.empty(), model.empty()) << step;
    if (!model.empty()) {
      ASSERT_EQ(t.lowest(), model.begin()->first) << step;
    }
  }
  auto c = contents(t);
  ASSERT_EQ(c.size(), model.size());
  size_t i = 0;
  for (auto& [off, state] : model) {
    EXPECT_EQ(c[i].first, off);
    EXPECT_EQ(c[i].second, state);
    ++i;
  }
}
