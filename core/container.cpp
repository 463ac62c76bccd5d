#include "evmesh/container.hpp"

namespace evmesh {

namespace detail {

std::size_t next_type_slot() noexcept {
  static std::atomic<std::size_t> next{0};
  return next.fetch_add(1, std::memory_order_relaxed);
}

} // namespace detail

container container_builder::freeze() const {
  container result;
  result.table_ = std::make_shared<const container::table>(services_);
  return result;
}

} // namespace evmesh
