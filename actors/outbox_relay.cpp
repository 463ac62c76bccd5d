// The outbox relay: publishes committed outbox rows in order (DESIGN.md §7).
#include <chrono>
#include <exception>
#include <string>
#include <unordered_set>

#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/spawn_options.hpp>
#include <caf/stateful_actor.hpp>

#include "evmesh/error.hpp"
#include "evmesh/outbox.hpp"

namespace evmesh::outbox {

namespace {

using tick_atom = caf::atom_constant<caf::atom("obtick")>;

struct relay_state {
  store_ptr db;
  transport_ptr out;
  relay_options opts;
  std::shared_ptr<relay_stats> stats;
  /// Wall clock at spawn and the actor clock then: `now_ms` advances with
  /// the actor clock, so backoffs follow virtual time in tests.
  int64_t wall0 = 0;
  caf::actor_clock::time_point clock0;
  /// Only ticks of the current generation run (a wake starts a new chain).
  uint64_t generation = 0;
  static inline const char* name = "evmesh.outbox_relay";
};

using relay_actor = caf::stateful_actor<relay_state>;

int64_t now_ms(relay_actor* self) {
  auto& st = self->state;
  return st.wall0
         + std::chrono::duration_cast<std::chrono::milliseconds>(
             self->clock().now() - st.clock0)
             .count();
}

caf::error publish_guarded(transport& out, const envelope& env) noexcept {
  try {
    return out.publish(env);
  } catch (const std::exception& ex) {
    return make_error(errc::io_error,
                      std::string{"publish threw: "} + ex.what());
  } catch (...) {
    return make_error(errc::io_error, "publish threw an unknown exception");
  }
}

/// Publishes one batch; returns whether the batch was full (more may wait).
bool run_batch(relay_actor* self) {
  auto& st = self->state;
  auto now = now_ms(self);
  auto rows = st.db->ready(now, st.opts.batch, st.opts.parked_blocks_key);
  st.stats->batches.fetch_add(1, std::memory_order_relaxed);
  if (!rows) {
    st.stats->store_errors.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  // Keys whose row failed in this batch: their later rows wait.
  std::unordered_set<std::string> failed_keys;
  for (const auto& r : *rows) {
    if (!r.key.empty() && failed_keys.count(r.key) != 0)
      continue;
    auto env = decode_envelope(r.envelope_json);
    auto err = env ? publish_guarded(*st.out, *env) : env.error();
    if (!err) {
      if (st.db->mark_published(r.seq, now_ms(self))) {
        // Published but not marked: it goes out again later (consumers
        // dedupe); stop here so no later row of its key overtakes it.
        st.stats->store_errors.fetch_add(1, std::memory_order_relaxed);
        return false;
      }
      st.stats->published.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    st.stats->failures.fetch_add(1, std::memory_order_relaxed);
    if (!r.key.empty())
      failed_keys.insert(r.key);
    auto attempts = r.attempts + 1;
    auto text = render(err);
    caf::error store_err;
    // A row that does not decode never will: park it at once.
    if (!env || attempts >= st.opts.max_attempts) {
      store_err = st.db->park(r.seq, attempts, text);
      if (!store_err)
        st.stats->parked.fetch_add(1, std::memory_order_relaxed);
    } else {
      auto delay = relay_backoff(attempts, st.opts.backoff_initial,
                                 st.opts.backoff_max);
      store_err = st.db->mark_failed(
        r.seq, attempts, text,
        now
          + std::chrono::duration_cast<std::chrono::milliseconds>(delay)
              .count());
    }
    if (store_err) {
      st.stats->store_errors.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
  }
  return rows->size() == st.opts.batch;
}

caf::behavior relay(relay_actor* self, store_ptr db, transport_ptr out,
                    relay_options opts, std::shared_ptr<relay_stats> stats) {
  auto& st = self->state;
  st.db = std::move(db);
  st.out = std::move(out);
  st.opts = opts;
  if (st.opts.batch == 0)
    st.opts.batch = 1;
  if (st.opts.max_attempts == 0)
    st.opts.max_attempts = 1;
  st.stats = stats ? std::move(stats) : std::make_shared<relay_stats>();
  st.wall0 = std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch())
               .count();
  st.clock0 = self->clock().now();
  self->send(self, tick_atom::value, st.generation);
  return {
    [self](tick_atom, uint64_t gen) {
      auto& s = self->state;
      if (gen != s.generation)
        return;
      if (run_batch(self))
        self->send(self, tick_atom::value, gen);
      else
        self->delayed_send(self, s.opts.poll_interval, tick_atom::value, gen);
    },
    [self](relay_wake_atom) {
      auto& s = self->state;
      self->send(self, tick_atom::value, ++s.generation);
    },
    [self](relay_stop_atom) -> uint64_t {
      // Batches run inside one message handler: none is in progress here.
      auto& s = self->state;
      s.stats->stopped = true;
      self->quit();
      return s.stats->published.load();
    },
  };
}

} // namespace

caf::actor spawn_relay(caf::actor_system& sys, store_ptr db, transport_ptr out,
                       relay_options opts, std::shared_ptr<relay_stats> stats) {
  if (opts.detached)
    return sys.spawn<caf::detached>(relay, std::move(db), std::move(out), opts,
                                    std::move(stats));
  return sys.spawn(relay, std::move(db), std::move(out), opts,
                   std::move(stats));
}

} // namespace evmesh::outbox
