#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <random>

#include <caf/timespan.hpp>

namespace evmesh {

/// How messages of one subscription are ordered.
enum class ordering : uint8_t {
  /// Messages with the same `key` run one at a time, in arrival order; a
  /// failing message parks only its own key. Messages without a key are free.
  per_key,
  /// No ordering constraint: up to `concurrency` messages run at once.
  none,
};

/// Where handler code runs.
enum class execution : uint8_t {
  /// On CAF's cooperative scheduler: for non-blocking handlers (default).
  cooperative,
  /// On lanes with their own threads (detached actors): for handlers that
  /// block on I/O. A timed-out lane is abandoned and replaced.
  blocking,
};

/// Jitter applied to the exponential backoff.
enum class jitter : uint8_t {
  /// Exact exponential delays.
  none,
  /// AWS "full jitter": uniform in [0, delay].
  full,
};

/// Exponential backoff between attempts: `initial * multiplier^(n-1)`, capped
/// at `max`, then jittered.
struct backoff_policy {
  caf::timespan initial = std::chrono::milliseconds{100};
  double multiplier = 2.0;
  caf::timespan max = std::chrono::seconds{30};
  evmesh::jitter jitter = evmesh::jitter::full;
};

/// Delay before attempt `failed_attempts + 1` after `failed_attempts` failures
/// (>= 1). Pure: the random draw comes from `rng`.
caf::timespan next_backoff(uint32_t failed_attempts, const backoff_policy& p,
                           std::mt19937_64& rng);

/// Per-handler options, given as designated initializers in the variadic tail
/// of `EVMESH_EVENT_PATTERN` (`.max_attempts = 3, .ordering = ordering::none`).
/// Unset fields take the runtime's `[retry]`/`[consumer]` configuration.
/// Every member has a default member initializer so that GCC 12's
/// -Wmissing-field-initializers stays quiet on partial designated lists.
struct handler_options {
  /// Handler executions before dead-lettering as `retries_exhausted` (>= 1).
  std::optional<uint32_t> max_attempts{};
  /// Backoff between attempts.
  std::optional<backoff_policy> backoff{};
  /// Ordering of this subscription's messages.
  std::optional<evmesh::ordering> ordering{};
  /// Handler lanes (messages running at once) of this subscription (>= 1).
  std::optional<uint32_t> concurrency{};
  /// A handler running longer is abandoned (lane killed, attempt counted).
  std::optional<caf::timespan> timeout{};
  /// Cooperative (default) or blocking lanes.
  std::optional<evmesh::execution> execution{};
};

/// Fully resolved options of one subscription (config defaults + overrides).
struct subscription_options {
  uint32_t max_attempts = 5;
  backoff_policy backoff{};
  evmesh::ordering ordering = evmesh::ordering::per_key;
  uint32_t concurrency = 8;
  caf::timespan timeout = std::chrono::seconds{30};
  evmesh::execution execution = evmesh::execution::cooperative;
};

/// Applies the fields set in `overrides` on top of `defaults`.
subscription_options resolve(const subscription_options& defaults,
                             const handler_options& overrides);

} // namespace evmesh
