// The transport contract suite for kafka:// against librdkafka's mock cluster
// (3 brokers), one cluster per test. Each test consumes `p<n>.>`: the
// transport discovers the topics the suite creates by publishing (4
// partitions each) and keeps attempt counts in a SQLite ledger, so the
// delivery-count checks run too.
#include <atomic>
#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>

#include <unistd.h>

#include "evmesh/kafka.hpp"
#include "evmesh/testing/transport_contract.hpp"

#include "kafka_mock.hpp"

namespace {

using evmesh::testing::kafka_fast_settings;
using evmesh::testing::kafka_mock_cluster;
using evmesh::testing::transport_harness;
using namespace std::chrono_literals;

class kafka_harness : public transport_harness {
public:
  caf::error start() override {
    evmesh::register_kafka_transport();
    n_ = ++instances;
    cluster_ = std::make_unique<kafka_mock_cluster>(3);
    dir_ = std::filesystem::temp_directory_path()
           / ("evmesh-kafka-contract-" + std::to_string(::getpid()) + "-"
              + std::to_string(n_));
    std::filesystem::create_directories(dir_);
    common_
      = cluster_->url(std::string{kafka_fast_settings} + "&discover=250ms");
    return {};
  }

  void stop() override {
    cluster_.reset();
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  caf::expected<evmesh::transport_ptr>
  make_consumer(std::string group) override {
    // Groups are named per test: the suite reuses short names.
    return evmesh::make_transport(common_ + "&group=" + unique_topic_prefix()
                                    + "-" + group + "&ledger="
                                    + (dir_ / "ledger.db").string(),
                                  env_);
  }

  caf::expected<evmesh::transport_ptr> make_producer() override {
    return evmesh::make_transport(common_, env_);
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
    auto records = evmesh::kafka_dead_letters(
      common_ + "&topics=" + unique_topic_prefix() + ".>");
    if (!records) {
      ADD_FAILURE() << evmesh::render(records.error());
      return std::nullopt;
    }
    return std::move(*records);
  }

  // A group's first join takes ~3 s on the mock, plus topic discovery and,
  // when the suite creates several topics, a rejoin per discovery round.
  // Generous for loaded CI machines: waits end as soon as messages arrive.
  caf::timespan poll_deadline() const override {
    return 30s;
  }

  caf::timespan quiet_period() const override {
    return 1s;
  }

  caf::timespan nack_delay() const override {
    return 1s;
  }

  caf::timespan timer_slack() const override {
    return 100ms;
  }

  evmesh::testing::contract_traits traits() const override {
    // Redeliveries are in-process and keep fetch (offset) order; topics have
    // 4 partitions and unkeyed events spread over them.
    return {true, true};
  }

private:
  static inline std::atomic<int> instances = 0;

  int n_ = 0;
  std::unique_ptr<kafka_mock_cluster> cluster_;
  std::filesystem::path dir_;
  std::string common_;
  evmesh::transport_environment env_{{}, "contract-node"};
};

} // namespace

namespace evmesh::testing {

INSTANTIATE_TYPED_TEST_SUITE_P(kafka, transport_contract, kafka_harness);

} // namespace evmesh::testing
