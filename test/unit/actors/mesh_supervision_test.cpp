// Issue tests 9 (per-key order), 11 (exactly one terminal action), 12 (stop
// mid-stream) and 14 (timeouts, actor crashes, crash loops, restart storms).
#include <algorithm>
#include <map>
#include <random>
#include <set>

#include <caf/all.hpp>
#include <gtest/gtest.h>

#include "evmesh/messages.hpp"

#include "probe.hpp"

using namespace evmesh;
using namespace evmesh::test;
using namespace std::chrono_literals;

namespace {

int seq_of(const std::string& id) {
  return std::stoi(id.substr(id.rfind('-') + 1));
}

} // namespace

TEST(ordering, per_key_order_holds_and_a_poison_key_parks_only_itself) {
  auto p = std::make_shared<probe>();
  auto cfg = evmesh::testing::test_config(test_name());
  cfg.defaults.concurrency = 8;
  cfg.defaults.max_attempts = 3;
  cfg.defaults.backoff = {1s, 2.0, 10s, jitter::none}; // slow retries
  evmesh::testing::test_mesh mesh{cfg};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  p->behave = [](event_context& ctx) {
    return ctx.message().id == "A-3" ? retry("poison") : ok();
  };
  const int keys = 20;
  const int per_key = 25;
  for (int i = 0; i < per_key; ++i)
    for (int k = 0; k < keys; ++k) {
      auto key = k == 0 ? std::string{"A"} : "K" + std::to_string(k);
      mesh.publish(
        make_env("order.confirmed", key + "-" + std::to_string(i), key));
    }
  // Every other key completes while A's poison message is still retrying.
  auto others_done = [&] {
    std::lock_guard guard{p->mtx};
    size_t n = 0;
    for (auto& c : p->calls)
      n += c.key != "A" ? 1 : 0;
    return n == static_cast<size_t>((keys - 1) * per_key);
  };
  ASSERT_TRUE(mesh.run_until(others_done));
  EXPECT_EQ(mesh.broker_stats().dead_lettered, 0u);
  EXPECT_EQ(p->runs("A-4"), 0u); // parked behind A-3
  EXPECT_EQ(p->runs("A-3"), 1u);
  ASSERT_TRUE(mesh.run_until_settled());
  // Per key: publish order, each message once (A-3 three times, adjacent).
  std::map<std::string, std::vector<int>> seen;
  for (auto& c : p->calls)
    seen[c.key].push_back(seq_of(c.id));
  for (auto& [key, seqs] : seen) {
    std::vector<int> expected;
    for (int i = 0; i < per_key; ++i) {
      expected.push_back(i);
      if (key == "A" && i == 3) {
        expected.push_back(3);
        expected.push_back(3);
      }
    }
    EXPECT_EQ(seqs, expected) << key;
  }
  EXPECT_EQ(mesh.broker_stats().dead_lettered, 1u);
  EXPECT_EQ(mesh.broker_stats().acked, static_cast<uint64_t>(keys * per_key));
}

TEST(ordering, none_never_exceeds_the_concurrency_limit) {
  auto p = std::make_shared<probe>();
  auto cfg = evmesh::testing::test_config(test_name());
  evmesh::testing::test_mesh mesh{cfg};
  auto h = make_handler("orders", "order.*",
                        {.ordering = ordering::none, .concurrency = 3});
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  for (int i = 0; i < 200; ++i)
    mesh.publish(make_env("order.confirmed", "n-" + std::to_string(i), "same"));
  ASSERT_TRUE(mesh.run_until_settled());
  EXPECT_EQ(p->total(), 200u);
  // Same key, but ordering none: all three lanes were used, never more.
  EXPECT_EQ(mesh.runtime().stats().max_concurrent, 3u);
}

TEST(invariant, every_delivery_gets_exactly_one_terminal_action) {
  auto p = std::make_shared<probe>();
  auto cfg = evmesh::testing::test_config(test_name());
  cfg.defaults.max_attempts = 4;
  evmesh::testing::test_mesh mesh{cfg};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  // The outcome of (message, attempt) is a pure function of a fixed seed.
  auto decide = [](const std::string& id, uint32_t attempt) {
    std::seed_seq seq{static_cast<uint32_t>(std::hash<std::string>{}(id)),
                      attempt, 42u};
    std::mt19937 rng{seq};
    return rng() % 10;
  };
  p->behave = [decide](event_context& ctx) -> outcome {
    switch (decide(ctx.message().id, ctx.attempt())) {
      case 0:
        return dead_letter("permanent");
      case 1:
        return discard("not interesting");
      case 2:
      case 3:
        return retry("transient");
      case 4:
        throw std::runtime_error("thrown");
      default:
        return ok();
    }
  };
  const int n = 10000;
  uint64_t expect_dlq = 0;
  uint64_t expect_ok = 0;
  uint64_t expect_discard = 0;
  for (int i = 0; i < n; ++i) {
    auto id = "m-" + std::to_string(i);
    for (uint32_t a = 1;; ++a) {
      auto d = decide(id, a);
      if (d == 0) {
        ++expect_dlq;
        break;
      }
      if (d == 1) {
        ++expect_discard;
        break;
      }
      if (d >= 2 && d <= 4) {
        if (a == 4) {
          ++expect_dlq;
          break;
        }
        continue;
      }
      ++expect_ok;
      break;
    }
    mesh.publish(make_env("order.x", id, "k" + std::to_string(i % 97)));
  }
  ASSERT_TRUE(mesh.run_until_settled(5'000'000));
  auto s = mesh.broker_stats();
  EXPECT_EQ(s.acked, static_cast<uint64_t>(n));
  EXPECT_EQ(s.nacked, 0u);
  EXPECT_EQ(s.protocol_violations, 0u);
  EXPECT_EQ(s.dead_lettered, expect_dlq);
  auto st = mesh.runtime().stats();
  EXPECT_EQ(st.handled, expect_ok);
  EXPECT_EQ(st.discarded, expect_discard);
  EXPECT_EQ(st.dead_lettered, expect_dlq);
  EXPECT_EQ(st.handled + st.discarded + st.dead_lettered,
            static_cast<uint64_t>(n));
}

TEST(shutdown, stop_mid_stream_loses_nothing_and_dead_letters_nothing) {
  auto p = std::make_shared<probe>();
  auto cfg = evmesh::testing::test_config(test_name());
  evmesh::testing::test_mesh mesh{cfg};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  p->behave = [](event_context& ctx) {
    // Some fail once, so shutdown meets waiting retries too; none may reach
    // max_attempts on its own, so every dead letter would be shutdown's fault.
    return seq_of(ctx.message().id) % 7 == 0 && ctx.attempt() == 1
             ? retry("later")
             : ok();
  };
  const int n = 1000;
  for (int i = 0; i < n; ++i)
    mesh.publish(make_env("order.confirmed", "s-" + std::to_string(i),
                          "k" + std::to_string(i % 13)));
  ASSERT_TRUE(mesh.run_until([&] { return p->total() >= 300; }));
  ASSERT_TRUE(mesh.stop(2s));
  auto s = mesh.broker_stats();
  EXPECT_EQ(s.unacked, 0u);
  EXPECT_EQ(s.dead_lettered, 0u);
  EXPECT_GT(s.nacked, 0u);
  // Everything is either acked or back in the queue for redelivery.
  EXPECT_EQ(s.acked + s.pending, static_cast<uint64_t>(n));
  EXPECT_EQ(s.protocol_violations, 0u);
  EXPECT_EQ(mesh.runtime().health(), health_status::stopped);
}

// -- timeouts and crashes --------------------------------------------------------

namespace {

// An actor handler: "hang" never answers, "crash-once" kills the actor on its
// first attempt, "crash-always" on every attempt; everything else is ok.
caf::behavior flaky_actor(caf::event_based_actor* self) {
  return {
    [self](delivery d) -> caf::result<outcome> {
      auto& id = d.context->message().id;
      if (id == "hang")
        return self->make_response_promise<outcome>(); // never delivered
      if ((id == "crash-once" && d.context->attempt() == 1)
          || id.rfind("crash-always", 0) == 0) {
        // A crash: the actor dies without answering.
        self->quit(caf::make_error(caf::sec::runtime_error, "handler bug"));
        return self->make_response_promise<outcome>();
      }
      auto& p = d.context->inject<probe>();
      std::lock_guard guard{p.mtx};
      p.calls.push_back({d.context->message().topic,
                         id,
                         {},
                         d.context->attempt(),
                         d.context->trace(),
                         {}});
      return ok();
    },
  };
}

handler_descriptor actor_handler(handler_options opts = {}) {
  handler_descriptor d;
  d.consumer = "orders";
  d.pattern = "order.*";
  d.factory = &flaky_actor;
  d.options = opts;
  return d;
}

} // namespace

TEST(supervision, handler_timeout_kills_the_lane_and_counts_the_attempt) {
  auto p = std::make_shared<probe>();
  auto cfg = evmesh::testing::test_config(test_name());
  cfg.defaults.timeout = 100ms;
  evmesh::testing::test_mesh mesh{cfg};
  auto h = actor_handler();
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  mesh.publish(make_env("order.a", "hang", "k1"));
  for (int i = 0; i < 10; ++i)
    mesh.publish(make_env("order.b", "fine-" + std::to_string(i), "k2"));
  ASSERT_TRUE(mesh.run_until_settled());
  EXPECT_EQ(p->total(), 10u); // other messages unaffected
  auto records = evmesh::testing::dead_letters(mesh.broker());
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].category, "retries_exhausted");
  EXPECT_EQ(records[0].attempts, 3u);
  EXPECT_NE(records[0].reason.find("timeout"), std::string::npos);
  auto st = mesh.runtime().stats();
  EXPECT_EQ(st.timeouts, 3u);
  EXPECT_EQ(st.lane_restarts, 3u);
}

TEST(supervision, crashed_handler_actor_is_respawned_and_the_attempt_counted) {
  auto p = std::make_shared<probe>();
  evmesh::testing::test_mesh mesh{test_name()};
  auto h = actor_handler();
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  mesh.publish(make_env("order.a", "crash-once", "k1"));
  mesh.publish(make_env("order.b", "other", "k2"));
  ASSERT_TRUE(mesh.run_until_settled());
  ASSERT_EQ(p->runs("crash-once"), 1u);
  EXPECT_EQ(p->runs("other"), 1u);
  for (auto& c : p->calls) {
    if (c.id == "crash-once") {
      EXPECT_EQ(c.attempt, 2u);
    }
  }
  EXPECT_EQ(mesh.runtime().stats().lane_restarts, 1u);
  EXPECT_EQ(mesh.broker_stats().dead_lettered, 0u);
  EXPECT_EQ(mesh.broker_stats().acked, 2u);
}

TEST(supervision, delivery_count_above_max_attempts_is_a_crash_loop) {
  auto p = std::make_shared<probe>();
  auto name = test_name();
  evmesh::testing::test_mesh mesh{name};
  // A consumer that "dies" three times while handling the message.
  register_inproc_transport();
  transport_environment env;
  auto t = make_transport("inproc://" + name, env);
  ASSERT_TRUE(t);
  ASSERT_FALSE((*t)->subscribe({">"}));
  mesh.publish(make_env("order.confirmed", "killer"));
  for (int i = 0; i < 3; ++i) {
    std::vector<raw_message> got;
    ASSERT_FALSE((*t)->poll(10, got));
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got[0].delivery_count, static_cast<uint32_t>(i + 1));
    mesh.broker().requeue_unacked();
  }
  (*t)->close();
  auto h = make_handler("orders", "order.*"); // max_attempts = 3
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  ASSERT_TRUE(mesh.run_until_settled());
  EXPECT_EQ(p->total(), 0u); // never run again
  auto records = evmesh::testing::dead_letters(mesh.broker());
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].category, "crash_loop");
  EXPECT_EQ(records[0].attempts, 3u);
}

TEST(supervision, restart_storm_pauses_the_subscription_and_degrades_health) {
  auto p = std::make_shared<probe>();
  auto cfg = evmesh::testing::test_config(test_name());
  cfg.restart_limit = 2;
  cfg.restart_window = 10s;
  cfg.pause_for = 5s;
  cfg.defaults.max_attempts = 10;
  cfg.defaults.backoff = {1ms, 1.0, 1ms, jitter::none};
  evmesh::testing::test_mesh mesh{cfg};
  auto h = actor_handler({.concurrency = 1});
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  EXPECT_EQ(mesh.runtime().health(), health_status::healthy);
  mesh.publish(make_env("order.a", "crash-always-1", "k"));
  ASSERT_TRUE(mesh.run_until(
    [&] { return mesh.runtime().health() == health_status::degraded; }));
  EXPECT_EQ(mesh.runtime().stats().paused, 1u);
  EXPECT_EQ(mesh.runtime().stats().lane_restarts, 3u);
  // Paused: no further attempts until the pause ends.
  mesh.advance(4s);
  EXPECT_EQ(mesh.runtime().stats().lane_restarts, 3u);
  ASSERT_TRUE(
    mesh.run_until([&] { return mesh.runtime().stats().lane_restarts > 3; }));
  ASSERT_TRUE(mesh.run_until_settled());
  auto records = evmesh::testing::dead_letters(mesh.broker());
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].category, "retries_exhausted");
}

TEST(supervision, crashed_topic_supervisor_is_restarted_and_loses_nothing) {
  auto p = std::make_shared<probe>();
  auto cfg = evmesh::testing::test_config(test_name());
  cfg.defaults.concurrency = 4;
  cfg.defaults.backoff = {1s, 2.0, 10s, jitter::none};
  evmesh::testing::test_mesh mesh{cfg};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  // K0-2 fails once: it waits for its retry timer (a record the supervisor
  // holds, with K0's successors parked behind it) when the crash comes.
  auto failed_once = std::make_shared<bool>(false);
  p->behave = [failed_once](event_context& ctx) {
    if (ctx.message().id == "K0-2" && !*failed_once) {
      *failed_once = true;
      return retry("transient");
    }
    return ok();
  };
  const int keys = 10;
  const int per_key = 20;
  for (int i = 0; i < per_key; ++i)
    for (int k = 0; k < keys; ++k) {
      auto key = "K" + std::to_string(k);
      mesh.publish(
        make_env("order.confirmed", key + "-" + std::to_string(i), key));
    }
  auto calls = [&] {
    std::lock_guard guard{p->mtx};
    return p->calls.size();
  };
  ASSERT_TRUE(mesh.run_until([&] { return calls() >= 60; }));
  ASSERT_EQ(p->runs("K0-2"), 1u);
  ASSERT_LT(mesh.broker_stats().acked, static_cast<uint64_t>(keys * per_key));
  ASSERT_TRUE(
    evmesh::testing::inject_supervisor_crash(mesh.runtime(), "orders/order.*"));
  EXPECT_FALSE(
    evmesh::testing::inject_supervisor_crash(mesh.runtime(), "no/such"));
  ASSERT_TRUE(mesh.run_until_settled());
  auto st = mesh.runtime().stats();
  EXPECT_EQ(st.supervisor_restarts, 1u);
  EXPECT_EQ(mesh.runtime().health(), health_status::healthy);
  EXPECT_EQ(mesh.broker_stats().acked, static_cast<uint64_t>(keys * per_key));
  EXPECT_EQ(mesh.broker_stats().dead_lettered, 0u);
  // Every message ran; per key in publish order. Attempts under way at the
  // crash may run again (at-least-once), but never out of order.
  std::map<std::string, std::vector<int>> seen;
  for (auto& c : p->calls)
    seen[c.key].push_back(seq_of(c.id));
  ASSERT_EQ(seen.size(), static_cast<size_t>(keys));
  for (auto& [key, seqs] : seen) {
    EXPECT_TRUE(std::is_sorted(seqs.begin(), seqs.end())) << key;
    std::set<int> unique(seqs.begin(), seqs.end());
    EXPECT_EQ(unique.size(), static_cast<size_t>(per_key)) << key;
  }
  // K0-2 failed once, then succeeded after the restart.
  EXPECT_GE(p->runs("K0-2"), 2u);
}

TEST(supervision, topic_supervisor_crashing_too_often_stops_the_runtime) {
  auto p = std::make_shared<probe>();
  auto cfg = evmesh::testing::test_config(test_name());
  cfg.restart_limit = 1;
  cfg.restart_window = 10s;
  evmesh::testing::test_mesh mesh{cfg};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  ASSERT_TRUE(
    evmesh::testing::inject_supervisor_crash(mesh.runtime(), "orders/order.*"));
  mesh.run();
  EXPECT_EQ(mesh.runtime().stats().supervisor_restarts, 1u);
  EXPECT_EQ(mesh.runtime().health(), health_status::healthy);
  ASSERT_TRUE(
    evmesh::testing::inject_supervisor_crash(mesh.runtime(), "orders/order.*"));
  mesh.run();
  EXPECT_EQ(mesh.runtime().stats().supervisor_restarts, 1u);
  EXPECT_EQ(mesh.runtime().health(), health_status::stopped);
}
