#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>
#include <caf/timespan.hpp>

#include "evmesh/envelope.hpp"
#include "evmesh/stores.hpp"

namespace evmesh {

/// One message as a transport hands it over, before decoding.
struct raw_message {
  /// The transport's handle for ack/nack/dead_letter (unique per delivery).
  uint64_t tag = 0;
  /// The message body.
  std::string bytes;
  /// Subject / topic / routing key it arrived on.
  std::string subject;
  /// Trace headers and key from broker metadata (empty when absent).
  std::string traceparent;
  std::string tracestate;
  std::string key;
  /// How often the broker delivered this message, this delivery included
  /// (1 = first delivery); 0 when the broker does not count.
  uint32_t delivery_count = 1;
  /// Native position for dead-letter records ("partition 3 offset 42").
  std::string position;
};

/// What a transport can do natively.
struct transport_capabilities {
  /// The broker counts deliveries (attempts survive restarts).
  bool delivery_count = false;
  /// `nack` honours a delay.
  bool delayed_nack = false;
  /// `dead_letter` publishes to a broker-side dead-letter queue.
  bool broker_dead_letter = false;
  /// The transport calls the wakeup function when messages arrive.
  bool wakeup = false;
  /// Retries due this far away or later leave the stream through `defer`
  /// (e.g. Kafka's retry topic) instead of waiting in memory, so the
  /// broker's position can move on. `max()`: never.
  caf::timespan defer_after = caf::timespan::max();
};

/// A broker connection as the mesh sees it. All calls are made by the source
/// actor (one thread at a time), except `publish`, which must be thread-safe.
/// No call may block for long: blocking clients run their I/O on their own
/// threads and hand over through queues.
class transport {
public:
  virtual ~transport();

  /// The URL scheme ("inproc", "nats", ...).
  virtual std::string_view scheme() const noexcept = 0;

  /// What the transport supports natively.
  virtual transport_capabilities capabilities() const noexcept = 0;

  /// Starts consuming; `patterns` are the subscriptions' topic patterns (a
  /// transport may consume more, e.g. a whole stream; unmatched topics are
  /// dead-lettered as `no_handler`).
  virtual caf::error subscribe(const std::vector<std::string>& patterns) = 0;

  /// Appends up to `max` available messages to `out` without blocking.
  virtual caf::error poll(size_t max, std::vector<raw_message>& out) = 0;

  /// Handled (or dead-lettered): never deliver this message again.
  virtual caf::error ack(uint64_t tag) = 0;

  /// Deliver again after `delay` (0 = as soon as possible).
  virtual caf::error nack(uint64_t tag, caf::timespan delay) = 0;

  /// Publishes `rec` to the broker's dead-letter queue (where it has one).
  /// Does not ack: the runtime acks after this returned without error.
  virtual caf::error dead_letter(uint64_t tag, const dead_letter_record& rec)
    = 0;

  /// Takes a failed delivery out of the stream until `delay` has passed (only
  /// called when `capabilities().defer_after <= delay`): the transport stores
  /// it durably for later (a retry topic), then treats `tag` as settled. When
  /// it comes back its `delivery_count` is `attempts + 1`. Until it is settled
  /// for good, the transport holds back later messages with the same key, so
  /// per-key order survives. An error means nothing was stored; the runtime
  /// then nacks. Default: `errc::invalid_state`.
  virtual caf::error defer(uint64_t tag, caf::timespan delay,
                           uint32_t attempts);

  /// Extends the broker's ack deadline of an unacked message (in progress).
  virtual caf::error extend(uint64_t tag) = 0;

  /// Publishes an envelope. Thread-safe.
  virtual caf::error publish(const envelope& env) = 0;

  /// Whether the broker connection is up (a transport reconnecting on its own
  /// answers false meanwhile). Thread-safe. Default: always connected.
  virtual bool connected() const noexcept;

  /// Registers `fn`, called (from any thread) when messages may be available.
  virtual void set_wakeup(std::function<void()> fn);

  /// A handler is about to run for delivery `tag`: called on the handler's
  /// lane (any thread) after the idempotency claim, right before the handler.
  /// The returned token goes to `attempt_finished` once the handler returned
  /// or its lane died, whatever the outcome (not after a timeout while the
  /// handler still runs). For brokers that count no deliveries (Kafka) this
  /// is where a durable count of handler runs is kept, so `crash_loop` counts
  /// exactly the runs that were under way when a process died. Thread-safe;
  /// must not block for long. The default does nothing.
  virtual uint64_t attempt_started(uint64_t tag) noexcept;

  /// The handler run announced by `attempt_started` is over.
  virtual void attempt_finished(uint64_t token) noexcept;

  /// Stops consuming; unacked messages become deliverable again.
  virtual caf::error close() = 0;
};

using transport_ptr = std::shared_ptr<transport>;

/// What factories get besides the URL.
struct transport_environment {
  /// The clock for delays (the actor system's clock, virtual in tests).
  std::function<std::chrono::steady_clock::time_point()> now;
  /// Name of this node (for consumer ids, DLQ records).
  std::string node;
};

/// Creates a transport from a URL.
using transport_factory = std::function<caf::expected<transport_ptr>(
  std::string_view url, const transport_environment& env)>;

/// Registers `factory` for `scheme` (replacing an earlier one). Thread-safe.
void register_transport(std::string scheme, transport_factory factory);

/// `url` fit for logs and messages: the password of `user:password@` (or a
/// lone token before `@`) and the values of query parameters whose name
/// contains `password`, `secret`, `token` or `credential` (case-insensitive,
/// e.g. Kafka's `sasl.password`) become `***`.
std::string redact_url(std::string_view url);

/// Creates a transport by URL scheme; an unknown scheme yields
/// `errc::invalid_url` listing the registered schemes.
caf::expected<transport_ptr> make_transport(std::string_view url,
                                            const transport_environment& env);

} // namespace evmesh
