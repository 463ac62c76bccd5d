#include "evmesh/memory_store.hpp"

#include <algorithm>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace evmesh {

namespace {

using time_point = memory_idempotency_store::clock_type::time_point;

enum class entry_state : uint8_t { in_flight, committed };

struct entry {
  entry_state state;
  time_point expires_at;
};

struct string_hash {
  using is_transparent = void;
  size_t operator()(std::string_view str) const noexcept {
    return std::hash<std::string_view>{}(str);
  }
};

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

struct memory_idempotency_store::shard {
  using map_type
    = std::unordered_map<std::string, entry, string_hash, std::equal_to<>>;

  mutable std::mutex mtx;
  map_type entries;
  size_t ops = 0;
  size_t cursor = 0; // next bucket the incremental sweep inspects

  // Requires mtx. Removes expired entries from at most `max_buckets` buckets,
  // resuming where the previous sweep stopped.
  size_t sweep(time_point now, size_t max_buckets) {
    auto buckets = entries.bucket_count();
    if (entries.empty() || buckets == 0)
      return 0;
    std::vector<std::string> expired;
    auto n = std::min(max_buckets, buckets);
    for (size_t i = 0; i < n; ++i) {
      auto b = (cursor + i) % buckets;
      for (auto it = entries.cbegin(b); it != entries.cend(b); ++it)
        if (it->second.expires_at <= now)
          expired.push_back(it->first);
    }
    cursor = (cursor + n) % buckets;
    for (auto& key : expired)
      entries.erase(key);
    return expired.size();
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
memory_idempotency_store::shard_for(std::string_view key) const noexcept {
  // Fibonacci hashing on the high bits: the maps inside a shard use the low
  // bits of the same hash, so taking those here would skew their buckets.
  auto h = static_cast<uint64_t>(string_hash{}(key)) * 0x9E3779B97F4A7C15ull;
  return shards_[static_cast<size_t>((h >> 32) % shard_count_)];
}

memory_idempotency_store::clock_type::time_point
memory_idempotency_store::now() const {
  return clock_ ? clock_() : clock_type::now();
}

namespace {

// The single-key operations on a locked shard.

template <class Shard>
claim_result claim_locked(Shard& s, std::string_view key, time_point t,
                          caf::timespan lease) {
  s.tick(t);
  if (auto it = s.entries.find(key); it != s.entries.end()) {
    if (it->second.expires_at > t)
      return it->second.state == entry_state::committed
               ? claim_result::duplicate
               : claim_result::in_flight;
    it->second = entry{entry_state::in_flight, deadline(t, lease)};
    return claim_result::fresh;
  }
  s.entries.emplace(std::string{key},
                    entry{entry_state::in_flight, deadline(t, lease)});
  return claim_result::fresh;
}

template <class Shard>
void commit_locked(Shard& s, std::string_view key, time_point t,
                   caf::timespan keep) {
  s.tick(t);
  auto it = s.entries.find(key);
  if (keep.count() <= 0) {
    if (it != s.entries.end())
      s.entries.erase(it);
    return;
  }
  entry e{entry_state::committed, deadline(t, keep)};
  if (it != s.entries.end())
    it->second = e;
  else
    s.entries.emplace(std::string{key}, e);
}

template <class Shard>
void abort_locked(Shard& s, std::string_view key, time_point t) {
  s.tick(t);
  if (auto it = s.entries.find(key);
      it != s.entries.end()
      && (it->second.state == entry_state::in_flight
          || it->second.expires_at <= t))
    s.entries.erase(it);
}

} // namespace

claim_result memory_idempotency_store::try_begin(std::string_view key,
                                                 caf::timespan lease) {
  auto t = now();
  auto& s = shard_for(key);
  std::lock_guard<std::mutex> guard{s.mtx};
  return claim_locked(s, key, t, lease);
}

caf::error memory_idempotency_store::commit(std::string_view key,
                                            caf::timespan keep) {
  auto t = now();
  auto& s = shard_for(key);
  std::lock_guard<std::mutex> guard{s.mtx};
  commit_locked(s, key, t, keep);
  return caf::error{};
}

caf::error memory_idempotency_store::abort(std::string_view key) {
  auto t = now();
  auto& s = shard_for(key);
  std::lock_guard<std::mutex> guard{s.mtx};
  abort_locked(s, key, t);
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
    auto& s = shard_for(keys[i]);
    if (&s != held) {
      // Never two shards at once: release the previous one first.
      if (guard.owns_lock())
        guard.unlock();
      guard = std::unique_lock<std::mutex>{s.mtx};
      held = &s;
    }
    out[i] = claim_locked(s, keys[i], t, lease);
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
    auto& s = shard_for(ops[i].key);
    if (&s != held) {
      // Never two shards at once: release the previous one first.
      if (guard.owns_lock())
        guard.unlock();
      guard = std::unique_lock<std::mutex>{s.mtx};
      held = &s;
    }
    if (ops[i].kind == finish_op::commit)
      commit_locked(s, ops[i].key, t, keep);
    else
      abort_locked(s, ops[i].key, t);
    errors[i] = caf::error{};
  }
  return caf::error{};
}

size_t memory_idempotency_store::size() const {
  size_t result = 0;
  for (size_t i = 0; i < shard_count_; ++i) {
    std::lock_guard<std::mutex> guard{shards_[i].mtx};
    result += shards_[i].entries.size();
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
    result += s.sweep(t, s.entries.bucket_count());
  }
  return result;
}

} // namespace evmesh
