#include "evmesh/runtime.hpp"

#include <algorithm>
#include <functional>
#include <thread>

#include <caf/all.hpp>
#include <caf/scheduler/test_coordinator.hpp>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include "evmesh/inproc.hpp"
#ifdef EVMESH_HAS_NATS
#  include "evmesh/nats.hpp"
#endif
#ifdef EVMESH_HAS_REDIS
#  include "evmesh/redis_store.hpp"
#endif
#ifdef EVMESH_HAS_KAFKA
#  include "evmesh/kafka.hpp"
#endif
#ifdef EVMESH_HAS_AMQP
#  include "evmesh/amqp.hpp"
#endif

#include "actors/mesh.hpp"
#ifdef EVMESH_HAS_CLUSTER
#  include "cluster/node.hpp"
#endif

namespace evmesh {

const char* to_string(health_status x) noexcept {
  switch (x) {
    case health_status::starting:
      return "starting";
    case health_status::healthy:
      return "healthy";
    case health_status::degraded:
      return "degraded";
    case health_status::disconnected:
      return "disconnected";
    case health_status::stopping:
      return "stopping";
    default:
      return "stopped";
  }
}

struct consumer_runtime::impl {
  runtime_config config;
  container services;
  std::unique_ptr<caf::actor_system_config> own_cfg;
  std::unique_ptr<caf::actor_system> own_sys;
  caf::actor_system* sys = nullptr;
  std::optional<std::vector<const handler_descriptor*>> handlers;
  bool detach_io = true;
  std::shared_ptr<internal::runtime_env> env;
  std::shared_ptr<internal::stats_block> stats
    = std::make_shared<internal::stats_block>();
  caf::actor mesh;
  /// The cluster's status board (DESIGN.md §8), when [cluster] is enabled.
  std::function<cluster_status()> cluster_snapshot;
  bool started = false;
  bool stop_requested = false;
};

consumer_runtime::consumer_runtime(runtime_config cfg, container services)
  : impl_(std::make_unique<impl>()) {
  impl_->config = std::move(cfg);
  impl_->services = std::move(services);
}

consumer_runtime::consumer_runtime(caf::actor_system& sys, runtime_config cfg,
                                   container services)
  : consumer_runtime(std::move(cfg), std::move(services)) {
  impl_->sys = &sys;
}

consumer_runtime::~consumer_runtime() {
  if (impl_->started && !stopped()) {
    if (impl_->own_sys)
      stop(impl_->config.stop_timeout);
    else
      request_stop(impl_->config.stop_timeout);
  }
  impl_->mesh = nullptr;
  if (impl_->env)
    impl_->env->cluster = nullptr; // the node actor holds the env
  impl_->own_sys.reset();
}

void consumer_runtime::set_handlers(
  std::vector<const handler_descriptor*> handlers) {
  impl_->handlers = std::move(handlers);
}

void consumer_runtime::set_detach_io(bool value) {
  impl_->detach_io = value;
}

namespace {

/// `runtime.scheduler_threads`, with 0 meaning one per core.
size_t scheduler_threads(const runtime_config& cfg) {
  if (cfg.scheduler_threads != 0)
    return cfg.scheduler_threads;
  return std::max<size_t>(1, std::thread::hardware_concurrency());
}

std::string host_name() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof(buf) - 1) != 0)
    return "localhost";
  return buf;
}

} // namespace

caf::error consumer_runtime::start() {
  auto& d = *impl_;
  if (d.started)
    return make_error(errc::invalid_state, "consumer_runtime already started");
  auto env = std::make_shared<internal::runtime_env>();
  env->config = d.config;
  env->services = d.services;
  env->stats = d.stats;
  env->detach_io = d.detach_io;
  env->node = d.config.node_name.empty() ? host_name() : d.config.node_name;
  env->ingress = d.config.cluster_role != "worker";
  if (d.config.cluster_enabled()) {
#ifdef EVMESH_HAS_CLUSTER
    if (auto err = internal::check_cluster_config(d.config))
      return err;
#else
    return make_error(errc::invalid_config,
                      "[cluster] is configured but this build of evmesh has "
                      "no cluster support (it needs libcaf-openssl and "
                      "libssl-dev at build time)");
#endif
  }
  // 1. Freeze the dispatch table.
  auto handlers = d.handlers ? *d.handlers : registered_handlers();
  auto table = freeze_handlers(handlers, d.config.defaults);
  if (!table)
    return table.error();
  if (table->subscriptions.empty())
    spdlog::warn("no handlers registered: every message will be "
                 "dead-lettered as no_handler");
  env->table = std::move(*table);
  // 2. Stores and sinks: instances in the container win over URLs.
#ifdef EVMESH_HAS_REDIS
  register_redis_store();
#endif
  if (auto ptr = d.services.find_shared<idempotency_store>())
    env->dedupe = ptr;
  else if (!d.config.dedupe_url.empty() && d.config.dedupe_url != "none") {
    auto store = make_idempotency_store(d.config.dedupe_url);
    if (!store)
      return store.error();
    env->dedupe = std::move(*store);
  }
  if (auto ptr = d.services.find_shared<dead_letter_store>())
    env->dead_letters = ptr;
  else if (!d.config.dead_letter_url.empty()
           && d.config.dead_letter_url != "none") {
    auto store = make_dead_letter_store(d.config.dead_letter_url);
    if (!store)
      return store.error();
    env->dead_letters = std::move(*store);
  }
  if (auto ptr = d.services.find_shared<span_sink>()) {
    env->spans = ptr;
  } else {
    auto sink = make_span_sink(d.config.trace_sink);
    if (!sink)
      return sink.error();
    env->spans = std::move(*sink);
  }
  if (env->dedupe)
    for (auto& sub : env->table.subscriptions)
      if (sub.options.timeout > d.config.dedupe_lease)
        spdlog::warn("{}: handler timeout exceeds dedupe.lease; a claim can "
                     "expire while the handler still runs and another worker "
                     "may run the same message — raise dedupe.lease",
                     sub.name);
  if (auto ptr = d.services.find_shared<tenant_registry>())
    env->tenants = ptr;
  else if (d.config.tenants_enabled)
    env->tenants = make_static_tenant_registry(d.config.tenants_known,
                                               d.config.tenants_suspended,
                                               d.config.tenant_fallback);
  // 3. The actor system (own one unless given) and the transport.
  if (d.sys == nullptr) {
    d.own_cfg = std::make_unique<caf::actor_system_config>();
    d.own_cfg->set("logger.verbosity", caf::atom("quiet"));
    d.own_cfg->set("scheduler.max-threads", scheduler_threads(d.config));
    if (d.config.idle_workers == "sleep") {
      // Out of work, a scheduler thread blocks at once (no 50 us sleep
      // loops) and looks for work to steal every idle_steal_interval.
      d.own_cfg->set("work-stealing.moderate-poll-attempts", size_t{0});
      d.own_cfg->set("work-stealing.relaxed-sleep-duration",
                     d.config.idle_steal_interval);
    }
#ifdef EVMESH_HAS_CLUSTER
    if (d.config.cluster_enabled())
      internal::prepare_cluster_system(*d.own_cfg, d.config);
#endif
    d.own_sys = std::make_unique<caf::actor_system>(*d.own_cfg);
    d.sys = d.own_sys.get();
  }
  register_inproc_transport();
#ifdef EVMESH_HAS_NATS
  register_nats_transport();
#endif
#ifdef EVMESH_HAS_KAFKA
  register_kafka_transport();
#endif
#ifdef EVMESH_HAS_AMQP
  register_amqp_transport();
#endif
  transport_environment tenv;
  auto* sys = d.sys;
  tenv.now = [sys] { return sys->clock().now(); };
  tenv.node = env->node;
  auto tr = make_transport(d.config.transport_url, tenv);
  if (!tr)
    return tr.error();
  env->transport = std::move(*tr);
  std::vector<std::string> patterns;
  for (auto& sub : env->table.subscriptions)
    patterns.emplace_back(sub.handler->pattern);
  // A cluster worker publishes through the transport but never consumes.
  if (env->ingress)
    if (auto err = env->transport->subscribe(patterns))
      return err;
  env->out = std::make_shared<internal::transport_publisher>(env->transport);
#ifdef EVMESH_HAS_CLUSTER
  if (d.config.cluster_enabled()) {
    auto node = internal::start_cluster_node(*d.sys, env,
                                             &internal::spawn_handler_lane);
    if (!node)
      return node.error();
    env->cluster = node->actor;
    auto board = node->board;
    auto stats = d.stats;
    d.cluster_snapshot = [board, stats] {
      auto result = board->snapshot();
      result.redispatched = stats->redispatched.load();
      return result;
    };
  }
#endif
  d.env = env;
  // 4. The actor tree.
  d.mesh = d.sys->spawn(internal::mesh_supervisor,
                        internal::runtime_env_ptr{env});
  d.started = true;
  spdlog::info("evmesh runtime started on {} with {} subscription(s), node {}",
               redact_url(d.config.transport_url),
               env->table.subscriptions.size(), env->node);
  return {};
}

void consumer_runtime::request_stop(caf::timespan deadline) {
  auto& d = *impl_;
  if (!d.started || d.stop_requested)
    return;
  d.stop_requested = true;
  caf::anon_send(d.mesh, internal::stop_atom::value, deadline);
}

bool consumer_runtime::stopped() const noexcept {
  return impl_->stats->stopped.load();
}

void consumer_runtime::stop(caf::timespan deadline) {
  request_stop(deadline);
  if (!impl_->started)
    return;
  // The mesh nacks everything at the deadline; allow it time to settle.
  auto limit = std::chrono::steady_clock::now() + deadline
               + std::chrono::seconds{5};
  while (!stopped() && std::chrono::steady_clock::now() < limit)
    std::this_thread::sleep_for(std::chrono::milliseconds{2});
  if (!stopped())
    spdlog::error("runtime did not stop within its deadline + 5 s");
}

runtime_stats consumer_runtime::stats() const {
  auto& s = *impl_->stats;
  auto get = [](const std::atomic<uint64_t>& x) {
    return x.load(std::memory_order_relaxed);
  };
  runtime_stats r;
  r.received = get(s.received);
  r.handled = get(s.handled);
  r.duplicates = get(s.duplicates);
  r.retried = get(s.retried);
  r.dead_lettered = get(s.dead_lettered);
  r.discarded = get(s.discarded);
  r.acked = get(s.acked);
  r.nacked = get(s.nacked);
  r.timeouts = get(s.timeouts);
  r.lane_restarts = get(s.lane_restarts);
  r.supervisor_restarts = get(s.supervisor_restarts);
  r.new_root_traces = get(s.new_root_traces);
  r.deferred = get(s.deferred);
  r.in_flight = get(s.in_flight);
  r.max_concurrent = get(s.max_concurrent);
  r.paused = get(s.paused);
  return r;
}

namespace testing {

bool inject_supervisor_crash(consumer_runtime& rt, std::string_view name) {
  auto& d = *rt.impl_;
  if (!d.env || !d.mesh)
    return false;
  auto& subs = d.env->table.subscriptions;
  for (uint32_t i = 0; i < subs.size(); ++i)
    if (subs[i].name == name) {
      caf::anon_send(d.mesh, internal::crash_atom::value, i);
      return true;
    }
  return false;
}

} // namespace testing

health_status consumer_runtime::health() const noexcept {
  auto result = static_cast<health_status>(impl_->stats->health.load());
  if ((result == health_status::healthy || result == health_status::degraded)
      && impl_->env && !impl_->env->transport->connected())
    return health_status::disconnected;
  return result;
}

caf::error consumer_runtime::publish(envelope env) {
  if (!impl_->env)
    return make_error(errc::invalid_state,
                      "consumer_runtime::publish before start()");
  // The same stamping rules as a handler's publish, with a fresh root span.
  static const envelope none;
  event_context ctx{none,       impl_->env->services,  new_root_trace(), 0,
                    env.tenant, impl_->env->out.get(), caf::timestamp{}, "",
                    ""};
  return ctx.publish(std::move(env));
}

const dispatch_table& consumer_runtime::table() const {
  static const dispatch_table empty;
  return impl_->env ? impl_->env->table : empty;
}

cluster_status consumer_runtime::cluster() const {
  if (impl_->cluster_snapshot)
    return impl_->cluster_snapshot();
  cluster_status result;
  result.node = impl_->env ? impl_->env->node : impl_->config.node_name;
  return result;
}

const runtime_config& consumer_runtime::config() const noexcept {
  return impl_->config;
}

} // namespace evmesh
