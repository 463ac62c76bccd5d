// The root of a runtime's actor tree: spawns the dead-letter actor, the
// source and one topic supervisor per subscription, watches them, and runs
// the shutdown protocol (drain until the deadline, then abandon).
#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/mesh.hpp"

namespace evmesh::internal {

namespace {

struct mesh_state {
  caf::actor dead_letter;
  caf::actor source;
  std::vector<caf::actor> supervisors;
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
  // A child that dies abnormally takes the mesh down with it (links): the
  // process must never look healthy while a consumer is dead.
  self->set_exit_handler([self, env, st](caf::exit_msg& msg) {
    if (!msg.reason || st->stopped)
      return;
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
