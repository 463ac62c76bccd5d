// Internal to the runtime: the cluster node (DESIGN.md §3 "node", §8). The
// runtime prepares the actor system with `prepare_cluster_system`, starts the
// node with `start_cluster_node` and reads its status board. Not installed.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/expected.hpp>

#include "evmesh/cluster.hpp"
#include "evmesh/config.hpp"

#include "actors/mesh.hpp"

namespace evmesh::internal {

/// Counters of one peer, shared by its lane proxies and the status board.
struct peer_counters {
  std::atomic<uint64_t> in_flight{0};
  std::atomic<uint64_t> dispatched{0};
  std::atomic<uint64_t> completed{0};
};

/// The node's view of the cluster, written by the node actor and read by
/// `consumer_runtime::cluster()`.
class cluster_board {
public:
  struct peer {
    cluster_peer_status status;
    /// Wall-clock ms of the last heartbeat (0: none).
    int64_t last_heartbeat = 0;
    std::shared_ptr<peer_counters> counters;
  };

  void set_self(std::string node, std::string role, uint16_t port, bool tls);

  /// Inserts or replaces the entry of `p.status.name`.
  void put(peer p);

  void heartbeat(const std::string& name, int64_t wall_ms);

  void mark_dead(const std::string& name);

  void count_refused();
  void count_redispatched(uint64_t n);

  cluster_status snapshot() const;

private:
  mutable std::mutex mtx_;
  cluster_status self_;
  std::vector<peer> peers_;
};

using cluster_board_ptr = std::shared_ptr<cluster_board>;

/// Spawns a handler lane for subscription `sub`, linked to `parent`.
using lane_factory = caf::actor (*)(caf::event_based_actor* parent,
                                    const runtime_env_ptr& env, uint32_t sub);

/// Checks the `[cluster]` settings that need the file system or the whole
/// config: the secret is set, the TLS files exist and are readable.
caf::error check_cluster_config(const runtime_config& cfg);

/// Loads the middleman (and the TLS module when configured) and the cluster's
/// message types into `cfg`, before the actor system is created.
void prepare_cluster_system(caf::actor_system_config& cfg,
                            const runtime_config& rc);

/// A running cluster node.
struct cluster_node_handle {
  caf::actor actor;
  cluster_board_ptr board;
  uint16_t port = 0;
};

/// Publishes the node on `cluster.listen` (if set) and starts joining the
/// seeds. The node actor then accepts `(join_sup_atom, uint32_t, actor)` for
/// each topic supervisor.
caf::expected<cluster_node_handle> start_cluster_node(caf::actor_system& sys,
                                                      runtime_env_ptr env,
                                                      lane_factory spawn_lane);

} // namespace evmesh::internal
