// The transport contract suite for inproc://, the reference transport.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/inproc.hpp"
#include "evmesh/testing/transport_contract.hpp"

namespace {

using evmesh::testing::transport_harness;

/// A fresh broker per test and a manual clock the suite advances, given to
/// every transport as `transport_environment::now`.
class inproc_harness : public transport_harness {
public:
  inproc_harness()
    : name_("contract-" + std::to_string(++instances)),
      clock_(std::make_shared<std::atomic<int64_t>>(0)),
      broker_(evmesh::inproc_broker::get(name_)) {
    evmesh::register_inproc_transport();
    broker_->reset();
    env_.now = [clock = clock_] {
      auto ns = std::chrono::nanoseconds{clock->load()};
      return std::chrono::steady_clock::time_point{} + std::chrono::hours{1}
             + ns;
    };
    env_.node = "contract-node";
  }

  void stop() override {
    // Drops the groups, and with them the wakeups and clock they hold.
    broker_->reset();
  }

  caf::expected<evmesh::transport_ptr>
  make_consumer(std::string group) override {
    return evmesh::make_transport("inproc://" + name_ + "?group=" + group,
                                  env_);
  }

  caf::expected<evmesh::transport_ptr> make_producer() override {
    return evmesh::make_transport("inproc://" + name_, env_);
  }

  std::string unique_topic_prefix() override {
    return "contract.t" + std::to_string(instances);
  }

  evmesh::transport_capabilities capabilities() const override {
    return {true, true, true, true};
  }

  void advance(caf::timespan d) override {
    *clock_ += d.count();
  }

  std::optional<std::vector<evmesh::dead_letter_record>>
  dead_letters(const std::string& group) override {
    std::vector<evmesh::dead_letter_record> result;
    for (auto& json : broker_->dead_letters(group)) {
      auto rec = evmesh::dead_letter_from_json(json);
      if (!rec) {
        ADD_FAILURE() << "unreadable DLQ record " << json << ": "
                      << evmesh::render(rec.error());
        continue;
      }
      result.push_back(std::move(*rec));
    }
    return result;
  }

  uint64_t violations(const std::string& group) override {
    return broker_->stats(group).protocol_violations;
  }

private:
  static inline std::atomic<int> instances = 0;

  std::string name_;
  std::shared_ptr<std::atomic<int64_t>> clock_;
  std::shared_ptr<evmesh::inproc_broker> broker_;
  evmesh::transport_environment env_;
};

} // namespace

namespace evmesh::testing {

INSTANTIATE_TYPED_TEST_SUITE_P(inproc, transport_contract, inproc_harness);

} // namespace evmesh::testing

namespace {

/// Polls everything ready (up to `max`) from `t`.
std::vector<evmesh::raw_message> poll_all(evmesh::transport& t,
                                          size_t max = 1000) {
  std::vector<evmesh::raw_message> out;
  EXPECT_FALSE(t.poll(max, out));
  return out;
}

} // namespace

// Settled deliveries leave the broker's window of unacked tags from its
// front; one that stays unsettled while far more later ones are acked is
// moved aside. It must stay ackable, nackable (and then come back first)
// and be returned to the group when its consumer closes.
TEST(inproc_broker, stuck_deliveries_stay_settleable_while_later_ones_flow) {
  evmesh::register_inproc_transport();
  auto broker = evmesh::inproc_broker::get("stragglers");
  broker->reset();
  auto consumer = evmesh::make_transport("inproc://stragglers",
                                         evmesh::transport_environment{});
  ASSERT_TRUE(consumer);
  auto& t = **consumer;
  ASSERT_FALSE(t.subscribe({"s.>"}));
  for (int i = 0; i < 3; ++i)
    broker->publish_raw("s.stuck", "stuck-" + std::to_string(i));
  auto stuck = poll_all(t);
  ASSERT_EQ(stuck.size(), 3u);
  constexpr int later = 150'000;
  for (int i = 0; i < later; i += 1000) {
    for (int j = i; j < i + 1000; ++j)
      broker->publish_raw("s.flow", "flow-" + std::to_string(j));
    auto batch = poll_all(t);
    ASSERT_EQ(batch.size(), 1000u) << i;
    // Acked out of order within the batch, as lanes finish.
    for (size_t k = 0; k < batch.size(); k += 2)
      ASSERT_FALSE(t.ack(batch[k].tag));
    for (size_t k = 1; k < batch.size(); k += 2)
      ASSERT_FALSE(t.ack(batch[k].tag));
  }
  auto stats = broker->stats();
  EXPECT_EQ(stats.acked, static_cast<uint64_t>(later));
  EXPECT_EQ(stats.unacked, 3u);
  EXPECT_EQ(stats.pending, 0u);
  // The first is acked, the second nacked: it comes back before anything
  // published after it.
  ASSERT_FALSE(t.ack(stuck[0].tag));
  EXPECT_TRUE(t.ack(stuck[0].tag)) << "a second ack is a violation";
  EXPECT_EQ(broker->stats().protocol_violations, 1u);
  broker->publish_raw("s.flow", "after");
  ASSERT_FALSE(t.nack(stuck[1].tag, caf::timespan{0}));
  auto again = poll_all(t);
  ASSERT_EQ(again.size(), 2u);
  EXPECT_EQ(again[0].bytes, "stuck-1");
  EXPECT_EQ(again[0].delivery_count, 2u);
  EXPECT_EQ(again[0].position, stuck[1].position);
  EXPECT_EQ(again[1].bytes, "after");
  ASSERT_FALSE(t.ack(again[1].tag));
  // The third (and the redelivered second) go back to the group when the
  // consumer closes, and a new consumer gets them in publish order.
  ASSERT_FALSE(t.close());
  auto next = evmesh::make_transport("inproc://stragglers",
                                     evmesh::transport_environment{});
  ASSERT_TRUE(next);
  ASSERT_FALSE((*next)->subscribe({"s.>"}));
  auto rest = poll_all(**next);
  ASSERT_EQ(rest.size(), 2u);
  EXPECT_EQ(rest[0].bytes, "stuck-1");
  EXPECT_EQ(rest[1].bytes, "stuck-2");
  EXPECT_EQ(rest[1].delivery_count, 2u);
  for (auto& m : rest)
    ASSERT_FALSE((*next)->ack(m.tag));
  stats = broker->stats();
  EXPECT_EQ(stats.unacked, 0u);
  EXPECT_EQ(stats.pending, 0u);
  EXPECT_EQ(stats.acked, static_cast<uint64_t>(later) + 4);
  broker->reset();
}
