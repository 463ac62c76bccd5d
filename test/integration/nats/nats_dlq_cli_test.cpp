// Issue 7 on a broker DLQ: `evmesh dlq list|show|replay|purge` with
// `--db nats://…?stream=S` read and change the DLQ stream the NATS transport
// writes. Dead letters are made the way the runtime makes them: messages
// consumed from the stream, `dead_letter` (publish confirmed), then `ack`.
#include <chrono>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/envelope.hpp"
#include "evmesh/error.hpp"
#include "evmesh/nats.hpp"
#include "evmesh/transport.hpp"

#include "../dlq_cli_support.hpp"
#include "nats_server.hpp"
#include "ops.hpp"

using namespace evmesh;
using namespace evmesh::cli;
using namespace std::chrono_literals;
using evmesh::testing::nats_server;

namespace {

transport_environment env() {
  return {{}, "dlq-cli-node"};
}

/// Polls `t` until `n` messages arrived or 10 s passed.
std::vector<raw_message> poll_n(transport& t, size_t n) {
  return evmesh::testing::poll_n(t, n, 10s);
}

class nats_dlq_cli : public ::testing::Test {
protected:
  void SetUp() override {
    if (!nats_server::available())
      GTEST_SKIP() << "nats-server is not installed (apt-get install "
                      "nats-server, or scripts/install-deps.sh "
                      "--with-servers)";
    register_broker_schemes();
    server_ = std::make_unique<nats_server>();
    base_ = server_->url() + "?stream=ORD&subjects=ord.>";
    auto c = make_transport(base_ + "&durable=billing", env());
    ASSERT_TRUE(c) << render(c.error());
    consumer_ = std::move(*c);
    ASSERT_FALSE(consumer_->subscribe({"ord.>"}));
  }

  void TearDown() override {
    if (consumer_)
      consumer_->close();
  }

  /// Publishes `n` envelopes on `topic` and dead-letters each as `category`
  /// from consumer `who`, like the runtime: dead_letter, then ack.
  void dead_letter_n(int n, const std::string& topic,
                     const std::string& category, const std::string& who) {
    evmesh::testing::dead_letter_n(*consumer_, n, topic, category, who, "nats",
                                   10s);
  }

  /// `dlq list --json` with `q`: the records' ids and the exit code.
  std::pair<int, std::vector<dead_letter_record>>
  list(const dead_letter_query& q) {
    auto listing = evmesh::testing::list_dlq(base_, q);
    return {listing.rc, std::move(listing.records)};
  }

  std::unique_ptr<nats_server> server_;
  std::string base_;
  transport_ptr consumer_;
};

} // namespace

TEST_F(nats_dlq_cli, list_and_show_read_the_dlq_stream_with_filters) {
  dead_letter_n(6, "ord.created", "retries_exhausted", "billing");
  dead_letter_n(4, "ord.cancelled", "permanent", "audit");
  auto [rc, all] = list(every_match());
  EXPECT_EQ(rc, 0);
  ASSERT_EQ(all.size(), 10u);
  for (size_t i = 1; i < all.size(); ++i)
    EXPECT_GT(all[i - 1].id, all[i].id) << "newest first";
  dead_letter_query by_category = every_match();
  by_category.category = "permanent";
  auto [rc2, perm] = list(by_category);
  EXPECT_EQ(rc2, 0);
  ASSERT_EQ(perm.size(), 4u);
  for (auto& r : perm) {
    EXPECT_EQ(r.consumer, "audit");
    EXPECT_EQ(r.topic, "ord.cancelled");
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
}

TEST_F(nats_dlq_cli, replay_republishes_once_and_moves_records_out) {
  dead_letter_n(8, "ord.created", "retries_exhausted", "billing");
  dead_letter_n(3, "ord.cancelled", "permanent", "audit");
  dlq_replay_options opts;
  opts.db = base_;
  opts.target = base_;
  opts.query.consumer = "billing";
  opts.yes = true;
  std::istringstream in;
  std::ostringstream out, err;
  ASSERT_EQ(dlq_replay(opts, terminal{}, in, out, err), 0) << err.str();
  // The eight replays arrive on the original topic with fresh attempts, the
  // dead-letter span as parent and deterministic replay idempotency keys.
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
              std::string::npos)
      << "the replay continues the dead letter's trace";
    keys.insert(e->idempotency_key);
    ASSERT_FALSE(consumer_->ack(m.tag));
  }
  EXPECT_EQ(keys.size(), 8u);
  // Replayed records left the DLQ; the other consumer's records stayed.
  auto [rc, left] = list(every_match());
  EXPECT_EQ(rc, 0);
  ASSERT_EQ(left.size(), 3u);
  for (auto& r : left)
    EXPECT_EQ(r.consumer, "audit");
  // A second run finds nothing to replay and publishes nothing.
  std::ostringstream out2, err2;
  EXPECT_EQ(dlq_replay(opts, terminal{}, in, out2, err2), 0) << err2.str();
  std::vector<raw_message> none;
  auto quiet = std::chrono::steady_clock::now() + 500ms;
  while (std::chrono::steady_clock::now() < quiet) {
    ASSERT_FALSE(consumer_->poll(16, none));
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_TRUE(none.empty()) << "a second replay published again";
}

TEST_F(nats_dlq_cli, purge_deletes_exactly_what_the_filters_select) {
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
  auto [rc, left] = list(every_match());
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(left.size(), 10u) << "8 + 4 minus the two k2 retries_exhausted";
  for (auto& r : left)
    EXPECT_FALSE(r.key == "k2" && r.category == "retries_exhausted");
  // Without --yes and without a terminal, purge refuses (usage error).
  dlq_purge_options ask = opts;
  ask.yes = false;
  ask.query = every_match();
  std::ostringstream out2, err2;
  EXPECT_EQ(dlq_purge(ask, terminal{}, in, out2, err2), exit_usage);
  EXPECT_EQ(list(every_match()).second.size(), 10u);
}

TEST_F(nats_dlq_cli, unreachable_broker_is_a_clear_failure) {
  dlq_list_options opts;
  opts.db = "nats://127.0.0.1:1?stream=ORD&connect_timeout=500ms";
  std::ostringstream out, err;
  EXPECT_EQ(dlq_list(opts, out, err), exit_failure);
  EXPECT_NE(err.str().find("cannot connect"), std::string::npos) << err.str();
}
