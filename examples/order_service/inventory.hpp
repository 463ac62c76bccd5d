#pragma once

#include <map>
#include <mutex>
#include <string>
#include <utility>

#include <evmesh/outcome.hpp>

namespace order_service {

/// In-memory stock of a warehouse. Thread-safe: handler lanes call it
/// concurrently. Reservations are idempotent per order id, because evmesh
/// delivers at least once: a redelivered confirmation must not reserve twice.
class inventory_service {
public:
  /// Starts with `stock` units per SKU.
  explicit inventory_service(std::map<std::string, int> stock)
    : stock_(std::move(stock)) {
  }

  /// Makes the next `count` reservations of `order_id` fail with a transient
  /// error (simulates a flaky database).
  void fail_next(const std::string& order_id, int count) {
    std::lock_guard guard{mtx_};
    failures_[order_id] = count;
  }

  /// Reserves `quantity` units of `sku` for `order_id`. Transient failures
  /// ask for a retry; an unknown SKU or too little stock can never succeed
  /// and goes to the dead-letter queue; an order with no items is discarded.
  evmesh::outcome reserve(const std::string& order_id, const std::string& sku,
                          int quantity) {
    std::lock_guard guard{mtx_};
    if (auto i = failures_.find(order_id);
        i != failures_.end() && i->second > 0) {
      --i->second;
      return evmesh::retry("inventory database timeout while reserving "
                           + order_id + " (simulated)");
    }
    if (quantity <= 0)
      return evmesh::discard("order " + order_id + " has no items");
    auto& state = orders_[order_id];
    if (state.cancelled || state.quantity > 0)
      return evmesh::ok(); // cancelled first, or already reserved
    auto item = stock_.find(sku);
    if (item == stock_.end())
      return evmesh::dead_letter("unknown SKU '" + sku + "' in order "
                                 + order_id);
    if (item->second < quantity)
      return evmesh::dead_letter("insufficient stock of " + sku + " for order "
                                 + order_id + ": "
                                 + std::to_string(item->second) + " left, "
                                 + std::to_string(quantity) + " wanted");
    item->second -= quantity;
    state.sku = sku;
    state.quantity = quantity;
    return evmesh::ok();
  }

  /// Returns the stock reserved for `order_id`. A cancellation that overtakes
  /// its confirmation (different topics are not ordered relative to each
  /// other) leaves a tombstone so the late confirmation reserves nothing.
  /// Returns whether stock was released.
  bool release(const std::string& order_id) {
    std::lock_guard guard{mtx_};
    auto& state = orders_[order_id];
    state.cancelled = true;
    if (state.quantity == 0)
      return false;
    stock_[state.sku] += state.quantity;
    state.quantity = 0;
    return true;
  }

  /// Units of `sku` on hand.
  int available(const std::string& sku) const {
    std::lock_guard guard{mtx_};
    auto i = stock_.find(sku);
    return i == stock_.end() ? 0 : i->second;
  }

private:
  struct order_state {
    std::string sku;
    int quantity = 0;
    bool cancelled = false;
  };

  mutable std::mutex mtx_;
  std::map<std::string, int> stock_;
  std::map<std::string, order_state> orders_;
  std::map<std::string, int> failures_;
};

} // namespace order_service
