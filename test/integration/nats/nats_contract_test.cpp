// The transport contract suite for nats:// against a real nats-server
// (JetStream), started once for this binary on a free loopback port. Each test
// gets its own stream (C<n>, subjects p<n>.>), so durables, messages and the
// DLQ stream (C<n>_DLQ on C<n>.dlq) never leak between tests.
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "evmesh/nats.hpp"
#include "evmesh/testing/transport_contract.hpp"

#include "nats_server.hpp"

namespace {

using evmesh::testing::nats_server;
using evmesh::testing::transport_harness;
using namespace std::chrono_literals;

nats_server* shared_server() {
  static std::unique_ptr<nats_server> server = std::make_unique<nats_server>();
  return server.get();
}

class nats_harness : public transport_harness {
public:
  caf::error start() override {
    if (!nats_server::available()) {
      skip();
      return {};
    }
    evmesh::register_nats_transport();
    n_ = ++instances;
    base_ = shared_server()->url() + "?stream=C" + std::to_string(n_)
            + "&subjects=p" + std::to_string(n_) + ".>";
    return {};
  }

  caf::expected<evmesh::transport_ptr>
  make_consumer(std::string group) override {
    return evmesh::make_transport(base_ + "&durable=" + group, env_);
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
  dead_letters(const std::string&) override {
    // One DLQ stream per test stream; records name their topic.
    auto records = evmesh::nats_dead_letters(base_);
    if (!records) {
      ADD_FAILURE() << evmesh::render(records.error());
      return std::nullopt;
    }
    return std::move(*records);
  }

  caf::timespan poll_deadline() const override {
    return 5s;
  }

  // Below ack_wait (30s); redeliveries after nak arrive within milliseconds.
  caf::timespan quiet_period() const override {
    return 300ms;
  }

  caf::timespan nack_delay() const override {
    return 1s;
  }

  caf::timespan timer_slack() const override {
    return 100ms;
  }

  evmesh::testing::contract_traits traits() const override {
    // JetStream redelivers nacked messages in nack order, not publish order.
    return {false, true};
  }

private:
  static void skip() {
    GTEST_SKIP() << "nats-server is not installed (apt-get install "
                    "nats-server, or scripts/install-deps.sh --with-servers)";
  }

  static inline std::atomic<int> instances = 0;

  int n_ = 0;
  std::string base_;
  evmesh::transport_environment env_{{}, "contract-node"};
};

} // namespace

namespace evmesh::testing {

INSTANTIATE_TYPED_TEST_SUITE_P(nats, transport_contract, nats_harness);

} // namespace evmesh::testing
