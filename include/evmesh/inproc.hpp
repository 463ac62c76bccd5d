#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "evmesh/envelope.hpp"
#include "evmesh/transport.hpp"

namespace evmesh {

/// Counters of one consumer group of an in-process broker.
struct inproc_group_stats {
  uint64_t published = 0;
  uint64_t delivered = 0;
  uint64_t redelivered = 0;
  uint64_t acked = 0;
  uint64_t nacked = 0;
  uint64_t dead_lettered = 0;
  /// Ack/nack on a tag that already had its terminal action (must stay 0).
  uint64_t protocol_violations = 0;
  /// Messages waiting (ready or delayed) and delivered but not yet acked.
  uint64_t pending = 0;
  uint64_t unacked = 0;
};

/// An in-process broker, addressed as `inproc://NAME[?group=G]`. It behaves
/// like a real one: every consumer group gets every published message (one
/// durable queue per group; consumers of one group compete), deliveries are
/// counted, `nack` redelivers (after a delay), unacked messages of a closed
/// consumer are redelivered, and `dead_letter` keeps records in a DLQ.
/// Redeliveries come back in publish order. Thread-safe.
class inproc_broker {
public:
  /// The broker named `name`, created on first use and kept for the process.
  static std::shared_ptr<inproc_broker> get(std::string_view name);

  /// Drops every queue and counter (tests).
  void reset();

  /// Publishes an envelope (encoded as native JSON) on `env.topic`.
  void publish(const envelope& env);

  /// Publishes raw bytes on `subject` with optional trace headers.
  void publish_raw(std::string subject, std::string bytes,
                   std::string traceparent = {}, std::string key = {});

  /// Counters of `group`.
  inproc_group_stats stats(std::string_view group = "default") const;

  /// The dead-letter records of `group`, as JSON (`to_json`), oldest first.
  std::vector<std::string>
  dead_letters(std::string_view group = "default") const;

  /// Makes every unacked message of `group` deliverable again, as if its
  /// consumer had crashed.
  void requeue_unacked(std::string_view group = "default");

  /// Broker-side implementation detail, public for the transport.
  struct state;
  std::shared_ptr<state> state_;

private:
  inproc_broker();
};

/// Registers the `inproc` scheme with `register_transport` (idempotent; the
/// runtime calls it before creating transports).
void register_inproc_transport();

} // namespace evmesh
