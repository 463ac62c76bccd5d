#pragma once

#include <cstdint>
#include <string>

#include <caf/error.hpp>
#include <caf/make_message.hpp> // used by CAF_ERROR_CODE_ENUM

namespace evmesh {

/// Error codes of evmesh's infrastructure contracts (transports, stores,
/// config).
enum class errc : uint8_t {
  /// No error.
  none = 0,
  /// Bytes that are not a valid envelope (not JSON, wrong field types).
  decode_error,
  /// A `traceparent` that violates W3C Trace Context.
  invalid_traceparent,
  /// A configuration value that cannot be used as given.
  invalid_config,
  /// A URL whose scheme no factory is registered for, or that cannot be parsed.
  invalid_url,
  /// A topic pattern that is not valid (empty token, `>` not last).
  invalid_pattern,
  /// The same (consumer, pattern) registered twice.
  duplicate_subscription,
  /// A backing server or file cannot be reached right now; retry later.
  unavailable,
  /// A store or transport operation failed for a reason that may pass.
  io_error,
  /// A requested record does not exist.
  not_found,
  /// The runtime is not in a state that allows the call.
  invalid_state,
  /// A payload exceeds the configured size limit.
  too_large,
};

/// Returns the name of `x` as written in the enum.
const char* to_string(errc x) noexcept;

/// Whether retrying the failed operation later may succeed.
bool is_retryable(errc x) noexcept;

/// Whether `err` carries an `errc` that `is_retryable`.
bool is_retryable(const caf::error& err) noexcept;

/// Makes an error with a human-readable, actionable context message.
caf::error make_error(errc code, std::string message);

/// Renders `err` for people: "invalid_config: retry.max_attempts must be >= 1".
std::string render(const caf::error& err);

} // namespace evmesh

CAF_ERROR_CODE_ENUM(evmesh::errc, "evmesh")
