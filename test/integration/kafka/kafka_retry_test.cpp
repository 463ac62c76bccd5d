// Retry topics (issue 4, test 5) with the consumer runtime on kafka://
// against librdkafka's mock cluster: a retry due later than
// `retry_topic_after` leaves the partition through `orders.retry` (the
// runtime calls `transport::defer`), so the partition keeps flowing and
// committing while the failing record's key stays parked. Every wait has a
// deadline.
#include <algorithm>
#include <chrono>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "evmesh/kafka.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/testing.hpp"

#include "kafka_mock.hpp"

using namespace std::chrono_literals;
using evmesh::testing::kafka_fast_settings;
using evmesh::testing::kafka_mock_cluster;
using steady = std::chrono::steady_clock;

namespace {

// One handler run as the handler saw it.
struct run {
  std::string id;
  uint32_t attempt;
  steady::time_point at;
  bool ok;
};

// What the handler does and what it saw (shared with the test thread).
struct journal {
  std::mutex mtx;
  std::vector<run> runs;
  std::string poison;     // fails every attempt
  std::string fails_once; // fails its first attempt only

  std::vector<run> snapshot() {
    std::lock_guard guard{mtx};
    return runs;
  }
};

journal* the_journal = nullptr;

evmesh::outcome handler(evmesh::event_context& ctx) {
  auto& j = *the_journal;
  const auto& id = ctx.message().id;
  bool fail = id == j.poison || (id == j.fails_once && ctx.attempt() == 1);
  {
    std::lock_guard guard{j.mtx};
    j.runs.push_back(run{id, ctx.attempt(), steady::now(), !fail});
  }
  if (fail)
    return evmesh::retry("test failure of " + id);
  return evmesh::ok();
}

// A plain librdkafka producer: records go to a chosen partition.
class raw_producer {
public:
  explicit raw_producer(const std::string& bootstraps) {
    char errstr[512];
    auto* conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "bootstrap.servers", bootstraps.c_str(), errstr,
                      sizeof errstr);
    rd_kafka_conf_set(conf, "log_level", "3", errstr, sizeof errstr);
    rk_ = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (rk_ == nullptr)
      throw std::runtime_error{std::string{"producer: "} + errstr};
  }

  ~raw_producer() {
    rd_kafka_destroy(rk_);
  }

  raw_producer(const raw_producer&) = delete;
  raw_producer& operator=(const raw_producer&) = delete;

  /// Produces `id` with `key` to orders/`partition` (the envelope as value).
  bool send(int32_t partition, const std::string& id, const std::string& key) {
    evmesh::envelope e;
    e.id = id;
    e.topic = "orders";
    e.key = key;
    e.payload = boost::json::object{{"id", id}};
    auto value = evmesh::encode_envelope(e);
    auto err = rd_kafka_producev(rk_, RD_KAFKA_V_TOPIC("orders"),
                                 RD_KAFKA_V_PARTITION(partition),
                                 RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                 RD_KAFKA_V_KEY(key.data(), key.size()),
                                 RD_KAFKA_V_VALUE(value.data(), value.size()),
                                 RD_KAFKA_V_END);
    return err == RD_KAFKA_RESP_ERR_NO_ERROR;
  }

  bool flush() {
    return rd_kafka_flush(rk_, 10000) == RD_KAFKA_RESP_ERR_NO_ERROR;
  }

  /// The high watermark of `topic`/`partition` (-1 on error).
  int64_t end_of(const std::string& topic, int32_t partition) {
    int64_t lo = 0;
    int64_t hi = -1;
    if (rd_kafka_query_watermark_offsets(rk_, topic.c_str(), partition, &lo,
                                         &hi, 5000)
        != RD_KAFKA_RESP_ERR_NO_ERROR)
      return -1;
    return hi;
  }

private:
  rd_kafka_t* rk_ = nullptr;
};

// The group's committed offset of orders/0, read without joining the group.
class committed_reader {
public:
  committed_reader(const std::string& bootstraps, const std::string& group) {
    char errstr[512];
    auto* conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "bootstrap.servers", bootstraps.c_str(), errstr,
                      sizeof errstr);
    rd_kafka_conf_set(conf, "group.id", group.c_str(), errstr, sizeof errstr);
    rd_kafka_conf_set(conf, "log_level", "3", errstr, sizeof errstr);
    rk_ = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);
    if (rk_ == nullptr)
      throw std::runtime_error{std::string{"reader: "} + errstr};
  }

  ~committed_reader() {
    rd_kafka_destroy(rk_);
  }

  committed_reader(const committed_reader&) = delete;
  committed_reader& operator=(const committed_reader&) = delete;

  int64_t offset(const std::string& topic, int32_t partition) {
    auto* list = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(list, topic.c_str(), partition);
    int64_t result = -1;
    if (rd_kafka_committed(rk_, list, 2000) == RD_KAFKA_RESP_ERR_NO_ERROR
        && list->elems[0].err == RD_KAFKA_RESP_ERR_NO_ERROR)
      result = list->elems[0].offset;
    rd_kafka_topic_partition_list_destroy(list);
    return result;
  }

private:
  rd_kafka_t* rk_ = nullptr;
};

evmesh::runtime_config runtime_config(const kafka_mock_cluster& cluster) {
  auto cfg = evmesh::testing::test_config("unused");
  cfg.transport_url
    = cluster.url(std::string{kafka_fast_settings}
                  + "&group=orders-svc&topics=orders&retry_topic_after=500ms"
                    "&commit_interval=50ms");
  cfg.dedupe_url = "none";
  cfg.dead_letter_url = "none"; // orders.dlq keeps the records
  cfg.defaults.max_attempts = 3;
  // Every retry is due 1 s later: past retry_topic_after, so each one goes
  // through orders.retry.
  cfg.defaults.backoff = evmesh::backoff_policy{1s, 1.0, 1s,
                                                evmesh::jitter::none};
  cfg.stop_timeout = 5s;
  return cfg;
}

// Runs of `id`, in handling order.
std::vector<run> runs_of(const std::vector<run>& runs, const std::string& id) {
  std::vector<run> result;
  for (auto& r : runs)
    if (r.id == id)
      result.push_back(r);
  return result;
}

struct fixture {
  kafka_mock_cluster cluster;
  journal j;
  evmesh::handler_descriptor h;

  fixture() {
    evmesh::register_kafka_transport();
    the_journal = &j;
    h.consumer = "orders-svc";
    h.pattern = "orders";
    h.fn = &handler;
  }

  ~fixture() {
    the_journal = nullptr;
  }

  bool create_topics() {
    return cluster.create_topic("orders", 4)
           && cluster.create_topic("orders.retry", 4)
           && cluster.create_topic("orders.dlq", 4);
  }
};

// What `run_key_and_successors` published and what ran.
struct interleaved_run {
  std::vector<std::string> successors;
  std::vector<std::string> others;
  std::vector<run> runs;
};

// Publishes KEY-0, then `n` successors KEY-1..KEY-n of key KEY interleaved
// with OTHER-0..OTHER-(n-1) of key OTHER, all on `partition`; runs a runtime
// until KEY-n ran (at most 60 s) and 1.5 s longer, so a second handling would
// show up, and returns every run.
void run_key_and_successors(fixture& f, raw_producer& producer,
                            int32_t partition, const std::string& key,
                            const std::string& other, size_t n,
                            interleaved_run& out) {
  ASSERT_TRUE(producer.send(partition, key + "-0", key));
  for (size_t i = 0; i < n; ++i) {
    out.others.push_back(other + "-" + std::to_string(i));
    ASSERT_TRUE(producer.send(partition, out.others.back(), other));
    out.successors.push_back(key + "-" + std::to_string(i + 1));
    ASSERT_TRUE(producer.send(partition, out.successors.back(), key));
  }
  ASSERT_TRUE(producer.flush());
  evmesh::consumer_runtime rt{runtime_config(f.cluster)};
  rt.set_handlers({&f.h});
  ASSERT_FALSE(rt.start());
  auto deadline = steady::now() + 60s;
  while (steady::now() < deadline) {
    if (!runs_of(f.j.snapshot(), out.successors.back()).empty())
      break;
    std::this_thread::sleep_for(50ms);
  }
  // A little longer: a second handling would show up now.
  std::this_thread::sleep_for(1500ms);
  rt.stop(10s);
  out.runs = f.j.snapshot();
}

// Issue 4, test 5.
TEST(
  kafka_retry_topic,
  a_poison_record_goes_through_the_retry_topic_to_the_dlq_while_the_rest_flows) {
  fixture f;
  ASSERT_TRUE(f.create_topics());
  f.j.poison = "p-0";
  raw_producer producer{f.cluster.bootstraps()};
  // Partition 0: the poison p-0 at offset 0, then its key's successors
  // p-1..p-3 interleaved with two other keys. Partitions 1-3: other keys.
  std::vector<std::string> others;
  std::vector<std::string> successors{"p-1", "p-2", "p-3"};
  ASSERT_TRUE(producer.send(0, "p-0", "p"));
  for (int n = 0; n < 9; ++n) {
    for (auto key : {"a", "b"}) {
      auto id = std::string{key} + "-" + std::to_string(n);
      ASSERT_TRUE(producer.send(0, id, key));
      others.push_back(id);
    }
    if (n % 3 == 0) {
      ASSERT_TRUE(producer.send(0, successors[n / 3], "p"));
    }
  }
  for (int32_t part = 1; part < 4; ++part)
    for (int n = 0; n < 10; ++n) {
      auto id = "x" + std::to_string(part) + "-" + std::to_string(n);
      ASSERT_TRUE(producer.send(
        part, id, "x" + std::to_string(part) + "-" + std::to_string(n % 3)));
      others.push_back(id);
    }
  ASSERT_TRUE(producer.flush());

  evmesh::consumer_runtime rt{runtime_config(f.cluster)};
  rt.set_handlers({&f.h});
  ASSERT_FALSE(rt.start());
  committed_reader committed{f.cluster.bootstraps(), "orders-svc"};
  auto dlq_url
    = f.cluster.url(std::string{kafka_fast_settings} + "&topics=orders");
  // (when, committed offset of orders/0) while it runs.
  std::vector<std::pair<steady::time_point, int64_t>> commits;
  std::vector<evmesh::dead_letter_record> dead;
  auto deadline = steady::now() + 60s;
  while (steady::now() < deadline) {
    commits.emplace_back(steady::now(), committed.offset("orders", 0));
    auto got = evmesh::kafka_dead_letters(dlq_url);
    ASSERT_TRUE(got) << evmesh::render(got.error());
    auto runs = f.j.snapshot();
    auto all_done
      = std::all_of(successors.begin(), successors.end(),
                    [&](auto& id) { return !runs_of(runs, id).empty(); });
    if (!got->empty() && all_done) {
      dead = std::move(*got);
      break;
    }
    std::this_thread::sleep_for(100ms);
  }
  rt.stop(10s);
  auto runs = f.j.snapshot();
  ASSERT_EQ(dead.size(), 1u) << "the poison record was not dead-lettered "
                                "(exactly once) in time";
  auto& rec = dead.front();
  EXPECT_NE(rec.original.find("\"p-0\""), std::string::npos);
  EXPECT_EQ(rec.category, "retries_exhausted") << rec.reason;
  EXPECT_EQ(rec.attempts, 3u);
  EXPECT_EQ(rec.position, "kafka:orders/0@0")
    << "the dead letter must name the original position";
  // Three runs, attempts 1, 2, 3; the two retries went through the retry
  // topic (a record each in orders.retry/0).
  auto poison = runs_of(runs, "p-0");
  ASSERT_EQ(poison.size(), 3u);
  for (uint32_t i = 0; i < 3; ++i)
    EXPECT_EQ(poison[i].attempt, i + 1);
  EXPECT_EQ(producer.end_of("orders.retry", 0), 2);
  auto last_attempt = poison.back().at;
  // Everything else was handled, once, before the poison's last attempt:
  // other keys of partition 0 and the other partitions kept flowing.
  for (auto& id : others) {
    auto xs = runs_of(runs, id);
    ASSERT_EQ(xs.size(), 1u) << id << " handled " << xs.size() << " times";
    EXPECT_TRUE(xs[0].ok);
    EXPECT_LT(xs[0].at, last_attempt) << id << " waited for the poison record";
  }
  // The poison key's successors came after it, in order, once each.
  auto prev = last_attempt;
  for (auto& id : successors) {
    auto xs = runs_of(runs, id);
    ASSERT_EQ(xs.size(), 1u) << id << " handled " << xs.size() << " times";
    EXPECT_GT(xs[0].at, prev) << id << " overtook its key's earlier record";
    prev = xs[0].at;
  }
  // Partition 0 committed past the poison while it waited in the retry
  // topic (up to its key's first parked successor at offset 3).
  auto moved_on = std::any_of(commits.begin(), commits.end(), [&](auto& c) {
    return c.first < last_attempt && c.second >= 1;
  });
  EXPECT_TRUE(moved_on)
    << "orders/0 did not commit past the poison record while it was retried";
  int64_t while_parked = -1;
  for (auto& [at, off] : commits)
    if (at < last_attempt)
      while_parked = std::max(while_parked, off);
  EXPECT_LE(while_parked, 3)
    << "a parked record's offset was committed before it was handled";
  std::cout << "[ info ] orders/0 committed up to " << while_parked
            << " while the poison record was in the retry topic\n";
}

TEST(kafka_retry_topic,
     a_deferred_record_that_then_succeeds_is_handled_once_and_its_key_follows) {
  fixture f;
  ASSERT_TRUE(f.create_topics());
  f.j.fails_once = "s-0";
  raw_producer producer{f.cluster.bootstraps()};
  interleaved_run r;
  ASSERT_NO_FATAL_FAILURE(
    run_key_and_successors(f, producer, 0, "s", "o", 4, r));
  auto& [successors, others, runs] = r;
  auto first = runs_of(runs, "s-0");
  ASSERT_EQ(first.size(), 2u) << "s-0: one failed run, one successful";
  EXPECT_FALSE(first[0].ok);
  EXPECT_EQ(first[1].attempt, 2u)
    << "the record from the retry topic must carry the attempt count";
  EXPECT_TRUE(first[1].ok);
  EXPECT_GE(first[1].at - first[0].at, 900ms) << "the retry came back early";
  EXPECT_EQ(producer.end_of("orders.retry", 0), 1)
    << "the retry did not go through the retry topic";
  auto prev = first[1].at;
  for (auto& id : successors) {
    auto xs = runs_of(runs, id);
    ASSERT_EQ(xs.size(), 1u) << id << " handled " << xs.size() << " times";
    EXPECT_GT(xs[0].at, prev) << id << " overtook its key's earlier record";
    prev = xs[0].at;
  }
  for (auto& id : others) {
    auto xs = runs_of(runs, id);
    ASSERT_EQ(xs.size(), 1u) << id;
    EXPECT_LT(xs[0].at, first[1].at) << id << " waited for another key";
  }
  auto dlq = evmesh::kafka_dead_letters(
    f.cluster.url(std::string{kafka_fast_settings} + "&topics=orders"));
  ASSERT_TRUE(dlq) << evmesh::render(dlq.error());
  EXPECT_TRUE(dlq->empty());
}

// A deferral the broker refuses: orders.retry has one partition, so the
// retry record for orders/2 cannot be stored (unknown partition). `defer`
// fails, the runtime nacks the delivery (without delay: the source settles a
// failed deferral with nack(0)), and nothing is lost: the record is
// redelivered, runs again with attempt 2 and succeeds, its key's successors
// follow in order, once each, and nothing reaches orders.retry or
// orders.dlq.
TEST(kafka_retry_topic,
     a_deferral_the_broker_refuses_is_retried_in_memory_and_nothing_is_lost) {
  fixture f;
  ASSERT_TRUE(f.cluster.create_topic("orders", 4));
  ASSERT_TRUE(f.cluster.create_topic("orders.retry", 1));
  ASSERT_TRUE(f.cluster.create_topic("orders.dlq", 4));
  f.j.fails_once = "r-0";
  raw_producer producer{f.cluster.bootstraps()};
  interleaved_run r;
  ASSERT_NO_FATAL_FAILURE(
    run_key_and_successors(f, producer, 2, "r", "q", 3, r));
  auto& [successors, others, runs] = r;
  auto first = runs_of(runs, "r-0");
  ASSERT_EQ(first.size(), 2u) << "r-0: one failed run, one successful";
  EXPECT_FALSE(first[0].ok);
  EXPECT_EQ(first[1].attempt, 2u);
  EXPECT_TRUE(first[1].ok);
  EXPECT_EQ(producer.end_of("orders.retry", 0), 0)
    << "nothing can have been stored in the retry topic";
  auto prev = first[1].at;
  for (auto& id : successors) {
    auto xs = runs_of(runs, id);
    ASSERT_EQ(xs.size(), 1u) << id << " handled " << xs.size() << " times";
    EXPECT_TRUE(xs[0].ok);
    EXPECT_GT(xs[0].at, prev) << id << " overtook its key's earlier record";
    prev = xs[0].at;
  }
  for (auto& id : others) {
    auto xs = runs_of(runs, id);
    ASSERT_EQ(xs.size(), 1u) << id;
    EXPECT_TRUE(xs[0].ok);
  }
  auto dlq = evmesh::kafka_dead_letters(
    f.cluster.url(std::string{kafka_fast_settings} + "&topics=orders"));
  ASSERT_TRUE(dlq) << evmesh::render(dlq.error());
  EXPECT_TRUE(dlq->empty());
}

// The parked state lives in the broker: a member that defers a record and
// leaves (with an earlier record still unsettled, so the original's offset
// stays above the committed watermark) hands the partition to a member that
// knows nothing of it. That one skips the deferred original, hands the retry
// record out only when due (delivery_count = attempts + 1), and holds the
// key's later record until the retry record is settled. (The test plays the
// runtime: a key's later record it holds when it defers one goes back as a
// nack right after the deferral, and must then stay parked.)
TEST(kafka_retry_topic, parked_keys_survive_a_move_to_another_member) {
  evmesh::register_kafka_transport();
  kafka_mock_cluster cluster;
  ASSERT_TRUE(cluster.create_topic("orders", 1));
  ASSERT_TRUE(cluster.create_topic("orders.retry", 1));
  raw_producer producer{cluster.bootstraps()};
  ASSERT_TRUE(producer.send(0, "o-0", "o")); // offset 0: left unsettled
  ASSERT_TRUE(producer.send(0, "d-0", "d")); // offset 1: deferred
  ASSERT_TRUE(producer.send(0, "d-1", "d")); // offset 2: parked behind it
  ASSERT_TRUE(producer.flush());
  auto url = cluster.url(std::string{kafka_fast_settings}
                         + "&group=g&topics=orders&retry_topic_after=100ms");
  auto id_of = [](const evmesh::raw_message& m) {
    auto e = evmesh::decode_envelope(m.bytes, {m.subject, m.traceparent,
                                               m.tracestate, m.key});
    return e ? e->id : std::string{"?"};
  };
  constexpr auto delay = 4s;
  steady::time_point due;
  {
    auto a = evmesh::make_transport(url, {{}, "a"});
    ASSERT_TRUE(a) << evmesh::render(a.error());
    ASSERT_FALSE((*a)->subscribe({}));
    std::map<std::string, evmesh::raw_message> got;
    auto deadline = steady::now() + 30s;
    while (got.size() < 2 && steady::now() < deadline) {
      std::vector<evmesh::raw_message> out;
      ASSERT_FALSE((*a)->poll(8, out));
      for (auto& m : out)
        got[id_of(m)] = m;
      std::this_thread::sleep_for(10ms);
    }
    ASSERT_EQ(got.count("o-0"), 1u);
    ASSERT_EQ(got.count("d-0"), 1u);
    due = steady::now() + delay;
    ASSERT_FALSE((*a)->defer(got["d-0"].tag, delay, 1));
    EXPECT_EQ(producer.end_of("orders.retry", 0), 1);
    // d-1, if it went out with d-0 (the runtime keeps a key's records in
    // order), comes back as the runtime hands it back after the deferral.
    if (got.count("d-1") != 0) {
      ASSERT_FALSE((*a)->nack(got["d-1"].tag, caf::timespan{0}));
    }
    // d-1 stays parked here too.
    std::vector<evmesh::raw_message> out;
    ASSERT_FALSE((*a)->poll(8, out));
    EXPECT_TRUE(out.empty());
    EXPECT_FALSE((*a)->close()); // o-0 unsettled: the watermark stays at 0
  }
  auto b = evmesh::make_transport(url, {{}, "b"});
  ASSERT_TRUE(b) << evmesh::render(b.error());
  ASSERT_FALSE((*b)->subscribe({}));
  struct seen {
    std::string id;
    uint32_t count;
    std::string position;
    steady::time_point at;
  };
  std::vector<seen> log;
  std::optional<steady::time_point> retry_acked;
  auto deadline = steady::now() + 40s;
  while (steady::now() < deadline
         && !std::any_of(log.begin(), log.end(),
                         [](auto& x) { return x.id == "d-1"; })) {
    std::vector<evmesh::raw_message> out;
    ASSERT_FALSE((*b)->poll(8, out));
    for (auto& m : out) {
      log.push_back({id_of(m), m.delivery_count, m.position, steady::now()});
      EXPECT_FALSE((*b)->ack(m.tag));
      if (log.back().id == "d-0")
        retry_acked = steady::now();
    }
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_FALSE((*b)->close());
  std::vector<seen> d0;
  std::optional<seen> d1;
  for (auto& x : log) {
    if (x.id == "d-0")
      d0.push_back(x);
    if (x.id == "d-1")
      d1 = x;
  }
  std::string shown;
  for (auto& x : log)
    shown += x.id + " count " + std::to_string(x.count) + " at " + x.position
             + "\n";
  ASSERT_EQ(d0.size(), 1u)
    << "the deferred original must come back once, from the retry topic:\n"
    << shown;
  EXPECT_EQ(d0[0].count, 2u) << "attempts + 1";
  EXPECT_EQ(d0[0].position, "kafka:orders/0@1");
  EXPECT_GE(d0[0].at, due) << "the retry record went out before it was due";
  ASSERT_TRUE(d1) << "d-1 was never handed out";
  ASSERT_TRUE(retry_acked);
  EXPECT_GE(d1->at, *retry_acked) << "d-1 overtook its key's retry record";
  EXPECT_TRUE(
    std::any_of(log.begin(), log.end(), [](auto& x) { return x.id == "o-0"; }))
    << "the unsettled o-0 was not redelivered";
}

} // namespace
