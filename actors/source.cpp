// The source: owns the transport (every transport call happens here), polls
// within the in-flight bound, decodes, matches, checks tenants, routes to the
// topic supervisors and settles each delivery with exactly one terminal
// action once every subscription it matched is done with it.
#include <algorithm>
#include <unordered_map>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/mesh.hpp"

namespace evmesh::internal {

namespace {

/// The subscriptions that have not settled a delivery yet: a bit mask for
/// indexes below 64, a list (made on first use) for the rest.
class owing_set {
public:
  void assign(const std::vector<uint32_t>& subs) {
    bits_ = 0;
    more_.reset();
    for (auto sub : subs) {
      if (sub < 64) {
        bits_ |= uint64_t{1} << sub;
      } else {
        if (!more_)
          more_ = std::make_unique<std::vector<uint32_t>>();
        more_->push_back(sub);
      }
    }
  }

  bool contains(uint32_t sub) const noexcept {
    if (sub < 64)
      return (bits_ >> sub) & 1u;
    return more_
           && std::find(more_->begin(), more_->end(), sub) != more_->end();
  }

  /// Removes `sub`; false when it was not in the set.
  bool erase(uint32_t sub) {
    if (!contains(sub))
      return false;
    if (sub < 64)
      bits_ &= ~(uint64_t{1} << sub);
    else
      more_->erase(std::find(more_->begin(), more_->end(), sub));
    return true;
  }

private:
  uint64_t bits_ = 0;
  std::unique_ptr<std::vector<uint32_t>> more_;
};

struct pending_delivery {
  /// The delivery id (0: the slot is free).
  uint64_t id = 0;
  uint64_t tag = 0;
  /// The decoded message (null for intake dead letters) and the
  /// subscriptions that have not settled it yet: a restarted topic
  /// supervisor gets these again.
  incoming_ptr msg;
  owing_set owing;
  /// Dead-letter records to publish on settling (rare: made on first use).
  std::unique_ptr<std::vector<std::shared_ptr<const dead_letter_record>>>
    records;
  /// A subscription deferred it (`transport::defer`): the latest due time
  /// and the most runs asked for win.
  caf::timespan delay{0};
  uint32_t attempts = 0;
  uint32_t remaining = 0;
  bool defer = false;
  bool nack = false;
  /// Dead-lettered by the source itself (decode, tenant, no handler).
  bool intake = false;
};

/// The deliveries in flight, in reused slots (no allocation per delivery once
/// the table has grown to the in-flight bound). A delivery id is its sequence
/// number shifted left by `slot_bits` plus its slot: ids grow in delivery
/// order, and a settlement for a delivery that is gone (the slot reused)
/// finds a different id and is ignored.
class delivery_table {
public:
  static constexpr int slot_bits = 24;
  static constexpr uint64_t slot_mask = (uint64_t{1} << slot_bits) - 1;
  static constexpr size_t max_slots = size_t{1} << slot_bits;

  /// A fresh delivery (its `id` set).
  pending_delivery& add() {
    uint64_t slot;
    if (free_.empty()) {
      slot = slots_.size();
      slots_.emplace_back();
    } else {
      slot = free_.back();
      free_.pop_back();
    }
    auto& d = slots_[slot];
    d.id = (next_seq_++ << slot_bits) | slot;
    ++live_;
    return d;
  }

  pending_delivery* find(uint64_t id) {
    auto slot = id & slot_mask;
    if (slot >= slots_.size() || slots_[slot].id != id || id == 0)
      return nullptr;
    return &slots_[slot];
  }

  void erase(pending_delivery& d) {
    auto slot = d.id & slot_mask;
    d = pending_delivery{};
    free_.push_back(static_cast<uint32_t>(slot));
    --live_;
  }

  size_t size() const noexcept {
    return live_;
  }

  bool empty() const noexcept {
    return live_ == 0;
  }

  template <class F>
  void for_each(F&& f) {
    for (auto& d : slots_)
      if (d.id != 0)
        f(d);
  }

private:
  std::vector<pending_delivery> slots_;
  std::vector<uint32_t> free_;
  size_t live_ = 0;
  uint64_t next_seq_ = 1;
};

struct source_state {
  runtime_env_ptr env;
  caf::actor dead_letter;
  caf::actor mesh;
  std::vector<caf::actor> supervisors;
  delivery_table deliveries;
  /// A `poll` to self is queued (immediate polls are not doubled up).
  bool poll_queued = false;
  /// A delayed `(poll, true)` is pending: at most one idle timer at a time,
  /// however many wakeups arrive meanwhile.
  bool idle_timer = false;
  /// The transport calls the wakeup when messages arrive (capability), so the
  /// idle timer is only a safety net.
  bool transport_wakes = false;
  bool draining = false;
  bool closed = false;
  size_t drained = 0;
  uint32_t poll_failures = 0;
  raw_batch buf; // reused: its messages keep their buffers between polls
  std::vector<uint32_t> matches;
  std::vector<dispatch_batch> batches;
  std::mt19937_64 rng{std::random_device{}()};
};

class source_impl {
public:
  source_impl(caf::event_based_actor* self, std::shared_ptr<source_state> st)
    : self_(self), st_(std::move(st)) {
  }

  stats_block& stats() {
    return *st_->env->stats;
  }

  /// Polls again as soon as the mailbox gets to it.
  void poll_soon() {
    if (st_->poll_queued || st_->draining)
      return;
    st_->poll_queued = true;
    self_->send(self_, poll_atom::value);
  }

  /// Polls again after `delay` unless a poll timer is already pending (an
  /// earlier one fires sooner or at most `delay` later).
  void poll_later(caf::timespan delay) {
    if (st_->idle_timer || st_->draining)
      return;
    st_->idle_timer = true;
    self_->delayed_send(self_, delay, poll_atom::value, true);
  }

  /// How long to wait after a poll that did not fill its batch: `poll_idle`,
  /// or 20 times that as a safety net when the transport wakes the source.
  caf::timespan idle_delay() const {
    auto idle = st_->env->config.poll_idle;
    return st_->transport_wakes ? idle * 20 : idle;
  }

  void on_poll_queued() {
    st_->poll_queued = false;
    on_poll();
  }

  void on_poll_timer() {
    st_->idle_timer = false;
    on_poll();
  }

  void on_poll() {
    if (st_->draining || st_->supervisors.empty())
      return;
    auto& cfg = st_->env->config;
    auto used = st_->deliveries.size();
    // (The config caps max_in_flight at the table's slots; a programmatic
    // config above that is held to it here.)
    auto bound = std::min(cfg.max_in_flight, delivery_table::max_slots);
    if (used >= bound)
      return; // settlements re-trigger polling (backpressure)
    auto want = std::min(cfg.poll_batch, bound - used);
    st_->buf.clear();
    if (auto err = st_->env->transport->poll_into(want, st_->buf)) {
      ++st_->poll_failures;
      auto delay = next_backoff(
        st_->poll_failures,
        {cfg.poll_idle, 2.0, std::chrono::seconds{5}, jitter::full}, st_->rng);
      spdlog::error("transport poll failed ({} in a row): {}",
                    st_->poll_failures, render(err));
      poll_later(std::max(delay, caf::timespan{std::chrono::milliseconds{1}}));
      return;
    }
    st_->poll_failures = 0;
    auto got = st_->buf.size();
    for (auto& b : st_->batches)
      b.items.clear();
    for (auto& raw : st_->buf)
      intake(raw);
    for (size_t i = 0; i < st_->batches.size(); ++i)
      if (!st_->batches[i].items.empty())
        self_->send(st_->supervisors[i], std::move(st_->batches[i]));
    st_->batches.assign(st_->supervisors.size(), dispatch_batch{});
    stats().in_flight.store(st_->deliveries.size(), std::memory_order_relaxed);
    if (got == want)
      poll_soon();
    else
      poll_later(idle_delay());
  }

  // Keeps nothing of `raw` (a slot of the reused poll batch).
  void intake(raw_message& raw) {
    auto& env = *st_->env;
    stats_block::inc(stats().received);
    auto& d = st_->deliveries.add();
    auto id = d.id;
    d.tag = raw.tag;
    // The configuration bounds the limit to 4 GiB - 1 (what a delivery
    // records of a size); a limit set in code is held to that too.
    auto limit = std::min<size_t>(env.config.max_message_bytes, 0xFFFF'FFFF);
    if (raw.bytes.size() > limit) {
      auto reason = "message of " + std::to_string(raw.bytes.size())
                    + " bytes exceeds transport.max_message_bytes = "
                    + std::to_string(limit);
      raw.bytes.resize(std::min<size_t>(raw.bytes.size(), 64 * 1024));
      intake_dead_letter(id, raw, nullptr, "too_large", reason);
      return;
    }
    transport_metadata meta{raw.subject, raw.traceparent, raw.tracestate,
                            raw.key};
    auto decoded = decode_envelope(raw.bytes, meta);
    if (!decoded) {
      intake_dead_letter(id, raw, nullptr, "decode_error",
                         render(decoded.error()));
      return;
    }
    auto& e = *decoded;
    st_->matches.clear();
    env.table.match(e.topic, st_->matches);
    if (st_->matches.empty()) {
      intake_dead_letter(id, raw, &e, "no_handler",
                         "no handler matches topic '" + e.topic + "'");
      return;
    }
    std::string resolved;
    if (env.tenants) {
      auto res = env.tenants->resolve(e.tenant);
      if (!res.accepted) {
        intake_dead_letter(id, raw, &e, "tenant_rejected", res.reason);
        return;
      }
      resolved = std::move(res.tenant);
    }
    auto msg = incoming_message::make(std::move(e), raw.bytes, raw.position);
    auto& me = msg->env;
    msg->delivery_id = id;
    msg->prior_attempts = std::max(
      raw.delivery_count > 0 ? raw.delivery_count - 1 : 0u, me.attempt);
    // The producer's span is the parent of every attempt; without a valid
    // traceparent this hop starts a new root trace (and W3C drops the
    // tracestate with it).
    if (auto parent = parse_traceparent(me.traceparent)) {
      msg->producer = producer_trace{parent->trace, parent->parent,
                                     parent->flags, false};
    } else {
      msg->producer.trace = new_trace_id();
      stats_block::inc(stats().new_root_traces);
      if (!me.traceparent.empty())
        spdlog::debug("invalid traceparent '{}' on topic {}: starting a new "
                      "root trace",
                      me.traceparent, me.topic);
    }
    msg->set_tenant(env.tenants ? std::string_view{resolved}
                                : std::string_view{me.tenant});
    msg->set_dedupe_key();
    msg->tag = raw.tag;
    d.remaining = static_cast<uint32_t>(st_->matches.size());
    d.owing.assign(st_->matches);
    incoming_ptr shared = std::move(msg);
    d.msg = shared;
    for (auto idx : st_->matches) {
      auto& items = st_->batches[idx].items;
      if (items.capacity() == 0)
        items.reserve(st_->buf.size()); // one allocation per poll batch
      items.push_back(shared);
    }
  }

  void intake_dead_letter(uint64_t id, const raw_message& raw,
                          const envelope* decoded, std::string category,
                          std::string reason) {
    spdlog::warn("dead-lettering {} message on '{}': {}", category, raw.subject,
                 reason);
    auto rec = std::make_shared<const dead_letter_record>(
      make_intake_dead_letter(*st_->env, raw, decoded, std::move(category),
                              std::move(reason)));
    auto& d = *st_->deliveries.find(id);
    d.remaining = 1;
    d.intake = true;
    self_
      ->request(st_->dead_letter, caf::infinite, write_atom::value,
                dead_letter_job{rec})
      .then(
        [this, id, rec](int64_t) {
          stats_block::inc(stats().dead_lettered);
          settle(settlement{id, settle_kind::dead_lettered, rec});
        },
        [this, id](caf::error&) {
          settle(settlement{id, settle_kind::nack, nullptr});
        });
  }

  /// One subscription is done with a delivery; the last one decides.
  void settle(const settlement& s) {
    auto* found = st_->deliveries.find(s.delivery_id);
    if (found == nullptr)
      return;
    auto& d = *found;
    if (d.msg) {
      if (!d.owing.erase(s.sub)) {
        spdlog::critical("delivery {} settled by subscription {} that does "
                         "not owe it; ignoring the extra settlement",
                         s.delivery_id, s.sub);
        return;
      }
    }
    if (s.kind == settle_kind::nack)
      d.nack = true;
    else if (s.kind == settle_kind::dead_lettered && s.record) {
      if (!d.records)
        d.records = std::make_unique<
          std::vector<std::shared_ptr<const dead_letter_record>>>();
      d.records->push_back(s.record);
    } else if (s.kind == settle_kind::defer) {
      d.defer = true;
      d.delay = std::max(d.delay, s.delay);
      d.attempts = std::max(d.attempts, s.attempts);
    }
    if (d.remaining == 0) {
      spdlog::critical("delivery {} settled more often than it was routed; "
                       "ignoring the extra settlement",
                       s.delivery_id);
      return;
    }
    if (--d.remaining > 0)
      return;
    auto& t = *st_->env->transport;
    caf::error err;
    if (!d.nack) {
      if (d.records)
        for (auto& rec : *d.records)
          if ((err = t.dead_letter(d.tag, *rec)))
            break;
      if (!err && d.defer) {
        // The transport stored it for a later attempt and settled the tag.
        if ((err = t.defer(d.tag, d.delay, d.attempts)))
          spdlog::error("deferring a retry to the broker failed: {}",
                        render(err));
        else {
          st_->deliveries.erase(d);
          after_settle();
          return;
        }
      }
    }
    if (d.nack || err) {
      if (err)
        spdlog::error("broker dead-letter publish failed, message will be "
                      "redelivered: {}",
                      render(err));
      if (auto e2 = t.nack(d.tag, caf::timespan{0}))
        spdlog::error("nack failed: {}", render(e2));
      stats_block::inc(stats().nacked);
    } else {
      if (auto e2 = t.ack(d.tag))
        spdlog::error("ack failed (the broker will redeliver): {}", render(e2));
      stats_block::inc(stats().acked);
    }
    st_->deliveries.erase(d);
    after_settle();
  }

  void after_settle() {
    stats().in_flight.store(st_->deliveries.size(), std::memory_order_relaxed);
    if (st_->draining) {
      check_stopped();
      return;
    }
    // Poll in batches: only once a batch worth of room is free (or when little
    // is in flight, for latency). Wakeups and the idle timer cover the rest.
    auto& cfg = st_->env->config;
    auto used = st_->deliveries.size();
    if (used + cfg.poll_batch <= cfg.max_in_flight || used < cfg.poll_batch)
      poll_soon();
  }

  /// Topic supervisor `index` crashed and was replaced by `sup`: every
  /// delivery it had not settled goes to the new one, in delivery order (so
  /// per-key order holds). The crashed attempts' idempotency claims are
  /// released first, or the retries would wait out the claim lease.
  void on_restart(uint32_t index, caf::actor sup) {
    st_->supervisors[index] = std::move(sup);
    auto& env = *st_->env;
    auto& subscription = env.table.subscriptions[index];
    std::vector<std::pair<uint64_t, incoming_ptr>> owed;
    st_->deliveries.for_each([&](pending_delivery& d) {
      if (d.msg && d.owing.contains(index))
        owed.emplace_back(d.id, d.msg);
    });
    std::sort(owed.begin(), owed.end(),
              [](auto& x, auto& y) { return x.first < y.first; });
    dispatch_batch batch;
    batch.items.reserve(owed.size());
    for (auto& [id, msg] : owed) {
      if (env.dedupe)
        if (auto err = env.dedupe->abort(scoped_dedupe_key(subscription, *msg)))
          spdlog::warn("{}: releasing a claim after the supervisor restart "
                       "failed: {}",
                       subscription.name, render(err));
      batch.items.push_back(std::move(msg));
    }
    spdlog::warn("{}: topic supervisor restarted; {} unsettled deliveries "
                 "dispatched again",
                 subscription.name, batch.items.size());
    if (st_->draining) {
      // Stopping: hand them back to the broker instead.
      for (auto& m : batch.items) {
        settlement s{m->delivery_id, settle_kind::nack, nullptr};
        s.sub = index;
        settle(s);
      }
      self_->send(st_->supervisors[index], drain_atom::value);
      return;
    }
    if (!batch.items.empty())
      self_->send(st_->supervisors[index], std::move(batch));
  }

  void drain() {
    st_->draining = true;
    for (auto& sup : st_->supervisors)
      self_->send(sup, drain_atom::value);
    check_stopped();
  }

  void abandon() {
    for (auto& sup : st_->supervisors)
      self_->send(sup, abandon_atom::value);
    // Intake dead letters still being written go back to the broker; a late
    // confirmation finds no delivery and is ignored.
    std::vector<uint64_t> ids;
    st_->deliveries.for_each([&](pending_delivery& d) {
      if (d.intake)
        ids.push_back(d.id);
    });
    for (auto id : ids)
      settle(settlement{id, settle_kind::nack, nullptr});
  }

  void on_drained() {
    ++st_->drained;
    check_stopped();
  }

  void check_stopped() {
    if (!st_->draining || st_->closed)
      return;
    if (st_->drained < st_->supervisors.size() || !st_->deliveries.empty())
      return;
    st_->closed = true;
    auto& env = *st_->env;
    if (auto err = env.transport->close())
      spdlog::error("closing the transport failed: {}", render(err));
    if (env.dedupe)
      if (auto err = env.dedupe->flush())
        spdlog::error("flushing the idempotency store failed: {}", render(err));
    if (env.spans)
      env.spans->flush();
    self_->send(st_->mesh, stopped_atom::value);
  }

private:
  caf::event_based_actor* self_;
  std::shared_ptr<source_state> st_;
};

} // namespace

caf::behavior source_actor(caf::event_based_actor* self, runtime_env_ptr env,
                           caf::actor dead_letter) {
  auto st = std::make_shared<source_state>();
  st->env = env;
  st->dead_letter = std::move(dead_letter);
  st->supervisors.resize(env->table.subscriptions.size());
  st->batches.resize(env->table.subscriptions.size());
  st->transport_wakes = env->transport->capabilities().wakeup;
  auto impl = std::make_shared<source_impl>(self, st);
  // Wake up on new messages; a weak handle so the transport never keeps the
  // actor alive.
  auto weak = caf::actor_cast<caf::weak_actor_ptr>(self);
  env->transport->set_wakeup([weak] {
    if (auto hdl = caf::actor_cast<caf::actor>(weak.lock()))
      caf::anon_send(hdl, poll_atom::value);
  });
  return {
    [st](uint32_t index, caf::actor& sup) {
      st->supervisors[index] = std::move(sup);
    },
    [st, impl](caf::actor& mesh, stop_atom) { st->mesh = mesh; },
    // Queued by the source itself, a wakeup or the mesh at start.
    [impl](poll_atom) { impl->on_poll_queued(); },
    [impl](poll_atom, bool) { impl->on_poll_timer(); },
    [impl](settle_atom, const settlement& s) { impl->settle(s); },
    [impl](settlement_batch& b) {
      for (auto& s : b.items)
        impl->settle(s);
    },
    [impl](restart_atom, uint32_t index, caf::actor& sup) {
      impl->on_restart(index, std::move(sup));
    },
    [impl](drain_atom) { impl->drain(); },
    [impl](abandon_atom) { impl->abandon(); },
    [impl](drained_atom, uint32_t) { impl->on_drained(); },
  };
}

} // namespace evmesh::internal
