#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/error.hpp>
#include <caf/timespan.hpp>

#include "evmesh/cluster.hpp"
#include "evmesh/config.hpp"
#include "evmesh/container.hpp"
#include "evmesh/envelope.hpp"
#include "evmesh/registry.hpp"

namespace evmesh {

/// Health of a runtime as orchestrators should see it.
enum class health_status : uint8_t {
  /// Not started yet.
  starting,
  /// Consuming; every subscription active.
  healthy,
  /// Consuming, but at least one subscription is paused after a restart storm.
  degraded,
  /// Running, but the transport lost its broker connection and is
  /// reconnecting on its own; unacked messages come back from the broker.
  disconnected,
  /// Draining after `stop()`.
  stopping,
  /// Stopped; nothing consumed any more.
  stopped,
};

/// Returns "starting", "healthy", ...
const char* to_string(health_status x) noexcept;

class consumer_runtime;

namespace testing {
bool inject_supervisor_crash(consumer_runtime& rt, std::string_view name);
} // namespace testing

/// Counters since start (a consistent-enough snapshot of relaxed atomics).
struct runtime_stats {
  /// Deliveries taken from the transport (redeliveries included).
  uint64_t received = 0;
  /// Handler attempts that returned ok.
  uint64_t handled = 0;
  /// Attempts skipped because the idempotency key was already handled.
  uint64_t duplicates = 0;
  /// Retries scheduled after a failed attempt.
  uint64_t retried = 0;
  /// Dead-letter records written (one per subscription and message).
  uint64_t dead_lettered = 0;
  /// Messages a handler discarded.
  uint64_t discarded = 0;
  /// Deliveries acked / nacked on the transport.
  uint64_t acked = 0;
  uint64_t nacked = 0;
  /// Attempts that exceeded their timeout.
  uint64_t timeouts = 0;
  /// Handler lanes restarted (crash or timeout).
  uint64_t lane_restarts = 0;
  /// Topic supervisors restarted after a crash (their unsettled deliveries
  /// were dispatched again to the fresh supervisor).
  uint64_t supervisor_restarts = 0;
  /// Messages without a valid traceparent that started a new root trace.
  uint64_t new_root_traces = 0;
  /// Claims answered in_flight or unavailable (retried without counting).
  uint64_t deferred = 0;
  /// Deliveries currently owned by the runtime.
  uint64_t in_flight = 0;
  /// Highest number of handler attempts one subscription ran at once (the
  /// maximum over all subscriptions).
  uint64_t max_concurrent = 0;
  /// Subscriptions currently paused by the restart-intensity limit.
  uint64_t paused = 0;
};

/// The consumer mesh of one process: freezes the handlers into a dispatch
/// table, opens the stores and the transport, and runs the actor tree of
/// DESIGN.md §3 (mesh supervisor, source, one topic supervisor per
/// subscription with handler lanes, dead-letter actor). RAII: the destructor
/// stops a running runtime with the configured `stop_timeout`.
class consumer_runtime {
public:
  /// A runtime with its own actor system.
  explicit consumer_runtime(runtime_config cfg, container services = {});

  /// A runtime on an existing actor system (e.g. a deterministic test
  /// coordinator; then use `request_stop` + `stopped` instead of `stop`).
  consumer_runtime(caf::actor_system& sys, runtime_config cfg,
                   container services = {});

  ~consumer_runtime();

  consumer_runtime(const consumer_runtime&) = delete;
  consumer_runtime& operator=(const consumer_runtime&) = delete;

  /// Uses `handlers` instead of the statically registered ones. Before start.
  void set_handlers(std::vector<const handler_descriptor*> handlers);

  /// Runs I/O-bound actors (dead-letter writer, blocking lanes) on their own
  /// threads (default true). Deterministic tests set false. Before start.
  void set_detach_io(bool value);

  /// Freezes the dispatch table, opens stores and transport, spawns the
  /// actors. Fails clearly (and starts nothing) on a duplicate (consumer,
  /// pattern), an invalid pattern, a bad URL or an unreachable store.
  caf::error start();

  /// Stops intake, lets running attempts finish until `deadline` from now,
  /// nacks everything else (never dead-letters because of shutdown), closes
  /// the transport and flushes the stores. Returns at once.
  void request_stop(caf::timespan deadline);

  /// Whether the runtime has fully stopped.
  bool stopped() const noexcept;

  /// `request_stop` + waits until stopped. Not for test coordinators.
  void stop(caf::timespan deadline);

  /// Counters since start.
  runtime_stats stats() const;

  /// Current health.
  health_status health() const noexcept;

  /// Publishes `env` on the runtime's transport (stamps id and produced_at).
  caf::error publish(envelope env);

  /// Cluster membership as this node sees it: peers, their lanes, attempts
  /// in flight on each, last heartbeat (`enabled` is false without
  /// [cluster]).
  cluster_status cluster() const;

  /// The frozen dispatch table (valid after a successful start).
  const dispatch_table& table() const;

  /// The effective configuration.
  const runtime_config& config() const noexcept;

  /// Internal state; public for the actor implementations only.
  struct impl;

private:
  friend bool testing::inject_supervisor_crash(consumer_runtime&,
                                               std::string_view);

  std::unique_ptr<impl> impl_;
};

} // namespace evmesh
