// One topic supervisor per subscription: owns in-flight records (envelope,
// attempts, errors, trace), per-key lanes, retry timers and handler lanes, and
// settles every delivery with the source exactly once.
#include <deque>
#include <memory_resource>
#include <stdexcept>
#include <unordered_map>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/mesh.hpp"

namespace evmesh::internal {

namespace {

using clock_type = caf::actor_clock;
using time_point = clock_type::time_point;

enum class record_state : uint8_t { queued, running, waiting, dead_lettering };

struct record {
  incoming_ptr msg;
  /// Handler executions in this process.
  uint32_t executions = 0;
  record_state state = record_state::queued;
  /// Lane running it (valid while running) and the dispatch sequence number
  /// that identifies the current attempt (stale answers are ignored).
  size_t lane = 0;
  uint64_t seq = 0;
  /// The running (or last) attempt's span id and the previous one (for
  /// links); the rest of the attempt's trace context is the producer's
  /// (`attempt_trace`).
  span_id span{};
  span_id last_span{};
  /// Whether an attempt ran (then `span` is the last attempt's).
  bool attempted = false;
  /// Bounded error history for the dead-letter record (made on first error).
  std::unique_ptr<dead_letter_record> errors;

  dead_letter_record& history() {
    if (!errors)
      errors = std::make_unique<dead_letter_record>();
    return *errors;
  }
};

/// The trace context of `r`'s running (or last) attempt: a child of the
/// producer's span.
trace_context attempt_trace(const record& r) {
  auto& m = *r.msg;
  auto& p = m.producer;
  return trace_context{p.trace,
                       r.span,
                       p.span,
                       p.flags,
                       p.is_root ? std::string{} : m.env.tracestate,
                       p.is_root};
}

struct lane_slot {
  caf::actor handle;
  uint64_t running = 0; // delivery id, 0 = idle
  time_point started;
  /// A peer's lane (handle = the cluster node's lane proxy for that peer).
  bool remote = false;
  /// A remote lane whose node was lost; reused when a node joins.
  bool gone = false;
  /// The peer's node name; empty for local lanes.
  std::string node;
  /// Local function lanes run batches: the delivery ids in order, the
  /// batch's token and the lane's progress through it.
  std::vector<uint64_t> batch;
  uint64_t token = 0;
  lane_progress_ptr progress;
};

/// Successors of a key's running message, in arrival order.
struct key_queue {
  std::vector<uint64_t> waiting;
  size_t head = 0;

  bool empty() const noexcept {
    return head == waiting.size();
  }

  uint64_t pop() {
    auto id = waiting[head++];
    if (head == waiting.size()) {
      waiting.clear();
      head = 0;
    }
    return id;
  }
};

/// Most attempts one batch carries to a lane.
constexpr size_t max_lane_batch = 64;

struct supervisor_state {
  runtime_env_ptr env;
  uint32_t index = 0;
  const subscription* sub = nullptr;
  caf::actor source;
  caf::actor dead_letter;
  /// The nodes of `records` and `keys`, reused: once the pool has grown to
  /// the most messages in flight, a message costs them no heap allocation
  /// (heap nodes were 2 of the 10.5 allocations an in-process message
  /// took). Chunks of at most 256 nodes: doubling chunks held up to twice
  /// the nodes in use. Declared first: it outlives both maps.
  std::pmr::unsynchronized_pool_resource pool{std::pmr::pool_options{256, 0}};
  std::pmr::unordered_map<uint64_t, record> records{&pool};
  /// Keys with a message in flight; successors wait here (per_key only).
  std::pmr::unordered_map<std::string, key_queue> keys{&pool};
  std::deque<uint64_t> ready;
  std::vector<lane_slot> lanes;
  std::vector<size_t> idle;
  uint64_t next_seq = 1;
  std::mt19937_64 rng{std::random_device{}()};
  std::deque<time_point> restarts;
  bool paused = false;
  bool draining = false;
  bool tick_scheduled = false;
  size_t running = 0;
  /// Remote lanes currently usable.
  size_t remote_slots = 0;
  /// Retries due this late leave through `transport::defer`.
  caf::timespan defer_after = caf::timespan::max();
  /// Settlements made while handling the current message (sent as one).
  std::vector<settlement> out;
};

using state_ptr = std::shared_ptr<supervisor_state>;

class supervisor_impl {
public:
  supervisor_impl(caf::event_based_actor* self, state_ptr st)
    : self_(self), st_(std::move(st)) {
  }

  const subscription_options& opts() const {
    return st_->sub->options;
  }

  stats_block& stats() {
    return *st_->env->stats;
  }

  // -- lanes -------------------------------------------------------------------

  /// Gives `slot` a fresh local lane (function lanes get a fresh progress
  /// record: the old lane may still write to its own).
  void spawn_lane(lane_slot& slot) {
    if (st_->sub->handler->factory == nullptr)
      slot.progress = std::make_shared<lane_progress>();
    slot.handle = spawn_local_lane(self_, st_->env, st_->index, slot.progress);
    slot.batch.clear();
    slot.token = 0;
  }

  void start_lanes() {
    st_->lanes.resize(opts().concurrency);
    for (size_t i = 0; i < st_->lanes.size(); ++i) {
      spawn_lane(st_->lanes[i]);
      st_->idle.push_back(i);
    }
  }

  /// Replaces lane `i` (crashed or timed out); counts towards the restart
  /// intensity limit.
  void replace_lane(size_t i, bool kill_old) {
    auto& slot = st_->lanes[i];
    if (kill_old && slot.handle)
      self_->send_exit(slot.handle, caf::exit_reason::kill);
    if (slot.progress)
      slot.progress->abandoned.store(true, std::memory_order_release);
    spawn_lane(slot);
    slot.running = 0;
    st_->idle.push_back(i);
    stats_block::inc(stats().lane_restarts);
    auto now = self_->clock().now();
    st_->restarts.push_back(now);
    while (!st_->restarts.empty()
           && now - st_->restarts.front() > st_->env->config.restart_window)
      st_->restarts.pop_front();
    if (!st_->paused && st_->restarts.size() > st_->env->config.restart_limit) {
      st_->paused = true;
      stats_block::inc(stats().paused);
      stats().health.store(static_cast<uint8_t>(health_status::degraded));
      spdlog::error("subscription {} paused for {} ms: {} handler restarts "
                    "within {} ms exceed supervision.restart_limit = {}",
                    st_->sub->name,
                    std::chrono::duration_cast<std::chrono::milliseconds>(
                      st_->env->config.pause_for)
                      .count(),
                    st_->restarts.size(),
                    std::chrono::duration_cast<std::chrono::milliseconds>(
                      st_->env->config.restart_window)
                      .count(),
                    st_->env->config.restart_limit);
      self_->delayed_send(self_, st_->env->config.pause_for,
                          resume_atom::value);
    }
  }

  void resume() {
    if (!st_->paused)
      return;
    st_->paused = false;
    st_->restarts.clear();
    auto left = stats().paused.fetch_sub(1) - 1;
    if (left == 0
        && stats().health.load()
             == static_cast<uint8_t>(health_status::degraded))
      stats().health.store(static_cast<uint8_t>(health_status::healthy));
    spdlog::info("subscription {} resumed", st_->sub->name);
    dispatch();
  }

  /// Lane `addr` exited (crash, or the kill after a timeout).
  void on_lane_exit(const caf::actor_addr& addr, const caf::error& reason) {
    for (size_t i = 0; i < st_->lanes.size(); ++i) {
      auto& slot = st_->lanes[i];
      if (slot.handle && slot.handle.address() == addr) {
        if (slot.running != 0 && slot.progress) {
          auto k = std::min<size_t>(
            slot.progress->index.load(std::memory_order_acquire),
            slot.batch.size() - 1);
          abandon_batch(i, k, "handler lane crashed: " + caf::to_string(reason),
                        false, false);
          dispatch();
          return;
        }
        if (slot.running != 0) {
          auto id = slot.running;
          slot.running = 0;
          if (auto r = find(id); r && r->state == record_state::running)
            failed_attempt(id, *r,
                           "handler actor crashed: " + caf::to_string(reason),
                           std::nullopt, true);
        } else {
          // The lane was idle (not in `idle` only while running).
          for (auto j = st_->idle.begin(); j != st_->idle.end(); ++j)
            if (*j == i) {
              st_->idle.erase(j);
              break;
            }
        }
        replace_lane(i, false);
        dispatch();
        return;
      }
    }
  }

  // -- intake ------------------------------------------------------------------

  record* find(uint64_t id) {
    auto i = st_->records.find(id);
    return i == st_->records.end() ? nullptr : &i->second;
  }

  void accept(dispatch_batch& batch) {
    for (auto& msg : batch.items) {
      if (st_->draining) {
        settle(msg->delivery_id, settle_kind::nack, nullptr);
        continue;
      }
      auto id = msg->delivery_id;
      auto& r = st_->records[id];
      r.msg = msg;
      if (hold_key(id, r))
        st_->ready.push_back(id);
    }
    dispatch();
  }

  /// Makes `id` the key's running message, or parks it behind the current one.
  /// Returns whether it may run now.
  bool hold_key(uint64_t id, record& r) {
    auto& key = r.msg->env.key;
    if (opts().ordering != ordering::per_key || key.empty())
      return true;
    auto [i, added] = st_->keys.try_emplace(key);
    if (added)
      return true;
    i->second.waiting.push_back(id);
    return false;
  }

  /// Releases the key of a finished record: its next message becomes ready.
  void release_key(const record& r) {
    auto& key = r.msg->env.key;
    if (opts().ordering != ordering::per_key || key.empty())
      return;
    auto i = st_->keys.find(key);
    if (i == st_->keys.end())
      return;
    if (i->second.empty()) {
      st_->keys.erase(i);
      return;
    }
    st_->ready.push_back(i->second.pop());
  }

  // -- dispatch ----------------------------------------------------------------

  /// Hands ready messages to idle lanes: one attempt per actor or remote
  /// lane; a batch per local function lane, sized so that every idle lane
  /// gets a share of what is ready (one message when little is waiting, so
  /// latency stays low; up to `max_lane_batch` under load).
  void dispatch() {
    while (!st_->paused && !st_->draining && !st_->ready.empty()
           && !st_->idle.empty()) {
      auto lane = pick_lane();
      auto& slot = st_->lanes[lane];
      size_t want = 1;
      // With peers' lanes in play, local lanes take one attempt at a time
      // too: a batch would make the local node look as loaded as a peer
      // running a single attempt, and the work would pile up here.
      if (slot.progress && !slot.remote && st_->remote_slots == 0) {
        auto lanes = st_->idle.size() + 1;
        want = std::clamp<size_t>((st_->ready.size() + lanes - 1) / lanes, 1,
                                  max_lane_batch);
      }
      std::vector<uint64_t> ids;
      ids.reserve(want);
      while (ids.size() < want && !st_->ready.empty())
        if (auto id = next_ready(); id != 0)
          ids.push_back(id);
      if (ids.empty()) {
        st_->idle.push_back(lane);
        break;
      }
      if (slot.progress && !slot.remote)
        run_batch(lane, std::move(ids));
      else
        run(ids.front(), *find(ids.front()), lane);
    }
  }

  /// Pops the next message that may run now (0 for none): stale entries are
  /// skipped, crash loops dead-lettered.
  uint64_t next_ready() {
    auto id = st_->ready.front();
    st_->ready.pop_front();
    auto r = find(id);
    if (!r || r->state == record_state::running)
      return 0;
    if (r->executions == 0 && r->msg->prior_attempts >= opts().max_attempts) {
      crash_loop(id, *r);
      return 0;
    }
    return id;
  }

  /// Takes an idle lane of the least loaded node (running / lanes); local
  /// lanes form the node "". Without remote lanes: the last idle one.
  size_t pick_lane() {
    auto& idle = st_->idle;
    size_t best = idle.size() - 1;
    if (st_->remote_slots > 0) {
      std::unordered_map<std::string_view, std::pair<size_t, size_t>> load;
      for (auto& slot : st_->lanes) {
        if (slot.gone)
          continue;
        auto& l = load[slot.node];
        ++l.second;
        if (slot.running != 0)
          ++l.first;
      }
      double best_score = 2.0;
      for (size_t j = 0; j < idle.size(); ++j) {
        auto& l = load[st_->lanes[idle[j]].node];
        auto score = static_cast<double>(l.first)
                     / static_cast<double>(std::max<size_t>(l.second, 1));
        if (score < best_score) {
          best_score = score;
          best = j;
        }
      }
    }
    auto lane = idle[best];
    idle.erase(idle.begin() + static_cast<ptrdiff_t>(best));
    return lane;
  }

  // -- remote lanes (cluster) --------------------------------------------------

  void node_up(const std::string& node, const caf::actor& proxy, uint32_t n) {
    for (uint32_t k = 0; k < n; ++k) {
      size_t i = 0;
      while (i < st_->lanes.size() && !st_->lanes[i].gone)
        ++i;
      if (i == st_->lanes.size())
        st_->lanes.emplace_back();
      auto& slot = st_->lanes[i];
      slot.handle = proxy;
      slot.running = 0;
      slot.remote = true;
      slot.gone = false;
      slot.node = node;
      st_->idle.push_back(i);
      ++st_->remote_slots;
    }
    spdlog::info("{}: {} lane(s) on node '{}' added", st_->sub->name, n, node);
    dispatch();
  }

  /// The node behind `proxy` was lost: its lanes go, and the attempts they
  /// ran are re-dispatched at once (counted: a message that keeps killing
  /// nodes ends as retries_exhausted). Its late answers carry stale sequence
  /// numbers and are ignored; the keys stay held by their records.
  void node_down(const std::string& node, const caf::actor& proxy) {
    size_t lost = 0;
    for (size_t i = 0; i < st_->lanes.size(); ++i) {
      auto& slot = st_->lanes[i];
      if (!slot.remote || slot.gone || slot.handle != proxy)
        continue;
      slot.gone = true;
      slot.handle = nullptr;
      --st_->remote_slots;
      if (slot.running == 0) {
        auto j = std::find(st_->idle.begin(), st_->idle.end(), i);
        if (j != st_->idle.end())
          st_->idle.erase(j);
        continue;
      }
      auto id = slot.running;
      slot.running = 0;
      auto r = find(id);
      if (r && r->state == record_state::running && r->lane == i) {
        ++lost;
        stats_block::inc(stats().redispatched);
        failed_attempt(id, *r,
                       "node '" + node + "' was lost while running the attempt",
                       caf::timespan{0}, true);
      }
    }
    spdlog::warn("{}: node '{}' lost; {} in-flight attempt(s) re-dispatched",
                 st_->sub->name, node, lost);
    dispatch();
  }

  /// A message delivered more often than it may run: an earlier consumer most
  /// likely died while handling it. Never run it again. It waits for its key
  /// like any other message, so its dead letter keeps the key's order.
  void crash_loop(uint64_t id, record& r) {
    auto prior = r.msg->prior_attempts;
    r.history().add_error(prior, wall_ms(),
                          "delivered " + std::to_string(prior + 1)
                            + " times, more than max_attempts = "
                            + std::to_string(opts().max_attempts)
                            + "; a consumer likely crashed while handling it");
    dead_letter(id, r, "crash_loop");
  }

  /// Marks `r` running on `lane` and makes its attempt message.
  attempt_msg prepare(uint64_t id, record& r, size_t lane) {
    auto& m = *r.msg;
    r.state = record_state::running;
    r.lane = lane;
    r.seq = st_->next_seq++;
    r.span = new_span_id();
    attempt_msg am;
    am.msg = r.msg;
    am.id = id;
    am.seq = r.seq;
    am.attempt = m.prior_attempts + r.executions + 1;
    am.trace = attempt_trace(r);
    am.link = r.last_span;
    am.deadline = caf::make_timestamp() + opts().timeout;
    return am;
  }

  /// Lane `slot` starts working; counts busy lanes.
  void lane_busy(lane_slot& slot) {
    slot.started = self_->clock().now();
    ++st_->running;
    auto cur = static_cast<uint64_t>(st_->running);
    auto prev = stats().max_concurrent.load(std::memory_order_relaxed);
    while (cur > prev
           && !stats().max_concurrent.compare_exchange_weak(prev, cur)) {
    }
  }

  /// Sends a batch of attempts (distinct keys) to local function lane `lane`.
  void run_batch(size_t lane, std::vector<uint64_t> ids) {
    attempt_batch b;
    b.token = st_->next_seq++;
    b.items.reserve(ids.size());
    for (auto id : ids)
      b.items.push_back(prepare(id, *find(id), lane));
    auto& slot = st_->lanes[lane];
    slot.running = ids.front();
    slot.batch = std::move(ids);
    slot.token = b.token;
    lane_busy(slot);
    slot.progress->started.store(slot.started.time_since_epoch().count(),
                                 std::memory_order_release);
    slot.progress->index.store(0, std::memory_order_release);
    self_->send(slot.handle, std::move(b));
    schedule_tick();
  }

  /// The results of a batch: the lane is idle again.
  void on_result_batch(result_batch& rb) {
    size_t lane = 0;
    while (lane < st_->lanes.size()
           && !(st_->lanes[lane].progress && st_->lanes[lane].token == rb.token
                && rb.token != 0))
      ++lane;
    if (lane == st_->lanes.size())
      return; // abandoned (timeout or crash): its attempts were taken back
    auto& slot = st_->lanes[lane];
    auto ids = std::move(slot.batch);
    slot.batch.clear();
    slot.token = 0;
    slot.running = 0;
    st_->idle.push_back(lane);
    --st_->running;
    for (auto& res : rb.items)
      if (auto r = accepted(res.id, res.seq))
        apply_result(res.id, *r, res);
    // A lane answers for every attempt; anything unanswered runs again.
    for (auto id : ids)
      if (auto r = find(id);
          r && r->state == record_state::running && r->lane == lane) {
        r->state = record_state::queued;
        st_->ready.push_front(id);
      }
    dispatch();
  }

  /// Takes back the batch of lane `i` after attempt `k` timed out or the
  /// lane died: the attempts that finished keep their outcomes, attempt `k`
  /// is counted and fails, the ones that never started go back to the front
  /// of the queue uncounted.
  void abandon_batch(size_t i, size_t k, std::string reason, bool kill_old,
                     bool timeout) {
    auto& slot = st_->lanes[i];
    std::vector<attempt_result> finished;
    {
      std::lock_guard guard{slot.progress->mtx};
      slot.progress->abandoned.store(true, std::memory_order_release);
      finished.swap(slot.progress->done);
    }
    for (auto& res : finished)
      if (auto r = accepted(res.id, res.seq); r && r->lane == i)
        apply_result(res.id, *r, res);
    auto ids = std::move(slot.batch);
    slot.batch.clear();
    slot.token = 0;
    slot.running = 0;
    --st_->running;
    for (size_t j = ids.size(); j-- > 0;) {
      if (j == k)
        continue;
      if (auto r = find(ids[j]);
          r && r->state == record_state::running && r->lane == i) {
        r->state = record_state::queued;
        st_->ready.push_front(ids[j]);
      }
    }
    replace_lane(i, kill_old); // the fresh lane goes to `idle`
    if (k >= ids.size())
      return;
    auto id = ids[k];
    auto r = find(id);
    if (!r || r->state != record_state::running || r->lane != i)
      return;
    if (timeout) {
      stats_block::inc(stats().timeouts);
      warn_timeout(*r);
    }
    count_abandoned_run(*r);
    failed_attempt(id, *r, std::move(reason), std::nullopt, false);
  }

  void run(uint64_t id, record& r, size_t lane) {
    auto am = prepare(id, r, lane);
    auto& slot = st_->lanes[lane];
    slot.running = id;
    lane_busy(slot);
    auto seq = r.seq;
    self_->request(slot.handle, caf::infinite, run_atom::value, std::move(am))
      .then(
        [this, id, seq](attempt_result& res) {
          on_result(id, seq, res);
          flush();
        },
        [this, id, seq](caf::error&) {
          // The lane died; its exit message carries the reason and
          // accounts for the attempt (see on_lane_exit).
          (void) id;
          (void) seq;
        });
    schedule_tick();
  }

  void free_lane(record& r) {
    auto& slot = st_->lanes[r.lane];
    if (slot.running != 0) {
      slot.running = 0;
      st_->idle.push_back(r.lane);
    }
    --st_->running;
  }

  /// The record of a current (not stale) attempt, or null.
  record* accepted(uint64_t id, uint64_t seq) {
    auto r = find(id);
    if (!r || r->seq != seq || r->state != record_state::running)
      return nullptr; // stale: the attempt timed out or the record was
                      // abandoned
    return r;
  }

  void on_result(uint64_t id, uint64_t seq, attempt_result& res) {
    auto r = accepted(id, seq);
    if (!r)
      return;
    free_lane(*r);
    apply_result(id, *r, res);
    dispatch();
  }

  void apply_result(uint64_t id, record& rec, attempt_result& res) {
    auto r = &rec;
    r->last_span = r->span;
    r->attempted = true;
    switch (res.kind) {
      case attempt_result::duplicate:
        stats_block::inc(stats().duplicates);
        finish(id, settle_kind::ack);
        break;
      case attempt_result::in_flight:
      case attempt_result::store_unavailable:
        stats_block::inc(stats().deferred);
        if (st_->draining) {
          finish(id, settle_kind::nack);
        } else {
          r->state = record_state::waiting;
          auto delay = next_backoff(1, opts().backoff, st_->rng);
          self_->delayed_send(self_, delay, retry_atom::value, id, r->seq);
        }
        break;
      default:
        handled(id, *r, std::move(res.out));
    }
  }

  void handled(uint64_t id, record& r, outcome out) {
    ++r.executions;
    switch (out.kind) {
      case outcome_kind::ok:
        stats_block::inc(stats().handled);
        finish(id, settle_kind::ack);
        break;
      case outcome_kind::discard:
        stats_block::inc(stats().discarded);
        finish(id, settle_kind::ack);
        break;
      case outcome_kind::dead_letter: {
        r.history().add_error(attempt_of(r), wall_ms(), out.reason);
        dead_letter(id, r, out.category.empty() ? "permanent" : out.category);
        break;
      }
      default:
        failed_attempt(id, r, std::move(out.reason), out.after, false);
    }
  }

  uint32_t attempt_of(const record& r) const {
    return r.msg->prior_attempts + r.executions;
  }

  /// A counted attempt failed (retry outcome, crash, timeout): retry with
  /// backoff or dead-letter when the attempts are exhausted.
  void failed_attempt(uint64_t id, record& r, std::string reason,
                      std::optional<caf::timespan> after, bool count) {
    if (count) {
      // Crash or timeout: the lane never finished its claim. Release it so the
      // retry is not mistaken for another worker's in-flight attempt.
      free_lane(r);
      count_abandoned_run(r);
    }
    auto n = attempt_of(r);
    r.history().add_error(n, wall_ms(), reason);
    if (n >= opts().max_attempts) {
      dead_letter(id, r, "retries_exhausted");
      return;
    }
    if (st_->draining) {
      finish(id, settle_kind::nack);
      return;
    }
    stats_block::inc(stats().retried);
    auto delay = after ? *after
                       : next_backoff(r.executions, opts().backoff, st_->rng);
    if (delay >= st_->defer_after) {
      // Too long to hold the broker's position: the transport takes it out
      // of the stream (retry topic) and keeps the key's order itself. The
      // key's successors waiting here go back to the transport (nacked after
      // the deferral), which holds them until the deferred message is done.
      std::vector<uint64_t> successors;
      auto& key = r.msg->env.key;
      if (opts().ordering == ordering::per_key && !key.empty())
        if (auto k = st_->keys.find(key); k != st_->keys.end()) {
          while (!k->second.empty())
            successors.push_back(k->second.pop());
          st_->keys.erase(k);
        }
      settlement s{id, settle_kind::defer, nullptr};
      s.delay = delay;
      s.attempts = n;
      finish(std::move(s));
      for (auto next : successors)
        if (st_->records.erase(next) > 0)
          settle(next, settle_kind::nack, nullptr);
      check_drained();
      return;
    }
    r.state = record_state::waiting;
    self_->delayed_send(self_, delay, retry_atom::value, id, r.seq);
  }

  void release_claim(const record& r) {
    auto& env = *st_->env;
    if (!env.dedupe)
      return;
    if (auto err = env.dedupe->abort(scoped_dedupe_key(*st_->sub, *r.msg)))
      spdlog::warn("{}: releasing the idempotency claim of a crashed attempt "
                   "failed: {}",
                   st_->sub->name, render(err));
  }

  void on_retry_timer(uint64_t id, uint64_t seq) {
    auto r = find(id);
    if (!r || r->seq != seq || r->state != record_state::waiting)
      return;
    r->state = record_state::queued;
    // The key stays held by this record: it goes first again.
    st_->ready.push_front(id);
    dispatch();
  }

  // -- terminal actions --------------------------------------------------------

  void dead_letter(uint64_t id, record& r, std::string category) {
    r.state = record_state::dead_lettering;
    r.seq = st_->next_seq++;
    auto rec = std::make_shared<dead_letter_record>(std::move(r.history()));
    r.errors.reset();
    auto& m = *r.msg;
    auto& env = *st_->env;
    rec->category = std::move(category);
    rec->reason = rec->errors.empty() ? "" : rec->errors.back().message;
    rec->attempts = attempt_of(r);
    // first/last failure times are kept by add_error (also beyond 5 errors).
    rec->consumer = st_->sub->handler->consumer;
    rec->pattern = st_->sub->handler->pattern;
    rec->topic = m.env.topic;
    rec->key = m.env.key;
    rec->idempotency_key = m.env.idempotency_key;
    rec->transport = std::string{env.transport->scheme()};
    rec->position = std::string{m.position()};
    rec->node = env.node;
    rec->traceparent = r.attempted ? attempt_trace(r).traceparent()
                                   : m.env.traceparent;
    rec->original = env.config.mask_fields.empty()
                      ? std::string{m.bytes()}
                      : mask_fields(m.bytes(), env.config.mask_fields);
    rec->original_decoded = true;
    spdlog::warn("{}: dead-lettering {} message on '{}' after {} attempt(s): "
                 "{}",
                 st_->sub->name, rec->category, rec->topic, rec->attempts,
                 rec->reason);
    std::shared_ptr<const dead_letter_record> shared = rec;
    auto seq = r.seq;
    self_
      ->request(st_->dead_letter, caf::infinite, write_atom::value,
                dead_letter_job{shared})
      .then(
        [this, id, seq, shared](int64_t) {
          auto cur = find(id);
          if (!cur || cur->seq != seq)
            return; // abandoned at the shutdown deadline
          stats_block::inc(stats().dead_lettered);
          finish(id, settle_kind::dead_lettered, shared);
          dispatch();
          flush();
        },
        [this, id, seq](caf::error& err) {
          // The dead-letter actor is gone (shutdown): never ack.
          auto cur = find(id);
          if (!cur || cur->seq != seq)
            return;
          spdlog::error("dead-letter write for {} failed: {}", st_->sub->name,
                        caf::to_string(err));
          finish(id, settle_kind::nack);
          flush();
        });
  }

  void settle(uint64_t id, settle_kind kind,
              std::shared_ptr<const dead_letter_record> rec) {
    settlement s{id, kind, std::move(rec)};
    s.sub = st_->index;
    st_->out.push_back(std::move(s));
  }

  /// Sends the settlements collected so far as one message.
  void flush() {
    if (st_->out.empty())
      return;
    settlement_batch b;
    b.items.swap(st_->out);
    self_->send(st_->source, std::move(b));
  }

  void finish(uint64_t id, settle_kind kind,
              std::shared_ptr<const dead_letter_record> rec = nullptr) {
    finish(settlement{id, kind, std::move(rec)});
  }

  void finish(settlement s) {
    auto i = st_->records.find(s.delivery_id);
    if (i == st_->records.end())
      return;
    release_key(i->second);
    st_->records.erase(i);
    s.sub = st_->index;
    st_->out.push_back(std::move(s));
    check_drained();
  }

  // -- timeouts ----------------------------------------------------------------

  void schedule_tick() {
    if (st_->tick_scheduled)
      return;
    st_->tick_scheduled = true;
    auto interval = opts().timeout / 4;
    interval = std::clamp<caf::timespan>(interval, std::chrono::milliseconds{5},
                                         std::chrono::seconds{1});
    self_->delayed_send(self_, interval, tick_atom::value);
  }

  void on_tick() {
    st_->tick_scheduled = false;
    auto now = self_->clock().now();
    for (size_t i = 0; i < st_->lanes.size(); ++i) {
      auto& slot = st_->lanes[i];
      if (slot.remote) {
        // The remote node enforces the timeout itself and answers; only an
        // answer lost on the way (beyond the heartbeat timeout) counts here.
        auto grace = opts().timeout
                     + st_->env->config.cluster_heartbeat_timeout;
        if (slot.gone || slot.running == 0 || now - slot.started < grace)
          continue;
        auto id = slot.running;
        slot.running = 0;
        st_->idle.push_back(i);
        if (auto r = find(id); r && r->state == record_state::running) {
          stats_block::inc(stats().timeouts);
          failed_attempt(id, *r,
                         "no answer from node '" + slot.node
                           + "' within the handler timeout",
                         std::nullopt, true);
        }
        continue;
      }
      if (slot.running != 0 && slot.progress) {
        // Which attempt of the batch runs, and since when. Reading the index
        // twice around the start time detects a lane moving on meanwhile.
        auto& pr = *slot.progress;
        auto k = pr.index.load(std::memory_order_acquire);
        auto started = pr.started.load(std::memory_order_acquire);
        if (k != pr.index.load(std::memory_order_acquire)
            || k >= slot.batch.size())
          continue;
        auto since = time_point{time_point::duration{started}};
        if (now - since < opts().timeout)
          continue;
        abandon_batch(i, k, timeout_reason(), true, true);
        continue;
      }
      if (slot.running == 0 || now - slot.started < opts().timeout)
        continue;
      auto id = slot.running;
      slot.running = 0;
      if (auto r = find(id); r && r->state == record_state::running) {
        stats_block::inc(stats().timeouts);
        warn_timeout(*r);
        // The old lane is killed; its exit is ignored (handle replaced).
        --st_->running;
        count_abandoned_run(*r);
        replace_lane(i, true);
        // replace_lane put the fresh lane into `idle`.
        failed_attempt(id, *r, timeout_reason(), std::nullopt, false);
      } else {
        st_->idle.push_back(i);
      }
    }
    if (st_->running > 0)
      schedule_tick();
    dispatch();
  }

  /// A run that never answered (crash, timeout, lost node) still counts: its
  /// claim is released (or the retry would look like another worker's
  /// in-flight attempt) and its span becomes the previous one.
  void count_abandoned_run(record& r) {
    release_claim(r);
    r.last_span = r.span;
    r.attempted = true;
    ++r.executions;
  }

  int64_t timeout_ms() const {
    return std::chrono::duration_cast<std::chrono::milliseconds>(opts().timeout)
      .count();
  }

  std::string timeout_reason() const {
    return "handler exceeded its timeout of " + std::to_string(timeout_ms())
           + " ms";
  }

  void warn_timeout(const record& r) {
    spdlog::warn("{}: attempt {} of {} exceeded its timeout of {} ms; "
                 "abandoning the handler lane",
                 st_->sub->name, attempt_of(r) + 1, r.msg->env.topic,
                 timeout_ms());
  }

  // -- shutdown ----------------------------------------------------------------

  void drain() {
    st_->draining = true;
    // Everything that is not running is handed back to the broker now.
    std::vector<uint64_t> ids;
    for (auto& [id, r] : st_->records)
      if (r.state == record_state::queued || r.state == record_state::waiting)
        ids.push_back(id);
    std::sort(ids.begin(), ids.end());
    st_->ready.clear();
    for (auto id : ids) {
      auto i = st_->records.find(id);
      st_->records.erase(i);
      settle(id, settle_kind::nack, nullptr);
    }
    // Parked successors were among the queued records.
    st_->keys.clear();
    check_drained();
  }

  void abandon() {
    std::vector<uint64_t> ids;
    for (auto& [id, r] : st_->records)
      ids.push_back(id);
    std::sort(ids.begin(), ids.end());
    st_->records.clear();
    st_->keys.clear();
    st_->ready.clear();
    for (auto id : ids)
      settle(id, settle_kind::nack, nullptr);
    check_drained();
  }

  void check_drained() {
    if (st_->draining && st_->records.empty()) {
      st_->draining = false; // report once
      st_->paused = true;    // never dispatch again
      flush();
      self_->send(st_->source, drained_atom::value, st_->index);
    }
  }

private:
  caf::event_based_actor* self_;
  state_ptr st_;
};

} // namespace

caf::actor spawn_handler_lane(caf::event_based_actor* parent,
                              const runtime_env_ptr& env, uint32_t sub) {
  auto& s = env->table.subscriptions[sub];
  bool actor_handler = s.handler->factory != nullptr;
  // Blocking handlers, and lanes that wait on a remote idempotency store,
  // get their own threads: CAF's cooperative threads never block on I/O.
  bool blocking = s.options.execution == execution::blocking
                  || (env->dedupe && env->dedupe->remote());
  bool detach = blocking && env->detach_io;
  if (actor_handler) {
    return detach
             ? parent->spawn<caf::linked + caf::detached>(actor_lane, env, sub)
             : parent->spawn<caf::linked>(actor_lane, env, sub);
  }
  return spawn_local_lane(parent, env, sub, nullptr);
}

caf::actor spawn_local_lane(caf::event_based_actor* parent,
                            const runtime_env_ptr& env, uint32_t sub,
                            lane_progress_ptr progress) {
  auto& s = env->table.subscriptions[sub];
  bool blocking = s.options.execution == execution::blocking
                  || (env->dedupe && env->dedupe->remote());
  bool detach = blocking && env->detach_io;
  if (s.handler->factory != nullptr)
    return detach
             ? parent->spawn<caf::linked + caf::detached>(actor_lane, env, sub)
             : parent->spawn<caf::linked>(actor_lane, env, sub);
  return detach
           ? parent->spawn<caf::linked + caf::detached>(function_lane, env, sub,
                                                        std::move(progress))
           : parent->spawn<caf::linked>(function_lane, env, sub,
                                        std::move(progress));
}

caf::behavior topic_supervisor(caf::event_based_actor* self,
                               runtime_env_ptr env, uint32_t sub,
                               caf::actor source, caf::actor dead_letter) {
  auto st = std::make_shared<supervisor_state>();
  st->env = env;
  st->index = sub;
  st->sub = &env->table.subscriptions[sub];
  st->source = std::move(source);
  st->dead_letter = std::move(dead_letter);
  if (env->transport)
    st->defer_after = env->transport->capabilities().defer_after;
  auto impl = std::make_shared<supervisor_impl>(self, st);
  impl->start_lanes();
  // However this supervisor ends (a crash included), its lanes run nothing
  // more of their batches: a restarted supervisor gets those messages again.
  self->attach_functor([st] {
    for (auto& slot : st->lanes)
      if (slot.progress)
        slot.progress->abandoned.store(true, std::memory_order_release);
  });
  self->set_exit_handler([self, impl, st](caf::exit_msg& msg) {
    for (auto& slot : st->lanes)
      if (slot.handle && slot.handle.address() == msg.source) {
        impl->on_lane_exit(msg.source, msg.reason);
        impl->flush();
        return;
      }
    // Not a current lane: a lane we killed after a timeout (ignored), or our
    // parent stopping us.
    if (msg.reason && msg.reason != caf::exit_reason::kill)
      self->quit(msg.reason);
  });
  return {
    [impl](dispatch_batch& batch) {
      impl->accept(batch);
      impl->flush();
    },
    [impl](result_batch& rb) {
      impl->on_result_batch(rb);
      impl->flush();
    },
    [impl](retry_atom, uint64_t id, uint64_t seq) {
      impl->on_retry_timer(id, seq);
      impl->flush();
    },
    [impl](tick_atom) {
      impl->on_tick();
      impl->flush();
    },
    [impl](resume_atom) {
      impl->resume();
      impl->flush();
    },
    [impl](drain_atom) {
      impl->drain();
      impl->flush();
    },
    [impl](abandon_atom) {
      impl->abandon();
      impl->flush();
    },
    [](crash_atom) {
      // Fault injection (evmesh::testing::inject_supervisor_crash): fail the
      // way a bug in this actor would.
      throw std::runtime_error("injected topic supervisor crash");
    },
    [impl](node_up_atom, const std::string& node, const caf::actor& proxy,
           uint32_t lanes) {
      impl->node_up(node, proxy, lanes);
      impl->flush();
    },
    [impl](node_down_atom, const std::string& node, const caf::actor& proxy) {
      impl->node_down(node, proxy);
      impl->flush();
    },
  };
}

} // namespace evmesh::internal
