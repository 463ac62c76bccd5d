#include "evmesh/memory_store.hpp"

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace evmesh {

namespace {

using time_point = memory_idempotency_store::clock_type::time_point;

enum class entry_state : uint8_t { in_flight, committed };

/// The hash of a key; never 0, which marks an empty slot.
uint64_t hash_key(std::string_view key) noexcept {
  auto h = static_cast<uint64_t>(std::hash<std::string_view>{}(key));
  return h == 0 ? 1 : h;
}

/// `now + ttl`, saturating instead of overflowing for huge TTLs.
time_point deadline(time_point now, caf::timespan ttl) {
  using duration = time_point::duration;
  auto d = std::chrono::duration_cast<duration>(ttl);
  if (d.count() > 0 && now.time_since_epoch() > duration::max() - d)
    return time_point::max();
  if (d.count() < 0 && now.time_since_epoch() < duration::min() - d)
    return time_point::min();
  return now + d;
}

} // namespace

/// One shard: an open-addressing hash table (linear probing, deletion by
/// backward shift, so there are no tombstones) whose slots hold the key, its
/// hash and its entry. Compared with a node-based map this saves the node
/// allocation per key and hashing a key more than once per operation, and
/// the incremental sweep is a walk over an array.
struct memory_idempotency_store::shard {
  // 32 bytes: the key's bytes live in an exact-size block of their own.
  struct slot {
    uint64_t hash = 0; // 0: empty
    time_point expires_at{};
    std::unique_ptr<char[]> key;
    uint32_t size = 0;
    entry_state state = entry_state::in_flight;

    bool holds(std::string_view k) const noexcept {
      return size == k.size()
             && (size == 0 || std::memcmp(key.get(), k.data(), size) == 0);
    }
  };

  static constexpr size_t npos = static_cast<size_t>(-1);
  static constexpr size_t min_capacity = 16;

  mutable std::mutex mtx;
  std::vector<slot> slots; // size 0 or a power of two
  size_t used = 0;
  size_t ops = 0;
  /// Next slot the incremental sweep inspects.
  size_t cursor = 0;
  /// No live entry expires before this (a lower bound): while the clock is
  /// below it, a sweep has nothing to find and is skipped.
  time_point earliest = time_point::max();
  /// The smallest deadline seen since the current sweep pass began: what
  /// `earliest` becomes when the pass completes.
  time_point pass_min = time_point::max();

  size_t mask() const noexcept {
    return slots.size() - 1;
  }

  void noted(time_point t) noexcept {
    earliest = std::min(earliest, t);
    pass_min = std::min(pass_min, t);
  }

  size_t find(std::string_view key, uint64_t h) const noexcept {
    if (used == 0)
      return npos;
    for (auto i = static_cast<size_t>(h) & mask();; i = (i + 1) & mask()) {
      auto& s = slots[i];
      if (s.hash == 0)
        return npos;
      if (s.hash == h && s.holds(key))
        return i;
    }
  }

  // Rebuilds the table with room for the live entries and restarts the
  // sweep; `extra` reserves room for insertions. Returns how many expired
  // entries it dropped.
  size_t rebuild(time_point now, size_t extra) {
    size_t live = 0;
    for (auto& s : slots)
      if (s.hash != 0 && s.expires_at > now)
        ++live;
    // The smallest table with the live entries at a load factor of at most
    // 5/8: room to grow before the 3/4 limit, without doubling the table
    // just because expired entries (dropped here) filled it.
    size_t cap = min_capacity;
    while (8 * (live + extra) > 5 * cap)
      cap *= 2;
    std::vector<slot> old(cap);
    old.swap(slots);
    auto old_used = used;
    used = 0;
    cursor = 0;
    earliest = time_point::max();
    pass_min = time_point::max();
    for (auto& s : old) {
      if (s.hash == 0 || s.expires_at <= now)
        continue;
      auto i = static_cast<size_t>(s.hash) & mask();
      while (slots[i].hash != 0)
        i = (i + 1) & mask();
      noted(s.expires_at);
      slots[i] = std::move(s);
      ++used;
    }
    return old_used - used;
  }

  // Inserts a key known to be absent.
  void insert(std::string_view key, uint64_t h, entry_state st, time_point t,
              time_point now) {
    // Grow above a load factor of 3/4 (dropping expired entries on the way).
    if (4 * (used + 1) > 3 * slots.size())
      rebuild(now, 1);
    auto i = static_cast<size_t>(h) & mask();
    while (slots[i].hash != 0)
      i = (i + 1) & mask();
    auto& s = slots[i];
    s.hash = h;
    s.key = std::make_unique_for_overwrite<char[]>(key.size());
    if (!key.empty())
      std::memcpy(s.key.get(), key.data(), key.size());
    s.size = static_cast<uint32_t>(key.size());
    s.state = st;
    s.expires_at = t;
    noted(t);
    ++used;
  }

  void set(size_t i, entry_state st, time_point t) noexcept {
    slots[i].state = st;
    slots[i].expires_at = t;
    noted(t);
  }

  // Empties slot `i` and shifts the entries of its probe run back, so lookups
  // never need tombstones. The slot `i` may afterwards hold another entry.
  void erase(size_t i) {
    auto m = mask();
    auto j = i;
    for (;;) {
      j = (j + 1) & m;
      auto& s = slots[j];
      if (s.hash == 0)
        break;
      auto home = static_cast<size_t>(s.hash) & m;
      // Entry j may fill the hole at i unless its home lies cyclically in
      // (i, j]: then moving it before its home would hide it from lookups.
      bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
      if (stays)
        continue;
      slots[i] = std::move(s);
      // It may have left the part of the array the sweep pass has yet to
      // see; keep its deadline in the pass's minimum.
      pass_min = std::min(pass_min, slots[i].expires_at);
      i = j;
    }
    auto& hole = slots[i];
    hole.hash = 0;
    hole.key.reset();
    hole.size = 0;
    --used;
  }

  // Requires mtx. Inspects at most `max_slots` slots, resuming where the
  // previous sweep stopped, and removes the expired entries among them.
  size_t sweep(time_point now, size_t max_slots) {
    if (used == 0 || now < earliest)
      return 0;
    size_t removed = 0;
    auto n = std::min(max_slots, slots.size());
    for (size_t k = 0; k < n; ++k) {
      auto& s = slots[cursor];
      // An erased slot can receive a later entry: inspect it again.
      while (s.hash != 0 && s.expires_at <= now) {
        erase(cursor);
        ++removed;
      }
      if (s.hash != 0)
        pass_min = std::min(pass_min, s.expires_at);
      if (++cursor == slots.size()) {
        // A whole pass: every live entry was seen (or noted when set).
        cursor = 0;
        earliest = pass_min;
        pass_min = time_point::max();
        // Memory follows the live keys: shrink a mostly empty table.
        if (slots.size() > min_capacity && 8 * used < slots.size())
          return removed + rebuild(now, 0);
      }
    }
    return removed;
  }

  // Requires mtx. Counts an operation and sweeps on every sweep_interval-th.
  void tick(time_point now) {
    if (++ops % sweep_interval == 0)
      sweep(now, sweep_buckets);
  }
};

memory_idempotency_store::memory_idempotency_store(size_t shards,
                                                   clock_function clock)
  : shards_(std::make_unique<shard[]>(std::max(shards, size_t{1}))),
    shard_count_(std::max(shards, size_t{1})),
    clock_(std::move(clock)) {
  // Nothing else to do.
}

memory_idempotency_store::~memory_idempotency_store() = default;

memory_idempotency_store::shard&
memory_idempotency_store::shard_for(uint64_t hash) const noexcept {
  // Fibonacci hashing on the high bits: the tables inside a shard use the low
  // bits of the same hash, so taking those here would skew their slots.
  auto h = hash * 0x9E3779B97F4A7C15ull;
  return shards_[static_cast<size_t>((h >> 32) % shard_count_)];
}

memory_idempotency_store::clock_type::time_point
memory_idempotency_store::now() const {
  return clock_ ? clock_() : clock_type::now();
}

namespace {

// The single-key operations on a locked shard; `h` is `hash_key(key)`.

template <class Shard>
claim_result claim_locked(Shard& s, std::string_view key, uint64_t h,
                          time_point t, caf::timespan lease) {
  s.tick(t);
  if (auto i = s.find(key, h); i != Shard::npos) {
    auto& e = s.slots[i];
    if (e.expires_at > t)
      return e.state == entry_state::committed ? claim_result::duplicate
                                               : claim_result::in_flight;
    s.set(i, entry_state::in_flight, deadline(t, lease));
    return claim_result::fresh;
  }
  s.insert(key, h, entry_state::in_flight, deadline(t, lease), t);
  return claim_result::fresh;
}

template <class Shard>
void commit_locked(Shard& s, std::string_view key, uint64_t h, time_point t,
                   caf::timespan keep) {
  s.tick(t);
  auto i = s.find(key, h);
  if (keep.count() <= 0) {
    if (i != Shard::npos)
      s.erase(i);
    return;
  }
  if (i != Shard::npos)
    s.set(i, entry_state::committed, deadline(t, keep));
  else
    s.insert(key, h, entry_state::committed, deadline(t, keep), t);
}

template <class Shard>
void abort_locked(Shard& s, std::string_view key, uint64_t h, time_point t) {
  s.tick(t);
  if (auto i = s.find(key, h); i != Shard::npos
                               && (s.slots[i].state == entry_state::in_flight
                                   || s.slots[i].expires_at <= t))
    s.erase(i);
}

} // namespace

claim_result memory_idempotency_store::try_begin(std::string_view key,
                                                 caf::timespan lease) {
  auto t = now();
  auto h = hash_key(key);
  auto& s = shard_for(h);
  std::lock_guard<std::mutex> guard{s.mtx};
  return claim_locked(s, key, h, t, lease);
}

caf::error memory_idempotency_store::commit(std::string_view key,
                                            caf::timespan keep) {
  auto t = now();
  auto h = hash_key(key);
  auto& s = shard_for(h);
  std::lock_guard<std::mutex> guard{s.mtx};
  commit_locked(s, key, h, t, keep);
  return caf::error{};
}

caf::error memory_idempotency_store::abort(std::string_view key) {
  auto t = now();
  auto h = hash_key(key);
  auto& s = shard_for(h);
  std::lock_guard<std::mutex> guard{s.mtx};
  abort_locked(s, key, h, t);
  return caf::error{};
}

void memory_idempotency_store::try_begin_many(
  std::span<const std::string_view> keys, caf::timespan lease,
  std::span<claim_result> out) {
  auto n = std::min(keys.size(), out.size());
  if (n == 0)
    return;
  auto t = now();
  shard* held = nullptr;
  std::unique_lock<std::mutex> guard;
  for (size_t i = 0; i < n; ++i) {
    auto h = hash_key(keys[i]);
    auto& s = shard_for(h);
    if (&s != held) {
      // Never two shards at once: release the previous one first.
      if (guard.owns_lock())
        guard.unlock();
      guard = std::unique_lock<std::mutex>{s.mtx};
      held = &s;
    }
    out[i] = claim_locked(s, keys[i], h, t, lease);
  }
}

caf::error memory_idempotency_store::finish_many(std::span<const finish_op> ops,
                                                 caf::timespan keep,
                                                 std::span<caf::error> errors) {
  auto n = std::min(ops.size(), errors.size());
  if (n == 0)
    return caf::error{};
  auto t = now();
  shard* held = nullptr;
  std::unique_lock<std::mutex> guard;
  for (size_t i = 0; i < n; ++i) {
    auto h = hash_key(ops[i].key);
    auto& s = shard_for(h);
    if (&s != held) {
      // Never two shards at once: release the previous one first.
      if (guard.owns_lock())
        guard.unlock();
      guard = std::unique_lock<std::mutex>{s.mtx};
      held = &s;
    }
    if (ops[i].kind == finish_op::commit)
      commit_locked(s, ops[i].key, h, t, keep);
    else
      abort_locked(s, ops[i].key, h, t);
    errors[i] = caf::error{};
  }
  return caf::error{};
}

size_t memory_idempotency_store::size() const {
  size_t result = 0;
  for (size_t i = 0; i < shard_count_; ++i) {
    std::lock_guard<std::mutex> guard{shards_[i].mtx};
    result += shards_[i].used;
  }
  return result;
}

size_t memory_idempotency_store::shard_count() const noexcept {
  return shard_count_;
}

size_t memory_idempotency_store::evict_expired() {
  auto t = now();
  size_t result = 0;
  for (size_t i = 0; i < shard_count_; ++i) {
    auto& s = shards_[i];
    std::lock_guard<std::mutex> guard{s.mtx};
    result += s.sweep(t, s.slots.size());
  }
  return result;
}

} // namespace evmesh
