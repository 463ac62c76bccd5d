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

/// Messages `transport::poll_into` appends to. Unlike a vector it keeps the
/// messages `clear` drops and hands them out again from `add`, so a steady
/// stream of polls reuses their strings' buffers instead of allocating new
/// ones for every message (buffers over `max_kept_bytes` are released).
class raw_batch {
public:
  /// A string buffer larger than this is released when its slot is reused,
  /// so one huge message does not stay resident in the batch.
  static constexpr size_t max_kept_bytes = 64 * 1024;

  /// A message at the end: every field reset to a default `raw_message`'s
  /// (strings empty, keeping buffers up to `max_kept_bytes`). It stays valid
  /// until the next `add` or `clear`.
  raw_message& add();

  /// Empties the batch; the slots stay for `add` to reuse.
  void clear() noexcept {
    size_ = 0;
  }

  /// Removes the last message (its slot stays for reuse).
  void pop_back() noexcept {
    --size_;
  }

  size_t size() const noexcept {
    return size_;
  }

  bool empty() const noexcept {
    return size_ == 0;
  }

  raw_message& operator[](size_t i) noexcept {
    return slots_[i];
  }

  const raw_message& operator[](size_t i) const noexcept {
    return slots_[i];
  }

  raw_message* begin() noexcept {
    return slots_.data();
  }

  raw_message* end() noexcept {
    return slots_.data() + size_;
  }

  const raw_message* begin() const noexcept {
    return slots_.data();
  }

  const raw_message* end() const noexcept {
    return slots_.data() + size_;
  }

private:
  std::vector<raw_message> slots_;
  size_t size_ = 0;
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

  /// The same into a `raw_batch`, which is how the runtime's source polls.
  /// The default calls `poll` and moves the messages over; a transport
  /// overrides it to fill the batch's reused messages in place (and then
  /// implements `poll` with `poll_through_batch`).
  virtual caf::error poll_into(size_t max, raw_batch& out);

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

protected:
  /// `poll` for a transport that overrides `poll_into`: polls into a batch
  /// and appends its messages to `out`.
  caf::error poll_through_batch(size_t max, std::vector<raw_message>& out);
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
