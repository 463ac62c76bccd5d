#pragma once

// librdkafka's built-in mock cluster (rdkafka_mock.h) as a test server: real
// Kafka protocol on loopback ports, brokers that can be taken down and up,
// all inside the test process. See shared/reference/kafka-mock-facts.md for
// what it emulates and what it does not.

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

namespace evmesh::testing {

/// librdkafka settings that make consumer-group tests fast on the mock: the
/// first join takes about 3 s, later rebalances about session timeout − 1 s.
/// Append to a kafka:// URL's query.
inline constexpr std::string_view kafka_fast_settings
  = "session.timeout.ms=4000&heartbeat.interval.ms=500"
    "&reconnect.backoff.max.ms=500&topic.metadata.refresh.interval.ms=1000";

/// A mock cluster of `brokers` brokers (ids 1..brokers) that lives as long as
/// this object. Topics are created on first produce (4 partitions) or with
/// `create_topic`.
class kafka_mock_cluster {
public:
  explicit kafka_mock_cluster(int brokers = 3) {
    char errstr[512];
    auto* conf = rd_kafka_conf_new();
    // The handle only hosts the cluster; keep its own logging quiet.
    rd_kafka_conf_set(conf, "log_level", "3", errstr, sizeof errstr);
    rk_ = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (rk_ == nullptr)
      throw std::runtime_error{std::string{"mock cluster handle: "} + errstr};
    mc_ = rd_kafka_mock_cluster_new(rk_, brokers);
    if (mc_ == nullptr) {
      rd_kafka_destroy(rk_);
      throw std::runtime_error{"rd_kafka_mock_cluster_new failed"};
    }
    bootstraps_ = rd_kafka_mock_cluster_bootstraps(mc_);
  }

  kafka_mock_cluster(const kafka_mock_cluster&) = delete;

  kafka_mock_cluster& operator=(const kafka_mock_cluster&) = delete;

  ~kafka_mock_cluster() {
    rd_kafka_mock_cluster_destroy(mc_);
    rd_kafka_destroy(rk_);
  }

  /// "127.0.0.1:PORT,127.0.0.1:PORT,..."
  const std::string& bootstraps() const {
    return bootstraps_;
  }

  /// `kafka://BOOTSTRAPS?QUERY`.
  std::string url(std::string_view query) const {
    return "kafka://" + bootstraps_ + "?" + std::string{query};
  }

  /// Creates `topic` with `partitions` partitions, replicated on every
  /// broker.
  bool create_topic(const std::string& topic, int partitions = 4,
                    int replication = 3) {
    return rd_kafka_mock_topic_create(mc_, topic.c_str(), partitions,
                                      replication)
           == RD_KAFKA_RESP_ERR_NO_ERROR;
  }

  /// Takes broker `id` (1-based) down: connections close, requests fail.
  bool set_down(int32_t id) {
    return rd_kafka_mock_broker_set_down(mc_, id) == RD_KAFKA_RESP_ERR_NO_ERROR;
  }

  /// Brings broker `id` back.
  bool set_up(int32_t id) {
    return rd_kafka_mock_broker_set_up(mc_, id) == RD_KAFKA_RESP_ERR_NO_ERROR;
  }

  /// Makes broker `id` the leader of `topic`/`partition`.
  bool set_leader(const std::string& topic, int32_t partition, int32_t id) {
    return rd_kafka_mock_partition_set_leader(mc_, topic.c_str(), partition, id)
           == RD_KAFKA_RESP_ERR_NO_ERROR;
  }

  /// Makes broker `id` the coordinator of consumer group `group`.
  bool set_coordinator(const std::string& group, int32_t id) {
    return rd_kafka_mock_coordinator_set(mc_, "group", group.c_str(), id)
           == RD_KAFKA_RESP_ERR_NO_ERROR;
  }

  rd_kafka_mock_cluster_t* handle() const {
    return mc_;
  }

private:
  rd_kafka_t* rk_ = nullptr;
  rd_kafka_mock_cluster_t* mc_ = nullptr;
  std::string bootstraps_;
};

} // namespace evmesh::testing
