// The mesh on a real rabbitmq-server: the factory's errors at start, the
// topology (retry queue, DLQ), AMQP properties, a poison message in the DLQ
// queue while other keys keep their order, and a broker restart mid-stream
// that loses nothing. One broker serves the whole binary (booting takes
// seconds); every test uses its own queues. Every wait has a deadline.
#include <atomic>
#include <chrono>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/amqp.hpp"
#include "evmesh/error.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/testing.hpp"

#include "rabbitmq_server.hpp"

using namespace evmesh;
using namespace std::chrono_literals;
using evmesh::testing::rabbitmq_server;

namespace {

rabbitmq_server& server() {
  static auto instance = std::make_unique<rabbitmq_server>();
  return *instance;
}

template <class Pred>
bool wait_for(Pred pred, caf::timespan limit = 30s) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline)
      return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

// Polls `t` until `n` messages arrived or `limit` passed.
std::vector<raw_message> poll_until(transport& t, size_t n,
                                    caf::timespan limit) {
  std::vector<raw_message> out;
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (out.size() < n && std::chrono::steady_clock::now() < deadline) {
    auto before = out.size();
    if (auto err = t.poll(n - out.size(), out))
      ADD_FAILURE() << render(err);
    if (out.size() == before)
      std::this_thread::sleep_for(5ms);
  }
  return out;
}

envelope make_env(std::string topic, std::string id, std::string key,
                  int64_t n) {
  envelope e;
  e.topic = std::move(topic);
  e.id = id;
  e.idempotency_key = std::move(id);
  e.key = std::move(key);
  e.payload = boost::json::object{{"n", n}};
  return e;
}

transport_environment env() {
  return {{}, "test-node"};
}

// What the handlers saw, shared with captureless handler functions.
struct journal {
  std::mutex mtx;
  std::map<std::string, std::vector<int64_t>> by_key; // successful runs
  std::set<std::string> handled;                      // ids
  std::atomic<int> poison_runs{0};
  std::atomic<int> ok_runs{0};

  void reset() {
    std::lock_guard guard{mtx};
    by_key.clear();
    handled.clear();
    poison_runs = 0;
    ok_runs = 0;
  }

  size_t handled_count() {
    std::lock_guard guard{mtx};
    return handled.size();
  }
};

journal j;

outcome record_ok(event_context& ctx) {
  auto& env = ctx.message();
  std::lock_guard guard{j.mtx};
  auto& obj = env.payload.as_object();
  j.by_key[env.key].push_back(obj.at("n").as_int64());
  j.handled.insert(env.id);
  ++j.ok_runs;
  return ok();
}

class amqp_runtime : public ::testing::Test {
protected:
  void SetUp() override {
    if (!rabbitmq_server::available())
      GTEST_SKIP() << "rabbitmq-server is not installed (apt-get install "
                      "rabbitmq-server, or scripts/install-deps.sh "
                      "--with-servers)";
    register_amqp_transport();
    j.reset();
    queue_ = "q" + std::to_string(++instances);
  }

  // A URL on the shared broker for this test's queue.
  std::string url(const std::string& extra = "") const {
    return server().url() + "?queue=" + queue_ + extra;
  }

  runtime_config config() const {
    auto cfg = evmesh::testing::test_config("unused");
    cfg.transport_url = url();
    cfg.dedupe_url = "memory://";
    cfg.dead_letter_url = "none"; // the broker's DLQ queue keeps the records
    cfg.poll_idle = 5ms;
    return cfg;
  }

  static inline std::atomic<int> instances = 0;
  std::string queue_;
};

} // namespace

// -- errors at start -----------------------------------------------------------

TEST_F(amqp_runtime, unreachable_broker_is_a_clear_error_not_a_hang) {
  // A port nothing listens on: bind, read the number, close.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), len), 0);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  close(fd);
  auto port = ntohs(addr.sin_port);
  auto start = std::chrono::steady_clock::now();
  auto t = make_transport("amqp://u:secret@127.0.0.1:" + std::to_string(port)
                            + "/?queue=q&connect_timeout=1s",
                          env());
  ASSERT_FALSE(t);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  auto text = render(t.error());
  EXPECT_NE(text.find("cannot connect to amqp://u:***@127.0.0.1:"),
            std::string::npos)
    << text;
  EXPECT_NE(text.find("is rabbitmq-server running"), std::string::npos) << text;
  EXPECT_EQ(text.find("secret"), std::string::npos) << "password leaked";
}

TEST_F(amqp_runtime, bad_credentials_are_an_authentication_error) {
  auto bad = make_transport("amqp://guest:wrong@127.0.0.1:"
                              + std::to_string(server().port()) + "/?queue=q",
                            env());
  ASSERT_FALSE(bad);
  auto text = render(bad.error());
  EXPECT_NE(text.find("authentication failed for user 'guest'"),
            std::string::npos)
    << text;
  EXPECT_EQ(text.find("wrong"), std::string::npos) << "password leaked";
  auto good = make_transport(url(), env());
  EXPECT_TRUE(good) << render(good.error());
}

TEST_F(amqp_runtime, unknown_vhost_is_a_clear_error) {
  auto t = make_transport("amqp://guest:guest@127.0.0.1:"
                            + std::to_string(server().port()) + "/nope?queue=q",
                          env());
  ASSERT_FALSE(t);
  auto text = render(t.error());
  EXPECT_NE(text.find("vhost 'nope' does not exist"), std::string::npos)
    << text;
}

TEST_F(amqp_runtime, missing_queue_without_create_is_a_clear_error) {
  auto t = make_transport(url("&create=false"), env());
  ASSERT_TRUE(t) << render(t.error());
  auto err = (*t)->subscribe({"order.*"});
  ASSERT_TRUE(err);
  auto text = render(err);
  EXPECT_NE(text.find("queue '" + queue_ + "' does not exist"),
            std::string::npos)
    << text;
  EXPECT_NE(text.find("create=false"), std::string::npos) << text;
  EXPECT_FALSE((*t)->close());
  // The runtime refuses to start on it, naming the queue.
  auto cfg = config();
  cfg.transport_url = url("&create=false");
  handler_descriptor h;
  h.consumer = "orders";
  h.pattern = "order.*";
  h.fn = record_ok;
  consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  auto start_err = rt.start();
  ASSERT_TRUE(start_err);
  EXPECT_NE(render(start_err).find(queue_), std::string::npos)
    << render(start_err);
}

TEST_F(amqp_runtime, bad_urls_name_the_problem) {
  for (auto bad :
       {"amqp://127.0.0.1:1/?queue=q&bogus=1",
        "amqp://127.0.0.1:1/?queue=q&prefetch=0",
        "amqp://127.0.0.1:1/?queue=q&prefetch=x",
        "amqp://127.0.0.1:99999/?queue=q",
        "amqp://127.0.0.1:1/?queue=q&format=xml",
        "amqp://127.0.0.1:1/?queue=amq.q", "amqps://127.0.0.1:1/?queue=q"}) {
    auto t = make_transport(bad, env());
    ASSERT_FALSE(t) << bad;
    EXPECT_EQ(t.error(), make_error(errc::invalid_url, "")) << bad;
    EXPECT_NE(render(t.error()).find("bad AMQP URL"), std::string::npos)
      << render(t.error());
  }
}

TEST_F(amqp_runtime, publish_without_a_bound_queue_is_an_error_not_a_loss) {
  auto p = make_transport(url(), env());
  ASSERT_TRUE(p) << render(p.error());
  auto err = (*p)->publish(make_env("nobody.listens", "x", "", 1));
  ASSERT_TRUE(err) << "an unroutable publish was confirmed as success";
  EXPECT_NE(render(err).find("no queue is bound for routing key "
                             "'nobody.listens'"),
            std::string::npos)
    << render(err);
}

// -- topology and properties ---------------------------------------------------

TEST_F(amqp_runtime, delayed_nacks_go_through_the_retry_queue_and_count) {
  auto c = make_transport(url(), env());
  ASSERT_TRUE(c) << render(c.error());
  ASSERT_FALSE((*c)->subscribe({"retry.>"}));
  ASSERT_FALSE((*c)->publish(make_env("retry.me", "r-1", "k", 1)));
  std::vector<uint32_t> counts;
  for (int round = 0; round < 3; ++round) {
    auto got = poll_until(**c, 1, 5s);
    ASSERT_EQ(got.size(), 1u) << "round " << round;
    auto& msg = got.front();
    counts.push_back(msg.delivery_count);
    EXPECT_EQ(msg.subject, "retry.me") << "the retry queue kept the subject";
    EXPECT_EQ(msg.key, "k");
    ASSERT_FALSE((*c)->nack(msg.tag, 200ms));
  }
  auto last = poll_until(**c, 1, 5s);
  ASSERT_EQ(last.size(), 1u);
  counts.push_back(last.front().delivery_count);
  EXPECT_EQ(counts, (std::vector<uint32_t>{1, 2, 3, 4}))
    << "x-death counts of the retry queue make the delivery count";
  auto env2 = decode_envelope(last.front().bytes, {});
  ASSERT_TRUE(env2);
  EXPECT_EQ(env2->id, "r-1");
  ASSERT_FALSE((*c)->ack(last.front().tag));
  EXPECT_TRUE(poll_until(**c, 1, 500ms).empty());
  EXPECT_FALSE((*c)->close());
}

TEST_F(amqp_runtime, quorum_queues_count_redeliveries_across_consumers) {
  // x-delivery-count survives a consumer that dies holding the message: the
  // count a crash loop is caught by.
  auto u = url("&queue_type=quorum");
  auto a = make_transport(u, env());
  ASSERT_TRUE(a) << render(a.error());
  ASSERT_FALSE((*a)->subscribe({"quorum.*"}));
  ASSERT_FALSE((*a)->publish(make_env("quorum.q", "q-1", "", 1)));
  std::vector<uint32_t> counts;
  for (int round = 0; round < 2; ++round) {
    auto got = poll_until(**a, 1, 5s);
    ASSERT_EQ(got.size(), 1u) << "round " << round;
    counts.push_back(got.front().delivery_count);
    ASSERT_FALSE((*a)->nack(got.front().tag, caf::timespan{0}));
  }
  auto held = poll_until(**a, 1, 5s);
  ASSERT_EQ(held.size(), 1u);
  counts.push_back(held.front().delivery_count);
  EXPECT_FALSE((*a)->close()); // unacked: back to the queue
  auto b = make_transport(u, env());
  ASSERT_TRUE(b) << render(b.error());
  ASSERT_FALSE((*b)->subscribe({"quorum.*"}));
  auto again = poll_until(**b, 1, 5s);
  ASSERT_EQ(again.size(), 1u);
  counts.push_back(again.front().delivery_count);
  EXPECT_EQ(counts, (std::vector<uint32_t>{1, 2, 3, 4}));
  ASSERT_FALSE((*b)->ack(again.front().tag));
  EXPECT_FALSE((*b)->close());
}

TEST_F(amqp_runtime, envelope_headers_travel_as_amqp_properties) {
  auto c = make_transport(url(), env());
  ASSERT_TRUE(c) << render(c.error());
  ASSERT_FALSE((*c)->subscribe({"props.*"}));
  auto e = make_env("props.set", "p-1", "key-1", 1);
  e.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  e.headers["correlation_id"] = "corr-7";
  e.headers["tenant-region"] = "eu";
  ASSERT_FALSE((*c)->publish(e));
  auto got = poll_until(**c, 1, 5s);
  ASSERT_EQ(got.size(), 1u);
  auto& msg = got.front();
  EXPECT_EQ(msg.traceparent, e.traceparent);
  EXPECT_EQ(msg.key, "key-1");
  EXPECT_EQ(msg.bytes, encode_envelope(e)) << "evmesh's own bytes verbatim";
  ASSERT_FALSE((*c)->ack(msg.tag));
  EXPECT_FALSE((*c)->close());
}

TEST_F(amqp_runtime, an_idle_connection_stays_up_on_heartbeats) {
  // heartbeat=1s: the broker closes a connection silent for two of them, so
  // a consumer that only waits must still send heartbeats.
  auto c = make_transport(url("&heartbeat=1s"), env());
  ASSERT_TRUE(c) << render(c.error());
  ASSERT_FALSE((*c)->subscribe({"idle.*"}));
  auto until = std::chrono::steady_clock::now() + 4s;
  bool always_up = true;
  while (std::chrono::steady_clock::now() < until) {
    std::vector<raw_message> out;
    EXPECT_FALSE((*c)->poll(16, out));
    EXPECT_TRUE(out.empty());
    always_up = always_up && (*c)->connected();
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_TRUE(always_up) << "the connection dropped while idle";
  ASSERT_FALSE((*c)->publish(make_env("idle.done", "i-1", "", 1)));
  auto got = poll_until(**c, 1, 5s);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got.front().delivery_count, 1u) << "no reconnect redelivered it";
  ASSERT_FALSE((*c)->ack(got.front().tag));
  EXPECT_FALSE((*c)->close());
}

// -- issue 5, test 4: a poison message ------------------------------------------

TEST_F(amqp_runtime,
       poison_message_lands_in_the_dlq_queue_while_other_keys_keep_order) {
  handler_descriptor h;
  h.consumer = "orders";
  h.pattern = "order.*";
  h.fn = [](event_context& ctx) -> outcome {
    if (ctx.message().key == "poison" && ctx.message().id == "poison-0") {
      ++j.poison_runs;
      return retry("always fails: attempt " + std::to_string(ctx.attempt()));
    }
    return record_ok(ctx);
  };
  h.options.max_attempts = 4;
  auto cfg = config();
  cfg.defaults.backoff.initial = 50ms;
  cfg.defaults.backoff.max = 200ms;
  consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  ASSERT_FALSE(rt.start());
  constexpr int per_key = 50;
  // The poison message first, a successor on its key, then other keys.
  ASSERT_FALSE(rt.publish(make_env("order.bad", "poison-0", "poison", 0)));
  ASSERT_FALSE(rt.publish(make_env("order.bad", "poison-1", "poison", 1)));
  for (int i = 0; i < per_key; ++i)
    for (auto key : {"k0", "k1", "k2", "k3"})
      ASSERT_FALSE(rt.publish(
        make_env("order.confirmed", std::string{key} + "-" + std::to_string(i),
                 key, i)));
  auto expected = size_t{4 * per_key + 1};
  ASSERT_TRUE(wait_for([&] { return j.handled_count() == expected; }))
    << j.handled_count() << " of " << expected << " handled";
  ASSERT_TRUE(wait_for([&] { return rt.stats().dead_lettered == 1u; }));
  rt.stop(5s);
  EXPECT_EQ(j.poison_runs.load(), 4) << "max_attempts executions";
  {
    std::lock_guard guard{j.mtx};
    for (auto key : {"k0", "k1", "k2", "k3"}) {
      auto& seen = j.by_key[key];
      ASSERT_EQ(seen.size(), size_t{per_key}) << key;
      for (int i = 0; i < per_key; ++i)
        EXPECT_EQ(seen[i], i) << key << " out of order";
    }
    // The successor on the poison key ran only after the poison was gone.
    EXPECT_EQ(j.by_key["poison"], std::vector<int64_t>{1});
  }
  auto records = amqp_dead_letters(url());
  ASSERT_TRUE(records) << render(records.error());
  ASSERT_EQ(records->size(), 1u);
  auto& rec = records->front();
  EXPECT_EQ(rec.category, "retries_exhausted");
  EXPECT_EQ(rec.attempts, 4u);
  EXPECT_EQ(rec.topic, "order.bad");
  EXPECT_EQ(rec.key, "poison");
  EXPECT_EQ(rec.transport, "amqp");
  EXPECT_EQ(rec.position.rfind("amqp:" + queue_ + "#", 0), 0u) << rec.position;
  EXPECT_LE(rec.errors.size(), 5u);
  EXPECT_FALSE(rec.errors.empty());
  auto original = decode_envelope(rec.original, {});
  ASSERT_TRUE(original) << rec.original;
  EXPECT_EQ(original->id, "poison-0");
  // Reading the DLQ does not consume it.
  auto again_records = amqp_dead_letters(url());
  ASSERT_TRUE(again_records);
  EXPECT_EQ(again_records->size(), 1u);
  // Nothing is redelivered later: a second runtime on the queue is idle.
  j.reset();
  consumer_runtime again{cfg};
  again.set_handlers({&h});
  ASSERT_FALSE(again.start());
  std::this_thread::sleep_for(500ms);
  EXPECT_EQ(again.stats().received, 0u);
  again.stop(5s);
}

// -- issue 5, test 3: the broker restarted mid-stream ---------------------------

TEST_F(amqp_runtime, broker_restart_mid_stream_loses_nothing) {
  handler_descriptor h;
  h.consumer = "orders";
  h.pattern = "order.*";
  h.fn = [](event_context& ctx) -> outcome {
    std::this_thread::sleep_for(2ms); // keep the stream busy for a while
    return record_ok(ctx);
  };
  h.options.execution = execution::blocking;
  h.options.ordering = ordering::none;
  h.options.concurrency = 2;
  auto cfg = config();
  cfg.dedupe_url = "none"; // count redeliveries, do not hide them
  cfg.max_in_flight = 128;
  cfg.poll_batch = 64;
  cfg.transport_url = url("&prefetch=64");
  constexpr int count = 2000;
  // Declare the queue and its bindings first (a consumer that closes), then
  // publish everything, so the restart hits the middle of the stream.
  {
    auto setup = make_transport(url(), env());
    ASSERT_TRUE(setup) << render(setup.error());
    ASSERT_FALSE((*setup)->subscribe({"order.*"}));
    for (int i = 0; i < count; ++i)
      ASSERT_FALSE((*setup)->publish(
        make_env("order.confirmed", "m-" + std::to_string(i), "", i)));
    ASSERT_FALSE((*setup)->close());
  }
  consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  ASSERT_FALSE(rt.start());
  ASSERT_TRUE(wait_for([] { return j.handled_count() >= 100; }));
  server().kill();
  std::this_thread::sleep_for(1s);
  auto during = j.handled_count();
  EXPECT_EQ(rt.health(), health_status::disconnected);
  server().start();
  ASSERT_TRUE(wait_for([] { return j.handled_count() == size_t{count}; }, 90s))
    << j.handled_count() << " of " << count << " handled (" << during
    << " when the broker came back)";
  EXPECT_GT(during, 0u);
  EXPECT_LT(during, size_t{count}) << "the restart did not hit mid-stream";
  EXPECT_TRUE(
    wait_for([&] { return rt.health() == health_status::healthy; }, 10s));
  rt.stop(5s);
  EXPECT_EQ(rt.stats().dead_lettered, 0u);
  std::cout << "[ info ] handled " << count << " messages with "
            << j.ok_runs.load() - count << " redeliveries across the restart\n";
}
