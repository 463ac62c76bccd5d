// Cluster setup (config checks, actor system modules) and the status board.
#include <algorithm>
#include <chrono>
#include <fstream>
#include <thread>

#include <boost/json.hpp>
#include <caf/all.hpp>
#include <caf/io/middleman.hpp>
#include <caf/openssl/manager.hpp>
#include <unistd.h>

#include "evmesh/error.hpp"

#include "cluster/node.hpp"
#include "cluster/wire.hpp"

namespace evmesh {

std::string to_json(const cluster_status& status) {
  boost::json::object out;
  out["enabled"] = status.enabled;
  out["node"] = status.node;
  out["role"] = status.role;
  out["port"] = status.port;
  out["tls"] = status.tls;
  out["refused"] = status.refused;
  out["redispatched"] = status.redispatched;
  boost::json::array peers;
  for (auto& p : status.peers) {
    boost::json::object x;
    x["name"] = p.name;
    x["state"] = p.state;
    x["address"] = p.address;
    x["incarnation"] = p.incarnation;
    x["lanes"] = p.lanes;
    boost::json::array subs;
    for (auto& s : p.subscriptions)
      subs.emplace_back(s);
    x["subscriptions"] = std::move(subs);
    x["in_flight"] = p.in_flight;
    x["dispatched"] = p.dispatched;
    x["completed"] = p.completed;
    x["last_heartbeat_ms"] = p.last_heartbeat_ms;
    peers.emplace_back(std::move(x));
  }
  out["peers"] = std::move(peers);
  return boost::json::serialize(out);
}

caf::expected<std::string> query_cluster_status(const runtime_config& cfg,
                                                const std::string& seed) {
  auto rc = cfg;
  rc.cluster_seeds = {seed};
  rc.cluster_listen.clear();
  rc.cluster_role = "observer"; // offers no lanes
  if (auto err = internal::check_cluster_config(rc))
    return err;
  caf::actor_system_config sys_cfg;
  sys_cfg.set("logger.verbosity", caf::atom("quiet"));
  internal::prepare_cluster_system(sys_cfg, rc);
  caf::actor_system sys{sys_cfg};
  auto env = std::make_shared<internal::runtime_env>();
  env->config = rc;
  env->node = "observer-" + std::to_string(::getpid());
  env->stats = std::make_shared<internal::stats_block>();
  auto node = internal::start_cluster_node(sys, env, nullptr);
  if (!node)
    return node.error();
  auto limit = std::chrono::steady_clock::now()
               + 2 * rc.cluster_connect_timeout;
  auto joined = [&] {
    for (auto& p : node->board->snapshot().peers)
      if (p.state == "alive")
        return true;
    return false;
  };
  while (!joined() && std::chrono::steady_clock::now() < limit)
    std::this_thread::sleep_for(std::chrono::milliseconds{10});
  caf::expected<std::string> result = make_error(
    errc::unavailable,
    "could not join " + seed + " within "
      + std::to_string(2 * rc.cluster_connect_timeout.count() / 1'000'000)
      + " ms — is a node listening there, and do cluster.secret "
        "and the TLS files match the cluster's?");
  if (joined()) {
    caf::scoped_actor self{sys};
    self
      ->request(node->actor, rc.cluster_connect_timeout,
                internal::status_atom::value)
      .receive([&](std::string& json) { result = std::move(json); },
               [&](caf::error& err) {
                 result = make_error(errc::unavailable,
                                     "the node at " + seed
                                       + " did not answer: " + sys.render(err));
               });
  }
  caf::anon_send_exit(node->actor, caf::exit_reason::user_shutdown);
  env->cluster = nullptr;
  return result;
}

} // namespace evmesh

namespace evmesh::internal {

void cluster_board::set_self(std::string node, std::string role, uint16_t port,
                             bool tls) {
  std::lock_guard<std::mutex> guard{mtx_};
  self_.enabled = true;
  self_.node = std::move(node);
  self_.role = std::move(role);
  self_.port = port;
  self_.tls = tls;
}

void cluster_board::put(peer p) {
  std::lock_guard<std::mutex> guard{mtx_};
  for (auto& x : peers_)
    if (x.status.name == p.status.name) {
      x = std::move(p);
      return;
    }
  peers_.push_back(std::move(p));
}

void cluster_board::heartbeat(const std::string& name, int64_t wall_ms) {
  std::lock_guard<std::mutex> guard{mtx_};
  for (auto& x : peers_)
    if (x.status.name == name)
      x.last_heartbeat = wall_ms;
}

void cluster_board::mark_dead(const std::string& name) {
  std::lock_guard<std::mutex> guard{mtx_};
  for (auto& x : peers_)
    if (x.status.name == name) {
      x.status.state = "dead";
      // Its unanswered attempts were re-dispatched; none is in flight there.
      if (x.counters)
        x.counters->in_flight.store(0);
    }
}

void cluster_board::count_refused() {
  std::lock_guard<std::mutex> guard{mtx_};
  ++self_.refused;
}

void cluster_board::count_redispatched(uint64_t n) {
  std::lock_guard<std::mutex> guard{mtx_};
  self_.redispatched += n;
}

cluster_status cluster_board::snapshot() const {
  std::lock_guard<std::mutex> guard{mtx_};
  auto result = self_;
  auto now = unix_ms();
  for (auto& x : peers_) {
    auto s = x.status;
    if (x.counters) {
      s.in_flight = x.counters->in_flight.load();
      s.dispatched = x.counters->dispatched.load();
      s.completed = x.counters->completed.load();
    }
    s.last_heartbeat_ms = x.last_heartbeat == 0 ? -1 : now - x.last_heartbeat;
    result.peers.push_back(std::move(s));
  }
  std::stable_sort(result.peers.begin(), result.peers.end(),
                   [](auto& a, auto& b) {
                     return a.state == "alive" && b.state != "alive";
                   });
  return result;
}

namespace {

caf::error check_pem(const std::string& key, const std::string& path,
                     std::string_view marker) {
  std::ifstream in{path};
  if (!in)
    return make_error(errc::invalid_config,
                      key + " = '" + path
                        + "': cannot read the file — check the path and its "
                          "permissions");
  std::string text{std::istreambuf_iterator<char>{in}, {}};
  if (text.find(marker) == std::string::npos)
    return make_error(errc::invalid_config,
                      key + " = '" + path + "' holds no PEM block ("
                        + std::string{marker}
                        + "...) — pass a PEM file, not DER");
  return {};
}

} // namespace

caf::error check_cluster_config(const runtime_config& cfg) {
  if (!cfg.cluster_enabled())
    return {};
  if (cfg.cluster_secret.empty())
    return make_error(errc::invalid_config,
                      "cluster.secret is empty: every node of a cluster must "
                      "prove the same shared secret (>= 16 characters); set "
                      "it in [cluster] or with --cluster.secret");
  if (cfg.cluster_tls_ca.empty())
    return {};
  // CAF reads these files only at the first connection and aborts the
  // process when they are bad: check them now.
  if (auto err = check_pem("cluster.tls_ca", cfg.cluster_tls_ca,
                           "-----BEGIN CERTIFICATE-----"))
    return err;
  if (auto err = check_pem("cluster.tls_cert", cfg.cluster_tls_cert,
                           "-----BEGIN CERTIFICATE-----"))
    return err;
  return check_pem("cluster.tls_key", cfg.cluster_tls_key, "PRIVATE KEY-----");
}

void prepare_cluster_system(caf::actor_system_config& cfg,
                            const runtime_config& rc) {
  cfg.load<caf::io::middleman>();
  if (!rc.cluster_tls_ca.empty()) {
    cfg.load<caf::openssl::manager>();
    cfg.openssl_cafile = rc.cluster_tls_ca;
    cfg.openssl_certificate = rc.cluster_tls_cert;
    cfg.openssl_key = rc.cluster_tls_key;
  }
  cfg.add_message_types<caf::id_block::evmesh_cluster>();
}

} // namespace evmesh::internal
