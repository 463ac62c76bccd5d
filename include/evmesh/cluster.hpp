#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <caf/expected.hpp>

#include "evmesh/config.hpp"

namespace evmesh {

/// One peer as this node sees it (`consumer_runtime::cluster()`).
struct cluster_peer_status {
  /// The peer's `runtime.node_name`.
  std::string name;
  /// `alive` (joined, heartbeats arriving) or `dead` (down message or
  /// heartbeat timeout; its in-flight attempts were re-dispatched).
  std::string state;
  /// The peer's CAF node id (host and process), for logs.
  std::string address;
  /// Random id of the peer's process; a restarted node has a new one.
  uint64_t incarnation = 0;
  /// Handler lanes the peer offers for subscriptions this node also has.
  uint32_t lanes = 0;
  /// The subscriptions ("consumer/pattern") those lanes serve.
  std::vector<std::string> subscriptions;
  /// Attempts sent to the peer that have not answered yet.
  uint64_t in_flight = 0;
  /// Attempts sent to / answered by the peer since it joined.
  uint64_t dispatched = 0;
  uint64_t completed = 0;
  /// Milliseconds since the last heartbeat from the peer (-1: none yet).
  int64_t last_heartbeat_ms = -1;
};

/// The cluster membership of one node.
struct cluster_status {
  /// Whether `[cluster]` is enabled on this node.
  bool enabled = false;
  /// This node's name and role (`ingress` or `worker`).
  std::string node;
  std::string role;
  /// The port this node accepts peers on (0: it does not listen).
  uint16_t port = 0;
  /// Whether node links use mutual TLS.
  bool tls = false;
  /// Peers that failed the join handshake (wrong secret) since start.
  uint64_t refused = 0;
  /// Attempts re-dispatched because the node running them was lost.
  uint64_t redispatched = 0;
  /// Known peers, alive first.
  std::vector<cluster_peer_status> peers;
};

/// `status` as one JSON object (for `evmesh cluster status` and logs).
std::string to_json(const cluster_status& status);

/// Joins the node at `seed` ("host:port") as an observer that offers no
/// lanes — proving `cfg.cluster_secret`, over TLS when `cfg.cluster_tls_*`
/// are set — asks for that node's `cluster_status` and leaves. Returns it as
/// JSON (`to_json`). Bounded by twice `cfg.cluster_connect_timeout`; fails
/// clearly on a wrong secret, an unreachable seed or bad TLS files. The
/// observer appears in the node's peer list (as `observer-PID`) until its
/// heartbeat timeout.
caf::expected<std::string> query_cluster_status(const runtime_config& cfg,
                                                const std::string& seed);

} // namespace evmesh
