// The runtime's batched claims on a real redis-server: a function lane claims
// the keys of its whole batch in one pipelined write and commits them in
// another before the results go back. Checks that every message runs once,
// is committed before it is acked, that redeliveries are answered from the
// commits, and that a timeout in the middle of a batch neither re-runs the
// attempts that finished nor loses the ones that never ran.
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "evmesh/consumer.hpp"
#include "evmesh/redis_store.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/testing.hpp"

#include "../nats/redis_server.hpp"

using namespace evmesh;
using namespace std::chrono_literals;

namespace {

template <class Pred>
bool wait_for(Pred pred, std::chrono::seconds limit = 20s) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline)
      return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

/// Counts handler runs per message id; `blocked` blocks on its first run
/// until the test releases it (bounded wait).
struct gate {
  std::mutex mtx;
  std::condition_variable cv;
  std::map<std::string, int> runs;
  std::string blocked;
  bool released = false;

  void release() {
    {
      std::lock_guard guard{mtx};
      released = true;
    }
    cv.notify_all();
  }

  int runs_of(const std::string& id) {
    std::lock_guard guard{mtx};
    auto it = runs.find(id);
    return it == runs.end() ? 0 : it->second;
  }
};

std::shared_ptr<gate> the_gate;

outcome gated_handler(event_context& ctx) {
  auto& g = *the_gate;
  std::unique_lock guard{g.mtx};
  auto n = ++g.runs[ctx.message().id];
  if (ctx.message().id == g.blocked && n == 1)
    g.cv.wait_for(guard, 20s, [&g] { return g.released; });
  return ok();
}

envelope make_env(const std::string& id, const std::string& key) {
  envelope e;
  e.topic = "order.placed";
  e.id = id;
  e.idempotency_key = id;
  e.key = key;
  e.payload = boost::json::object{{"n", 1}};
  return e;
}

std::string test_name() {
  return ::testing::UnitTest::GetInstance()->current_test_info()->name();
}

struct redis_runtime : ::testing::Test {
  std::unique_ptr<evmesh::testing::redis_server> redis;
  handler_descriptor handler;

  void SetUp() override {
    if (!evmesh::testing::redis_server::available())
      GTEST_SKIP() << "redis-server is not installed";
    redis = std::make_unique<evmesh::testing::redis_server>();
    the_gate = std::make_shared<gate>();
    handler.consumer = "orders";
    handler.pattern = "order.*";
    handler.fn = &gated_handler;
  }

  runtime_config config(const std::string& broker) {
    auto cfg = evmesh::testing::test_config(broker);
    // A generous command timeout: the machine may be saturated.
    cfg.dedupe_url = redis->url() + "?timeout_ms=5000";
    cfg.defaults.backoff = {1ms, 1.0, 1ms, jitter::none};
    return cfg;
  }

  /// A second store on the same server, to look at the runtime's keys.
  std::shared_ptr<redis_idempotency_store> observer() {
    auto store
      = redis_idempotency_store::open(redis->url() + "?timeout_ms=5000");
    EXPECT_TRUE(store) << (store ? "" : render(store.error()));
    return store ? *store : nullptr;
  }
};

} // namespace

TEST_F(redis_runtime, batches_commit_every_message_before_its_ack) {
  auto broker = inproc_broker::get(test_name());
  broker->reset();
  auto cfg = config(test_name());
  cfg.defaults.concurrency = 4;
  constexpr int n = 400;
  for (int i = 0; i < n; ++i)
    broker->publish(
      make_env("m" + std::to_string(i), "k" + std::to_string(i % 50)));
  consumer_runtime rt{cfg};
  rt.set_handlers({&handler});
  ASSERT_FALSE(rt.start());
  ASSERT_TRUE(wait_for([&] { return broker->stats().acked == n; }));
  // Acked means committed: every key is a duplicate for anyone else now.
  auto other = observer();
  ASSERT_TRUE(other);
  for (int i = 0; i < n; ++i) {
    auto id = "m" + std::to_string(i);
    EXPECT_EQ(other->try_begin("orders:order.*:" + id, 30s),
              claim_result::duplicate)
      << id;
    EXPECT_EQ(the_gate->runs_of(id), 1) << id;
  }
  // The same messages again: answered from the commits, nothing runs.
  for (int i = 0; i < n; ++i)
    broker->publish(
      make_env("m" + std::to_string(i), "k" + std::to_string(i % 50)));
  ASSERT_TRUE(wait_for([&] { return broker->stats().acked == 2 * n; }));
  rt.stop(5s);
  for (int i = 0; i < n; ++i)
    EXPECT_EQ(the_gate->runs_of("m" + std::to_string(i)), 1);
  EXPECT_EQ(broker->stats().dead_lettered, 0u);
}

TEST_F(redis_runtime, a_timeout_mid_batch_keeps_finished_attempts_done) {
  the_gate->blocked = "m3";
  auto broker = inproc_broker::get(test_name());
  broker->reset();
  auto cfg = config(test_name());
  cfg.defaults.concurrency = 1; // one lane: every message in one batch
  cfg.defaults.timeout = 200ms;
  cfg.defaults.execution = execution::blocking;
  cfg.defaults.max_attempts = 5;
  // Published before the start: the first poll takes all ten at once.
  for (int i = 0; i < 10; ++i)
    broker->publish(make_env("m" + std::to_string(i), "k" + std::to_string(i)));
  consumer_runtime rt{cfg};
  rt.set_handlers({&handler});
  ASSERT_FALSE(rt.start());
  // m3's first run hangs until the supervisor gave up on it.
  ASSERT_TRUE(wait_for([&] { return rt.stats().timeouts >= 1; }));
  the_gate->release();
  ASSERT_TRUE(wait_for([&] { return broker->stats().acked == 10; }));
  rt.stop(5s);
  EXPECT_EQ(rt.stats().timeouts, 1u);
  EXPECT_EQ(broker->stats().dead_lettered, 0u);
  for (int i = 0; i < 10; ++i) {
    auto id = "m" + std::to_string(i);
    if (i == 3) {
      // The hung run, and its retry unless the hung run's commit (made
      // when it returned) reached Redis first.
      EXPECT_GE(the_gate->runs_of(id), 1);
      EXPECT_LE(the_gate->runs_of(id), 2);
    } else {
      // m0..m2 finished before the timeout: their re-dispatch waited for
      // the lane's commit and found it. m4..m9 never ran on the old lane:
      // its claims were released and they ran once on the fresh lane.
      EXPECT_EQ(the_gate->runs_of(id), 1) << id;
    }
  }
  auto other = observer();
  ASSERT_TRUE(other);
  for (int i = 0; i < 10; ++i)
    EXPECT_EQ(other->try_begin("orders:order.*:m" + std::to_string(i), 30s),
              claim_result::duplicate)
      << i;
}
