// The mesh on a real nats-server (JetStream): the factory's errors at start,
// a poison message in the DLQ stream while other keys keep their order, and a
// server restart mid-stream that loses nothing. Every wait has a deadline;
// every server is stopped by its fixture.
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/error.hpp"
#include "evmesh/nats.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/testing.hpp"

#include "nats_server.hpp"

using namespace evmesh;
using namespace std::chrono_literals;
using evmesh::testing::nats_server;

namespace {

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

class nats_runtime : public ::testing::Test {
protected:
  void SetUp() override {
    if (!nats_server::available())
      GTEST_SKIP() << "nats-server is not installed (apt-get install "
                      "nats-server, or scripts/install-deps.sh "
                      "--with-servers)";
    register_nats_transport();
    server_ = std::make_unique<nats_server>();
    j.reset();
  }

  // A URL on this test's server for stream ORDERS (subjects order.>).
  std::string url(const std::string& extra = "") const {
    return server_->url() + "?stream=ORDERS&durable=orders-svc&subjects=order.>"
           + extra;
  }

  runtime_config config() const {
    auto cfg = evmesh::testing::test_config("unused");
    cfg.transport_url = url();
    cfg.dedupe_url = "memory://";
    cfg.poll_idle = 5ms;
    return cfg;
  }

  std::unique_ptr<nats_server> server_;
};

transport_environment env() {
  return {{}, "test-node"};
}

} // namespace

// -- errors at start -----------------------------------------------------------

TEST_F(nats_runtime, unreachable_server_is_a_clear_error_not_a_hang) {
  auto port = server_->port();
  server_->kill();
  auto start = std::chrono::steady_clock::now();
  auto t = make_transport("nats://127.0.0.1:" + std::to_string(port)
                            + "?stream=S&durable=d&connect_timeout=1s",
                          env());
  ASSERT_FALSE(t);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  auto text = render(t.error());
  EXPECT_NE(text.find("cannot connect to nats://127.0.0.1:"), std::string::npos)
    << text;
  EXPECT_NE(text.find("is nats-server running"), std::string::npos) << text;
}

TEST_F(nats_runtime, bad_urls_name_the_problem) {
  for (auto bad :
       {"nats://127.0.0.1:1?durable=d", // no stream
        "nats://127.0.0.1:1?stream=S&bogus=1",
        "nats://127.0.0.1:1?stream=S&fetch=x",
        "nats://127.0.0.1:1?stream=S&fetch=2000&max_ack_pending=1000",
        "nats://127.0.0.1:1?stream=S&subjects=a.>&dlq=a.dlq"}) {
    auto t = make_transport(bad, env());
    ASSERT_FALSE(t) << bad;
    EXPECT_EQ(t.error(), make_error(errc::invalid_url, "")) << bad;
    EXPECT_NE(render(t.error()).find("bad NATS URL"), std::string::npos)
      << render(t.error());
  }
}

TEST_F(nats_runtime, unknown_stream_without_create_is_a_clear_error) {
  auto t = make_transport(server_->url() + "?stream=NOPE&create=false", env());
  ASSERT_FALSE(t);
  auto text = render(t.error());
  EXPECT_NE(text.find("stream 'NOPE' does not exist"), std::string::npos)
    << text;
  auto u = make_transport(server_->url() + "?stream=NOPE", env());
  ASSERT_FALSE(u) << "no subjects: cannot create";
  EXPECT_NE(render(u.error()).find("subjects="), std::string::npos)
    << render(u.error());
}

TEST(nats_runtime_auth, wrong_password_is_an_authentication_error) {
  if (!nats_server::available())
    GTEST_SKIP() << "nats-server is not installed";
  register_nats_transport();
  nats_server server{{"--user", "evmesh", "--pass", "s3cret"}};
  auto base = "127.0.0.1:" + std::to_string(server.port()) + "?stream=A"
              + "&subjects=a.>&connect_timeout=1s";
  auto bad = make_transport("nats://evmesh:wrong@" + base, env());
  ASSERT_FALSE(bad);
  auto text = render(bad.error());
  EXPECT_NE(text.find("authentication failed"), std::string::npos) << text;
  EXPECT_EQ(text.find("wrong"), std::string::npos) << "password leaked";
  auto good = make_transport("nats://evmesh:s3cret@" + base, env());
  EXPECT_TRUE(good) << render(good.error());
}

// -- issue 3, test 5: a poison message ------------------------------------------

TEST_F(nats_runtime,
       poison_message_lands_in_the_dlq_stream_while_other_keys_keep_order) {
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
  auto records = nats_dead_letters(url());
  ASSERT_TRUE(records) << render(records.error());
  ASSERT_EQ(records->size(), 1u);
  auto& rec = records->front();
  EXPECT_EQ(rec.category, "retries_exhausted");
  EXPECT_EQ(rec.attempts, 4u);
  EXPECT_EQ(rec.topic, "order.bad");
  EXPECT_EQ(rec.key, "poison");
  EXPECT_EQ(rec.transport, "nats");
  EXPECT_EQ(rec.position.rfind("nats:ORDERS#", 0), 0u) << rec.position;
  EXPECT_LE(rec.errors.size(), 5u);
  EXPECT_FALSE(rec.errors.empty());
  auto original = decode_envelope(rec.original, {});
  ASSERT_TRUE(original) << rec.original;
  EXPECT_EQ(original->id, "poison-0");
  // Nothing is redelivered later: a second runtime on the durable is idle.
  j.reset();
  consumer_runtime again{cfg};
  again.set_handlers({&h});
  ASSERT_FALSE(again.start());
  std::this_thread::sleep_for(500ms);
  EXPECT_EQ(again.stats().received, 0u);
  again.stop(5s);
}

// -- issue 3, test 3: nats-server restarted mid-stream --------------------------

TEST_F(nats_runtime, server_restart_mid_stream_loses_nothing) {
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
  cfg.max_in_flight = 128; // most of the stream stays on the server
  cfg.poll_batch = 64;
  // Publish everything first, so the restart hits the middle of the stream.
  constexpr int count = 2000;
  {
    auto producer = make_transport(url(), env());
    ASSERT_TRUE(producer) << render(producer.error());
    for (int i = 0; i < count; ++i)
      ASSERT_FALSE((*producer)->publish(
        make_env("order.confirmed", "m-" + std::to_string(i), "", i)));
  }
  consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  ASSERT_FALSE(rt.start());
  ASSERT_TRUE(wait_for([] { return j.handled_count() >= 100; }));
  server_->kill();
  std::this_thread::sleep_for(1s);
  auto during = j.handled_count();
  EXPECT_EQ(rt.health(), health_status::disconnected);
  server_->start();
  ASSERT_TRUE(wait_for([] { return j.handled_count() == size_t{count}; }, 60s))
    << j.handled_count() << " of " << count << " handled (" << during
    << " when the server came back)";
  EXPECT_GT(during, 0u);
  EXPECT_LT(during, size_t{count}) << "the restart did not hit mid-stream";
  EXPECT_TRUE(
    wait_for([&] { return rt.health() == health_status::healthy; }, 10s));
  rt.stop(5s);
  EXPECT_EQ(rt.stats().dead_lettered, 0u);
  std::cout << "[ info ] handled " << count << " messages with "
            << j.ok_runs.load() - count << " redeliveries across the restart\n";
}
