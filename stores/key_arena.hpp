// Storage for the keys of one memory-store shard (internal to evmesh_stores).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace evmesh::detail {

/// Makes bytes [from, to) of `base` present in memory without changing
/// them: one MADV_POPULATE_WRITE for the pages they span (Linux 5.14+), then
/// a read of each page from here; without MADV_POPULATE_WRITE, a write of
/// each page. On the virtual machines measured here a first-touch fault cost
/// 10-15 us a page. Populating 16 pages at once cost ~1 us a page, but the
/// first access from user space afterwards still cost ~5 us a page (the
/// hypervisor maps the page for this process then, unseen by the guest):
/// without the read, that half of the cost landed on whoever touched the
/// memory next. The pages at either end may hold other bytes too;
/// populating never changes what a page holds, and the reads and writes
/// stay within [from, to).
void make_present(char* base, size_t from, size_t to) noexcept;

/// The bytes of a shard's keys, packed one after another into 64 KiB chunks
/// mapped from the kernel (keys longer than `max_key` get a heap block of
/// their own). Not thread-safe: the shard's lock guards it.
///
/// Why not one heap block per key: the keys a store keeps for hours are
/// allocated by the worker threads between their short-lived allocations,
/// so each worker's glibc arena grows at its top a page at a time - one
/// mprotect per page, which takes the process's memory-map lock for writing
/// and stalls every thread's page faults meanwhile, then a first-touch fault
/// - under the shard's lock. That was the in-process mesh's p99 at 150 k
/// claims/s (2-3 ms, against 0.5-0.8 ms with the key bytes left out).
///
/// Chunks are filled in order. A chunk is freed when its last key goes; the
/// first one freed while no spare waits becomes the spare, pages present,
/// so keys that expire in the order they came (the usual case: one keep
/// TTL) recycle two chunks' memory rather than mapping new ones. A spare is
/// also asked for (`wants_spare`) once the chunk being filled is half full,
/// for the store's thread to map and make present off the lock.
///
/// A chunk other than the one being filled whose live bytes fall below
/// 1/8 of it is marked for evacuation: the shard copies the live keys it
/// finds there into the current chunk as part of its regular operations
/// (`evacuating`), so one long-lived key cannot pin a chunk of dead ones.
/// The chunks hold at most eight times the live key bytes, plus the chunk
/// being filled, the spare and the chunks still being evacuated.
class key_arena {
public:
  /// Bytes of a chunk, which is aligned to its size.
  static constexpr size_t chunk_bytes = 64 * 1024;

  /// Longer keys get a heap block each.
  static constexpr size_t max_key = 1024;

  /// A chunk not being filled with fewer live bytes than this is evacuated.
  static constexpr size_t sparse_below = chunk_bytes / 8;

  key_arena() = default;

  ~key_arena();

  key_arena(const key_arena&) = delete;
  key_arena& operator=(const key_arena&) = delete;

  /// Copies `key` and returns where; nullptr for an empty key. Throws
  /// std::bad_alloc when no memory can be had.
  char* copy(std::string_view key);

  /// Releases a key `copy` returned for `size` bytes (nullptr is fine).
  void drop(const char* p, size_t size) noexcept;

  /// Whether the key at `p` of `size` bytes sits in a chunk being evacuated.
  bool evacuating(const char* p, size_t size) const noexcept;

  /// Whether any chunk is being evacuated.
  bool has_evacuations() const noexcept {
    return evacuating_ > 0;
  }

  /// Whether a spare chunk should be prepared now: the chunk being filled is
  /// half full, no spare waits and none was asked for.
  bool wants_spare() const noexcept;

  /// Records that a spare was asked for (`wants_spare` answers false until
  /// `adopt_spare`).
  void spare_asked() noexcept {
    spare_asked_ = true;
  }

  /// Takes a chunk from `map_chunk` as the spare (nullptr: mapping it
  /// failed); returns a chunk to unmap when a spare is already here.
  char* adopt_spare(char* chunk) noexcept;

  /// Chunks freed while a spare was already here, to be unmapped after the
  /// shard's lock is released (`unmap_chunk`).
  std::vector<char*>& unneeded() noexcept {
    return unneeded_;
  }

  /// Maps a chunk, made present when `present`; nullptr on failure.
  static char* map_chunk(bool present) noexcept;

  static void unmap_chunk(char* chunk) noexcept;

  /// Chunks held (the spare included).
  size_t chunk_count() const noexcept {
    return chunks_.size() + (spare_ != nullptr ? 1 : 0);
  }

  /// Bytes of the live keys in chunks.
  size_t live_bytes() const noexcept;

private:
  struct header;

  static header& header_of(char* chunk) noexcept;

  static char* chunk_of(const char* p) noexcept;

  void next_chunk();

  /// `chunk` (not the one being filled) lost bytes: frees it when empty,
  /// marks it for evacuation when sparse.
  void shrunk(char* chunk) noexcept;

  /// Unlists an empty chunk and keeps it as the spare or for unmapping.
  void release(char* chunk) noexcept;

  /// Every chunk but the spare; a chunk's header holds its index here.
  std::vector<char*> chunks_;
  /// The chunk being filled and the offset of its first free byte.
  char* current_ = nullptr;
  size_t fill_ = 0;
  char* spare_ = nullptr;
  bool spare_asked_ = false;
  size_t evacuating_ = 0;
  std::vector<char*> unneeded_;
};

} // namespace evmesh::detail
