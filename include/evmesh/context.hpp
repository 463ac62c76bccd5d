#pragma once

#include <any>
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <typeinfo>

#include <boost/core/demangle.hpp>
#include <boost/json/value_to.hpp>
#include <caf/error.hpp>
#include <caf/timestamp.hpp>

#include "evmesh/container.hpp"
#include "evmesh/envelope.hpp"
#include "evmesh/outcome.hpp"
#include "evmesh/trace.hpp"

namespace evmesh {

/// Publishes envelopes onto the runtime's transport. Thread-safe.
class publisher {
public:
  virtual ~publisher();

  /// Publishes `env`; returns once the transport accepted it.
  virtual caf::error publish(envelope env) = 0;
};

/// Everything a handler receives for one attempt: the envelope, a typed view of
/// its payload, the DI container, the attempt's span and the tenant. Valid only
/// during the handler call (or until an actor handler answered).
class event_context {
public:
  event_context(const envelope& msg, const container& services,
                trace_context trace, uint32_t attempt, std::string tenant,
                publisher* out, caf::timestamp deadline,
                std::string_view consumer, std::string_view pattern)
    : msg_(&msg),
      services_(&services),
      trace_(std::move(trace)),
      attempt_(attempt),
      tenant_(std::move(tenant)),
      out_(out),
      deadline_(deadline),
      consumer_(consumer),
      pattern_(pattern) {
  }

  event_context(const event_context&) = delete;
  event_context& operator=(const event_context&) = delete;

  /// The envelope as delivered.
  const envelope& message() const noexcept {
    return *msg_;
  }

  /// The payload converted to `T` (Boost.JSON; described structs work via
  /// Boost.Describe). Converted once; later calls return the cached value. A
  /// payload that does not fit `T` throws `payload_error`, which dead-letters
  /// the message as `malformed_payload` without retries.
  template <class T>
  const T& payload() {
    if (auto ptr = std::any_cast<T>(&payload_cache_))
      return *ptr;
    auto res = boost::json::try_value_to<T>(msg_->payload);
    if (!res)
      throw payload_error(std::string{"payload of topic '"} + msg_->topic
                          + "' does not fit "
                          + boost::core::demangle(typeid(T).name()) + ": "
                          + res.error().message());
    payload_cache_ = std::move(*res);
    return *std::any_cast<T>(&payload_cache_);
  }

  /// The service of type `T` from the frozen container. Throws
  /// `missing_dependency` (retryable) when it was not registered.
  template <class T>
  T& inject() const {
    if (auto ptr = services_->find<T>())
      return *ptr;
    throw missing_dependency(std::string{"no service of type "}
                             + boost::core::demangle(typeid(T).name())
                             + " in the container: register it with "
                               "container_builder::add before start()");
  }

  /// The service of type `T`, or nullptr.
  template <class T>
  T* try_inject() const noexcept {
    return services_->find<T>();
  }

  /// 1 for the first handler execution of this message, counting executions
  /// in earlier deliveries (broker delivery count, envelope `attempt`).
  uint32_t attempt() const noexcept {
    return attempt_;
  }

  /// This attempt's span: same trace as the producer, producer span as parent.
  const trace_context& trace() const noexcept {
    return trace_;
  }

  /// `traceparent` of this attempt's span, to forward to the next hop.
  std::string traceparent() const {
    return trace_.traceparent();
  }

  /// The resolved tenant (fallback applied); empty when the message has none.
  const std::string& tenant() const noexcept {
    return tenant_;
  }

  /// When the runtime abandons this attempt (its timeout).
  caf::timestamp deadline() const noexcept {
    return deadline_;
  }

  /// The subscription's consumer name and pattern.
  std::string_view consumer() const noexcept {
    return consumer_;
  }
  std::string_view pattern() const noexcept {
    return pattern_;
  }

  /// Publishes an outgoing event on the runtime's transport, stamped with this
  /// attempt's traceparent/tracestate, an id and `produced_at` when missing.
  caf::error publish(envelope env) const;

private:
  const envelope* msg_;
  const container* services_;
  trace_context trace_;
  uint32_t attempt_;
  std::string tenant_;
  publisher* out_;
  caf::timestamp deadline_;
  std::string_view consumer_;
  std::string_view pattern_;
  std::any payload_cache_;
};

} // namespace evmesh
