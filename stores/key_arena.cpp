#include "key_arena.hpp"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include <sys/mman.h>

namespace evmesh::detail {

namespace {

constexpr size_t page_bytes = 4096;

/// Set once MADV_POPULATE_WRITE failed (an older kernel): pages are then
/// touched one at a time.
std::atomic<bool> populate_failed{false};

} // namespace

void make_present(char* base, size_t from, size_t to) noexcept {
  if (!populate_failed.load(std::memory_order_relaxed)) {
    auto first = reinterpret_cast<uintptr_t>(base + from) & ~(page_bytes - 1);
    auto last = (reinterpret_cast<uintptr_t>(base + to) + page_bytes - 1)
                & ~(page_bytes - 1);
    if (::madvise(reinterpret_cast<void*>(first), last - first,
                  MADV_POPULATE_WRITE)
        == 0) {
      for (auto at = from; at < to; at += page_bytes)
        static_cast<void>(reinterpret_cast<volatile const char*>(base)[at]);
      return;
    }
    populate_failed.store(true, std::memory_order_relaxed);
  }
  for (auto at = from; at < to; at += page_bytes)
    // Storing a zero keeps the zeroed bytes as they are.
    reinterpret_cast<volatile char*>(base)[at] = 0;
}

/// The first bytes of a chunk; keys follow it.
struct key_arena::header {
  /// Bytes of the live keys in the chunk.
  uint32_t live;
  /// Index in `chunks_`.
  uint32_t index;
  bool evacuating;
};

namespace {

/// Where a chunk's first key goes.
constexpr size_t first_key = 16;

} // namespace

key_arena::header& key_arena::header_of(char* chunk) noexcept {
  static_assert(sizeof(header) <= first_key);
  return *std::launder(reinterpret_cast<header*>(chunk));
}

char* key_arena::chunk_of(const char* p) noexcept {
  return reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(p)
                                 & ~(chunk_bytes - 1));
}

key_arena::~key_arena() {
  for (auto* c : chunks_)
    unmap_chunk(c);
  if (spare_ != nullptr)
    unmap_chunk(spare_);
  for (auto* c : unneeded_)
    unmap_chunk(c);
}

char* key_arena::map_chunk(bool present) noexcept {
  // Twice the size, then the unaligned ends go back.
  auto* p = ::mmap(nullptr, 2 * chunk_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    return nullptr;
  auto* base = static_cast<char*>(p);
  auto* chunk = chunk_of(base + chunk_bytes - 1);
  if (chunk > base)
    ::munmap(base, static_cast<size_t>(chunk - base));
  if (auto* end = base + 2 * chunk_bytes; chunk + chunk_bytes < end)
    ::munmap(chunk + chunk_bytes,
             static_cast<size_t>(end - (chunk + chunk_bytes)));
  if (present)
    make_present(chunk, 0, chunk_bytes);
  return chunk;
}

void key_arena::unmap_chunk(char* chunk) noexcept {
  ::munmap(chunk, chunk_bytes);
}

char* key_arena::copy(std::string_view key) {
  if (key.empty())
    return nullptr;
  char* p = nullptr;
  if (key.size() > max_key) {
    p = static_cast<char*>(std::malloc(key.size()));
    if (p == nullptr)
      throw std::bad_alloc{};
  } else {
    if (current_ == nullptr || fill_ + key.size() > chunk_bytes)
      next_chunk();
    p = current_ + fill_;
    fill_ += key.size();
    header_of(current_).live += static_cast<uint32_t>(key.size());
  }
  std::memcpy(p, key.data(), key.size());
  return p;
}

void key_arena::next_chunk() {
  auto* c = std::exchange(spare_, nullptr);
  if (c == nullptr && (c = map_chunk(false)) == nullptr)
    throw std::bad_alloc{};
  chunks_.reserve(chunks_.size() + 1); // nothing below throws
  auto& h = header_of(c);
  h.live = 0;
  h.index = static_cast<uint32_t>(chunks_.size());
  h.evacuating = false;
  chunks_.push_back(c);
  auto* previous = std::exchange(current_, c);
  fill_ = first_key;
  if (previous != nullptr)
    shrunk(previous);
}

void key_arena::drop(const char* p, size_t size) noexcept {
  if (p == nullptr || size == 0)
    return;
  if (size > max_key) {
    std::free(const_cast<char*>(p));
    return;
  }
  auto* c = chunk_of(p);
  header_of(c).live -= static_cast<uint32_t>(size);
  if (c != current_)
    shrunk(c);
}

void key_arena::shrunk(char* chunk) noexcept {
  auto& h = header_of(chunk);
  if (h.live == 0) {
    release(chunk);
  } else if (!h.evacuating && h.live < sparse_below) {
    h.evacuating = true;
    ++evacuating_;
  }
}

void key_arena::release(char* chunk) noexcept {
  auto& h = header_of(chunk);
  if (h.evacuating)
    --evacuating_;
  auto* last = chunks_.back();
  chunks_[h.index] = last;
  header_of(last).index = h.index;
  chunks_.pop_back();
  if (spare_ == nullptr) {
    spare_ = chunk;
    return;
  }
  try {
    unneeded_.push_back(chunk);
  } catch (const std::bad_alloc&) {
    unmap_chunk(chunk);
  }
}

bool key_arena::evacuating(const char* p, size_t size) const noexcept {
  return p != nullptr && size != 0 && size <= max_key
         && header_of(chunk_of(p)).evacuating;
}

bool key_arena::wants_spare() const noexcept {
  return spare_ == nullptr && !spare_asked_ && current_ != nullptr
         && fill_ > chunk_bytes / 2;
}

char* key_arena::adopt_spare(char* chunk) noexcept {
  spare_asked_ = false;
  if (spare_ != nullptr)
    return chunk;
  spare_ = chunk;
  return nullptr;
}

size_t key_arena::live_bytes() const noexcept {
  size_t n = 0;
  for (auto* c : chunks_)
    n += header_of(c).live;
  return n;
}

} // namespace evmesh::detail
