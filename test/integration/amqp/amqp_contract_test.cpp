// The transport contract suite for amqp:// against a real rabbitmq-server,
// started once for this binary on free loopback ports. Each test gets its own
// topic prefix p<n> and queues c<n>-<group> (with their .retry and .dlq
// queues), bound to the shared topic exchange `evmesh`, so nothing leaks
// between tests.
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "evmesh/amqp.hpp"
#include "evmesh/testing/transport_contract.hpp"

#include "rabbitmq_server.hpp"

namespace {

using evmesh::testing::rabbitmq_server;
using evmesh::testing::transport_harness;
using namespace std::chrono_literals;

rabbitmq_server* shared_server() {
  static std::unique_ptr<rabbitmq_server> server
    = std::make_unique<rabbitmq_server>();
  return server.get();
}

class amqp_harness : public transport_harness {
public:
  caf::error start() override {
    if (!rabbitmq_server::available()) {
      skip();
      return {};
    }
    evmesh::register_amqp_transport();
    n_ = ++instances;
    base_ = shared_server()->url() + "?prefetch=256";
    return {};
  }

  caf::expected<evmesh::transport_ptr>
  make_consumer(std::string group) override {
    return evmesh::make_transport(queue_url(group), env_);
  }

  caf::expected<evmesh::transport_ptr> make_producer() override {
    return evmesh::make_transport(base_, env_);
  }

  std::string unique_topic_prefix() override {
    return "p" + std::to_string(n_);
  }

  evmesh::transport_capabilities capabilities() const override {
    return {true, true, true, true};
  }

  void advance(caf::timespan d) override {
    std::this_thread::sleep_for(d);
  }

  std::optional<std::vector<evmesh::dead_letter_record>>
  dead_letters(const std::string& group) override {
    auto records = evmesh::amqp_dead_letters(queue_url(group));
    if (!records) {
      ADD_FAILURE() << evmesh::render(records.error());
      return std::nullopt;
    }
    return std::move(*records);
  }

  caf::timespan poll_deadline() const override {
    return 5s;
  }

  // RabbitMQ has no ack deadline; redeliveries after a nack arrive within
  // milliseconds.
  caf::timespan quiet_period() const override {
    return 300ms;
  }

  caf::timespan nack_delay() const override {
    return 1s;
  }

  // The TTL of the retry queue never expires early; sleeping may overshoot.
  caf::timespan timer_slack() const override {
    return 100ms;
  }

  evmesh::testing::contract_traits traits() const override {
    // RabbitMQ requeues nacked messages in nack order, not publish order.
    return {false, true};
  }

private:
  std::string queue_url(const std::string& group) const {
    return base_ + "&queue=c" + std::to_string(n_) + "-" + group;
  }

  static void skip() {
    GTEST_SKIP() << "rabbitmq-server is not installed (apt-get install "
                    "rabbitmq-server, or scripts/install-deps.sh "
                    "--with-servers)";
  }

  static inline std::atomic<int> instances = 0;

  int n_ = 0;
  std::string base_;
  evmesh::transport_environment env_{{}, "contract-node"};
};

} // namespace

namespace evmesh::testing {

INSTANTIATE_TYPED_TEST_SUITE_P(amqp, transport_contract, amqp_harness);

} // namespace evmesh::testing
