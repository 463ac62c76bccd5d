#include "evmesh/memory_store.hpp"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/stores.hpp"

using namespace evmesh;
using namespace std::chrono_literals;

namespace {

/// Virtual time: starts at an arbitrary point and moves only when told.
struct virtual_clock {
  std::atomic<std::chrono::steady_clock::rep> ticks{1'000'000'000};

  std::chrono::steady_clock::time_point now() const {
    return std::chrono::steady_clock::time_point{
      std::chrono::steady_clock::duration{ticks.load()}};
  }

  void advance(std::chrono::steady_clock::duration d) {
    ticks += d.count();
  }
};

struct memory_store_fixture : testing::Test {
  virtual_clock clock;
  memory_idempotency_store store{4, [this] { return clock.now(); }};
};

} // namespace

using memory_idempotency_store_test = memory_store_fixture;

TEST_F(memory_idempotency_store_test, first_claim_is_fresh) {
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::fresh);
  EXPECT_EQ(store.size(), 1u);
}

TEST_F(memory_idempotency_store_test, committed_key_is_a_duplicate) {
  ASSERT_EQ(store.try_begin("k", 30s), claim_result::fresh);
  EXPECT_FALSE(store.commit("k", 1h));
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::duplicate);
  EXPECT_EQ(store.try_begin("other", 30s), claim_result::fresh);
}

TEST_F(memory_idempotency_store_test, leased_key_is_in_flight) {
  ASSERT_EQ(store.try_begin("k", 30s), claim_result::fresh);
  clock.advance(29s);
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::in_flight);
}

TEST_F(memory_idempotency_store_test, expired_lease_can_be_claimed_again) {
  ASSERT_EQ(store.try_begin("k", 30s), claim_result::fresh);
  clock.advance(30s);
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::fresh);
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::in_flight);
}

TEST_F(memory_idempotency_store_test, commit_is_forgotten_after_keep) {
  ASSERT_EQ(store.try_begin("k", 30s), claim_result::fresh);
  ASSERT_FALSE(store.commit("k", 1h));
  clock.advance(1h - 1ms);
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::duplicate);
  clock.advance(1ms);
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::fresh);
}

TEST_F(memory_idempotency_store_test, commit_without_claim_is_an_upsert) {
  EXPECT_FALSE(store.commit("k", 1h));
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::duplicate);
}

TEST_F(memory_idempotency_store_test, commit_with_zero_keep_forgets_the_key) {
  ASSERT_EQ(store.try_begin("k", 30s), claim_result::fresh);
  EXPECT_FALSE(store.commit("k", 0s));
  EXPECT_EQ(store.size(), 0u);
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::fresh);
}

TEST_F(memory_idempotency_store_test, abort_releases_the_claim) {
  ASSERT_EQ(store.try_begin("k", 30s), claim_result::fresh);
  EXPECT_FALSE(store.abort("k"));
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::fresh);
}

TEST_F(memory_idempotency_store_test, abort_after_commit_keeps_it_committed) {
  ASSERT_EQ(store.try_begin("k", 30s), claim_result::fresh);
  ASSERT_FALSE(store.commit("k", 1h));
  EXPECT_FALSE(store.abort("k"));
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::duplicate);
}

TEST_F(memory_idempotency_store_test, abort_of_an_unknown_key_is_harmless) {
  EXPECT_FALSE(store.abort("nobody"));
  EXPECT_EQ(store.size(), 0u);
}

// Leases carry no owner: worker A's lease expires, B re-claims, then A's
// late abort releases B's claim, so C may claim while B still runs. This is
// the documented price of an owner-less interface (at most a duplicate
// execution); a late commit from A, by contrast, is never lost.
TEST_F(memory_idempotency_store_test, late_abort_releases_a_newer_claim) {
  ASSERT_EQ(store.try_begin("k", 30s), claim_result::fresh); // A
  clock.advance(31s);
  ASSERT_EQ(store.try_begin("k", 30s), claim_result::fresh); // B
  EXPECT_FALSE(store.abort("k"));                            // A, late
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::fresh); // C
}

TEST_F(memory_idempotency_store_test, late_abort_never_undoes_a_commit) {
  ASSERT_EQ(store.try_begin("k", 30s), claim_result::fresh); // A
  clock.advance(31s);
  ASSERT_EQ(store.try_begin("k", 30s), claim_result::fresh); // B
  ASSERT_FALSE(store.commit("k", 1h));                       // B done
  EXPECT_FALSE(store.abort("k"));                            // A, late
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::duplicate);
}

TEST_F(memory_idempotency_store_test, huge_ttls_do_not_overflow) {
  ASSERT_EQ(store.try_begin("k", caf::timespan::max()), claim_result::fresh);
  EXPECT_EQ(store.try_begin("k", 1s), claim_result::in_flight);
  ASSERT_FALSE(store.commit("k", caf::timespan::max()));
  clock.advance(24h * 365);
  EXPECT_EQ(store.try_begin("k", 1s), claim_result::duplicate);
}

TEST_F(memory_idempotency_store_test, evict_expired_removes_only_expired) {
  for (int i = 0; i < 100; ++i)
    ASSERT_EQ(store.try_begin("lease-" + std::to_string(i), 10s),
              claim_result::fresh);
  for (int i = 0; i < 50; ++i)
    ASSERT_FALSE(store.commit("kept-" + std::to_string(i), 1h));
  clock.advance(10s);
  EXPECT_EQ(store.evict_expired(), 100u);
  EXPECT_EQ(store.size(), 50u);
}

TEST(memory_idempotency_store, sweeps_expired_entries_without_being_asked) {
  virtual_clock clock;
  memory_idempotency_store store{1, [&] { return clock.now(); }};
  constexpr int n = 20'000;
  for (int i = 0; i < n; ++i)
    ASSERT_EQ(store.try_begin("old-" + std::to_string(i), 1s),
              claim_result::fresh);
  clock.advance(2s);
  // New traffic only: the old keys are never touched again, yet the
  // incremental sweep must reclaim them.
  for (int i = 0; i < n; ++i)
    ASSERT_EQ(store.try_begin("new-" + std::to_string(i), 1h),
              claim_result::fresh);
  EXPECT_LT(store.size(), n + n / 4);
}

TEST(memory_idempotency_store, uses_at_least_one_shard) {
  memory_idempotency_store store{0};
  EXPECT_EQ(store.shard_count(), 1u);
  EXPECT_EQ(store.try_begin("k", 30s), claim_result::fresh);
}

TEST(memory_idempotency_store, defaults_to_the_steady_clock) {
  memory_idempotency_store store;
  EXPECT_EQ(store.shard_count(), 16u);
  EXPECT_EQ(store.try_begin("k", 1h), claim_result::fresh);
  EXPECT_EQ(store.try_begin("k", 1h), claim_result::in_flight);
}

TEST(memory_idempotency_store, only_one_of_eight_racing_threads_is_fresh) {
  memory_idempotency_store store;
  constexpr size_t threads = 8;
  constexpr size_t rounds = 500;
  // results[round][thread]; all threads claim the round's key at once.
  std::vector<std::vector<claim_result>> results(
    rounds, std::vector<claim_result>(threads, claim_result::unavailable));
  std::barrier sync{static_cast<std::ptrdiff_t>(threads)};
  std::vector<std::thread> workers;
  for (size_t i = 0; i < threads; ++i)
    workers.emplace_back([&, i] {
      for (size_t round = 0; round < rounds; ++round) {
        sync.arrive_and_wait();
        results[round][i] = store.try_begin("race-" + std::to_string(round),
                                            1h);
      }
    });
  for (auto& worker : workers)
    worker.join();
  for (size_t round = 0; round < rounds; ++round) {
    auto& r = results[round];
    ASSERT_EQ(std::count(r.begin(), r.end(), claim_result::fresh), 1)
      << "round " << round;
    ASSERT_EQ(std::count(r.begin(), r.end(), claim_result::in_flight),
              static_cast<std::ptrdiff_t>(threads - 1))
      << "round " << round;
  }
}

TEST(make_idempotency_store, memory_url_makes_a_memory_store) {
  auto store = make_idempotency_store("memory://");
  ASSERT_TRUE(store) << render(store.error());
  auto mem = std::dynamic_pointer_cast<memory_idempotency_store>(*store);
  ASSERT_NE(mem, nullptr);
  EXPECT_EQ(mem->shard_count(), 16u);
  EXPECT_EQ((*store)->try_begin("k", 1h), claim_result::fresh);
}

TEST(make_idempotency_store, memory_url_takes_a_shard_count) {
  auto store = make_idempotency_store("memory://?shards=3");
  ASSERT_TRUE(store) << render(store.error());
  auto mem = std::dynamic_pointer_cast<memory_idempotency_store>(*store);
  ASSERT_NE(mem, nullptr);
  EXPECT_EQ(mem->shard_count(), 3u);
}

TEST(make_idempotency_store, rejects_bad_memory_parameters) {
  for (auto url : {"memory://?shards=0", "memory://?shards=x",
                   "memory://?shards=", "memory://?size=3", "memory://host"}) {
    auto store = make_idempotency_store(url);
    ASSERT_FALSE(store) << url;
    EXPECT_NE(render(store.error()).find("invalid_url"), std::string::npos)
      << render(store.error());
    EXPECT_NE(render(store.error()).find(url), std::string::npos)
      << render(store.error());
  }
}

TEST(make_idempotency_store, unknown_scheme_names_the_expected_ones) {
  auto store = make_idempotency_store("foo://x");
  ASSERT_FALSE(store);
  EXPECT_EQ(render(store.error()),
            "invalid_url: unknown idempotency store URL 'foo://x': expected "
            "memory://, sqlite://PATH or redis://HOST:PORT/DB");
}

TEST(make_idempotency_store, redis_says_it_is_not_built_in) {
  auto store = make_idempotency_store("redis://127.0.0.1:6379/0");
  ASSERT_FALSE(store);
  auto text = render(store.error());
  EXPECT_NE(text.find("redis://127.0.0.1:6379/0"), std::string::npos) << text;
  EXPECT_NE(text.find("not built into this binary"), std::string::npos) << text;
}

TEST(make_idempotency_store, url_without_scheme_is_invalid) {
  for (auto url : {"", "memory", "state/x.db", "://x"}) {
    auto store = make_idempotency_store(url);
    ASSERT_FALSE(store) << url;
    EXPECT_NE(render(store.error()).find("invalid_url"), std::string::npos);
  }
}
