#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include <caf/timespan.hpp>

namespace evmesh {

/// What a handler decided about one message.
enum class outcome_kind : uint8_t {
  /// Handled: commit the idempotency key, ack.
  ok,
  /// Transient failure: retry with backoff, dead letter after max_attempts.
  retry,
  /// Permanent failure: dead letter now, no retries.
  dead_letter,
  /// Deliberately ignored: ack, counted as discarded.
  discard,
};

/// The result of one handler attempt. Build it with `ok()`, `retry()`,
/// `dead_letter()` or `discard()`.
struct outcome {
  outcome_kind kind = outcome_kind::ok;
  /// Why (retry, dead_letter, discard); empty for ok.
  std::string reason;
  /// For retry: the earliest next attempt, overriding the backoff.
  std::optional<caf::timespan> after;
  /// Dead-letter category; defaults by kind (`permanent`, `retries_exhausted`).
  std::string category;

  bool is_ok() const noexcept {
    return kind == outcome_kind::ok;
  }
};

/// The message was handled.
inline outcome ok() {
  return {};
}

/// A transient failure: try again after the backoff (or `after`).
inline outcome retry(std::string reason,
                     std::optional<caf::timespan> after = std::nullopt) {
  return {outcome_kind::retry, std::move(reason), after, {}};
}

/// A permanent failure: dead letter without further attempts.
inline outcome dead_letter(std::string reason) {
  return {outcome_kind::dead_letter, std::move(reason), std::nullopt,
          "permanent"};
}

/// Ignore the message on purpose (acked, counted as discarded).
inline outcome discard(std::string reason) {
  return {outcome_kind::discard, std::move(reason), std::nullopt, {}};
}

/// Thrown by a handler to dead-letter the message at once.
class permanent_error : public std::runtime_error {
public:
  explicit permanent_error(const std::string& what,
                           std::string category = "permanent")
    : std::runtime_error(what), category_(std::move(category)) {
  }

  /// Dead-letter category recorded for this error.
  const std::string& category() const noexcept {
    return category_;
  }

private:
  std::string category_;
};

/// Thrown by `event_context::payload<T>()` when the payload does not fit `T`;
/// dead-letters with category `malformed_payload`, never retried.
class payload_error : public permanent_error {
public:
  explicit payload_error(const std::string& what)
    : permanent_error(what, "malformed_payload") {
  }
};

/// Thrown by `event_context::inject<T>()` when `T` is not in the container;
/// retryable (a deployment fix can make it succeed).
class missing_dependency : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

} // namespace evmesh
