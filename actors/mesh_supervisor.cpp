// The root of a runtime's actor tree: spawns the dead-letter actor, the
// source and one topic supervisor per subscription, watches them, and runs
// the shutdown protocol (drain until the deadline, then abandon).
#include <deque>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/mesh.hpp"

namespace evmesh::internal {

namespace {

struct mesh_state {
  caf::actor dead_letter;
  caf::actor source;
  std::vector<caf::actor> supervisors;
  /// Recent topic supervisor restarts (restart-intensity window).
  std::deque<caf::actor_clock::time_point> restarts;
  bool stopping = false;
  bool stopped = false;
};

} // namespace

caf::behavior mesh_supervisor(caf::event_based_actor* self,
                              runtime_env_ptr env) {
  auto st = std::make_shared<mesh_state>();
  st->dead_letter
    = env->detach_io
        ? self->spawn<caf::linked + caf::detached>(dead_letter_writer, env)
        : self->spawn<caf::linked>(dead_letter_writer, env);
  st->source = self->spawn<caf::linked>(source_actor, env, st->dead_letter);
  for (uint32_t i = 0; i < env->table.subscriptions.size(); ++i) {
    auto sup = self->spawn<caf::linked>(topic_supervisor, env, i, st->source,
                                        st->dead_letter);
    st->supervisors.push_back(sup);
    self->send(st->source, i, sup);
    if (env->cluster)
      self->send(env->cluster, join_sup_atom::value, i, sup);
  }
  self->send(st->source, caf::actor_cast<caf::actor>(self), stop_atom::value);
  // A cluster worker never consumes: it only runs its peers' attempts.
  if (env->ingress)
    self->send(st->source, poll_atom::value);
  env->stats->health.store(static_cast<uint8_t>(health_status::healthy));
  // A crashed topic supervisor is replaced and gets its unsettled deliveries
  // again (from the source), within supervision.restart_limit per
  // restart_window. Any other child that dies abnormally, or a supervisor
  // crashing too often, takes the mesh down with it: the process must never
  // look healthy while a consumer is dead.
  auto restart = [self, env, st](size_t i, const caf::error& reason) {
    auto now = self->clock().now();
    st->restarts.push_back(now);
    while (!st->restarts.empty()
           && now - st->restarts.front() > env->config.restart_window)
      st->restarts.pop_front();
    if (st->restarts.size() > env->config.restart_limit)
      return false;
    auto idx = static_cast<uint32_t>(i);
    spdlog::error("topic supervisor of {} crashed: {}; restarting it",
                  env->table.subscriptions[i].name, caf::to_string(reason));
    auto sup = self->spawn<caf::linked>(topic_supervisor, env, idx, st->source,
                                        st->dead_letter);
    st->supervisors[i] = sup;
    stats_block::inc(env->stats->supervisor_restarts);
    self->send(st->source, restart_atom::value, idx, sup);
    if (env->cluster)
      self->send(env->cluster, join_sup_atom::value, idx, sup);
    return true;
  };
  self->set_exit_handler([self, env, st, restart](caf::exit_msg& msg) {
    if (!msg.reason || st->stopped)
      return;
    for (size_t i = 0; i < st->supervisors.size(); ++i)
      if (st->supervisors[i].address() == msg.source) {
        if (restart(i, msg.reason))
          return;
        break;
      }
    spdlog::critical("consumer mesh: child actor failed: {}; stopping the "
                     "runtime (health = stopped)",
                     caf::to_string(msg.reason));
    env->stats->health.store(static_cast<uint8_t>(health_status::stopped));
    env->stats->stopped.store(true);
    if (env->cluster)
      self->send_exit(env->cluster, msg.reason);
    self->quit(msg.reason);
  });
  return {
    [self, env, st](stop_atom, caf::timespan deadline) {
      if (st->stopping)
        return;
      st->stopping = true;
      env->stats->health.store(static_cast<uint8_t>(health_status::stopping));
      self->send(st->source, drain_atom::value);
      self->delayed_send(self, deadline, abandon_atom::value);
    },
    [self, st](crash_atom, uint32_t index) {
      if (index < st->supervisors.size())
        self->send(st->supervisors[index], crash_atom::value);
    },
    [st](abandon_atom) {
      if (st->stopped)
        return;
      spdlog::warn("stop deadline reached: abandoning running attempts (their "
                   "messages are nacked and will be redelivered)");
      caf::anon_send(st->source, abandon_atom::value);
    },
    [self, env, st](stopped_atom) {
      st->stopped = true;
      for (auto& sup : st->supervisors)
        self->send_exit(sup, caf::exit_reason::user_shutdown);
      self->send_exit(st->source, caf::exit_reason::user_shutdown);
      self->send_exit(st->dead_letter, caf::exit_reason::user_shutdown);
      if (env->cluster)
        self->send_exit(env->cluster, caf::exit_reason::user_shutdown);
      env->stats->health.store(static_cast<uint8_t>(health_status::stopped));
      env->stats->stopped.store(true);
      self->quit();
    },
  };
}

} // namespace evmesh::internal
