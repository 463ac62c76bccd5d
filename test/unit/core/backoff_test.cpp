#include <chrono>
#include <cstdint>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/options.hpp"

using namespace evmesh;
using namespace std::chrono_literals;

namespace {

backoff_policy exact(caf::timespan initial, double multiplier,
                     caf::timespan max) {
  backoff_policy p;
  p.initial = initial;
  p.multiplier = multiplier;
  p.max = max;
  p.jitter = jitter::none;
  return p;
}

} // namespace

TEST(backoff, grows_exponentially_without_jitter) {
  auto p = exact(100ms, 2.0, 30s);
  std::mt19937_64 rng{42};
  struct step {
    uint32_t failed;
    caf::timespan expected;
  };
  std::vector<step> table{
    {1, 100ms},  {2, 200ms},   {3, 400ms}, {4, 800ms}, {5, 1600ms},
    {6, 3200ms}, {9, 25600ms}, {10, 30s},  {11, 30s},
  };
  for (const auto& s : table)
    EXPECT_EQ(next_backoff(s.failed, p, rng), s.expected) << s.failed;
}

TEST(backoff, supports_fractional_multipliers) {
  auto p = exact(1s, 1.5, 1min);
  std::mt19937_64 rng{1};
  EXPECT_EQ(next_backoff(1, p, rng), 1s);
  EXPECT_EQ(next_backoff(2, p, rng), 1500ms);
  EXPECT_EQ(next_backoff(3, p, rng), 2250ms);
}

TEST(backoff, treats_zero_failed_attempts_like_the_first) {
  auto p = exact(100ms, 2.0, 30s);
  std::mt19937_64 rng{1};
  EXPECT_EQ(next_backoff(0, p, rng), 100ms);
}

TEST(backoff, is_capped_at_max) {
  auto p = exact(10s, 3.0, 15s);
  std::mt19937_64 rng{1};
  EXPECT_EQ(next_backoff(1, p, rng), 10s);
  EXPECT_EQ(next_backoff(2, p, rng), 15s);
  // An initial delay above max is capped as well.
  auto q = exact(1min, 2.0, 15s);
  EXPECT_EQ(next_backoff(1, q, rng), 15s);
}

TEST(backoff, huge_attempt_numbers_do_not_overflow) {
  auto p = exact(100ms, 2.0, 30s);
  std::mt19937_64 rng{7};
  for (uint32_t n : {64u, 65u, 1000u, 100000u, UINT32_MAX})
    EXPECT_EQ(next_backoff(n, p, rng), 30s) << n;
  auto unbounded = exact(1ns, 10.0, caf::timespan::max());
  EXPECT_EQ(next_backoff(1000, unbounded, rng), caf::timespan::max());
  auto zero = exact(0ns, 2.0, 30s);
  EXPECT_EQ(next_backoff(5000, zero, rng), 0ns);
}

TEST(backoff, full_jitter_stays_within_zero_and_the_delay) {
  backoff_policy p;
  p.initial = 100ms;
  p.multiplier = 2.0;
  p.max = 30s;
  p.jitter = jitter::full;
  std::mt19937_64 rng{12345};
  for (uint32_t n = 1; n <= 20; ++n) {
    auto ceiling = next_backoff(n, exact(100ms, 2.0, 30s), rng);
    caf::timespan low = caf::timespan::max();
    caf::timespan high = caf::timespan::zero();
    for (int i = 0; i < 200; ++i) {
      auto d = next_backoff(n, p, rng);
      ASSERT_GE(d, 0ns) << n;
      ASSERT_LE(d, ceiling) << n;
      low = std::min(low, d);
      high = std::max(high, d);
    }
    // 200 uniform draws spread over most of the range.
    EXPECT_LT(low, ceiling / 4) << n;
    EXPECT_GT(high, ceiling * 3 / 4) << n;
  }
}

TEST(backoff, full_jitter_is_reproducible_for_a_fixed_seed) {
  backoff_policy p;
  p.jitter = jitter::full;
  std::mt19937_64 a{99};
  std::mt19937_64 b{99};
  for (uint32_t n = 1; n <= 10; ++n)
    EXPECT_EQ(next_backoff(n, p, a), next_backoff(n, p, b));
}

TEST(backoff, full_jitter_with_huge_attempts_stays_within_max) {
  backoff_policy p;
  p.jitter = jitter::full;
  std::mt19937_64 rng{3};
  for (int i = 0; i < 100; ++i) {
    auto d = next_backoff(1000, p, rng);
    EXPECT_GE(d, 0ns);
    EXPECT_LE(d, p.max);
  }
}

TEST(resolve, keeps_defaults_when_nothing_is_overridden) {
  subscription_options defaults;
  defaults.max_attempts = 7;
  defaults.concurrency = 3;
  auto res = resolve(defaults, handler_options{});
  EXPECT_EQ(res.max_attempts, 7u);
  EXPECT_EQ(res.concurrency, 3u);
  EXPECT_EQ(res.ordering, ordering::per_key);
  EXPECT_EQ(res.execution, execution::cooperative);
  EXPECT_EQ(res.timeout, caf::timespan{30s});
  EXPECT_EQ(res.backoff.initial, caf::timespan{100ms});
}

TEST(resolve, applies_each_set_override) {
  subscription_options defaults;
  handler_options overrides{.max_attempts = 3,
                            .backoff = exact(1s, 3.0, 1min),
                            .ordering = ordering::none,
                            .concurrency = 16,
                            .timeout = caf::timespan{5s},
                            .execution = execution::blocking};
  auto res = resolve(defaults, overrides);
  EXPECT_EQ(res.max_attempts, 3u);
  EXPECT_EQ(res.backoff.initial, caf::timespan{1s});
  EXPECT_EQ(res.backoff.multiplier, 3.0);
  EXPECT_EQ(res.backoff.max, caf::timespan{1min});
  EXPECT_EQ(res.backoff.jitter, jitter::none);
  EXPECT_EQ(res.ordering, ordering::none);
  EXPECT_EQ(res.concurrency, 16u);
  EXPECT_EQ(res.timeout, caf::timespan{5s});
  EXPECT_EQ(res.execution, execution::blocking);
}

TEST(resolve, overrides_only_the_fields_that_are_set) {
  subscription_options defaults;
  defaults.concurrency = 4;
  auto res = resolve(defaults, {.max_attempts = 1});
  EXPECT_EQ(res.max_attempts, 1u);
  EXPECT_EQ(res.concurrency, 4u);
  EXPECT_EQ(res.ordering, ordering::per_key);
}
