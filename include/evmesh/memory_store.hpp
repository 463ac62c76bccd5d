#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <span>
#include <string_view>

#include "evmesh/stores.hpp"

namespace evmesh {

/// In-process idempotency store (`memory://`): forgets everything on restart,
/// so it dedupes only within one process. Thread-safe and sharded: keys are
/// spread over `shards` independent open-addressing hash tables, each behind
/// its own mutex; a key is hashed once per operation.
///
/// Entries are `in_flight` (until their lease ends) or `committed` (until the
/// keep TTL ends). An expired entry counts as absent. Expired entries are
/// reused when touched and removed by a bounded incremental sweep that every
/// shard runs as part of its regular operations (skipped while no entry of
/// the shard can have expired yet); a table that is mostly empty after a
/// sweep pass shrinks. So memory follows the number of live keys rather than
/// the number of keys ever seen.
///
/// No single operation pays for a growth: a large table that doubles moves
/// to its successor a few slots per operation (so operations cost more
/// while the move lasts), and the successor's memory is allocated once more
/// than 5/8 of the slots hold live keys and made present (16 pages at a
/// time: one `madvise` where the kernel has MADV_POPULATE_WRITE, then a read
/// of each page) while the table fills towards 3/4, so a shard can hold up
/// to three times its table then. Shards grow at slightly different loads
/// (eight steps from 3/4 down to 89/128), so that keys spread evenly over
/// the shards do not make all of them double at once. Tables of 256 KiB and
/// more are mapped from the kernel and returned to it when freed. A table
/// filled with expired entries is rebuilt at its size at once.
///
/// A shard packs the bytes of its keys into 64 KiB chunks mapped from the
/// kernel (keys longer than 1 KiB get a heap block each) rather than one
/// heap block per key: keys kept for hours, allocated between the workers'
/// short-lived allocations, grew the workers' heap arenas a page at a time
/// (an mprotect and a fault per page, under the shard's lock). A chunk is
/// reused once its keys are gone; one whose live keys fill less than 1/8
/// of it has them copied into the chunk being filled as part of the
/// shard's regular operations, so a few long-lived keys cannot pin the
/// memory of many dropped ones (the chunks hold at most about eight times
/// the live key bytes).
///
/// Making successors and the next key chunk present, and freeing the
/// tables growths leave behind, runs on a thread of the store's own (named
/// `evmesh-mstore`, at nice 10), started the first time a shard grows past
/// 256 keys or half fills a key chunk, and stopped by the destructor: no
/// claim waits for that work, and no lock is held during it. Where no
/// thread can be started, the thread that has the work does it after
/// releasing the shard's lock (and a key chunk is mapped when needed).
///
/// `try_begin_many` and `finish_many` take a batch shard by shard (one lock
/// per shard and batch), in the batch's order within each shard; shards
/// another thread holds at that moment are taken after the others.
///
/// Leases carry no owner: a late `abort` from a worker whose lease expired
/// (and whose key another worker re-claimed) releases the newer claim, so a
/// third worker may run the handler concurrently. That costs at most a
/// duplicate execution (at-least-once holds); it never loses a commit,
/// because `abort` never removes a committed key.
class memory_idempotency_store : public idempotency_store {
public:
  /// Monotonic clock the TTLs are measured with.
  using clock_type = std::chrono::steady_clock;

  /// Source of the current time; tests pass a virtual clock.
  using clock_function = std::function<clock_type::time_point()>;

  /// Operations on one shard between two incremental sweeps of it.
  static constexpr size_t sweep_interval = 256;

  /// Table slots one incremental sweep inspects (2 per operation, so a full
  /// pass over a shard completes before its size can double).
  static constexpr size_t sweep_buckets = 2 * sweep_interval;

  /// Creates a store with `shards` shards (at least 1). An empty `clock`
  /// means `std::chrono::steady_clock::now`. The clock may be called from
  /// several threads at once.
  explicit memory_idempotency_store(size_t shards = 16,
                                    clock_function clock = {});

  ~memory_idempotency_store() override;

  memory_idempotency_store(const memory_idempotency_store&) = delete;
  memory_idempotency_store& operator=(const memory_idempotency_store&) = delete;

  /// Absent or expired: claims `key` for `lease` and answers `fresh`.
  /// Committed: `duplicate`. Claimed by an unexpired lease: `in_flight`.
  /// Never answers `unavailable`.
  claim_result try_begin(std::string_view key, caf::timespan lease) override;

  /// Marks `key` committed for `keep`, whether it was claimed or not (a
  /// non-positive `keep` just forgets the key). Never fails.
  caf::error commit(std::string_view key, caf::timespan keep) override;

  /// Forgets an in-flight claim of `key`; committed keys stay. Never fails.
  caf::error abort(std::string_view key) override;

  /// `try_begin` for every key, with one clock reading for the batch and
  /// one lock per run of consecutive keys on the same shard.
  void try_begin_many(std::span<const std::string_view> keys,
                      caf::timespan lease,
                      std::span<claim_result> out) override;

  /// `commit` / `abort` for every step, with one clock reading for the
  /// batch and one lock per run of consecutive keys on the same shard.
  /// Never fails.
  caf::error finish_many(std::span<const finish_op> ops, caf::timespan keep,
                         std::span<caf::error> errors) override;

  /// Number of entries held, including expired ones not yet swept.
  size_t size() const;

  /// Number of shards.
  size_t shard_count() const noexcept;

  /// Chunks of 64 KiB mapped for the bytes of the keys (spares included).
  size_t key_chunks() const;

  /// Removes every expired entry now and returns how many were removed.
  size_t evict_expired();

private:
  struct shard;
  class preparer;

  shard& shard_for(uint64_t hash) const noexcept;

  size_t shard_index(uint64_t hash) const noexcept;

  /// Calls `op(shard, i)` for every i in [0, hashes.size()) with the shard
  /// of `hashes[i]` locked: shard by shard (one lock per shard and batch, in
  /// index order within a shard), after asking the CPU to fetch the first
  /// slot each key probes, so that a batch's cache misses overlap.
  void visit_by_shard(std::span<const uint64_t> hashes,
                      const std::function<void(shard&, size_t)>& op);

  clock_type::time_point now() const;

  std::unique_ptr<shard[]> shards_;
  size_t shard_count_;
  clock_function clock_;
  /// Declared last: stopped before the shards go.
  std::unique_ptr<preparer> preparer_;
};

} // namespace evmesh
