// Issue tests 6 (dedupe), 8 (trace continuity) and 13 (SQLite stores survive a
// restart).
#include <atomic>
#include <filesystem>

#include <gtest/gtest.h>

#include "evmesh/memory_store.hpp"
#include "evmesh/sqlite_store.hpp"

#include "probe.hpp"

using namespace evmesh;
using namespace evmesh::test;
using namespace std::chrono_literals;

namespace {

/// An idempotency store whose availability the test switches.
class switchable_store : public idempotency_store {
public:
  std::atomic<bool> available{true};
  memory_idempotency_store inner;

  claim_result try_begin(std::string_view key, caf::timespan lease) override {
    if (!available)
      return claim_result::unavailable;
    return inner.try_begin(key, lease);
  }
  caf::error commit(std::string_view key, caf::timespan keep) override {
    if (!available)
      return make_error(errc::unavailable, "store down");
    return inner.commit(key, keep);
  }
  caf::error abort(std::string_view key) override {
    if (!available)
      return make_error(errc::unavailable, "store down");
    return inner.abort(key);
  }
};

container services(std::shared_ptr<probe> p,
                   std::shared_ptr<idempotency_store> store) {
  container_builder b;
  b.add<probe>(std::move(p));
  b.add<idempotency_store>(std::move(store));
  return b.freeze();
}

} // namespace

TEST(dedupe, duplicate_after_success_is_acked_without_running) {
  auto p = std::make_shared<probe>();
  evmesh::testing::test_mesh mesh{test_name()};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  auto first = make_env("order.confirmed", "k-1");
  auto second = make_env("order.confirmed", "k-1");
  second.id = "another-id"; // same idempotency key, different message
  mesh.publish(first);
  ASSERT_TRUE(mesh.run_until_settled());
  mesh.publish(second);
  ASSERT_TRUE(mesh.run_until_settled());
  EXPECT_EQ(p->total(), 1u);
  EXPECT_EQ(mesh.runtime().stats().duplicates, 1u);
  EXPECT_EQ(mesh.broker_stats().acked, 2u);
  EXPECT_EQ(mesh.broker_stats().dead_lettered, 0u);
}

// The key the runtime dedupes on: the idempotency key, else the id, else a
// digest of the message (identical messages collide, different ones not).
TEST(dedupe, key_is_the_idempotency_key_then_the_id_then_a_digest) {
  auto p = std::make_shared<probe>();
  evmesh::testing::test_mesh mesh{test_name()};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  auto publish = [&](std::string id, std::string idem, int n) {
    envelope e;
    e.topic = "order.confirmed";
    e.id = std::move(id);
    e.idempotency_key = std::move(idem);
    e.payload = boost::json::object{{"n", n}};
    mesh.publish(e);
    return mesh.run_until_settled();
  };
  // Idempotency key: same key, different ids -> one run.
  ASSERT_TRUE(publish("id-1", "idem-1", 1));
  ASSERT_TRUE(publish("id-2", "idem-1", 1));
  // No idempotency key: the id -> one run for id-3, another for id-4.
  ASSERT_TRUE(publish("id-3", "", 1));
  ASSERT_TRUE(publish("id-3", "", 2));
  ASSERT_TRUE(publish("id-4", "", 1));
  // Neither: identical messages share a digest, a different payload not.
  ASSERT_TRUE(publish("", "", 7));
  ASSERT_TRUE(publish("", "", 7));
  ASSERT_TRUE(publish("", "", 8));
  EXPECT_EQ(p->total(), 5u);
  EXPECT_EQ(mesh.runtime().stats().duplicates, 3u);
  EXPECT_EQ(mesh.broker_stats().acked, 8u);
}

TEST(dedupe, in_flight_claim_defers_without_counting_an_attempt) {
  auto p = std::make_shared<probe>();
  auto store = std::make_shared<switchable_store>();
  evmesh::testing::test_mesh mesh{test_name()};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, services(p, store)));
  // Another worker holds the claim.
  ASSERT_EQ(store->try_begin("orders:order.*:k-2", 1h), claim_result::fresh);
  mesh.publish(make_env("order.confirmed", "k-2"));
  ASSERT_TRUE(
    mesh.run_until([&] { return mesh.runtime().stats().deferred >= 5; }));
  EXPECT_EQ(p->total(), 0u);
  // The other worker fails and releases the key: we run it, as attempt 1.
  ASSERT_FALSE(store->abort("orders:order.*:k-2"));
  ASSERT_TRUE(mesh.run_until_settled());
  ASSERT_EQ(p->total(), 1u);
  EXPECT_EQ(p->calls[0].attempt, 1u);
  EXPECT_EQ(mesh.broker_stats().acked, 1u);
}

TEST(dedupe, unavailable_store_fail_open_runs_the_handler) {
  auto p = std::make_shared<probe>();
  auto store = std::make_shared<switchable_store>();
  store->available = false;
  evmesh::testing::test_mesh mesh{test_name()};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, services(p, store)));
  mesh.publish(make_env("order.confirmed", "k-3"));
  ASSERT_TRUE(mesh.run_until_settled());
  EXPECT_EQ(p->total(), 1u);
  EXPECT_EQ(mesh.broker_stats().acked, 1u);
}

TEST(dedupe, unavailable_store_fail_closed_retries_later) {
  auto p = std::make_shared<probe>();
  auto store = std::make_shared<switchable_store>();
  store->available = false;
  evmesh::testing::test_mesh mesh{test_name()};
  mesh.config().dedupe_policy = store_failure_policy::fail_closed;
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, services(p, store)));
  mesh.publish(make_env("order.confirmed", "k-4"));
  ASSERT_TRUE(
    mesh.run_until([&] { return mesh.runtime().stats().deferred >= 10; }));
  EXPECT_EQ(p->total(), 0u);
  EXPECT_EQ(mesh.broker_stats().dead_lettered, 0u);
  store->available = true;
  ASSERT_TRUE(mesh.run_until_settled());
  ASSERT_EQ(p->total(), 1u);
  EXPECT_EQ(p->calls[0].attempt, 1u);
}

TEST(dedupe, failed_attempt_releases_the_claim_for_the_retry) {
  auto p = std::make_shared<probe>();
  evmesh::testing::test_mesh mesh{test_name()};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  p->behave = [](event_context& ctx) {
    return ctx.attempt() < 2 ? retry("flaky") : ok();
  };
  mesh.publish(make_env("order.confirmed", "k-5"));
  ASSERT_TRUE(mesh.run_until_settled());
  EXPECT_EQ(p->total(), 2u);
  EXPECT_EQ(mesh.runtime().stats().handled, 1u);
  EXPECT_EQ(mesh.runtime().stats().duplicates, 0u);
}

// -- trace continuity -----------------------------------------------------------

TEST(trace_continuity, valid_traceparent_becomes_the_parent_of_each_attempt) {
  auto p = std::make_shared<probe>();
  evmesh::testing::test_mesh mesh{test_name()};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  p->behave = [](event_context& ctx) {
    return ctx.attempt() < 2 ? retry("again") : ok();
  };
  const std::string trace = "4bf92f3577b34da6a3ce929d0e0e4736";
  const std::string parent = "00f067aa0ba902b7";
  auto e = make_env("order.confirmed", "t-1");
  e.traceparent = "00-" + trace + "-" + parent + "-00"; // not sampled
  e.tracestate = "vendor=x";
  mesh.publish(e);
  ASSERT_TRUE(mesh.run_until_settled());
  ASSERT_EQ(p->total(), 2u);
  for (auto& c : p->calls) {
    EXPECT_EQ(to_hex(c.trace.trace.data(), 16), trace);
    EXPECT_EQ(to_hex(c.trace.parent.data(), 8), parent);
    EXPECT_NE(to_hex(c.trace.span.data(), 8), parent);
    EXPECT_EQ(c.trace.flags, 0u);
    EXPECT_EQ(c.trace.tracestate, "vendor=x");
    EXPECT_FALSE(c.trace.is_root);
  }
  EXPECT_NE(p->calls[0].trace.span, p->calls[1].trace.span);
  EXPECT_EQ(mesh.runtime().stats().new_root_traces, 0u);
}

TEST(trace_continuity, invalid_or_missing_traceparent_starts_a_counted_root) {
  const std::vector<std::string> invalid = {
    "",                                                        // absent
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",  // short
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // upper
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
    "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01", // separators
  };
  auto p = std::make_shared<probe>();
  evmesh::testing::test_mesh mesh{test_name()};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  int n = 0;
  for (auto& tp : invalid) {
    auto e = make_env("order.confirmed", "r-" + std::to_string(n++));
    e.traceparent = tp;
    mesh.publish(e);
  }
  ASSERT_TRUE(mesh.run_until_settled());
  ASSERT_EQ(p->total(), invalid.size());
  std::set<trace_id> traces;
  for (auto& c : p->calls) {
    EXPECT_TRUE(c.trace.is_root) << c.id;
    EXPECT_EQ(c.trace.parent, span_id{}) << c.id;
    traces.insert(c.trace.trace);
  }
  EXPECT_EQ(traces.size(), invalid.size()); // every root is a new trace
  EXPECT_EQ(mesh.runtime().stats().new_root_traces, invalid.size());
}

TEST(trace_continuity, publish_from_a_handler_forwards_this_attempts_span) {
  auto p = std::make_shared<probe>();
  evmesh::testing::test_mesh mesh{test_name()};
  auto h = make_handler("orders", "order.*");
  auto billing = make_handler("billing", "billing.>");
  ASSERT_FALSE(mesh.start({&h, &billing}, with_probe(p)));
  p->behave = [](event_context& ctx) {
    if (ctx.consumer() == "orders") {
      envelope out;
      out.topic = "billing.charge";
      out.idempotency_key = "charge-" + ctx.message().id;
      out.payload = boost::json::object{{"amount", 5}};
      if (auto err = ctx.publish(out))
        return retry(render(err));
    }
    return ok();
  };
  auto e = make_env("order.confirmed", "p-1");
  e.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  mesh.publish(e);
  ASSERT_TRUE(mesh.run_until_settled());
  ASSERT_EQ(p->total(), 2u);
  auto& first = p->calls[0];
  auto& second = p->calls[1];
  EXPECT_EQ(second.topic, "billing.charge");
  EXPECT_EQ(second.trace.trace, first.trace.trace);
  EXPECT_EQ(second.trace.parent, first.trace.span); // chained, not orphaned
}

// -- SQLite stores across restarts ----------------------------------------------

TEST(sqlite_state, dedupe_and_dead_letters_survive_a_restart) {
  auto dir = std::filesystem::temp_directory_path()
             / ("evmesh-restart-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  auto cfg = evmesh::testing::test_config(test_name());
  cfg.dedupe_url = "sqlite://" + (dir / "dedupe.db").string();
  cfg.dead_letter_url = "sqlite://" + (dir / "dlq.db").string();
  auto p = std::make_shared<probe>();
  p->behave = [](event_context& ctx) {
    return ctx.message().id == "poison" ? dead_letter("bad order") : ok();
  };
  auto h = make_handler("orders", "order.*");
  {
    evmesh::testing::test_mesh mesh{cfg};
    ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
    mesh.publish(make_env("order.confirmed", "once"));
    mesh.publish(make_env("order.confirmed", "poison"));
    ASSERT_TRUE(mesh.run_until_settled());
    ASSERT_TRUE(mesh.stop(1s));
  }
  ASSERT_EQ(p->total(), 2u);
  {
    evmesh::testing::test_mesh mesh{cfg}; // same files, fresh process state
    ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
    mesh.publish(make_env("order.confirmed", "once")); // redelivered copy
    ASSERT_TRUE(mesh.run_until_settled());
    EXPECT_EQ(mesh.runtime().stats().duplicates, 1u);
    ASSERT_TRUE(mesh.stop(1s));
  }
  EXPECT_EQ(p->total(), 2u); // not run again
  auto dlq = sqlite_dead_letter_store::open((dir / "dlq.db").string());
  ASSERT_TRUE(dlq) << render(dlq.error());
  auto records = (*dlq)->list(dead_letter_query{});
  ASSERT_TRUE(records);
  ASSERT_EQ(records->size(), 1u);
  EXPECT_EQ((*records)[0].category, "permanent");
  EXPECT_EQ((*records)[0].reason, "bad order");
  std::filesystem::remove_all(dir);
}
