#include "evmesh/memory_store.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <pthread.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include "key_arena.hpp"

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
///
/// A large table grows incrementally: the entries move from the previous
/// table (`old`) to the new one a few slots per operation, so no single
/// operation pays for rehashing the whole shard (which took milliseconds at
/// tens of thousands of keys and showed up as the p99 of the whole mesh).
/// While that runs, a key is in exactly one of the two tables; one found in
/// `old` moves to the new table before it is touched, so every change
/// happens in `slots`.
struct memory_idempotency_store::shard {
  // 32 bytes and trivially copyable: all-zero bytes are an empty slot, so
  // a table comes zeroed from calloc (or, when large, straight from mmap)
  // and its pages are first touched as entries arrive rather than all at
  // once when it grows (first touches are page faults, which cost tens of
  // milliseconds for a large table on some virtual machines). The key's
  // bytes live in the shard's `keys` arena.
  struct slot {
    uint64_t hash; // 0: empty
    time_point expires_at;
    char* key;
    uint32_t size;
    entry_state state;

    bool holds(std::string_view k) const noexcept {
      return size == k.size()
             && (size == 0 || std::memcmp(key, k.data(), size) == 0);
    }
  };
  static_assert(std::is_trivially_copyable_v<slot>);

  // A zero-initialised array of slots (size 0 or a power of two). The keys
  // its slots point to belong to the shard's arena, not to the table.
  //
  // A large table is mapped from the kernel directly: its pages arrive
  // zeroed and untouched, and go back when it is freed. From calloc, a
  // table of a megabyte or two came out of the heap once glibc had raised
  // its mmap threshold (it does after freeing a mapped block), and calloc
  // then cleared all of it at once: up to half a millisecond under the
  // shard's lock, in every shard at nearly the same moment.
  class table {
  public:
    /// Tables of at least this many bytes are mapped.
    static constexpr size_t map_from = 256 * 1024;

    table() noexcept = default;

    explicit table(size_t n) : n_(n) {
      if (mapped()) {
        auto* p = ::mmap(nullptr, n * sizeof(slot), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
          throw std::bad_alloc{};
        p_ = static_cast<slot*>(p);
      } else {
        p_ = static_cast<slot*>(std::calloc(n, sizeof(slot)));
        if (p_ == nullptr)
          throw std::bad_alloc{};
      }
    }

    table(table&& x) noexcept
      : p_(std::exchange(x.p_, nullptr)), n_(std::exchange(x.n_, 0)) {
      // Nothing else to do.
    }

    table& operator=(table&& x) noexcept {
      if (this != &x) {
        release();
        p_ = std::exchange(x.p_, nullptr);
        n_ = std::exchange(x.n_, 0);
      }
      return *this;
    }

    ~table() {
      release();
    }

    size_t size() const noexcept {
      return n_;
    }

    bool empty() const noexcept {
      return n_ == 0;
    }

    slot& operator[](size_t i) noexcept {
      return p_[i];
    }

    const slot& operator[](size_t i) const noexcept {
      return p_[i];
    }

    slot* begin() noexcept {
      return p_;
    }

    slot* end() noexcept {
      return p_ + n_;
    }

  private:
    bool mapped() const noexcept {
      return n_ * sizeof(slot) >= map_from;
    }

    void release() noexcept {
      if (p_ != nullptr && mapped())
        ::munmap(p_, n_ * sizeof(slot));
      else
        std::free(p_);
      p_ = nullptr;
      n_ = 0;
    }

    slot* p_ = nullptr;
    size_t n_ = 0;
  };

  static constexpr size_t npos = static_cast<size_t>(-1);
  static constexpr size_t min_capacity = 16;
  /// Tables with fewer live entries than this are rebuilt at once.
  static constexpr size_t incremental_from = 256;
  /// Slots of `old` moved per operation while a table doubles: the new
  /// table starts at a load of at most 5/8 and an operation inserts at most
  /// one key, so moving `old` (half the new table's slots) in 1/16 as many
  /// operations as the new table has slots keeps its load below 3/4 until
  /// the move completes.
  static constexpr size_t moves_per_op = 8;
  /// Slots inspected per operation while a key chunk is evacuated.
  static constexpr size_t evacuate_per_op = 4;
  /// Tables of at least this many slots get their successor prepared.
  static constexpr size_t spare_from = 512;
  /// Bytes of a spare made present at a time (see `detail::make_present`).
  static constexpr size_t populate_bytes = 16 * 4096;
  /// Marks a slot of `old` whose entry moved out ahead of the cursor.
  static constexpr uint32_t moved_mark = static_cast<uint32_t>(-1);

  mutable std::mutex mtx;
  /// The bytes of the keys of both tables.
  detail::key_arena keys;
  /// The load, in 128ths, above which the table grows: 96 (3/4) or a little
  /// less, set per shard by the store (above 5/8 + 1/16, so a growth always
  /// doubles and its moves finish before the next one).
  size_t grow_at = 96;
  table slots;
  size_t used = 0;
  /// The previous table while a growth is in progress, else empty.
  table old;
  /// `old` once everything moved out, until `locked` frees it.
  table retired;
  /// Entries (live or expired) still in `old`.
  size_t old_used = 0;
  /// Slots of `old` below this index have been moved (or were empty).
  size_t old_cursor = 0;
  /// The table the next growth will use, prepared while this one fills
  /// from 5/8 towards 3/4, and how many of its bytes have been touched.
  table spare;
  size_t spare_touched = 0;
  /// Bytes of the spare below this are due to be made present, which the
  /// store's preparer does with the spare lent to it (`prepare_some`).
  size_t spare_due = 0;
  /// The spare is out being made present: no other is made meanwhile.
  bool spare_lent = false;
  /// The shard waits for the preparer or is being worked on by it.
  bool prep_queued = false;
  /// The store's preparer.
  preparer* prep = nullptr;
  /// `used` at which prepare_spare counts the live entries again.
  size_t spare_check = 0;
  size_t ops = 0;
  /// Next slot the incremental sweep inspects.
  size_t cursor = 0;
  /// Next slot the evacuation of sparse key chunks inspects.
  size_t evac_cursor = 0;
  /// No live entry expires before this (a lower bound): while the clock is
  /// below it, a sweep has nothing to find and is skipped.
  time_point earliest = time_point::max();
  /// The smallest deadline seen since the current sweep pass began: what
  /// `earliest` becomes when the pass completes.
  time_point pass_min = time_point::max();

  shard() = default;

  // Gives every key back to the arena, which frees the ones with heap
  // blocks of their own; it unmaps its chunks when it goes.
  ~shard() {
    for (auto* t : {&slots, &old})
      for (auto& e : *t)
        if (e.hash != 0)
          keys.drop(e.key, e.size);
  }

  shard(const shard&) = delete;
  shard& operator=(const shard&) = delete;

  size_t mask() const noexcept {
    return slots.size() - 1;
  }

  void noted(time_point t) noexcept {
    earliest = std::min(earliest, t);
    pass_min = std::min(pass_min, t);
  }

  /// Entries in both tables (live or expired).
  size_t size() const noexcept {
    return used + old_used;
  }

  // The first empty slot of `slots` on the probe run of hash `h` (`slots`
  // has room).
  size_t empty_slot_for(uint64_t h) const noexcept {
    auto i = static_cast<size_t>(h) & mask();
    while (slots[i].hash != 0)
      i = (i + 1) & mask();
    return i;
  }

  // Live (unexpired) entries in `slots`, for sizing tables. While the clock
  // is below `earliest`, nothing can have expired and no scan is needed:
  // growing tables of keys kept for hours no longer scan a megabyte or two
  // (up to 0.1 ms, under the shard's lock) to learn that they are all live.
  // (`earliest` can miss an entry an erase shifted behind the sweep's
  // cursor; then the count includes an expired entry or two, which only
  // sizes a table a little larger.)
  size_t count_live(time_point now) const noexcept {
    if (now < earliest)
      return used;
    size_t live = 0;
    for (size_t i = 0; i < slots.size(); ++i)
      if (slots[i].hash != 0 && slots[i].expires_at > now)
        ++live;
    return live;
  }

  // Moves an entry known to be absent into `slots`, which has room, and
  // returns its index; `s` is left empty.
  size_t place(slot& s) {
    auto i = empty_slot_for(s.hash);
    noted(s.expires_at);
    slots[i] = s;
    s.hash = 0;
    s.key = nullptr;
    ++used;
    return i;
  }

  // Moves the entry of old slot `i` (if live) into `slots` and leaves a
  // slot that lookups in `old` skip.
  void move_out(size_t i, time_point now) {
    auto& s = old[i];
    if (s.hash == 0)
      return;
    --old_used;
    if (s.expires_at > now) {
      place(s);
    } else {
      keys.drop(s.key, s.size);
      s.hash = 0;
      s.key = nullptr;
    }
    s.size = moved_mark;
  }

  // Moves up to `n` slots of `old`; frees it once everything moved.
  void move_some(time_point now, size_t n) {
    auto end = std::min(old.size(), old_cursor + n);
    // The entries land in random slots of the new table: fetch those first,
    // so the misses of one call overlap rather than follow each other.
    for (auto i = old_cursor; i < end; ++i)
      if (old[i].hash != 0)
        __builtin_prefetch(&slots[old[i].hash & mask()]);
    for (; old_cursor < end; ++old_cursor)
      move_out(old_cursor, now);
    if (old_cursor == old.size() || old_used == 0) {
      // Freed once the shard's lock is released (`locked`).
      retired = std::move(old);
      old_used = 0;
      old_cursor = 0;
    }
  }

  /// Holds the shard's lock. After the unlock, the table a completed
  /// growth left behind goes to the store's preparer to be freed (scanning
  /// a megabyte of slots and unmapping it took 0.3-0.9 ms here, under the
  /// lock once), and so does a spare with pages due to be made present.
  class locked {
  public:
    explicit locked(shard& s) : s_(s), lock_(s.mtx) {
      // Nothing else to do.
    }

    locked(shard& s, std::try_to_lock_t)
      : s_(s), lock_(s.mtx, std::try_to_lock) {
      // Nothing else to do.
    }

    ~locked();

    locked(const locked&) = delete;
    locked& operator=(const locked&) = delete;

    bool owns_lock() const noexcept {
      return lock_.owns_lock();
    }

  private:
    shard& s_;
    std::unique_lock<std::mutex> lock_;
  };

  void finish_growth(time_point now) {
    if (!old.empty())
      move_some(now, old.size());
  }

  // Index of `key` in `old`, or npos. Slots below the cursor and slots
  // whose entry moved ahead of it count as occupied: the probe run of an
  // entry still in `old` went through them when it was inserted.
  size_t find_old(std::string_view key, uint64_t h) const noexcept {
    if (old_used == 0)
      return npos;
    auto m = old.size() - 1;
    auto i = static_cast<size_t>(h) & m;
    for (size_t probes = 0; probes < old.size(); ++probes, i = (i + 1) & m) {
      if (i < old_cursor) {
        // Skip the moved prefix in one step (all of it counts as occupied).
        probes += old_cursor - i;
        i = old_cursor;
        if (probes >= old.size() || i == old.size())
          return npos;
      }
      auto& s = old[i];
      if (s.hash == 0) {
        if (s.size == moved_mark)
          continue;
        return npos;
      }
      if (s.hash == h && s.holds(key))
        return i;
    }
    return npos;
  }

  // Index of `key` in `slots`, or npos; a key found in `old` moves first.
  size_t find(std::string_view key, uint64_t h) {
    if (used != 0) {
      for (auto i = static_cast<size_t>(h) & mask();; i = (i + 1) & mask()) {
        auto& s = slots[i];
        if (s.hash == 0)
          break;
        if (s.hash == h && s.holds(key))
          return i;
      }
    }
    auto j = find_old(key, h);
    if (j == npos)
      return npos;
    // Expired entries move too: the caller decides what an expired entry
    // means (a claim reuses it, an abort removes it).
    --old_used;
    auto i = place(old[j]);
    old[j].size = moved_mark;
    return i;
  }

  // The smallest power-of-two capacity with `live` entries at a load factor
  // of at most 5/8: room to grow before the 3/4 limit, without doubling the
  // table just because expired entries (dropped on the way) filled it.
  static size_t capacity_for(size_t live) noexcept {
    size_t cap = min_capacity;
    while (8 * live > 5 * cap)
      cap *= 2;
    return cap;
  }

  // Replaces the table with one sized for the live entries (plus `extra`)
  // and restarts the sweep. A large table that grows moves over
  // incrementally; anything else, or `at_once`, right here. Returns how many
  // expired entries it dropped right away.
  size_t rebuild(time_point now, size_t extra, bool at_once) {
    finish_growth(now);
    auto live = count_live(now);
    auto cap = capacity_for(live + extra);
    table previous = spare.size() == cap ? std::move(spare) : table{cap};
    spare = table{};
    spare_touched = 0;
    spare_due = 0;
    spare_check = 0;
    std::swap(previous, slots);
    auto before = used;
    used = 0;
    cursor = 0;
    evac_cursor = 0;
    earliest = time_point::max();
    pass_min = time_point::max();
    // Only a growth moves incrementally: a rebuild at the same size or
    // smaller (expired entries filled the table) frees the old table at once,
    // so that the next shard's rebuild reuses its memory (moving them
    // incrementally kept an old and a new table of many shards alive at a
    // time: +35 MiB in the 10-minute soak).
    if (!at_once && live >= incremental_from
        && slots.size() > previous.size()) {
      old = std::move(previous);
      old_used = before;
      old_cursor = 0;
      return 0;
    }
    for (auto& s : previous) {
      if (s.hash == 0)
        continue;
      if (s.expires_at > now)
        place(s);
      else
        keys.drop(s.key, s.size);
    }
    return before - used;
  }

  // While the table fills from 5/8 towards the 3/4 that makes it grow,
  // allocates the table twice its size and touches its pages in step with
  // the insertions, so that the last page is touched when the growth comes
  // and the growth finds its memory ready. First touches are page faults:
  // a whole table's worth at once stalled every shard for tens of
  // milliseconds on a virtual machine where a fault costs ~16 µs, while 16
  // pages made present together every 128 insertions spread the cost thinly
  // and pay a fraction of it (`make_present`).
  //
  // `used` counts expired entries the sweep has not reached yet, and a
  // growth sizes the new table by the live ones: where keys expire as fast
  // as they come, the table is rebuilt at its own size and a spare would be
  // wasted memory (+40 MiB in the 10-minute soak). So the spare is made
  // only once more than 5/8 of the slots hold live entries - the condition
  // for the growth to double the table - checked every slots/32
  // insertions.
  void prepare_spare(time_point now) {
    auto cap = slots.size();
    if (spare_lent || cap < spare_from || 8 * used <= 5 * cap)
      return;
    if (spare.size() != 2 * cap) {
      if (used < spare_check)
        return;
      if (8 * count_live(now) <= 5 * cap) {
        spare_check = used + cap / 32;
        return;
      }
      spare = table{2 * cap};
      spare_touched = 0;
      spare_due = 0;
    }
    auto bytes = spare.size() * sizeof(slot);
    // Due: the fraction of the way from 5/8 to the growth point, in whole
    // steps (one hand-over to the preparer per step). The whole spare is
    // due at 3/4 of the way, so that the preparer is done with it before
    // the growth comes.
    auto span = std::max<size_t>(1,
                                 (grow_at * cap / 128 - 5 * cap / 8) * 3 / 4);
    auto due = std::min(bytes, bytes / span * (used - 5 * cap / 8));
    if (due < bytes)
      due -= due % populate_bytes;
    spare_due = std::max(spare_due, due);
  }

  // Requires mtx. Whether the spare is here and has pages due.
  bool spare_has_due() const noexcept {
    return !spare.empty() && spare_due > spare_touched;
  }

  // Requires mtx. Whether the preparer has chores here (`has_chores`) that
  // it is not already on; if so, marks the shard as queued for it.
  bool wants_preparing() noexcept {
    if (prep_queued || !has_chores())
      return false;
    prep_queued = true;
    return true;
  }

  // Requires mtx. Moves the spare out into `out` when some of it is due to
  // be made present and answers the byte range, at most `max_bytes`.
  std::pair<size_t, size_t> lend_spare(table& out, size_t max_bytes) noexcept {
    if (!spare_has_due())
      return {0, 0};
    out = std::move(spare);
    spare_lent = true;
    return {spare_touched, std::min(spare_due, spare_touched + max_bytes)};
  }

  // Requires mtx. Takes the lent spare back, made present up to `to`,
  // unless the shard moved on meanwhile (it grew without it, or shrank);
  // then `t` keeps it, to be freed after the unlock.
  void return_spare(table& t, size_t to) noexcept {
    spare_lent = false;
    if (spare.empty() && old.empty() && t.size() == 2 * slots.size()) {
      spare = std::move(t);
      spare_touched = to;
      spare_due = std::max(spare_due, to);
    }
  }

  // Requires mtx. Whether the preparer has something to do here.
  bool has_chores() const noexcept {
    return spare_has_due() || keys.wants_spare();
  }

  // One step of the preparer's work on this shard, with the lock released
  // meanwhile: maps a spare key chunk and makes it present, or makes up to
  // `max_bytes` of the spare table's due pages present with the spare lent
  // out (so no other thread touches or frees it; a growth that comes while
  // it is out makes a table of its own). Answers whether more is to do; if
  // not, clears `prep_queued`.
  bool prepare_some(size_t max_bytes) {
    table lent;
    std::pair<size_t, size_t> range;
    bool chunk = false;
    {
      locked guard{*this};
      if (keys.wants_spare()) {
        keys.spare_asked();
        chunk = true;
      } else {
        range = lend_spare(lent, max_bytes);
        if (lent.empty()) {
          prep_queued = false;
          return false;
        }
      }
    }
    char* made = nullptr;
    if (chunk)
      made = detail::key_arena::map_chunk(true);
    else
      detail::make_present(reinterpret_cast<char*>(lent.begin()), range.first,
                           range.second);
    char* extra = nullptr;
    bool more = false;
    {
      locked guard{*this};
      if (chunk)
        extra = keys.adopt_spare(made);
      else
        return_spare(lent, range.second);
      more = has_chores();
      if (!more)
        prep_queued = false;
    }
    if (extra != nullptr)
      detail::key_arena::unmap_chunk(extra);
    return more;
  }

  // Inserts a key known to be absent from both tables.
  void insert(std::string_view key, uint64_t h, entry_state st, time_point t,
              time_point now) {
    // Grow above the shard's load factor (dropping expired entries on the
    // way).
    if (128 * (used + 1) > grow_at * slots.size())
      rebuild(now, 1, false);
    auto* bytes = keys.copy(key); // may throw: before the slot is taken
    auto& s = slots[empty_slot_for(h)];
    s.hash = h;
    s.key = bytes;
    s.size = static_cast<uint32_t>(key.size());
    s.state = st;
    s.expires_at = t;
    noted(t);
    ++used;
    if (old.empty())
      prepare_spare(now);
  }

  void set(size_t i, entry_state st, time_point t) noexcept {
    slots[i].state = st;
    slots[i].expires_at = t;
    noted(t);
  }

  // Empties slot `i` and shifts the entries of its probe run back, so lookups
  // never need tombstones. The slot `i` may afterwards hold another entry.
  void erase(size_t i) {
    keys.drop(slots[i].key, slots[i].size);
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
      slots[i] = s;
      // It may have left the part of the array the sweep pass has yet to
      // see; keep its deadline in the pass's minimum.
      pass_min = std::min(pass_min, slots[i].expires_at);
      i = j;
    }
    auto& hole = slots[i];
    hole.hash = 0;
    hole.key = nullptr; // freed above, or now held by the slot it moved to
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
        if (old.empty() && slots.size() > min_capacity
            && 8 * used < slots.size())
          return removed + rebuild(now, 0, true);
      }
    }
    return removed;
  }

  // Requires mtx. Inspects `n` slots, resuming where the previous call
  // stopped: removes expired entries and copies the keys that sit in a
  // chunk being evacuated into the chunk being filled.
  void evacuate(time_point now, size_t n) {
    for (size_t k = 0; k < n && !slots.empty(); ++k) {
      if (evac_cursor >= slots.size())
        evac_cursor = 0;
      auto& s = slots[evac_cursor];
      while (s.hash != 0 && s.expires_at <= now)
        erase(evac_cursor);
      if (s.hash != 0 && keys.evacuating(s.key, s.size)) {
        auto* moved = keys.copy({s.key, s.size});
        keys.drop(s.key, s.size);
        s.key = moved;
      }
      ++evac_cursor;
    }
  }

  // Requires mtx. Counts an operation, moves a few slots of a growing table,
  // evacuates a few while a key chunk is sparse and sweeps on every
  // sweep_interval-th.
  void tick(time_point now) {
    if (!old.empty())
      move_some(now, moves_per_op);
    if (keys.has_evacuations())
      evacuate(now, evacuate_per_op);
    if (++ops % sweep_interval == 0)
      sweep(now, sweep_buckets);
  }
};

/// Does a store's memory chores on a thread of its own, so that no claim
/// waits for them: it makes the shards' spare tables present (first touches
/// of pages cost ~6 us a page on the virtual machines measured here) and
/// frees the tables growths leave behind (scanning their slots for keys and
/// unmapping them took 0.1-1.8 ms a table there). The thread starts when a
/// shard first has such work (the first growth past `incremental_from`
/// keys, or a spare for a table of `spare_from` slots), runs at nice 10, and is
/// stopped by the store's destructor, which also frees what is still queued.
/// Where no thread can be started, the thread that has the work does it, after
/// releasing the shard's lock.
class memory_idempotency_store::preparer {
public:
  preparer() = default;

  ~preparer();

  preparer(const preparer&) = delete;
  preparer& operator=(const preparer&) = delete;

  /// Queues `s`, whose `prep_queued` the caller has set.
  void submit(shard& s);

  /// Frees what a shard no longer needs - `t` (a table a growth left
  /// behind) and `chunks` (key chunks) - on the thread, or here when no
  /// thread runs.
  void dispose(shard::table t, std::vector<char*> chunks);

private:
  /// Starts the thread on first use; answers whether it runs.
  bool running();

  void run();

  std::mutex mtx_;
  std::condition_variable cv_;
  std::deque<shard*> queue_;
  /// Freed with itself.
  struct garbage {
    shard::table table;
    std::vector<char*> chunks;

    garbage(shard::table t, std::vector<char*> cs) noexcept
      : table(std::move(t)), chunks(std::move(cs)) {
      // Nothing else to do.
    }

    garbage(garbage&&) noexcept = default;
    // Assigning would drop the target's chunks without unmapping them.
    garbage& operator=(garbage&&) = delete;

    ~garbage() {
      for (auto* c : chunks)
        detail::key_arena::unmap_chunk(c);
    }
  };
  std::deque<garbage> garbage_;
  std::thread thread_;
  bool started_ = false;
  bool stop_ = false;
};

// After the unlock: a table a completed growth left behind and key chunks
// the arena no longer needs go to the preparer to be freed (or are freed
// here when no thread runs), and a shard with chores is handed to it.
memory_idempotency_store::shard::locked::~locked() {
  if (!lock_.owns_lock())
    return;
  auto dead = std::move(s_.retired);
  std::vector<char*> chunks;
  chunks.swap(s_.keys.unneeded());
  bool submit = s_.wants_preparing();
  lock_.unlock();
  if (!dead.empty() || !chunks.empty())
    s_.prep->dispose(std::move(dead), std::move(chunks));
  if (submit)
    s_.prep->submit(s_);
}

memory_idempotency_store::preparer::~preparer() {
  {
    std::lock_guard<std::mutex> guard{mtx_};
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable())
    thread_.join();
}

bool memory_idempotency_store::preparer::running() {
  if (!started_) {
    started_ = true;
    try {
      thread_ = std::thread{[this] { run(); }};
      ::pthread_setname_np(thread_.native_handle(), "evmesh-mstore");
    } catch (const std::system_error&) {
      // The callers do the work themselves.
    }
  }
  return thread_.joinable();
}

void memory_idempotency_store::preparer::submit(shard& s) {
  {
    std::unique_lock<std::mutex> guard{mtx_};
    if (running()) {
      queue_.push_back(&s);
      guard.unlock();
      cv_.notify_one();
      return;
    }
  }
  while (s.prepare_some(shard::populate_bytes))
    continue;
}

void memory_idempotency_store::preparer::dispose(shard::table t,
                                                 std::vector<char*> chunks) {
  garbage dead{std::move(t), std::move(chunks)};
  {
    std::lock_guard<std::mutex> guard{mtx_};
    if (!running())
      return; // `dead` goes here
    garbage_.push_back(std::move(dead));
  }
  cv_.notify_one();
}

void memory_idempotency_store::preparer::run() {
  // Behind the workers whose claims it serves, when both want a core.
  ::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 10);
  std::unique_lock<std::mutex> guard{mtx_};
  for (;;) {
    cv_.wait(guard,
             [this] { return stop_ || !queue_.empty() || !garbage_.empty(); });
    if (stop_)
      return;
    if (!garbage_.empty()) {
      {
        auto dead = std::move(garbage_.front());
        garbage_.pop_front();
        guard.unlock();
      }
      guard.lock();
      continue;
    }
    auto* s = queue_.front();
    queue_.pop_front();
    guard.unlock();
    // A step (16 pages) at a time, the shards taking turns.
    bool more = s->prepare_some(shard::populate_bytes);
    guard.lock();
    if (more)
      queue_.push_back(s);
  }
}

memory_idempotency_store::memory_idempotency_store(size_t shards,
                                                   clock_function clock)
  : shards_(std::make_unique<shard[]>(std::max(shards, size_t{1}))),
    shard_count_(std::max(shards, size_t{1})),
    clock_(std::move(clock)),
    preparer_(std::make_unique<preparer>()) {
  for (size_t i = 0; i < shard_count_; ++i)
    shards_[i].prep = preparer_.get();
  // Staggered growth points: with keys spread evenly, shards with one
  // threshold all doubled within a few thousand keys of each other, and
  // the moves that follow a doubling made every claim of every shard ~10x
  // dearer at once (the in-process p99's worst windows). Eight thresholds
  // from 3/4 down to 89/128 spread those moves over ~7 % of the key count.
  for (size_t i = 0; i < shard_count_; ++i)
    shards_[i].grow_at = 96 - i % 8;
}

memory_idempotency_store::~memory_idempotency_store() = default;

size_t memory_idempotency_store::shard_index(uint64_t hash) const noexcept {
  // Fibonacci hashing on the high bits: the tables inside a shard use the low
  // bits of the same hash, so taking those here would skew their slots.
  auto h = hash * 0x9E3779B97F4A7C15ull;
  return static_cast<size_t>((h >> 32) % shard_count_);
}

memory_idempotency_store::shard&
memory_idempotency_store::shard_for(uint64_t hash) const noexcept {
  return shards_[shard_index(hash)];
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
  shard::locked guard{s};
  return claim_locked(s, key, h, t, lease);
}

caf::error memory_idempotency_store::commit(std::string_view key,
                                            caf::timespan keep) {
  auto t = now();
  auto h = hash_key(key);
  auto& s = shard_for(h);
  shard::locked guard{s};
  commit_locked(s, key, h, t, keep);
  return caf::error{};
}

caf::error memory_idempotency_store::abort(std::string_view key) {
  auto t = now();
  auto h = hash_key(key);
  auto& s = shard_for(h);
  shard::locked guard{s};
  abort_locked(s, key, h, t);
  return caf::error{};
}

void memory_idempotency_store::visit_by_shard(
  std::span<const uint64_t> hashes,
  const std::function<void(shard&, size_t)>& op) {
  // (shard, index) pairs: sorted, they group a batch by shard and keep the
  // batch's order within a shard (the same key twice in a batch is claimed
  // in order).
  thread_local std::vector<std::pair<uint32_t, uint32_t>> order;
  order.clear();
  for (size_t i = 0; i < hashes.size(); ++i)
    order.emplace_back(static_cast<uint32_t>(shard_index(hashes[i])),
                       static_cast<uint32_t>(i));
  std::sort(order.begin(), order.end());
  // The ops of one shard, under its lock.
  auto run = [&](shard& s, size_t first, size_t last) {
    if (!s.slots.empty())
      for (auto k = first; k < last; ++k)
        __builtin_prefetch(&s.slots[hashes[order[k].second] & s.mask()]);
    for (auto k = first; k < last; ++k)
      op(s, order[k].second);
  };
  // First the shards nobody holds, then the rest, waiting for each. Two
  // workers with batches over all shards otherwise walked them in the same
  // order, one waiting behind the other at every shard - and on a busy
  // machine the holder may be preempted mid-batch (lock waits summed to
  // ~30 ms/s at 150 k claims/s here, mostly behind preempted holders).
  thread_local std::vector<std::pair<uint32_t, uint32_t>> busy; // first, last
  busy.clear();
  for (size_t first = 0; first < order.size();) {
    auto& s = shards_[order[first].first];
    auto last = first;
    while (last < order.size() && order[last].first == order[first].first)
      ++last;
    if (shard::locked guard{s, std::try_to_lock}; guard.owns_lock()) {
      run(s, first, last);
    } else {
      busy.emplace_back(static_cast<uint32_t>(first),
                        static_cast<uint32_t>(last));
    }
    first = last;
  }
  for (auto [first, last] : busy) {
    auto& s = shards_[order[first].first];
    shard::locked guard{s};
    run(s, first, last);
  }
}

void memory_idempotency_store::try_begin_many(
  std::span<const std::string_view> keys, caf::timespan lease,
  std::span<claim_result> out) {
  auto n = std::min(keys.size(), out.size());
  if (n == 0)
    return;
  auto t = now();
  thread_local std::vector<uint64_t> hashes;
  hashes.resize(n);
  for (size_t i = 0; i < n; ++i)
    hashes[i] = hash_key(keys[i]);
  visit_by_shard({hashes.data(), n}, [&](shard& s, size_t i) {
    out[i] = claim_locked(s, keys[i], hashes[i], t, lease);
  });
}

caf::error memory_idempotency_store::finish_many(std::span<const finish_op> ops,
                                                 caf::timespan keep,
                                                 std::span<caf::error> errors) {
  auto n = std::min(ops.size(), errors.size());
  if (n == 0)
    return caf::error{};
  auto t = now();
  thread_local std::vector<uint64_t> hashes;
  hashes.resize(n);
  for (size_t i = 0; i < n; ++i)
    hashes[i] = hash_key(ops[i].key);
  visit_by_shard({hashes.data(), n}, [&](shard& s, size_t i) {
    if (ops[i].kind == finish_op::commit)
      commit_locked(s, ops[i].key, hashes[i], t, keep);
    else
      abort_locked(s, ops[i].key, hashes[i], t);
    errors[i] = caf::error{};
  });
  return caf::error{};
}

size_t memory_idempotency_store::size() const {
  size_t result = 0;
  for (size_t i = 0; i < shard_count_; ++i) {
    std::lock_guard<std::mutex> guard{shards_[i].mtx};
    result += shards_[i].size();
  }
  return result;
}

size_t memory_idempotency_store::shard_count() const noexcept {
  return shard_count_;
}

size_t memory_idempotency_store::key_chunks() const {
  size_t result = 0;
  for (size_t i = 0; i < shard_count_; ++i) {
    std::lock_guard<std::mutex> guard{shards_[i].mtx};
    result += shards_[i].keys.chunk_count();
  }
  return result;
}

size_t memory_idempotency_store::evict_expired() {
  auto t = now();
  size_t result = 0;
  for (size_t i = 0; i < shard_count_; ++i) {
    auto& s = shards_[i];
    shard::locked guard{s};
    auto before = s.size();
    s.finish_growth(t);
    result += before - s.size();
    result += s.sweep(t, s.slots.size());
  }
  return result;
}

} // namespace evmesh
