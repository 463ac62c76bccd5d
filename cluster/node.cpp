// The cluster node: joins peers over the middleman with a challenge-response
// handshake on the shared secret, offers this node's handler lanes (workers),
// hands peers' lanes to the local topic supervisors as lane proxies, and
// watches peers with heartbeats and monitors. A peer declared dead loses its
// proxies at once, so its late answers are dropped and its keys are owned by
// the supervisor again (which re-dispatches the in-flight attempts).
#include "cluster/node.hpp"

#include <deque>
#include <unordered_map>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <caf/openssl/all.hpp>
#include <spdlog/spdlog.h>

#include "cluster/wire.hpp"

namespace evmesh::internal {

namespace {

using time_point = caf::actor_clock::time_point;

int64_t ms_of(caf::timespan x) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(x).count();
}

std::string key_of(const caf::strong_actor_ptr& ptr) {
  return ptr ? caf::to_string(ptr->node()) : std::string{};
}

// -- lane proxy (dispatching side) ---------------------------------------------

/// Stands in for one peer's lanes of one subscription: the topic supervisor
/// sends it attempts like to a local lane. Killed when the peer is declared
/// dead, which drops every late answer of that peer.
caf::behavior lane_proxy(caf::event_based_actor* self, caf::actor peer,
                         std::string sub, std::string origin,
                         std::shared_ptr<peer_counters> counters) {
  return {
    [=](run_atom, attempt_msg& am) {
      auto rp = self->make_response_promise<attempt_result>();
      counters->in_flight.fetch_add(1);
      counters->dispatched.fetch_add(1);
      self->request(peer, caf::infinite, to_wire(am, sub, origin))
        .then(
          [rp, counters](wire_result& w) mutable {
            counters->in_flight.fetch_sub(1);
            counters->completed.fetch_add(1);
            rp.deliver(from_wire(w));
          },
          [rp, counters, peer](caf::error& err) mutable {
            // The peer refused it (it no longer knows us, or lacks the
            // subscription): try again later, not counted as an execution.
            // A lost peer never answers; the node actor handles that.
            counters->in_flight.fetch_sub(1);
            attempt_result res;
            res.kind = attempt_result::in_flight;
            res.out = retry("node " + caf::to_string(peer.node())
                            + " refused the attempt: " + caf::to_string(err));
            rp.deliver(std::move(res));
          });
      return rp;
    },
  };
}

// -- lane host (running side) --------------------------------------------------

/// One subscription's handler lanes on a worker. A class rather than
/// closures that capture each other: a `pump` <-> `run` pair of lambdas
/// holding shared pointers to one another is a reference cycle that keeps
/// the state, and through it the runtime env (transport, stores, the
/// source actor's memory), alive after the actor system is gone
/// (LeakSanitizer found it at worker exit).
class lane_host_impl : public std::enable_shared_from_this<lane_host_impl> {
public:
  lane_host_impl(caf::event_based_actor* self, runtime_env_ptr env,
                 uint32_t sub, lane_factory spawn_lane)
    : self_(self), env_(std::move(env)), sub_(sub), spawn_lane_(spawn_lane) {
    slots_.resize(env_->table.subscriptions[sub_].options.concurrency);
    for (auto& s : slots_)
      s.lane = spawn_lane_(self_, env_, sub_);
  }

  /// Drops the lanes (detached threads wait until nobody holds them), the
  /// waiting attempts and the env; called when the actor terminates.
  void release() {
    slots_.clear();
    queue_.clear();
    env_.reset();
  }

  void on_attempt(wire_attempt& w) {
    auto rp = self_->make_response_promise();
    auto am = from_wire(w);
    if (!am) {
      attempt_result res{attempt_result::handled,
                         dead_letter("cannot decode the attempt sent by "
                                     + w.origin + ": " + render(am.error())),
                         w.id, w.seq};
      rp.deliver(to_wire(res, env_->node));
      return;
    }
    for (size_t i = 0; i < slots_.size(); ++i)
      if (!slots_[i].busy) {
        run(i, std::move(*am), std::move(rp));
        return;
      }
    // More attempts than lanes (the dispatcher counted a timed-out attempt
    // as finished): wait for a lane.
    queue_.emplace_back(std::move(*am), std::move(rp));
  }

  void on_result(size_t i, uint64_t token, attempt_result& res) {
    if (i >= slots_.size())
      return;
    auto& slot = slots_[i];
    if (!slot.busy || slot.token != token)
      return;
    res.id = slot.id;
    res.seq = slot.seq;
    slot.rp.deliver(to_wire(res, env_->node));
    slot.busy = false;
    pump();
  }

  void on_timeout(uint64_t i, uint64_t token) {
    if (i >= slots_.size())
      return;
    auto& s = slots_[i];
    if (!s.busy || s.token != token)
      return;
    auto& sub = env_->table.subscriptions[sub_];
    spdlog::warn("{}: remote attempt exceeded its timeout of {} ms; "
                 "abandoning the handler lane",
                 sub.name, ms_of(sub.options.timeout));
    self_->send_exit(s.lane, caf::exit_reason::kill);
    answer(s, retry("handler exceeded its timeout of "
                    + std::to_string(ms_of(sub.options.timeout))
                    + " ms on node " + env_->node));
    s.lane = spawn_lane_(self_, env_, sub_);
    pump();
  }

  void on_exit(const caf::exit_msg& msg) {
    for (auto& s : slots_) {
      if (s.lane && s.lane.address() == msg.source) {
        if (s.busy)
          answer(s, retry("handler actor crashed on node " + env_->node + ": "
                          + caf::to_string(msg.reason)));
        s.lane = spawn_lane_(self_, env_, sub_);
        pump();
        return;
      }
    }
    if (msg.reason && msg.reason != caf::exit_reason::kill)
      self_->quit(msg.reason);
  }

private:
  struct lane_slot {
    caf::actor lane;
    bool busy = false;
    uint64_t token = 0;
    caf::response_promise rp;
    uint64_t id = 0;
    uint64_t seq = 0;
  };

  void answer(lane_slot& s, outcome out) {
    attempt_result res{attempt_result::handled, std::move(out), s.id, s.seq};
    s.rp.deliver(to_wire(res, env_->node));
    s.busy = false;
  }

  void pump() {
    while (!queue_.empty()) {
      size_t i = 0;
      while (i < slots_.size() && slots_[i].busy)
        ++i;
      if (i == slots_.size())
        return;
      auto [am, rp] = std::move(queue_.front());
      queue_.pop_front();
      run(i, std::move(am), std::move(rp));
    }
  }

  void run(size_t i, attempt_msg&& am, caf::response_promise rp) {
    auto& s = slots_[i];
    s.busy = true;
    s.token = next_token_++;
    s.rp = std::move(rp);
    s.id = am.id;
    s.seq = am.seq;
    auto token = s.token;
    auto timeout = std::max<caf::timespan>(am.deadline - caf::make_timestamp(),
                                           caf::timespan{0});
    self_->delayed_send(self_, timeout, timeout_atom::value, uint64_t{i},
                        token);
    // The actor owns this handler (dropped when it terminates): no cycle.
    self_->request(s.lane, caf::infinite, run_atom::value, std::move(am))
      .then([impl = shared_from_this(), i,
             token](attempt_result& res) { impl->on_result(i, token, res); },
            [](caf::error&) {
              // The lane died: the exit handler answers.
            });
  }

  caf::event_based_actor* self_;
  runtime_env_ptr env_;
  uint32_t sub_;
  lane_factory spawn_lane_;
  std::vector<lane_slot> slots_;
  std::deque<std::pair<attempt_msg, caf::response_promise>> queue_;
  uint64_t next_token_ = 1;
};

/// Runs remote attempts of one subscription on this node's handler lanes,
/// enforcing the handler timeout and answering crashes with a retry outcome.
caf::behavior lane_host(caf::event_based_actor* self, runtime_env_ptr env,
                        uint32_t sub, lane_factory spawn_lane) {
  auto impl = std::make_shared<lane_host_impl>(self, std::move(env), sub,
                                               spawn_lane);
  self->attach_functor([impl] { impl->release(); });
  self->set_exit_handler([impl](caf::exit_msg& msg) { impl->on_exit(msg); });
  return {
    [impl](wire_attempt& w) { impl->on_attempt(w); },
    [impl](timeout_atom, uint64_t i, uint64_t token) {
      impl->on_timeout(i, token);
    },
  };
}

// -- the node ------------------------------------------------------------------

struct peer_entry {
  std::string name;
  uint64_t incarnation = 0;
  std::string key;
  caf::actor handle;
  std::string session;
  bool alive = false;
  bool outbound = false;
  size_t seed = 0;
  time_point last_seen;
  std::vector<std::pair<uint32_t, caf::actor>> proxies;
  std::shared_ptr<peer_counters> counters;
};

struct pending_join {
  join_hello hello;
  std::string key;
  time_point expires;
};

struct seed_entry {
  std::string text;
  std::string host;
  uint16_t port = 0;
  bool busy = false;
  bool joined = false;
  uint32_t failures = 0;
};

struct node_state {
  runtime_env_ptr env;
  cluster_board_ptr board;
  lane_factory spawn_lane;
  uint64_t incarnation = 0;
  caf::io::middleman_actor mm;
  std::vector<caf::actor> supervisors;
  std::vector<caf::actor> hosts;
  std::unordered_map<std::string, uint32_t> subs;
  std::vector<peer_entry> peers;
  std::unordered_map<std::string, pending_join> pending;
  std::vector<seed_entry> seeds;
};

constexpr size_t max_pending_joins = 64;

class node_impl {
public:
  node_impl(caf::event_based_actor* self, std::shared_ptr<node_state> st)
    : self_(self), st_(std::move(st)) {
  }

  const runtime_config& cfg() const {
    return st_->env->config;
  }

  const std::string& name() const {
    return st_->env->node;
  }

  bool worker() const {
    return cfg().cluster_role == "worker";
  }

  std::vector<lane_offer> offers() const {
    std::vector<lane_offer> out;
    if (!worker())
      return out;
    for (auto& sub : st_->env->table.subscriptions)
      out.push_back({sub.name, sub.options.concurrency});
    return out;
  }

  void start() {
    auto& subs = st_->env->table.subscriptions;
    st_->supervisors.resize(subs.size());
    for (uint32_t i = 0; i < subs.size(); ++i)
      st_->subs.emplace(subs[i].name, i);
    if (worker() && st_->spawn_lane != nullptr)
      for (uint32_t i = 0; i < subs.size(); ++i)
        st_->hosts.push_back(
          self_->spawn<caf::linked>(lane_host, st_->env, i, st_->spawn_lane));
    for (size_t i = 0; i < st_->seeds.size(); ++i)
      self_->send(self_, connect_seed_atom::value, uint64_t{i});
    self_->delayed_send(self_, cfg().cluster_heartbeat_interval,
                        tick_atom::value);
  }

  void add_supervisor(uint32_t sub, caf::actor sup) {
    if (sub >= st_->supervisors.size())
      return;
    st_->supervisors[sub] = sup;
    for (auto& p : st_->peers)
      if (p.alive)
        for (auto& [idx, proxy] : p.proxies)
          if (idx == sub)
            self_->send(sup, node_up_atom::value, p.name, proxy,
                        lanes_[proxy.address()]);
  }

  // -- accepting ---------------------------------------------------------------

  caf::result<join_challenge> on_hello(join_hello& hello) {
    auto now = self_->clock().now();
    for (auto i = st_->pending.begin(); i != st_->pending.end();)
      i = i->second.expires < now ? st_->pending.erase(i) : std::next(i);
    if (st_->pending.size() >= max_pending_joins)
      return make_error(errc::unavailable, "too many pending joins");
    auto nonce = random_nonce();
    join_challenge ch{name(), st_->incarnation, nonce,
                      acceptor_mac(cfg().cluster_secret, hello, name(), nonce)};
    st_->pending.emplace(
      nonce, pending_join{std::move(hello), key_of(self_->current_sender()),
                          now + cfg().cluster_connect_timeout});
    return ch;
  }

  caf::result<join_welcome> on_proof(join_proof& proof) {
    auto sender = self_->current_sender();
    auto i = st_->pending.find(proof.nonce);
    if (i == st_->pending.end()) {
      refuse(proof.node, key_of(sender), "unknown or expired handshake");
      return make_error(errc::invalid_state, "join refused");
    }
    auto pj = std::move(i->second);
    st_->pending.erase(i);
    auto expected = connector_mac(cfg().cluster_secret, pj.hello, name(),
                                  proof.nonce);
    if (pj.key != key_of(sender) || pj.hello.node != proof.node
        || pj.hello.incarnation != proof.incarnation
        || !same_mac(proof.mac, expected)) {
      refuse(proof.node, key_of(sender), "wrong cluster.secret");
      return make_error(errc::invalid_config, "join refused");
    }
    register_peer(proof.node, proof.incarnation,
                  caf::actor_cast<caf::actor>(sender), proof.nonce, proof.lanes,
                  false, 0);
    return join_welcome{proof.nonce, offers()};
  }

  void refuse(const std::string& node, const std::string& key,
              const char* why) {
    st_->board->count_refused();
    spdlog::error("cluster: refused peer '{}' ({}): {}; nothing was "
                  "exchanged with it",
                  node, key, why);
  }

  // -- connecting --------------------------------------------------------------

  void connect_seed(size_t idx) {
    if (idx >= st_->seeds.size())
      return;
    auto& seed = st_->seeds[idx];
    if (seed.busy || seed.joined)
      return;
    seed.busy = true;
    auto timeout = cfg().cluster_connect_timeout;
    self_
      ->request(st_->mm, timeout, caf::connect_atom::value, seed.host,
                seed.port)
      .then(
        [this, idx, timeout](caf::node_id&, caf::strong_actor_ptr& ptr,
                             std::set<std::string>&) {
          if (!ptr) {
            seed_failed(idx, "no node is published on that port");
            return;
          }
          auto hdl = caf::actor_cast<caf::actor>(ptr);
          join_hello hello{name(), st_->incarnation, random_nonce()};
          self_->request(hdl, timeout, hello)
            .then(
              [this, idx, hdl, hello, timeout](join_challenge& ch) {
                auto expected = acceptor_mac(cfg().cluster_secret, hello,
                                             ch.node, ch.nonce);
                if (!same_mac(ch.mac, expected)) {
                  refuse(ch.node, caf::to_string(hdl.node()),
                         "the seed could not prove cluster.secret");
                  // Finish the handshake without lanes so the seed checks
                  // our proof and logs the refusal on its side too.
                  join_proof proof{name(),
                                   st_->incarnation,
                                   ch.nonce,
                                   connector_mac(cfg().cluster_secret, hello,
                                                 ch.node, ch.nonce),
                                   {}};
                  self_->request(hdl, timeout, std::move(proof))
                    .then([](join_welcome&) {}, [](caf::error&) {});
                  seed_failed(idx, "the seed failed the handshake");
                  return;
                }
                join_proof proof{name(), st_->incarnation, ch.nonce,
                                 connector_mac(cfg().cluster_secret, hello,
                                               ch.node, ch.nonce),
                                 offers()};
                self_->request(hdl, timeout, std::move(proof))
                  .then(
                    [this, idx, hdl, ch](join_welcome& w) {
                      st_->seeds[idx].busy = false;
                      st_->seeds[idx].joined = true;
                      st_->seeds[idx].failures = 0;
                      register_peer(ch.node, ch.incarnation, hdl, w.session,
                                    w.lanes, true, idx);
                    },
                    [this, idx](caf::error& err) {
                      seed_failed(idx, "join refused: " + caf::to_string(err)
                                         + " — do both nodes use the same "
                                           "cluster.secret?");
                    });
              },
              [this, idx](caf::error& err) {
                seed_failed(idx, "no answer to the join handshake: "
                                   + caf::to_string(err));
              });
        },
        [this, idx](caf::error& err) {
          seed_failed(idx, caf::to_string(err));
        });
  }

  void seed_failed(size_t idx, const std::string& why) {
    auto& seed = st_->seeds[idx];
    seed.busy = false;
    ++seed.failures;
    auto delay = std::min<caf::timespan>(
      std::chrono::milliseconds{200} * std::min<uint32_t>(seed.failures, 25),
      std::chrono::seconds{5});
    if (seed.failures == 1 || seed.failures % 10 == 0)
      spdlog::warn("cluster: cannot join seed {} ({} attempt(s)): {}; "
                   "retrying in {} ms",
                   seed.text, seed.failures, why, ms_of(delay));
    self_->delayed_send(self_, delay, connect_seed_atom::value, uint64_t{idx});
  }

  // -- membership --------------------------------------------------------------

  peer_entry* find_alive_by_key(const std::string& key) {
    for (auto& p : st_->peers)
      if (p.alive && p.key == key)
        return &p;
    return nullptr;
  }

  void register_peer(const std::string& peer_name, uint64_t incarnation,
                     caf::actor hdl, const std::string& session,
                     const std::vector<lane_offer>& lanes, bool outbound,
                     size_t seed) {
    for (auto& p : st_->peers)
      if (p.alive && p.name == peer_name)
        declare_dead(p, "replaced by a new connection of the same node", false);
    st_->peers.erase(std::remove_if(st_->peers.begin(), st_->peers.end(),
                                    [&](const peer_entry& p) {
                                      return !p.alive && p.name == peer_name;
                                    }),
                     st_->peers.end());
    peer_entry p;
    p.name = peer_name;
    p.incarnation = incarnation;
    p.key = caf::to_string(hdl.node());
    p.handle = hdl;
    p.session = session;
    p.alive = true;
    p.outbound = outbound;
    p.seed = seed;
    p.last_seen = self_->clock().now();
    p.counters = std::make_shared<peer_counters>();
    cluster_board::peer entry;
    entry.status.name = peer_name;
    entry.status.state = "alive";
    entry.status.address = p.key;
    entry.status.incarnation = incarnation;
    entry.counters = p.counters;
    for (auto& offer : lanes) {
      auto i = st_->subs.find(offer.sub);
      if (i == st_->subs.end() || offer.lanes == 0)
        continue;
      auto proxy = self_->spawn(lane_proxy, hdl, offer.sub, name(), p.counters);
      p.proxies.emplace_back(i->second, proxy);
      lanes_[proxy.address()] = offer.lanes;
      entry.status.lanes += offer.lanes;
      entry.status.subscriptions.push_back(offer.sub);
      if (auto& sup = st_->supervisors[i->second])
        self_->send(sup, node_up_atom::value, peer_name, proxy, offer.lanes);
    }
    self_->monitor(hdl);
    spdlog::info("cluster: node '{}' joined ({} lane(s) for {} "
                 "subscription(s) here, {})",
                 peer_name, entry.status.lanes,
                 entry.status.subscriptions.size(),
                 outbound ? "we connected" : "it connected");
    st_->board->put(std::move(entry));
    st_->peers.push_back(std::move(p));
  }

  void declare_dead(peer_entry& p, const std::string& why, bool reconnect) {
    if (!p.alive)
      return;
    p.alive = false;
    for (auto& [sub, proxy] : p.proxies) {
      if (auto& sup = st_->supervisors[sub])
        self_->send(sup, node_down_atom::value, p.name, proxy);
      lanes_.erase(proxy.address());
      self_->send_exit(proxy, caf::exit_reason::kill);
    }
    p.proxies.clear();
    st_->board->mark_dead(p.name);
    spdlog::warn("cluster: node '{}' is down: {}; its in-flight attempts are "
                 "re-dispatched and its late answers ignored",
                 p.name, why);
    if (p.outbound && reconnect) {
      auto& seed = st_->seeds[p.seed];
      seed.joined = false;
      self_->delayed_send(self_, std::chrono::milliseconds{100},
                          connect_seed_atom::value, uint64_t{p.seed});
    }
  }

  void on_down(const caf::down_msg& msg) {
    for (auto& p : st_->peers)
      if (p.alive && p.handle.address() == msg.source)
        declare_dead(p, "connection lost (" + caf::to_string(msg.reason) + ")",
                     true);
  }

  // -- heartbeats --------------------------------------------------------------

  void on_heartbeat(const std::string& session) {
    auto sender = self_->current_sender();
    auto key = key_of(sender);
    for (auto& p : st_->peers)
      if (p.alive && p.session == session && p.key == key) {
        p.last_seen = self_->clock().now();
        st_->board->heartbeat(p.name, unix_ms());
        return;
      }
    // A peer we declared dead (or never knew) still talks to us: it must
    // join again before it gets work.
    if (sender)
      self_->send(caf::actor_cast<caf::actor>(sender), rejoin_atom::value,
                  session);
  }

  void on_rejoin(const std::string& session) {
    auto key = key_of(self_->current_sender());
    for (auto& p : st_->peers)
      if (p.alive && p.session == session && p.key == key)
        declare_dead(p, "the peer declared us dead; joining again", true);
  }

  void on_tick() {
    auto now = self_->clock().now();
    for (auto& p : st_->peers) {
      if (!p.alive)
        continue;
      if (now - p.last_seen > cfg().cluster_heartbeat_timeout) {
        declare_dead(p,
                     "no heartbeat for "
                       + std::to_string(ms_of(now - p.last_seen)) + " ms",
                     true);
        continue;
      }
      // High priority: heartbeats must not wait behind queued attempts.
      self_->send<caf::message_priority::high>(p.handle, heartbeat_atom::value,
                                               p.session);
    }
    self_->delayed_send(self_, cfg().cluster_heartbeat_interval,
                        tick_atom::value);
  }

  // -- attempts ----------------------------------------------------------------

  void on_attempt(wire_attempt& w) {
    // Before make_response_promise, which takes the sender out of the
    // current message.
    auto key = key_of(self_->current_sender());
    auto rp = self_->make_response_promise();
    if (!find_alive_by_key(key)) {
      spdlog::warn("cluster: refusing an attempt from {}: not a joined node",
                   key);
      rp.deliver(make_error(errc::invalid_state,
                            "attempt from a node that has not joined"));
      return;
    }
    auto i = st_->subs.find(w.sub);
    if (i == st_->subs.end() || st_->hosts.empty()) {
      rp.deliver(
        make_error(errc::not_found, "no lanes for " + w.sub + " on " + name()));
      return;
    }
    rp.delegate(st_->hosts[i->second], std::move(w));
  }

  /// From a local actor (`query_cluster_status`): asks the first alive peer.
  /// From a joined peer: this node's status as JSON.
  caf::result<std::string> on_status() {
    auto sender = self_->current_sender();
    if (sender && sender->node() == self_->node()) {
      for (auto& p : st_->peers)
        if (p.alive) {
          auto rp = self_->make_response_promise<std::string>();
          self_
            ->request(p.handle, cfg().cluster_connect_timeout,
                      status_atom::value)
            .then([rp](std::string& json) mutable { rp.deliver(json); },
                  [rp](caf::error& err) mutable { rp.deliver(err); });
          return rp;
        }
      return make_error(errc::unavailable, "not joined to any node");
    }
    if (!find_alive_by_key(key_of(sender)))
      return make_error(errc::invalid_state,
                        "status request from a node that has not joined");
    auto status = st_->board->snapshot();
    if (st_->env->stats)
      status.redispatched = st_->env->stats->redispatched.load();
    return to_json(status);
  }

  void shutdown(const caf::error& reason) {
    for (auto& p : st_->peers)
      for (auto& [sub, proxy] : p.proxies)
        self_->send_exit(proxy, caf::exit_reason::kill);
    self_->quit(reason);
  }

  std::unordered_map<caf::actor_addr, uint32_t> lanes_;

private:
  caf::event_based_actor* self_;
  std::shared_ptr<node_state> st_;
};

caf::behavior cluster_node(caf::event_based_actor* self,
                           std::shared_ptr<node_state> st) {
  auto impl = std::make_shared<node_impl>(self, st);
  // The env holds our handle and we hold the env: break the cycle when we
  // terminate, and let go of the lane hosts and proxies.
  self->attach_functor([st] {
    st->hosts.clear();
    st->peers.clear();
    st->supervisors.clear();
    st->env.reset();
  });
  self->set_down_handler([impl](caf::down_msg& msg) { impl->on_down(msg); });
  self->set_exit_handler([self, impl, st](caf::exit_msg& msg) {
    for (auto& host : st->hosts)
      if (host.address() == msg.source) {
        spdlog::critical("cluster: a lane host failed: {}",
                         caf::to_string(msg.reason));
        impl->shutdown(msg.reason);
        return;
      }
    impl->shutdown(msg.reason);
  });
  impl->start();
  return {
    [impl](join_sup_atom, uint32_t sub, caf::actor sup) {
      impl->add_supervisor(sub, std::move(sup));
    },
    [impl](join_hello& hello) { return impl->on_hello(hello); },
    [impl](join_proof& proof) { return impl->on_proof(proof); },
    [impl](connect_seed_atom, uint64_t idx) { impl->connect_seed(idx); },
    [impl](heartbeat_atom, const std::string& session) {
      impl->on_heartbeat(session);
    },
    [impl](rejoin_atom, const std::string& session) {
      impl->on_rejoin(session);
    },
    [impl](tick_atom) { impl->on_tick(); },
    [impl](wire_attempt& w) { impl->on_attempt(w); },
    [impl](status_atom) { return impl->on_status(); },
  };
}

bool split_host_port(const std::string& text, std::string& host,
                     uint16_t& port) {
  auto pos = text.rfind(':');
  if (pos == std::string::npos)
    return false;
  host = text.substr(0, pos);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  try {
    auto value = std::stoul(text.substr(pos + 1));
    if (value > 65535)
      return false;
    port = static_cast<uint16_t>(value);
  } catch (...) {
    return false;
  }
  return true;
}

} // namespace

caf::expected<cluster_node_handle> start_cluster_node(caf::actor_system& sys,
                                                      runtime_env_ptr env,
                                                      lane_factory spawn_lane) {
  auto& cfg = env->config;
  bool tls = !cfg.cluster_tls_ca.empty();
  if (!sys.has_middleman() || (tls && !sys.has_openssl_manager()))
    return make_error(errc::invalid_state,
                      "[cluster] needs an actor system with CAF's middleman"
                        + std::string{tls ? " and openssl manager" : ""}
                        + " loaded (prepare_cluster_system)");
  auto st = std::make_shared<node_state>();
  st->env = env;
  st->board = std::make_shared<cluster_board>();
  st->spawn_lane = spawn_lane;
  st->incarnation = random_u64();
  st->mm = tls ? sys.openssl_manager().actor_handle()
               : sys.middleman().actor_handle();
  for (auto& text : cfg.cluster_seeds) {
    seed_entry seed;
    seed.text = text;
    if (!split_host_port(text, seed.host, seed.port))
      return make_error(errc::invalid_config, "cluster.seeds: cannot read '"
                                                + text + "' as host:port");
    st->seeds.push_back(std::move(seed));
  }
  uint16_t port = 0;
  std::string host;
  if (!cfg.cluster_listen.empty()
      && !split_host_port(cfg.cluster_listen, host, port))
    return make_error(errc::invalid_config, "cluster.listen: cannot read '"
                                              + cfg.cluster_listen
                                              + "' as host:port");
  auto node = sys.spawn(cluster_node, st);
  if (!cfg.cluster_listen.empty()) {
    auto res = tls ? caf::openssl::publish(node, port, host.c_str(), true)
                   : sys.middleman().publish(node, port, host.c_str(), true);
    if (!res) {
      caf::anon_send_exit(node, caf::exit_reason::kill);
      return make_error(errc::io_error, "cannot listen for cluster peers on "
                                          + cfg.cluster_listen + ": "
                                          + sys.render(res.error())
                                          + " — is the port in use?");
    }
    port = *res;
  }
  st->board->set_self(env->node, cfg.cluster_role, port, tls);
  spdlog::info("cluster: node '{}' ({}) {}{}, {} seed(s)", env->node,
               cfg.cluster_role,
               port != 0 ? "listening on port " + std::to_string(port)
                         : std::string{"not listening"},
               tls ? " with mutual TLS" : "", st->seeds.size());
  return cluster_node_handle{node, st->board, port};
}

} // namespace evmesh::internal
