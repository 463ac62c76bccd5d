#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scheduler/test_coordinator.hpp>

#include "evmesh/config.hpp"
#include "evmesh/container.hpp"
#include "evmesh/inproc.hpp"
#include "evmesh/registry.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/transport.hpp"

namespace evmesh::testing {

/// A configuration for deterministic tests: a fresh `inproc://` broker named
/// `broker`, in-memory dedupe, no dead-letter store (the broker's DLQ keeps
/// the records), no span sink, short backoffs, concurrency 4.
runtime_config test_config(const std::string& broker);

/// Runs a `consumer_runtime` on CAF's deterministic test coordinator: time is
/// virtual (timers fire only when the test advances it), nothing sleeps, and
/// every run is reproducible. Use it to test your own handlers:
///
///     evmesh::testing::test_mesh mesh{"orders"};
///     mesh.start({&my_handler_descriptor});
///     mesh.publish(env);
///     ASSERT_TRUE(mesh.run_until_settled());
class test_mesh {
public:
  /// A mesh on a fresh broker named `broker` (reset first).
  explicit test_mesh(const std::string& broker);

  /// A mesh with a custom configuration (its transport URL names the broker).
  explicit test_mesh(runtime_config cfg);

  ~test_mesh();

  /// The configuration; change it before `start`.
  runtime_config& config() noexcept {
    return cfg_;
  }

  /// Starts the runtime with `handlers` and `services`.
  caf::error start(std::vector<const handler_descriptor*> handlers,
                   container services = {});

  /// The broker behind `config().transport_url`.
  inproc_broker& broker() noexcept {
    return *broker_;
  }

  /// The runtime (valid after `start`).
  consumer_runtime& runtime() noexcept {
    return *runtime_;
  }

  /// The actor system and its test coordinator.
  caf::actor_system& system() noexcept {
    return *sys_;
  }
  caf::scheduler::test_coordinator& sched() noexcept {
    return *sched_;
  }

  /// Publishes an envelope on the broker.
  void publish(const envelope& env);

  /// Runs every pending job without advancing time; returns jobs run.
  size_t run();

  /// Runs jobs and fires timers in time order until `pred` holds. Returns
  /// false when `max_timers` timers fired without `pred` becoming true.
  bool run_until(const std::function<bool()>& pred, size_t max_timers = 200000);

  /// Runs until the broker has no pending or unacked message of the group.
  bool run_until_settled(size_t max_timers = 200000);

  /// Advances virtual time by `d`, firing due timers and running jobs.
  void advance(caf::timespan d);

  /// Requests a stop with `deadline` and runs until the runtime stopped.
  bool stop(caf::timespan deadline);

  /// Stats of the broker group "default".
  inproc_group_stats broker_stats() const;

private:
  runtime_config cfg_;
  std::shared_ptr<inproc_broker> broker_;
  std::unique_ptr<caf::actor_system_config> sys_cfg_;
  std::unique_ptr<caf::actor_system> sys_;
  caf::scheduler::test_coordinator* sched_ = nullptr;
  std::unique_ptr<consumer_runtime> runtime_;
};

/// Fault injection: makes the topic supervisor of the subscription `name`
/// ("consumer/pattern") throw inside its message handler, as a bug in it
/// would. The mesh supervisor restarts it and the source dispatches every
/// delivery it had not settled to the fresh one (attempts under way run
/// again: at-least-once; dedupe absorbs what had already committed). Returns
/// false when the runtime is not running or has no such subscription. Defined
/// in the runtime library (no test coordinator needed).
bool inject_supervisor_crash(consumer_runtime& rt, std::string_view name);

/// Parses the broker's DLQ (JSON records) of the group "default".
std::vector<dead_letter_record> dead_letters(const inproc_broker& broker);

/// A transport that consumes nothing and publishes through `fn`: a test double
/// for code that only publishes (an outbox relay, a dead-letter replay), and a
/// base for doubles that override a few calls. Every other call succeeds and
/// does nothing.
class publish_transport : public transport {
public:
  /// What `publish` calls (none: publishing succeeds); a test may swap it.
  std::function<caf::error(const envelope&)> fn;

  explicit publish_transport(std::function<caf::error(const envelope&)> f
                             = nullptr)
    : fn(std::move(f)) {
  }
  std::string_view scheme() const noexcept override {
    return "test";
  }
  transport_capabilities capabilities() const noexcept override {
    return {};
  }
  caf::error subscribe(const std::vector<std::string>&) override {
    return {};
  }
  caf::error poll(size_t, std::vector<raw_message>&) override {
    return {};
  }
  caf::error ack(uint64_t) override {
    return {};
  }
  caf::error nack(uint64_t, caf::timespan) override {
    return {};
  }
  caf::error dead_letter(uint64_t, const dead_letter_record&) override {
    return {};
  }
  caf::error extend(uint64_t) override {
    return {};
  }
  caf::error publish(const envelope& env) override {
    return fn ? fn(env) : caf::error{};
  }
  caf::error close() override {
    return {};
  }
};

/// A `publish_transport` that publishes into `mesh`'s broker (`mesh` must
/// outlive it): what an outbox relay or a dead-letter replay under test
/// sends to.
inline transport_ptr mesh_publisher(test_mesh& mesh) {
  return std::make_shared<publish_transport>([&mesh](const envelope& env) {
    mesh.publish(env);
    return caf::error{};
  });
}

} // namespace evmesh::testing
