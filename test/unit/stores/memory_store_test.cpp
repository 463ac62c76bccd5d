#include "evmesh/memory_store.hpp"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
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

// A table of tens of thousands of keys grows a few slots per operation:
// while its entries move to the larger table, every key stays findable
// (committed ones answer duplicate, leased ones in_flight), expired ones
// count as absent, and aborts and zero-keep commits remove keys from
// whichever table holds them.
TEST(memory_idempotency_store, every_key_stays_findable_while_a_table_grows) {
  virtual_clock clock;
  memory_idempotency_store store{1, [&] { return clock.now(); }};
  std::mt19937 rng{28112026};
  constexpr int n = 40'000;
  auto key = [](int i) { return "order-" + std::to_string(i); };
  enum class st { committed, leased, short_lived, gone };
  std::vector<st> state;
  for (int i = 0; i < n; ++i) {
    if (i % 7 == 3) {
      ASSERT_EQ(store.try_begin(key(i), 1h), claim_result::fresh) << i;
      state.push_back(st::leased);
    } else {
      ASSERT_FALSE(store.commit(key(i), i % 11 == 5 ? 1s : 1h));
      state.push_back(i % 11 == 5 ? st::short_lived : st::committed);
    }
    // Probe two earlier keys after every insertion; remove one now and then.
    for (int probe = 0; probe < 2; ++probe) {
      auto j = std::uniform_int_distribution<int>{0, i}(rng);
      switch (state[j]) {
        case st::committed:
        case st::short_lived:
          ASSERT_EQ(store.try_begin(key(j), 1h), claim_result::duplicate)
            << "key " << j << " after " << i << " insertions";
          break;
        case st::leased:
          ASSERT_EQ(store.try_begin(key(j), 1h), claim_result::in_flight)
            << "key " << j << " after " << i << " insertions";
          break;
        case st::gone:
          break;
      }
    }
    if (i % 97 == 0) {
      auto j = std::uniform_int_distribution<int>{0, i}(rng);
      if (state[j] == st::leased) {
        ASSERT_FALSE(store.abort(key(j)));
        state[j] = st::gone;
      } else if (state[j] != st::gone) {
        ASSERT_FALSE(store.commit(key(j), 0s));
        state[j] = st::gone;
      }
    }
  }
  auto gone = std::count(state.begin(), state.end(), st::gone);
  EXPECT_EQ(store.size(), static_cast<size_t>(n - gone));
  for (int i = 0; i < n; ++i) {
    if (state[i] == st::gone) {
      ASSERT_EQ(store.try_begin(key(i), 1h), claim_result::fresh) << i;
    }
  }
  // The short-lived commits expire; everything else is still there.
  clock.advance(2s);
  for (int i = 0; i < n; ++i) {
    auto expected = state[i] == st::leased      ? claim_result::in_flight
                    : state[i] == st::committed ? claim_result::duplicate
                                                : claim_result::fresh;
    if (state[i] == st::gone)
      expected = claim_result::in_flight; // claimed just above
    ASSERT_EQ(store.try_begin(key(i), 1h), expected) << i;
  }
}

// The store against a plain map implementing the documented semantics,
// under random claims, batches, commits (some with zero keep), aborts and
// clock steps. One shard, so probe runs are long and every deletion shifts
// neighbours; bursts of unique keys make the table grow, their expiry makes
// the sweep shrink it again.
TEST(memory_idempotency_store, agrees_with_a_reference_model) {
  virtual_clock clock;
  memory_idempotency_store store{1, [&] { return clock.now(); }};
  struct model_entry {
    bool committed;
    std::chrono::steady_clock::time_point expires_at;
  };
  std::map<std::string, model_entry, std::less<>> model;
  auto model_claim = [&](const std::string& k, caf::timespan lease) {
    auto t = clock.now();
    if (auto it = model.find(k); it != model.end() && it->second.expires_at > t)
      return it->second.committed ? claim_result::duplicate
                                  : claim_result::in_flight;
    model[k] = model_entry{false, t + lease};
    return claim_result::fresh;
  };
  auto model_live = [&] {
    return static_cast<size_t>(
      std::count_if(model.begin(), model.end(), [&](const auto& kv) {
        return kv.second.expires_at > clock.now();
      }));
  };
  std::mt19937 rng{20261128};
  auto pick = [&](int n) {
    return std::uniform_int_distribution<int>{0, n - 1}(rng);
  };
  auto key = [&] {
    // Short keys (inline in std::string) and long ones (heap-allocated).
    auto i = pick(400);
    return i % 2 == 0 ? "k" + std::to_string(i)
                      : "consumer:orders.*:long-key-" + std::to_string(i);
  };
  int unique = 0;
  for (int step = 0; step < 40'000; ++step) {
    auto op = pick(100);
    if (op < 30) {
      auto k = key();
      caf::timespan lease = std::chrono::milliseconds{100 * (1 + pick(50))};
      ASSERT_EQ(store.try_begin(k, lease), model_claim(k, lease))
        << "claim " << k << " at step " << step;
    } else if (op < 38) {
      std::vector<std::string> ks{key(), key(), key()};
      std::vector<std::string_view> views{ks.begin(), ks.end()};
      std::vector<claim_result> out(3, claim_result::unavailable);
      store.try_begin_many(views, 2s, out);
      for (size_t i = 0; i < 3; ++i)
        ASSERT_EQ(out[i], model_claim(ks[i], 2s))
          << "batch claim " << ks[i] << " at step " << step;
    } else if (op < 60) {
      auto k = key();
      caf::timespan keep = pick(10) == 0
                             ? caf::timespan{0}
                             : caf::timespan{std::chrono::seconds{1 + pick(8)}};
      ASSERT_FALSE(store.commit(k, keep));
      if (keep.count() <= 0)
        model.erase(k);
      else
        model[k] = model_entry{true, clock.now() + keep};
    } else if (op < 75) {
      auto k = key();
      ASSERT_FALSE(store.abort(k));
      if (auto it = model.find(k);
          it != model.end()
          && (!it->second.committed || it->second.expires_at <= clock.now()))
        model.erase(it);
    } else if (op < 76) {
      // A burst of fresh keys that nobody touches again.
      for (int i = 0; i < 200; ++i) {
        auto k = "u" + std::to_string(unique++);
        ASSERT_EQ(store.try_begin(k, 1s), model_claim(k, 1s));
      }
    } else if (op < 97) {
      clock.advance(std::chrono::milliseconds{pick(300)});
    } else {
      // Every entry the store holds beyond the live ones is expired, and
      // an explicit eviction leaves exactly the live ones.
      auto live = model_live();
      ASSERT_GE(store.size(), live) << "step " << step;
      store.evict_expired();
      ASSERT_EQ(store.size(), live) << "step " << step;
      std::erase_if(model, [&](const auto& kv) {
        return kv.second.expires_at <= clock.now();
      });
    }
  }
  // Everything expires: the sweep and eviction leave nothing behind.
  clock.advance(1h);
  store.evict_expired();
  EXPECT_EQ(store.size(), 0u);
  EXPECT_EQ(store.try_begin("k0", 1s), claim_result::fresh);
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

// -- batch calls -------------------------------------------------------------------

namespace {

/// Records the single-key calls the default batch implementations make and
/// answers from a script: `answers` for try_begin (in call order), errors for
/// the keys in `failing`.
class recording_store : public idempotency_store {
public:
  std::vector<std::string> calls;
  std::vector<claim_result> answers;
  std::vector<std::string> failing;
  caf::timespan last_lease{0};
  caf::timespan last_keep{0};

  claim_result try_begin(std::string_view key, caf::timespan lease) override {
    calls.push_back("begin " + std::string{key});
    last_lease = lease;
    auto i = static_cast<size_t>(
      std::count_if(calls.begin(), calls.end(),
                    [](const std::string& c) { return c.starts_with("begin"); })
      - 1);
    return i < answers.size() ? answers[i] : claim_result::fresh;
  }

  caf::error commit(std::string_view key, caf::timespan keep) override {
    calls.push_back("commit " + std::string{key});
    last_keep = keep;
    return fail(key);
  }

  caf::error abort(std::string_view key) override {
    calls.push_back("abort " + std::string{key});
    return fail(key);
  }

private:
  caf::error fail(std::string_view key) {
    if (std::find(failing.begin(), failing.end(), key) == failing.end())
      return caf::error{};
    return make_error(errc::unavailable, "no store for " + std::string{key});
  }
};

} // namespace

TEST(idempotency_store_batch_defaults,
     try_begin_many_claims_each_key_in_order) {
  recording_store store;
  store.answers = {claim_result::fresh, claim_result::duplicate,
                   claim_result::in_flight, claim_result::unavailable};
  std::vector<std::string_view> keys{"a", "b", "c", "d"};
  std::vector<claim_result> out(keys.size(), claim_result::fresh);
  store.try_begin_many(keys, 7s, out);
  EXPECT_EQ(store.calls, (std::vector<std::string>{"begin a", "begin b",
                                                   "begin c", "begin d"}));
  EXPECT_EQ(store.last_lease, caf::timespan{7s});
  EXPECT_EQ(out, store.answers);
}

TEST(idempotency_store_batch_defaults,
     try_begin_many_stops_at_the_shorter_span) {
  recording_store store;
  std::vector<std::string_view> keys{"a", "b", "c"};
  std::vector<claim_result> out(2, claim_result::unavailable);
  store.try_begin_many(keys, 1s, out);
  EXPECT_EQ(store.calls, (std::vector<std::string>{"begin a", "begin b"}));
  EXPECT_EQ(out[0], claim_result::fresh);
  EXPECT_EQ(out[1], claim_result::fresh);
  store.try_begin_many({}, 1s, out);
  EXPECT_EQ(store.calls.size(), 2u) << "an empty batch calls nothing";
}

TEST(idempotency_store_batch_defaults,
     finish_many_runs_every_step_and_returns_the_first_error) {
  recording_store store;
  store.failing = {"c", "d"};
  std::vector<finish_op> ops{{"a", finish_op::commit},
                             {"b", finish_op::abort},
                             {"c", finish_op::commit},
                             {"d", finish_op::abort},
                             {"e", finish_op::commit}};
  std::vector<caf::error> errors(ops.size());
  auto first = store.finish_many(ops, 3h, errors);
  EXPECT_EQ(store.calls,
            (std::vector<std::string>{"commit a", "abort b", "commit c",
                                      "abort d", "commit e"}))
    << "a failed step must not stop the others";
  EXPECT_EQ(store.last_keep, caf::timespan{3h});
  EXPECT_FALSE(errors[0]);
  EXPECT_FALSE(errors[1]);
  ASSERT_TRUE(errors[2]);
  EXPECT_NE(render(errors[2]).find("no store for c"), std::string::npos);
  ASSERT_TRUE(errors[3]);
  EXPECT_NE(render(errors[3]).find("no store for d"), std::string::npos);
  EXPECT_FALSE(errors[4]);
  ASSERT_TRUE(first);
  EXPECT_EQ(render(first), render(errors[2]));
}

TEST(idempotency_store_batch_defaults, finish_many_without_failures_is_ok) {
  recording_store store;
  std::vector<finish_op> ops{{"a", finish_op::abort}, {"b", finish_op::commit}};
  std::vector<caf::error> errors(1);
  EXPECT_FALSE(store.finish_many(ops, 1h, errors));
  EXPECT_EQ(store.calls, (std::vector<std::string>{"abort a"}))
    << "only as many steps as there are error slots";
}

TEST_F(memory_idempotency_store_test, batch_claim_answers_per_key) {
  ASSERT_EQ(store.try_begin("done", 30s), claim_result::fresh);
  ASSERT_FALSE(store.commit("done", 1h));
  ASSERT_EQ(store.try_begin("held", 30s), claim_result::fresh);
  std::vector<std::string_view> keys{"new1", "done", "held", "new2", "new1"};
  std::vector<claim_result> out(keys.size(), claim_result::unavailable);
  store.try_begin_many(keys, 30s, out);
  EXPECT_EQ(out, (std::vector<claim_result>{
                   claim_result::fresh, claim_result::duplicate,
                   claim_result::in_flight, claim_result::fresh,
                   claim_result::in_flight}))
    << "a key twice in one batch is claimed once";
  // The batch's claims are ordinary leases.
  EXPECT_EQ(store.try_begin("new2", 30s), claim_result::in_flight);
  clock.advance(31s);
  EXPECT_EQ(store.try_begin("new2", 30s), claim_result::fresh);
}

TEST_F(memory_idempotency_store_test, batch_finish_commits_and_aborts) {
  std::vector<std::string_view> keys{"a", "b", "c"};
  std::vector<claim_result> out(keys.size(), claim_result::unavailable);
  store.try_begin_many(keys, 30s, out);
  ASSERT_EQ(out, std::vector<claim_result>(3, claim_result::fresh));
  std::vector<finish_op> ops{{"a", finish_op::commit},
                             {"b", finish_op::abort},
                             {"c", finish_op::commit},
                             {"c", finish_op::abort}};
  std::vector<caf::error> errors(ops.size(), make_error(errc::io_error, "x"));
  EXPECT_FALSE(store.finish_many(ops, 1h, errors));
  for (auto& err : errors)
    EXPECT_FALSE(err) << "every slot is written";
  EXPECT_EQ(store.try_begin("a", 30s), claim_result::duplicate);
  EXPECT_EQ(store.try_begin("b", 30s), claim_result::fresh);
  EXPECT_EQ(store.try_begin("c", 30s), claim_result::duplicate)
    << "an abort after the commit keeps it committed";
  clock.advance(1h + 1s);
  EXPECT_EQ(store.try_begin("a", 30s), claim_result::fresh)
    << "the keep TTL of the batch applies";
}

TEST(memory_idempotency_store, racing_batches_claim_each_key_exactly_once) {
  // Every thread claims the same keys in its own order (so the batches
  // cross shards in different orders): each key is fresh exactly once.
  memory_idempotency_store store{4};
  constexpr int threads = 8;
  constexpr int keys_per_batch = 64;
  std::vector<std::string> names;
  for (int i = 0; i < keys_per_batch; ++i)
    names.push_back("key-" + std::to_string(i));
  std::atomic<int> fresh{0};
  std::barrier start{threads};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      std::vector<std::string_view> keys{names.begin(), names.end()};
      std::rotate(keys.begin(), keys.begin() + t * 7, keys.end());
      if (t % 2 == 1)
        std::reverse(keys.begin(), keys.end());
      std::vector<claim_result> out(keys.size());
      start.arrive_and_wait();
      store.try_begin_many(keys, 30s, out);
      fresh += static_cast<int>(
        std::count(out.begin(), out.end(), claim_result::fresh));
      std::vector<finish_op> ops;
      for (size_t i = 0; i < keys.size(); ++i)
        if (out[i] == claim_result::fresh)
          ops.push_back({keys[i], finish_op::commit});
      std::vector<caf::error> errors(ops.size());
      EXPECT_FALSE(store.finish_many(ops, 1h, errors));
    });
  for (auto& w : workers)
    w.join();
  EXPECT_EQ(fresh.load(), keys_per_batch);
  for (auto& name : names)
    EXPECT_EQ(store.try_begin(name, 30s), claim_result::duplicate) << name;
}

TEST(memory_idempotency_store, batches_across_shards_answer_in_batch_order) {
  // A batch is worked through shard by shard; each key's answers must still
  // follow the batch's order: its first occurrence is the fresh claim, a
  // later one in the same batch finds it in flight. Keys stored before the
  // batch answer for themselves.
  memory_idempotency_store store{16};
  ASSERT_FALSE(store.commit("done-0", 1h));
  ASSERT_EQ(store.try_begin("held-0", 1h), claim_result::fresh);
  std::vector<std::string> names;
  for (int i = 0; i < 96; ++i)
    names.push_back("key-" + std::to_string(i));
  std::vector<std::string_view> keys;
  for (int i = 0; i < 96; ++i) {
    keys.push_back(names[static_cast<size_t>(i)]);
    if (i % 3 == 0) // a repeat a few places later
      keys.push_back(names[static_cast<size_t>(i / 2)]);
  }
  keys.push_back("done-0");
  keys.push_back("held-0");
  std::vector<claim_result> out(keys.size(), claim_result::unavailable);
  store.try_begin_many(keys, 1h, out);
  std::set<std::string_view> seen;
  for (size_t i = 0; i + 2 < keys.size(); ++i) {
    auto expected = seen.insert(keys[i]).second ? claim_result::fresh
                                                : claim_result::in_flight;
    EXPECT_EQ(out[i], expected) << keys[i] << " at " << i;
  }
  EXPECT_EQ(out[keys.size() - 2], claim_result::duplicate);
  EXPECT_EQ(out[keys.size() - 1], claim_result::in_flight);
  // Commits and aborts of one batch across shards: every step runs.
  std::vector<finish_op> ops;
  for (size_t i = 0; i < names.size(); ++i)
    ops.push_back(
      {names[i], i % 2 == 0 ? finish_op::commit : finish_op::abort});
  std::vector<caf::error> errors(ops.size());
  EXPECT_FALSE(store.finish_many(ops, 1h, errors));
  for (size_t i = 0; i < names.size(); ++i)
    EXPECT_EQ(store.try_begin(names[i], 1h),
              i % 2 == 0 ? claim_result::duplicate : claim_result::fresh)
      << names[i];
}

TEST(memory_idempotency_store, contended_batches_keep_each_shards_order) {
  // Eight threads claim the same keys in batches over all 16 shards, round
  // after round: a batch that finds a shard held works the free ones first
  // and comes back to it. Each key is still fresh exactly once, and a key a
  // batch names twice finds its own first claim the second time. The keys
  // also make the tables grow (and retire the old ones) while threads race.
  memory_idempotency_store store{16};
  constexpr int threads = 8;
  constexpr int rounds = 40;
  constexpr int keys_per_batch = 256;
  std::vector<std::vector<std::string>> names(rounds);
  for (int r = 0; r < rounds; ++r)
    for (int i = 0; i < keys_per_batch; ++i)
      names[static_cast<size_t>(r)].push_back("r" + std::to_string(r) + "-k"
                                              + std::to_string(i));
  std::atomic<int> fresh{0};
  std::atomic<int> fresh_repeats{0};
  std::barrier start{threads};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      for (int r = 0; r < rounds; ++r) {
        auto& round = names[static_cast<size_t>(r)];
        std::vector<std::string_view> keys{round.begin(), round.end()};
        std::rotate(keys.begin(), keys.begin() + t * 31, keys.end());
        if (t % 2 == 1)
          std::reverse(keys.begin(), keys.end());
        keys.push_back(keys.front()); // the same key again, last
        std::vector<claim_result> out(keys.size());
        start.arrive_and_wait();
        store.try_begin_many(keys, 30s, out);
        fresh += static_cast<int>(
          std::count(out.begin(), out.end() - 1, claim_result::fresh));
        if (out.back() == claim_result::fresh)
          ++fresh_repeats;
      }
    });
  for (auto& w : workers)
    w.join();
  EXPECT_EQ(fresh.load(), rounds * keys_per_batch);
  EXPECT_EQ(fresh_repeats.load(), 0);
  EXPECT_EQ(store.size(), static_cast<size_t>(rounds * keys_per_batch));
}

namespace {

/// Threads of this process named like the memory store's preparer.
int preparer_threads() {
  int n = 0;
  for (auto& task : std::filesystem::directory_iterator{"/proc/self/task"}) {
    std::ifstream comm{task.path() / "comm"};
    std::string name;
    std::getline(comm, name);
    n += name == "evmesh-mstore" ? 1 : 0;
  }
  return n;
}

} // namespace

TEST(memory_idempotency_store, does_its_chores_on_a_thread_that_ends_with_it) {
  // Small tables are rebuilt at once and start no thread; a shard growing
  // past 256 keys has its successor prepared and the table it leaves behind
  // freed on the store's own thread, which the store's destructor stops.
  ASSERT_EQ(preparer_threads(), 0);
  {
    memory_idempotency_store store{1};
    for (int i = 0; i < 200; ++i)
      ASSERT_EQ(store.try_begin("k" + std::to_string(i), 1h),
                claim_result::fresh);
    EXPECT_EQ(preparer_threads(), 0) << "200 keys in a 512-slot table";
    for (int i = 200; i < 3'000; ++i)
      ASSERT_EQ(store.try_begin("k" + std::to_string(i), 1h),
                claim_result::fresh);
    EXPECT_EQ(preparer_threads(), 1);
    EXPECT_EQ(store.size(), 3'000u);
  }
  EXPECT_EQ(preparer_threads(), 0);
}

TEST(memory_idempotency_store, growths_racing_the_preparer_lose_no_key) {
  // One shard, four threads inserting fresh keys as fast as they can: the
  // table doubles again and again while the preparer has its spare lent
  // out (a growth then makes a table of its own, and the spare that comes
  // back no longer fits). Every key is fresh once and found afterwards.
  memory_idempotency_store store{1};
  constexpr int threads = 4;
  constexpr int per_thread = 50'000;
  std::atomic<int> not_fresh{0};
  std::barrier start{threads};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      start.arrive_and_wait();
      for (int i = 0; i < per_thread; i += 32) {
        std::vector<std::string> names;
        for (int j = i; j < std::min(i + 32, per_thread); ++j)
          names.push_back("t" + std::to_string(t) + "-" + std::to_string(j));
        std::vector<std::string_view> keys{names.begin(), names.end()};
        std::vector<claim_result> out(keys.size());
        store.try_begin_many(keys, 1h, out);
        not_fresh += static_cast<int>(
          keys.size()
          - static_cast<size_t>(
            std::count(out.begin(), out.end(), claim_result::fresh)));
      }
    });
  for (auto& w : workers)
    w.join();
  EXPECT_EQ(not_fresh.load(), 0);
  EXPECT_EQ(store.size(), static_cast<size_t>(threads * per_thread));
  for (int t = 0; t < threads; ++t)
    for (int i = 0; i < per_thread; ++i)
      ASSERT_EQ(
        store.try_begin("t" + std::to_string(t) + "-" + std::to_string(i), 1h),
        claim_result::in_flight)
        << t << "/" << i;
}

TEST(memory_idempotency_store, keys_kept_long_do_not_pin_the_memory_of_others) {
  // 200 000 claims of 40-byte keys (8 MB, ~120 chunks of key bytes): one
  // in 500 committed for an hour, the others aborted at once. The chunks of
  // the aborted keys are evacuated and reused rather than each held by its
  // few committed keys.
  virtual_clock clock;
  memory_idempotency_store store{1, [&] { return clock.now(); }};
  auto key = [](int i) {
    auto k = "order-" + std::to_string(i) + ":";
    k.resize(40, 'x');
    return k;
  };
  size_t most = 0;
  for (int i = 0; i < 200'000; ++i) {
    auto k = key(i);
    ASSERT_EQ(store.try_begin(k, 1min), claim_result::fresh) << i;
    if (i % 500 == 0)
      ASSERT_FALSE(store.commit(k, 1h));
    else
      ASSERT_FALSE(store.abort(k));
    most = std::max(most, store.key_chunks());
  }
  EXPECT_LE(most, 6u);
  EXPECT_EQ(store.size(), 400u);
  for (int i = 0; i < 200'000; i += 500)
    ASSERT_EQ(store.try_begin(key(i), 1min), claim_result::duplicate) << i;
  for (int i = 1; i < 200'000; i += 997) {
    if (i % 500 != 0) {
      ASSERT_EQ(store.try_begin(key(i), 1min), claim_result::fresh) << i;
    }
  }
}

TEST(memory_idempotency_store, keys_of_every_length_survive_growth_and_expiry) {
  // Empty keys, keys packed into the arena's chunks and keys too long for
  // them (heap blocks of their own), through several doublings and an
  // expiry of half of them.
  virtual_clock clock;
  memory_idempotency_store store{2, [&] { return clock.now(); }};
  auto key = [](int i) {
    if (i == 0)
      return std::string{};
    auto k = std::to_string(i) + ":"; // unique whatever the padding
    auto len = static_cast<size_t>(i % 7 == 0 ? 1500 + i % 100 : i % 60);
    if (len > k.size())
      k.resize(len, '.');
    return k;
  };
  for (int i = 0; i < 20'000; ++i) {
    auto k = key(i);
    ASSERT_EQ(store.try_begin(k, 1min), claim_result::fresh) << i;
    ASSERT_FALSE(store.commit(k, i % 2 == 0 ? 1h : 10min));
  }
  clock.advance(30min);
  EXPECT_EQ(store.evict_expired(), 10'000u);
  for (int i = 0; i < 20'000; ++i)
    ASSERT_EQ(store.try_begin(key(i), 1min),
              i % 2 == 0 ? claim_result::duplicate : claim_result::fresh)
      << i;
}
