#include "key_arena.hpp"

#include <cstdint>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#include <gtest/gtest.h>

using evmesh::detail::key_arena;

namespace {

struct held {
  char* p;
  std::string key;
};

std::string key_of(size_t i, size_t len) {
  auto k = "k" + std::to_string(i) + ":";
  k.resize(len, 'x');
  return k;
}

} // namespace

TEST(key_arena, copies_keys_of_every_size_and_keeps_them_intact) {
  key_arena arena;
  EXPECT_EQ(arena.copy(""), nullptr);
  std::vector<held> keys;
  // Across several chunks, with keys up to and past the longest one that is
  // packed into a chunk (the longer ones get heap blocks).
  for (size_t i = 0; i < 3'000; ++i) {
    auto len = 1 + (i * 37) % (key_arena::max_key + 200);
    auto k = key_of(i, len);
    keys.push_back({arena.copy(k), k});
  }
  EXPECT_GT(arena.chunk_count(), 3u);
  for (auto& h : keys)
    ASSERT_EQ(std::string_view(h.p, h.key.size()), h.key);
  size_t packed = 0;
  for (auto& h : keys)
    if (h.key.size() <= key_arena::max_key)
      packed += h.key.size();
  EXPECT_EQ(arena.live_bytes(), packed);
  for (auto& h : keys)
    arena.drop(h.p, h.key.size());
  EXPECT_EQ(arena.live_bytes(), 0u);
  // The chunk being filled and one spare stay; the rest are given back.
  EXPECT_LE(arena.chunk_count(), 2u);
  EXPECT_GE(arena.unneeded().size(), 2u);
}

TEST(key_arena, keys_that_expire_in_order_recycle_the_same_chunks) {
  // Steady state of a store whose keys expire in the order they came: the
  // chunks emptied by expiry are reused instead of mapping new ones.
  key_arena arena;
  std::deque<held> window;
  size_t most = 0;
  for (size_t i = 0; i < 200'000; ++i) {
    auto k = key_of(i, 36);
    window.push_back({arena.copy(k), k});
    if (window.size() > 5'000) {
      arena.drop(window.front().p, window.front().key.size());
      window.pop_front();
    }
    most = std::max(most, arena.chunk_count());
  }
  // 5 000 keys of 36 bytes fill about three chunks.
  EXPECT_LE(most, 5u);
  EXPECT_TRUE(arena.unneeded().empty())
    << "no chunk beyond the spare was freed: none was mapped anew";
  for (auto& h : window)
    ASSERT_EQ(std::string_view(h.p, h.key.size()), h.key);
}

TEST(key_arena, a_few_long_lived_keys_do_not_pin_their_chunks) {
  // One key in 500 lives on; the others go. Without evacuation each of
  // the ~60 chunks filled would stay for its one survivor.
  key_arena arena;
  std::vector<held> survivors;
  for (size_t i = 0; i < 100'000; ++i) {
    auto k = key_of(i, 40);
    auto* p = arena.copy(k);
    if (i % 500 == 0)
      survivors.push_back({p, k});
    else
      arena.drop(p, k.size());
  }
  EXPECT_TRUE(arena.has_evacuations());
  size_t marked = 0;
  for (auto& h : survivors)
    if (arena.evacuating(h.p, h.key.size()))
      ++marked;
  EXPECT_GE(marked, survivors.size() - 4) << "all but the current chunk's";
  // What the shard does when it meets such a key: copy it, drop the old.
  for (auto& h : survivors)
    if (arena.evacuating(h.p, h.key.size())) {
      auto* moved = arena.copy(h.key);
      arena.drop(h.p, h.key.size());
      h.p = moved;
    }
  EXPECT_FALSE(arena.has_evacuations());
  EXPECT_LE(arena.chunk_count(), 3u);
  EXPECT_EQ(arena.live_bytes(), survivors.size() * 40);
  for (auto& h : survivors)
    ASSERT_EQ(std::string_view(h.p, h.key.size()), h.key);
}

TEST(key_arena, asks_for_a_spare_once_the_chunk_is_half_full) {
  key_arena arena;
  std::vector<held> keys;
  size_t i = 0;
  while (!arena.wants_spare()) {
    auto k = key_of(i++, 100);
    keys.push_back({arena.copy(k), k});
    ASSERT_LT(i, key_arena::chunk_bytes / 100) << "never asked";
  }
  EXPECT_GE(i * 100, key_arena::chunk_bytes / 2);
  arena.spare_asked();
  EXPECT_FALSE(arena.wants_spare()) << "asked once";
  auto* chunk = key_arena::map_chunk(true);
  ASSERT_NE(chunk, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(chunk) % key_arena::chunk_bytes, 0u);
  EXPECT_EQ(arena.adopt_spare(chunk), nullptr) << "taken as the spare";
  EXPECT_EQ(arena.chunk_count(), 2u);
  // More than a chunk's worth: the next chunk is the spare, not a new one.
  for (size_t more = 0; more < key_arena::chunk_bytes / 100 + 50; ++more) {
    auto k = key_of(i++, 100);
    keys.push_back({arena.copy(k), k});
  }
  EXPECT_EQ(arena.chunk_count(), 2u) << "filled into the spare";
  for (auto& h : keys)
    ASSERT_EQ(std::string_view(h.p, h.key.size()), h.key);
  // A second spare that arrives while one waits is handed back.
  for (auto& h : keys)
    arena.drop(h.p, h.key.size());
  auto* another = key_arena::map_chunk(false);
  ASSERT_NE(another, nullptr);
  EXPECT_EQ(arena.adopt_spare(another), another);
  key_arena::unmap_chunk(another);
}
