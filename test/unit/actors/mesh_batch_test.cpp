// Batched dispatch on a real scheduler: a handler that hangs in the middle of
// a lane's batch times out alone. The attempts before it keep their outcomes,
// the ones after it run once on the fresh lane, never also on the abandoned
// one. Dedupe is off, so any second run would show.
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>

#include <caf/all.hpp>
#include <gtest/gtest.h>

#include "evmesh/consumer.hpp"
#include "evmesh/memory_store.hpp"
#include "evmesh/testing.hpp"

#include "probe.hpp"

using namespace evmesh;
using namespace evmesh::test;
using namespace std::chrono_literals;

namespace {

/// Counts handler runs per message id; `blocked` blocks on its first run
/// until the test releases it (bounded wait).
struct gate {
  std::mutex mtx;
  std::condition_variable cv;
  std::map<std::string, int> runs;
  std::string blocked = "m3";
  bool released = false;

  void release() {
    {
      std::lock_guard guard{mtx};
      released = true;
    }
    cv.notify_all();
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

} // namespace

TEST(batching, a_timeout_mid_batch_fails_only_that_attempt) {
  the_gate = std::make_shared<gate>();
  auto broker = inproc_broker::get(test_name());
  broker->reset();
  auto cfg = evmesh::testing::test_config(test_name());
  cfg.dedupe_url = "none";
  cfg.defaults.concurrency = 1; // one lane: every message in one batch
  cfg.defaults.timeout = 200ms;
  cfg.defaults.execution = execution::blocking;
  cfg.defaults.max_attempts = 5;
  cfg.defaults.backoff = {1ms, 1.0, 1ms, jitter::none};
  // Published before the start: the first poll takes all ten at once.
  for (int i = 0; i < 10; ++i)
    broker->publish(make_env("order.placed", "m" + std::to_string(i),
                             "k" + std::to_string(i)));
  handler_descriptor h;
  h.consumer = "orders";
  h.pattern = "order.*";
  h.fn = &gated_handler;
  consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  ASSERT_FALSE(rt.start());
  // m3's first run hangs until the supervisor gave up on it.
  ASSERT_TRUE(wait_for([&] { return rt.stats().timeouts >= 1; }, 20s));
  the_gate->release();
  ASSERT_TRUE(wait_for([&] { return broker->stats().acked == 10; }, 20s));
  rt.stop(5s);
  auto st = rt.stats();
  EXPECT_EQ(st.timeouts, 1u);
  EXPECT_EQ(broker->stats().dead_lettered, 0u);
  std::lock_guard guard{the_gate->mtx};
  for (int i = 0; i < 10; ++i) {
    auto id = "m" + std::to_string(i);
    // m3: the hung run and its retry; every other message exactly once.
    EXPECT_EQ(the_gate->runs[id], i == 3 ? 2 : 1) << id;
  }
}

TEST(batching, lanes_of_a_crashed_supervisor_run_nothing_more) {
  the_gate = std::make_shared<gate>();
  the_gate->blocked = "m2";
  auto broker = inproc_broker::get(test_name());
  broker->reset();
  auto cfg = evmesh::testing::test_config(test_name());
  cfg.dedupe_url = "none"; // any second run shows
  cfg.defaults.concurrency = 1;
  cfg.defaults.timeout = 30s;
  cfg.defaults.execution = execution::blocking;
  for (int i = 0; i < 10; ++i)
    broker->publish(make_env("order.placed", "m" + std::to_string(i),
                             "k" + std::to_string(i)));
  handler_descriptor h;
  h.consumer = "orders";
  h.pattern = "order.*";
  h.fn = &gated_handler;
  consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  ASSERT_FALSE(rt.start());
  // The lane is inside m2 (first run) with m3..m9 still to go in its batch.
  ASSERT_TRUE(wait_for(
    [&] {
      std::lock_guard guard{the_gate->mtx};
      return the_gate->runs.count("m2") == 1;
    },
    20s));
  ASSERT_TRUE(evmesh::testing::inject_supervisor_crash(rt, "orders/order.*"));
  ASSERT_TRUE(
    wait_for([&] { return rt.stats().supervisor_restarts == 1; }, 20s));
  the_gate->release();
  ASSERT_TRUE(wait_for([&] { return broker->stats().acked == 10; }, 20s));
  rt.stop(5s);
  EXPECT_EQ(rt.health(), health_status::stopped);
  std::lock_guard guard{the_gate->mtx};
  // m0..m2 ran before the crash and again after it (their results died with
  // the supervisor; without dedupe that is at-least-once). m3..m9 never
  // started on the old lane: it stopped at the end of m2.
  for (int i = 0; i < 10; ++i) {
    auto id = "m" + std::to_string(i);
    EXPECT_EQ(the_gate->runs[id], i <= 2 ? 2 : 1) << id;
  }
}
