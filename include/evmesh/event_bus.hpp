#pragma once

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <boost/json/value.hpp>

#include "evmesh/pattern.hpp"

namespace evmesh {

/// In-process event bus: listeners subscribe to an event name and `emit`
/// calls them synchronously, in subscription order.
///
/// `emit` is lock-free and refcount-free: it performs one atomic load of an
/// immutable snapshot of the subscription table and calls the listeners it
/// finds there. `subscribe` copies the table under a writers-only mutex,
/// publishes the copy and retires the previous snapshot, which stays alive
/// until the bus is destroyed, so an `emit` still walking it is unaffected.
/// Consequently a subscription made while an `emit` runs (even from one of
/// its listeners) is seen by the next `emit`, never by the running one.
///
/// Every `subscribe` keeps one retired snapshot, so subscribing is meant for
/// setup, not for every message. All members are thread-safe; destroying the
/// bus while another thread emits is not.
class event_bus {
public:
  /// Called with the payload of each emitted event it subscribed to.
  using listener = std::function<void(const boost::json::value&)>;

  event_bus() {
    tables_.push_back(std::make_unique<const table>());
    current_.store(tables_.back().get(), std::memory_order_release);
  }

  event_bus(const event_bus&) = delete;

  event_bus& operator=(const event_bus&) = delete;

  ~event_bus() = default;

  /// Adds `f` as the last listener of `name`. Returns false (and adds
  /// nothing) when `f` is empty.
  bool subscribe(std::string name, listener f) {
    if (!f)
      return false;
    std::lock_guard<std::mutex> guard{writers_};
    listeners_.push_back(std::make_unique<const listener>(std::move(f)));
    auto next
      = std::make_unique<table>(*current_.load(std::memory_order_relaxed));
    next->by_name[std::move(name)].push_back(listeners_.back().get());
    tables_.push_back(std::move(next));
    current_.store(tables_.back().get(), std::memory_order_release);
    return true;
  }

  /// Calls every listener of `name` with `payload`, in subscription order, on
  /// the calling thread. An exception thrown by a listener is caught and
  /// counted in `listener_failures()`; the remaining listeners still run.
  /// Returns how many listeners were called.
  size_t emit(std::string_view name, const boost::json::value& payload) const {
    const table* snapshot = current_.load(std::memory_order_acquire);
    auto i = snapshot->by_name.find(name);
    if (i == snapshot->by_name.end())
      return 0;
    for (const listener* f : i->second) {
      try {
        (*f)(payload);
      } catch (...) {
        failures_.fetch_add(1, std::memory_order_relaxed);
      }
    }
    return i->second.size();
  }

  /// Number of listeners currently subscribed to `name`.
  size_t listener_count(std::string_view name) const {
    const table* snapshot = current_.load(std::memory_order_acquire);
    auto i = snapshot->by_name.find(name);
    return i == snapshot->by_name.end() ? 0 : i->second.size();
  }

  /// Number of exceptions listeners have thrown from `emit` so far.
  size_t listener_failures() const noexcept {
    return failures_.load(std::memory_order_relaxed);
  }

private:
  /// An immutable snapshot: event name -> listeners in subscription order.
  struct table {
    std::unordered_map<std::string, std::vector<const listener*>,
                       detail::string_hash, std::equal_to<>>
      by_name;
  };

  /// The snapshot `emit` reads; points into `tables_`.
  std::atomic<const table*> current_{nullptr};

  /// Serializes `subscribe` calls; `emit` never takes it.
  std::mutex writers_;

  /// Owns every listener; snapshots point into it. Guarded by `writers_`.
  std::vector<std::unique_ptr<const listener>> listeners_;

  /// Owns the current and every retired snapshot. Guarded by `writers_`.
  std::vector<std::unique_ptr<const table>> tables_;

  /// Exceptions caught from listeners.
  mutable std::atomic<size_t> failures_{0};
};

} // namespace evmesh
