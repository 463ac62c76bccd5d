// `evmesh dlq list|show|replay|purge` with `--db kafka://…?topics=…` read and
// settle the `<topic>.dlq` topics the Kafka transport writes, on librdkafka's
// mock cluster. Dead letters are made the way the runtime makes them:
// messages consumed, `dead_letter` (confirmed by the broker), then `ack`.
// Kafka cannot delete one record: replay and purge produce marker records the
// readers skip, so the tests check what a later `list` and
// `kafka_dead_letters` see.
#include <chrono>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/envelope.hpp"
#include "evmesh/error.hpp"
#include "evmesh/kafka.hpp"
#include "evmesh/stores.hpp"
#include "evmesh/transport.hpp"

#include "../dlq_cli_support.hpp"
#include "kafka_mock.hpp"
#include "ops.hpp"

using namespace evmesh;
using namespace evmesh::cli;
using namespace std::chrono_literals;
using evmesh::testing::kafka_fast_settings;
using evmesh::testing::kafka_mock_cluster;

namespace {

transport_environment env() {
  return {{}, "dlq-cli-node"};
}

/// Polls `t` until `n` messages arrived or 30 s passed (a group's first join
/// takes about 3 s on the mock).
std::vector<raw_message> poll_n(transport& t, size_t n) {
  return evmesh::testing::poll_n(t, n, 30s);
}

class kafka_dlq_cli : public ::testing::Test {
protected:
  void SetUp() override {
    register_broker_schemes();
    cluster_ = std::make_unique<kafka_mock_cluster>(3);
    for (auto* t : {"ord.created", "ord.cancelled"})
      ASSERT_TRUE(cluster_->create_topic(t, 2));
    // Two partitions per DLQ topic: ids carry the partition.
    for (auto* t : {"ord.created.dlq", "ord.cancelled.dlq"})
      ASSERT_TRUE(cluster_->create_topic(t, 2));
    base_ = cluster_->url(std::string{kafka_fast_settings}
                          + "&topics=ord.created,ord.cancelled");
    // The shared helper polls every record before it settles any; with
    // retry topics on, a key's records go out one at a time.
    auto c = make_transport(base_ + "&group=billing&retry_topic_after=off",
                            env());
    ASSERT_TRUE(c) << render(c.error());
    consumer_ = std::move(*c);
    ASSERT_FALSE(consumer_->subscribe({"ord.*"}));
  }

  void TearDown() override {
    if (consumer_)
      consumer_->close();
    consumer_.reset();
    cluster_.reset();
  }

  /// Publishes `n` envelopes on `topic` and dead-letters each as `category`
  /// from consumer `who`, like the runtime: dead_letter, then ack.
  void dead_letter_n(int n, const std::string& topic,
                     const std::string& category, const std::string& who) {
    evmesh::testing::dead_letter_n(*consumer_, n, topic, category, who, "kafka",
                                   30s);
  }

  /// `dlq list --json` with `q`: the exit code and the records.
  std::pair<int, std::vector<dead_letter_record>>
  list(const dead_letter_query& q) {
    auto listing = evmesh::testing::list_dlq(base_, q);
    EXPECT_EQ(listing.rc, 0) << listing.err;
    return {listing.rc, std::move(listing.records)};
  }

  std::unique_ptr<kafka_mock_cluster> cluster_;
  std::string base_;
  transport_ptr consumer_;
};

} // namespace

TEST_F(kafka_dlq_cli, list_and_show_read_the_dlq_topics_with_filters) {
  dead_letter_n(6, "ord.created", "retries_exhausted", "billing");
  dead_letter_n(4, "ord.cancelled", "permanent", "audit");
  auto [rc, all] = list(every_match());
  EXPECT_EQ(rc, 0);
  ASSERT_EQ(all.size(), 10u);
  std::set<int64_t> ids;
  for (auto& r : all)
    ids.insert(r.id);
  EXPECT_EQ(ids.size(), 10u) << "record ids are unique";
  dead_letter_query limited = every_match();
  limited.limit = 3;
  EXPECT_EQ(list(limited).second.size(), 3u);
  dead_letter_query by_category = every_match();
  by_category.category = "permanent";
  auto [rc2, perm] = list(by_category);
  EXPECT_EQ(rc2, 0);
  ASSERT_EQ(perm.size(), 4u);
  for (auto& r : perm) {
    EXPECT_EQ(r.consumer, "audit");
    EXPECT_EQ(r.topic, "ord.cancelled");
    // The second topic of topics=: index 1 in the id's top bits.
    EXPECT_EQ(r.id >> 56, 1) << r.id;
  }
  dead_letter_query by_key = every_match();
  by_key.key = "k1";
  by_key.topic = "ord.created";
  auto [rc3, k1] = list(by_key);
  EXPECT_EQ(rc3, 0);
  EXPECT_EQ(k1.size(), 2u); // i = 1, 5
  dlq_show_options show;
  show.db = base_;
  show.id = perm.front().id;
  std::ostringstream out, err;
  EXPECT_EQ(dlq_show(show, out, err), 0) << err.str();
  EXPECT_NE(out.str().find("ord.cancelled"), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("inventory down"), std::string::npos) << out.str();
  show.id = 999'999;
  std::ostringstream out2, err2;
  EXPECT_EQ(dlq_show(show, out2, err2), exit_failure);
  EXPECT_NE(err2.str().find("999999"), std::string::npos) << err2.str();
  // The store writes records the readers see, under the id it returned.
  auto store = make_dead_letter_store(base_);
  ASSERT_TRUE(store) << render(store.error());
  auto extra = perm.front();
  extra.key = "written";
  auto id = (*store)->write(extra);
  ASSERT_TRUE(id) << render(id.error());
  auto back = (*store)->get(*id);
  ASSERT_TRUE(back) << render(back.error());
  EXPECT_EQ(back->key, "written");
  EXPECT_EQ(back->id, *id);
  extra.topic = "ord.unknown";
  EXPECT_FALSE((*store)->write(extra)) << "a topic outside topics=";
}

TEST_F(kafka_dlq_cli, replay_republishes_once_and_settles_the_records) {
  dead_letter_n(8, "ord.created", "retries_exhausted", "billing");
  dead_letter_n(3, "ord.cancelled", "permanent", "audit");
  dlq_replay_options opts;
  opts.db = base_;
  opts.target = cluster_->url(kafka_fast_settings);
  opts.query.consumer = "billing";
  opts.yes = true;
  std::istringstream in;
  std::ostringstream out, err;
  ASSERT_EQ(dlq_replay(opts, terminal{}, in, out, err), 0) << err.str();
  // The eight replays arrive on the original topic with fresh attempts, the
  // dead letter's trace and deterministic replay idempotency keys.
  auto got = poll_n(*consumer_, 8);
  ASSERT_EQ(got.size(), 8u);
  std::set<std::string> keys;
  for (auto& m : got) {
    auto e = decode_envelope(m.bytes);
    ASSERT_TRUE(e) << render(e.error());
    EXPECT_EQ(e->topic, "ord.created");
    EXPECT_EQ(e->attempt, 0u);
    EXPECT_EQ(e->idempotency_key.rfind("replay:", 0), 0u) << e->idempotency_key;
    EXPECT_NE(e->traceparent.find("4bf92f3577b34da6a3ce929d0e0e4736"),
              std::string::npos);
    keys.insert(e->idempotency_key);
    ASSERT_FALSE(consumer_->ack(m.tag));
  }
  EXPECT_EQ(keys.size(), 8u);
  // Replayed records left the listing; the other consumer's records stayed.
  auto [rc, left] = list(every_match());
  EXPECT_EQ(rc, 0);
  ASSERT_EQ(left.size(), 3u);
  for (auto& r : left)
    EXPECT_EQ(r.consumer, "audit");
  auto raw = kafka_dead_letters(base_);
  ASSERT_TRUE(raw) << render(raw.error());
  EXPECT_EQ(raw->size(), 3u) << "kafka_dead_letters skips settled records";
  // A second run finds nothing to replay and publishes nothing.
  std::ostringstream out2, err2;
  EXPECT_EQ(dlq_replay(opts, terminal{}, in, out2, err2), 0) << err2.str();
  EXPECT_NE(err2.str().find("nothing to replay"), std::string::npos)
    << err2.str();
  std::vector<raw_message> none;
  auto quiet = std::chrono::steady_clock::now() + 1500ms;
  while (std::chrono::steady_clock::now() < quiet) {
    ASSERT_FALSE(consumer_->poll(16, none));
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_TRUE(none.empty()) << "a second replay published again";
}

TEST_F(kafka_dlq_cli, purge_settles_exactly_what_the_filters_select) {
  dead_letter_n(8, "ord.created", "retries_exhausted", "billing");
  dead_letter_n(4, "ord.cancelled", "permanent", "audit");
  dlq_purge_options opts;
  opts.db = base_;
  opts.query.category = "retries_exhausted";
  opts.query.key = "k2";
  opts.yes = true;
  std::istringstream in;
  std::ostringstream out, err;
  ASSERT_EQ(dlq_purge(opts, terminal{}, in, out, err), 0) << err.str();
  EXPECT_NE(err.str().find("deleted 2, failed 0"), std::string::npos)
    << err.str();
  auto [rc, left] = list(every_match());
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(left.size(), 10u) << "8 + 4 minus the two k2 retries_exhausted";
  for (auto& r : left)
    EXPECT_FALSE(r.key == "k2" && r.category == "retries_exhausted");
  auto raw = kafka_dead_letters(base_);
  ASSERT_TRUE(raw) << render(raw.error());
  EXPECT_EQ(raw->size(), 10u);
  // Without --yes and without a terminal, purge refuses (usage error).
  dlq_purge_options ask = opts;
  ask.yes = false;
  ask.query = every_match();
  std::ostringstream out2, err2;
  EXPECT_EQ(dlq_purge(ask, terminal{}, in, out2, err2), exit_usage);
  EXPECT_EQ(list(every_match()).second.size(), 10u);
}

TEST_F(kafka_dlq_cli, unreachable_bootstrap_and_bad_urls_are_clear_failures) {
  dlq_list_options opts;
  opts.db = "kafka://127.0.0.1:1?topics=ord.created&connect_timeout=500ms";
  std::ostringstream out, err;
  EXPECT_EQ(dlq_list(opts, out, err), exit_failure);
  EXPECT_NE(err.str().find("cannot reach the Kafka bootstrap servers"),
            std::string::npos)
    << err.str();
  // Without plain topics= the store does not know which DLQs to read.
  opts.db = cluster_->url("topics=ord.*");
  std::ostringstream out2, err2;
  EXPECT_EQ(dlq_list(opts, out2, err2), exit_failure);
  EXPECT_NE(err2.str().find("topics="), std::string::npos) << err2.str();
}
