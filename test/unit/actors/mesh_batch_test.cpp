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

/// Counts handler runs per message id; "m3" blocks on its first run until
/// the runtime has counted a timeout (bounded wait).
struct gate {
  std::mutex mtx;
  std::condition_variable cv;
  std::map<std::string, int> runs;
  bool released = false;
};

std::shared_ptr<gate> the_gate;

outcome gated_handler(event_context& ctx) {
  auto& g = *the_gate;
  std::unique_lock guard{g.mtx};
  auto n = ++g.runs[ctx.message().id];
  if (ctx.message().id == "m3" && n == 1)
    g.cv.wait_for(guard, 20s, [&g] { return g.released; });
  return ok();
}

template <class Pred>
bool wait_for(Pred pred, std::chrono::seconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline)
      return false;
    std::this_thread::yield();
  }
  return true;
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
  {
    std::lock_guard guard{the_gate->mtx};
    the_gate->released = true;
  }
  the_gate->cv.notify_all();
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
