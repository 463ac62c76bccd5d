// The runtime on CAF's real, multi-threaded scheduler: concurrency limits and
// blocking lanes with real time. Every wait has a deadline.
#include <atomic>
#include <mutex>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "evmesh/inproc.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/testing.hpp"

using namespace evmesh;
using namespace std::chrono_literals;

namespace {

std::string test_name() {
  return ::testing::UnitTest::GetInstance()->current_test_info()->name();
}

envelope make_env(std::string topic, std::string id) {
  envelope e;
  e.topic = std::move(topic);
  e.id = id;
  e.idempotency_key = std::move(id);
  e.payload = boost::json::object{{"n", 1}};
  return e;
}

template <class Pred>
bool wait_for(Pred pred, caf::timespan limit = 30s) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline)
      return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

struct gauge {
  std::atomic<int> running{0};
  std::atomic<int> peak{0};
  std::atomic<int> done{0};
  std::atomic<int> calls{0};

  void reset() {
    running = 0;
    peak = 0;
    done = 0;
    calls = 0;
  }

  void enter() {
    auto now = ++running;
    auto peak_now = peak.load();
    while (now > peak_now && !peak.compare_exchange_weak(peak_now, now)) {
    }
  }
};

gauge g;

} // namespace

TEST(real_threads, ordering_none_never_exceeds_the_concurrency_limit) {
  g.reset();
  handler_descriptor h;
  h.consumer = "orders";
  h.pattern = "order.*";
  h.fn = [](event_context&) -> outcome {
    g.enter();
    auto until = std::chrono::steady_clock::now() + 200us;
    while (std::chrono::steady_clock::now() < until) {
    }
    --g.running;
    ++g.done;
    return ok();
  };
  h.options.ordering = ordering::none;
  h.options.concurrency = 3;
  auto cfg = evmesh::testing::test_config(test_name());
  inproc_broker::get(test_name())->reset();
  consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  ASSERT_FALSE(rt.start());
  for (int i = 0; i < 300; ++i)
    ASSERT_FALSE(
      rt.publish(make_env("order.confirmed", "r-" + std::to_string(i))));
  ASSERT_TRUE(wait_for([] { return g.done.load() == 300; }));
  EXPECT_LE(g.peak.load(), 3);
  rt.stop(5s);
  EXPECT_TRUE(rt.stopped());
  EXPECT_EQ(inproc_broker::get(test_name())->stats().acked, 300u);
}

TEST(real_threads, blocking_lane_over_its_timeout_is_abandoned_and_replaced) {
  g.reset();
  handler_descriptor h;
  h.consumer = "orders";
  h.pattern = "order.*";
  h.fn = [](event_context& ctx) -> outcome {
    ++g.calls;
    if (ctx.message().id == "slow" && ctx.attempt() == 1)
      std::this_thread::sleep_for(600ms); // blocks its own thread only
    ++g.done;
    return ok();
  };
  h.options.execution = execution::blocking;
  h.options.concurrency = 2;
  h.options.timeout = 100ms;
  auto cfg = evmesh::testing::test_config(test_name());
  cfg.dedupe_url = "none";
  inproc_broker::get(test_name())->reset();
  consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  ASSERT_FALSE(rt.start());
  ASSERT_FALSE(rt.publish(make_env("order.a", "slow")));
  for (int i = 0; i < 20; ++i)
    ASSERT_FALSE(rt.publish(make_env("order.b", "fast-" + std::to_string(i))));
  auto broker = inproc_broker::get(test_name());
  ASSERT_TRUE(wait_for([&] { return broker->stats().acked == 21; }));
  auto st = rt.stats();
  EXPECT_EQ(st.timeouts, 1u);
  EXPECT_EQ(st.lane_restarts, 1u);
  EXPECT_EQ(st.handled, 21u); // the abandoned attempt's late result is dropped
  EXPECT_EQ(broker->stats().dead_lettered, 0u);
  rt.stop(5s);
  EXPECT_TRUE(rt.stopped());
  // The abandoned call still returns on its own thread eventually.
  EXPECT_TRUE(wait_for([] { return g.done.load() == 22; }, 5s));
}

TEST(real_threads,
     cooperative_handlers_run_on_the_configured_scheduler_threads) {
  // runtime.scheduler_threads sizes the actor system the runtime creates:
  // with one scheduler thread, every cooperative handler call of a
  // subscription with three lanes happens on that one thread; with two,
  // on at most two.
  for (size_t threads : {size_t{1}, size_t{2}}) {
    static std::mutex mtx;
    static std::set<std::thread::id> seen;
    static std::atomic<int> done{0};
    {
      std::lock_guard guard{mtx};
      seen.clear();
    }
    done = 0;
    handler_descriptor h;
    h.consumer = "orders";
    h.pattern = "order.*";
    h.fn = [](event_context&) -> outcome {
      {
        std::lock_guard guard{mtx};
        seen.insert(std::this_thread::get_id());
      }
      auto until = std::chrono::steady_clock::now() + 100us;
      while (std::chrono::steady_clock::now() < until) {
      }
      ++done;
      return ok();
    };
    h.options.ordering = ordering::none;
    h.options.concurrency = 3;
    auto name = test_name() + std::to_string(threads);
    auto cfg = evmesh::testing::test_config(name);
    cfg.scheduler_threads = threads;
    inproc_broker::get(name)->reset();
    consumer_runtime rt{cfg};
    rt.set_handlers({&h});
    ASSERT_FALSE(rt.start());
    for (int i = 0; i < 600; ++i)
      ASSERT_FALSE(
        rt.publish(make_env("order.confirmed", "s-" + std::to_string(i))));
    ASSERT_TRUE(wait_for([] { return done.load() == 600; }));
    rt.stop(5s);
    std::lock_guard guard{mtx};
    EXPECT_GE(seen.size(), 1u);
    EXPECT_LE(seen.size(), threads) << "scheduler_threads = " << threads;
  }
}
