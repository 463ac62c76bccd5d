#pragma once

#include <atomic>
#include <cstddef>
#include <memory>
#include <string>
#include <typeinfo>
#include <vector>

namespace evmesh {

namespace detail {

/// Hands out one dense slot number per type on first use (static init time in
/// practice); lookups afterwards are a plain array index.
std::size_t next_type_slot() noexcept;

template <class T>
inline const std::size_t type_slot = next_type_slot();

} // namespace detail

class container_builder;

/// Frozen dependency-injection container: an immutable table of singleton
/// services indexed by type. Lookups are O(1), lock-free and allocation-free.
/// Copies share the same table.
class container {
public:
  container() = default;

  /// Returns the service of type `T`, or nullptr when none was registered.
  template <class T>
  T* find() const noexcept {
    if (!table_)
      return nullptr;
    auto slot = detail::type_slot<T>;
    if (slot >= table_->size())
      return nullptr;
    return static_cast<T*>((*table_)[slot].get());
  }

  /// Returns the service of type `T` as a shared pointer (empty if absent).
  template <class T>
  std::shared_ptr<T> find_shared() const noexcept {
    if (!table_)
      return nullptr;
    auto slot = detail::type_slot<T>;
    if (slot >= table_->size())
      return nullptr;
    return std::static_pointer_cast<T>((*table_)[slot]);
  }

  /// Whether a service of type `T` was registered.
  template <class T>
  bool contains() const noexcept {
    return find<T>() != nullptr;
  }

private:
  friend class container_builder;
  using table = std::vector<std::shared_ptr<void>>;
  std::shared_ptr<const table> table_;
};

/// Collects services before the runtime starts; `freeze()` makes the immutable
/// `container`. Registering a type twice replaces the earlier service.
class container_builder {
public:
  /// Registers `service` as the singleton for `T` (and returns `*this`).
  template <class T>
  container_builder& add(std::shared_ptr<T> service) {
    auto slot = detail::type_slot<T>;
    if (slot >= services_.size())
      services_.resize(slot + 1);
    services_[slot] = std::static_pointer_cast<void>(std::move(service));
    return *this;
  }

  /// Constructs a `T` from `xs` and registers it.
  template <class T, class... Ts>
  container_builder& emplace(Ts&&... xs) {
    return add<T>(std::make_shared<T>(std::forward<Ts>(xs)...));
  }

  /// Whether a service of type `T` was registered.
  template <class T>
  bool contains() const noexcept {
    auto slot = detail::type_slot<T>;
    return slot < services_.size() && services_[slot] != nullptr;
  }

  /// Freezes the registered services into an immutable container.
  container freeze() const;

private:
  std::vector<std::shared_ptr<void>> services_;
};

} // namespace evmesh
