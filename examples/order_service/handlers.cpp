// The order service's event handlers. Each EVMESH_EVENT_PATTERN registers one
// subscription (consumer, pattern) at static initialization; the runtime
// freezes them into its dispatch table at start().
#include <evmesh/consumer.hpp>
#include <spdlog/spdlog.h>

#include "audit_log.hpp"
#include "inventory.hpp"

using order_service::audit_log;
using order_service::inventory_service;

namespace {

struct order_confirmed {
  std::string order_id;
  std::string sku;
  int quantity = 0;
};
BOOST_DESCRIBE_STRUCT(order_confirmed, (), (order_id, sku, quantity))

struct order_cancelled {
  std::string order_id;
  std::string reason;
};
BOOST_DESCRIBE_STRUCT(order_cancelled, (), (order_id, reason))

} // namespace

/// Keeps the inventory in step with the order lifecycle.
struct order_events {
  static evmesh::outcome on_confirmed(evmesh::event_context& ctx) {
    // A payload that does not fit order_confirmed throws: dead-lettered as
    // malformed_payload, never retried.
    const auto& evt = ctx.payload<order_confirmed>();
    return ctx.inject<inventory_service>().reserve(evt.order_id, evt.sku,
                                                   evt.quantity);
  }

  static void on_cancelled(evmesh::event_context& ctx) {
    const auto& evt = ctx.payload<order_cancelled>();
    if (!ctx.inject<inventory_service>().release(evt.order_id))
      spdlog::debug("cancelled order {} had no reservation", evt.order_id);
  }

  static evmesh::outcome on_fraud_check(evmesh::event_context&) {
    // The fraud service of this example is never up: every attempt asks for
    // a retry until max_attempts, then the message is dead-lettered as
    // retries_exhausted.
    return evmesh::retry("fraud service unreachable");
  }
};

EVMESH_EVENT_PATTERN(order_events, "order.confirmed",
                     &order_events::on_confirmed);
EVMESH_EVENT_PATTERN(order_events, "order.cancelled",
                     &order_events::on_cancelled, .max_attempts = 3);
EVMESH_EVENT_PATTERN(order_events, "order.fraud_check",
                     &order_events::on_fraud_check, .max_attempts = 3,
                     .backoff = evmesh::backoff_policy{
                       std::chrono::milliseconds{20}, 2.0,
                       std::chrono::milliseconds{200}});

/// A second, independent consumer of every order event (fan-out): it has its
/// own subscription, retries and dead letters, and needs no ordering.
struct order_audit {
  static void on_any(evmesh::event_context& ctx) {
    const auto& trace = ctx.trace().trace;
    ctx.inject<audit_log>().record(ctx.message().topic, ctx.message().id,
                                   evmesh::to_hex(trace.data(), trace.size()));
  }
};

EVMESH_EVENT_PATTERN(order_audit, "order.*", &order_audit::on_any,
                     .ordering = evmesh::ordering::none);
