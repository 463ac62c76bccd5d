#include "evmesh/testing.hpp"

#include <caf/all.hpp>

namespace evmesh::testing {

runtime_config test_config(const std::string& broker) {
  runtime_config cfg;
  cfg.node_name = "test-node";
  cfg.transport_url = "inproc://" + broker;
  cfg.dedupe_url = "memory://";
  cfg.dead_letter_url = "none";
  cfg.trace_sink = "none";
  cfg.defaults.max_attempts = 3;
  cfg.defaults.backoff.initial = std::chrono::milliseconds{10};
  cfg.defaults.backoff.max = std::chrono::milliseconds{200};
  cfg.defaults.concurrency = 4;
  cfg.defaults.timeout = std::chrono::seconds{5};
  cfg.max_in_flight = 1024;
  cfg.poll_batch = 64;
  cfg.poll_idle = std::chrono::milliseconds{5};
  return cfg;
}

namespace {

std::string broker_name(const runtime_config& cfg) {
  auto url = std::string_view{cfg.transport_url};
  constexpr std::string_view prefix = "inproc://";
  if (url.substr(0, prefix.size()) == prefix)
    url.remove_prefix(prefix.size());
  auto q = url.find('?');
  auto name = std::string{url.substr(0, q)};
  return name.empty() ? "default" : name;
}

} // namespace

test_mesh::test_mesh(const std::string& broker)
  : test_mesh(test_config(broker)) {
}

test_mesh::test_mesh(runtime_config cfg) : cfg_(std::move(cfg)) {
  broker_ = inproc_broker::get(broker_name(cfg_));
  broker_->reset();
  sys_cfg_ = std::make_unique<caf::actor_system_config>();
  sys_cfg_->set("scheduler.policy", caf::atom("testing"));
  sys_cfg_->set("logger.verbosity", caf::atom("quiet"));
  sys_ = std::make_unique<caf::actor_system>(*sys_cfg_);
  sched_ = &dynamic_cast<caf::scheduler::test_coordinator&>(sys_->scheduler());
}

test_mesh::~test_mesh() {
  if (runtime_ && !runtime_->stopped())
    stop(std::chrono::seconds{1});
  runtime_.reset();
  run();
}

caf::error test_mesh::start(std::vector<const handler_descriptor*> handlers,
                            container services) {
  runtime_ = std::make_unique<consumer_runtime>(*sys_, cfg_,
                                                std::move(services));
  runtime_->set_handlers(std::move(handlers));
  runtime_->set_detach_io(false);
  auto err = runtime_->start();
  run();
  return err;
}

void test_mesh::publish(const envelope& env) {
  broker_->publish(env);
}

size_t test_mesh::run() {
  size_t n = 0;
  while (sched_->try_run_once())
    ++n;
  return n;
}

bool test_mesh::run_until(const std::function<bool()>& pred,
                          size_t max_timers) {
  run();
  for (size_t i = 0; i < max_timers; ++i) {
    if (pred())
      return true;
    if (!sched_->has_pending_timeout())
      return pred();
    sched_->trigger_timeout();
    run();
  }
  return pred();
}

bool test_mesh::run_until_settled(size_t max_timers) {
  return run_until(
    [this] {
      auto s = broker_->stats();
      return s.pending == 0 && s.unacked == 0
             && runtime_->stats().in_flight == 0;
    },
    max_timers);
}

void test_mesh::advance(caf::timespan d) {
  sched_->advance_time(d);
  run();
}

bool test_mesh::stop(caf::timespan deadline) {
  if (!runtime_)
    return true;
  runtime_->request_stop(deadline);
  return run_until([this] { return runtime_->stopped(); });
}

inproc_group_stats test_mesh::broker_stats() const {
  return broker_->stats();
}

std::vector<dead_letter_record> dead_letters(const inproc_broker& broker) {
  std::vector<dead_letter_record> result;
  for (auto& json : broker.dead_letters())
    if (auto rec = dead_letter_from_json(json))
      result.push_back(std::move(*rec));
  return result;
}

} // namespace evmesh::testing
