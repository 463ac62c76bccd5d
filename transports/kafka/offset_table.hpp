#pragma once

// Internal to the Kafka transport (and its unit test); not installed.

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>

namespace evmesh::kafka_detail {

/// What the Kafka transport tracks about the offsets of one partition, by
/// offset: a sparse array in pages of 256. Fetching is sequential, so the
/// offsets in flight fill a few pages nearly densely and the per-record
/// lookups (fetch, hand-out, settle) index a cached page; gaps that
/// compaction leaves cost no memory. (A std::map here was ~6 % of the CPU of
/// a Kafka consumer at 180 k msg/s: a node per record and a tree walk per
/// lookup.)
template <class T>
class offset_table {
public:
  /// The entry for `off`, or nullptr.
  T* find(int64_t off) noexcept {
    auto* pg = page_of(off >> page_bits, false);
    if (pg == nullptr)
      return nullptr;
    auto i = static_cast<size_t>(off & page_mask);
    return pg->has(i) ? &pg->slots[i] : nullptr;
  }

  bool contains(int64_t off) noexcept {
    return find(off) != nullptr;
  }

  /// The entry for `off`, made (value-initialised) if absent.
  T& operator[](int64_t off) {
    auto* pg = page_of(off >> page_bits, true);
    auto i = static_cast<size_t>(off & page_mask);
    if (!pg->has(i)) {
      pg->set(i);
      pg->slots[i] = T{};
      ++size_;
    }
    return pg->slots[i];
  }

  void erase(int64_t off) noexcept {
    auto key = off >> page_bits;
    auto* pg = page_of(key, false);
    auto i = static_cast<size_t>(off & page_mask);
    if (pg == nullptr || !pg->has(i))
      return;
    pg->clear(i);
    --size_;
    if (pg->n == 0)
      drop(key);
  }

  bool empty() const noexcept {
    return size_ == 0;
  }

  /// The lowest tracked offset (requires !empty()).
  int64_t lowest() const noexcept {
    auto& [key, pg] = *pages_.begin();
    return (key << page_bits) + static_cast<int64_t>(pg->first());
  }

  /// Forgets every offset below `off`.
  void erase_below(int64_t off) noexcept {
    while (!empty() && lowest() < off)
      erase(lowest());
  }

  /// Calls f(offset, info) in ascending order of offset.
  template <class F>
  void for_each(F f) {
    for (auto& [key, pg] : pages_)
      for (size_t i = 0; i < page_size; ++i)
        if (pg->has(i))
          f((key << page_bits) + static_cast<int64_t>(i), pg->slots[i]);
  }

private:
  static constexpr int page_bits = 8;
  static constexpr size_t page_size = size_t{1} << page_bits;
  static constexpr int64_t page_mask = static_cast<int64_t>(page_size) - 1;

  struct page {
    std::array<T, page_size> slots;
    std::array<uint64_t, page_size / 64> present{};
    size_t n = 0;

    bool has(size_t i) const noexcept {
      return (present[i / 64] >> (i % 64)) & 1;
    }
    void set(size_t i) noexcept {
      present[i / 64] |= uint64_t{1} << (i % 64);
      ++n;
    }
    void clear(size_t i) noexcept {
      present[i / 64] &= ~(uint64_t{1} << (i % 64));
      --n;
    }
    size_t first() const noexcept {
      for (size_t w = 0; w < present.size(); ++w)
        if (present[w] != 0)
          return w * 64 + static_cast<size_t>(std::countr_zero(present[w]));
      return page_size;
    }
  };

  page* page_of(int64_t key, bool make) {
    if (cached_ != nullptr && cached_key_ == key)
      return cached_;
    auto i = pages_.find(key);
    if (i == pages_.end()) {
      if (!make)
        return nullptr;
      i = pages_.emplace(key, std::make_unique<page>()).first;
    }
    cached_key_ = key;
    cached_ = i->second.get();
    return cached_;
  }

  void drop(int64_t key) noexcept {
    if (cached_key_ == key)
      cached_ = nullptr;
    pages_.erase(key);
  }

  std::map<int64_t, std::unique_ptr<page>> pages_;
  size_t size_ = 0;
  int64_t cached_key_ = 0;
  page* cached_ = nullptr;
};

} // namespace evmesh::kafka_detail
