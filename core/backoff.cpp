#include <algorithm>
#include <cmath>

#include "evmesh/options.hpp"

namespace evmesh {

caf::timespan next_backoff(uint32_t failed_attempts, const backoff_policy& p,
                           std::mt19937_64& rng) {
  using rep = caf::timespan::rep;
  const auto cap = std::max(p.max.count(), rep{0});
  const auto initial = std::clamp(p.initial.count(), rep{0}, cap);
  const auto exponent = failed_attempts > 1 ? failed_attempts - 1 : 0u;
  // In double, pow() saturates to +inf instead of overflowing; every
  // comparison below is written so that inf and NaN land on the cap.
  const auto raw = static_cast<double>(initial)
                   * std::pow(p.multiplier, static_cast<double>(exponent));
  rep delay;
  if (initial == 0)
    delay = 0; // 0 * inf would be NaN
  else if (!(raw < static_cast<double>(cap)))
    delay = cap;
  else if (!(raw > 0.0))
    delay = 0;
  else
    delay = static_cast<rep>(raw);
  if (p.jitter == jitter::full && delay > 0)
    delay = std::uniform_int_distribution<rep>{0, delay}(rng);
  return caf::timespan{delay};
}

subscription_options resolve(const subscription_options& defaults,
                             const handler_options& overrides) {
  auto result = defaults;
  if (overrides.max_attempts)
    result.max_attempts = *overrides.max_attempts;
  if (overrides.backoff)
    result.backoff = *overrides.backoff;
  if (overrides.ordering)
    result.ordering = *overrides.ordering;
  if (overrides.concurrency)
    result.concurrency = *overrides.concurrency;
  if (overrides.timeout)
    result.timeout = *overrides.timeout;
  if (overrides.execution)
    result.execution = *overrides.execution;
  return result;
}

} // namespace evmesh
