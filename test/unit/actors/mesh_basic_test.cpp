// Issue tests 1-5, 7, 10: terminal actions, retries, dead letters,
// exceptions, malformed payloads, tenants, registry errors.
#include <boost/describe.hpp>
#include <gtest/gtest.h>

#include "probe.hpp"

using namespace evmesh;
using namespace evmesh::test;
using namespace std::chrono_literals;

namespace {

struct fixture : ::testing::Test {
  std::shared_ptr<probe> p = std::make_shared<probe>();
  std::unique_ptr<evmesh::testing::test_mesh> mesh;
  handler_descriptor handler = make_handler("orders", "order.*");

  void SetUp() override {
    auto name = std::string{
      ::testing::UnitTest::GetInstance()->current_test_info()->name()};
    mesh = std::make_unique<evmesh::testing::test_mesh>(name);
  }

  void start() {
    auto err = mesh->start({&handler}, with_probe(p));
    ASSERT_FALSE(err) << render(err);
  }

  std::vector<dead_letter_record> dlq() {
    return evmesh::testing::dead_letters(mesh->broker());
  }
};

} // namespace

TEST_F(fixture, success_acks_exactly_once) {
  start();
  mesh->publish(make_env("order.confirmed", "o-1"));
  ASSERT_TRUE(mesh->run_until_settled());
  auto s = mesh->broker_stats();
  EXPECT_EQ(s.acked, 1u);
  EXPECT_EQ(s.nacked, 0u);
  EXPECT_EQ(s.dead_lettered, 0u);
  EXPECT_EQ(s.protocol_violations, 0u);
  EXPECT_EQ(p->runs("o-1"), 1u);
  EXPECT_EQ(mesh->runtime().stats().handled, 1u);
}

TEST_F(fixture, retry_runs_max_attempts_times_then_dead_letters_once) {
  mesh->config().defaults.backoff.jitter = jitter::none;
  start();
  p->behave = [](event_context& ctx) {
    return retry("downstream 503 on attempt " + std::to_string(ctx.attempt()));
  };
  mesh->publish(make_env("order.confirmed", "o-2"));
  ASSERT_TRUE(mesh->run_until([&] { return p->total() >= 1; }));
  EXPECT_EQ(p->total(), 1u);
  // Backoff is 10 ms, then 20 ms (no jitter): nothing runs before it is due.
  mesh->advance(9ms);
  EXPECT_EQ(p->total(), 1u);
  mesh->advance(1ms);
  EXPECT_EQ(p->total(), 2u);
  mesh->advance(19ms);
  EXPECT_EQ(p->total(), 2u);
  mesh->advance(1ms);
  EXPECT_EQ(p->total(), 3u);
  ASSERT_TRUE(mesh->run_until_settled());
  EXPECT_EQ(p->runs("o-2"), 3u);
  auto records = dlq();
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].category, "retries_exhausted");
  EXPECT_EQ(records[0].reason, "downstream 503 on attempt 3");
  EXPECT_EQ(records[0].attempts, 3u);
  EXPECT_EQ(records[0].errors.size(), 3u);
  EXPECT_EQ(records[0].consumer, "orders");
  EXPECT_EQ(records[0].pattern, "order.*");
  EXPECT_EQ(records[0].topic, "order.confirmed");
  EXPECT_TRUE(records[0].original_decoded);
  auto s = mesh->broker_stats();
  EXPECT_EQ(s.acked, 1u);
  EXPECT_EQ(s.nacked, 0u);
  EXPECT_EQ(s.protocol_violations, 0u);
}

TEST_F(fixture, dead_letter_outcome_goes_to_dlq_without_retries) {
  start();
  p->behave = [](event_context&) {
    return dead_letter("order does not exist");
  };
  mesh->publish(make_env("order.confirmed", "o-3"));
  ASSERT_TRUE(mesh->run_until_settled());
  EXPECT_EQ(p->runs("o-3"), 1u);
  auto records = dlq();
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].category, "permanent");
  EXPECT_EQ(records[0].reason, "order does not exist");
  EXPECT_EQ(records[0].attempts, 1u);
  EXPECT_EQ(mesh->runtime().stats().retried, 0u);
}

TEST_F(fixture, exceptions_are_classified) {
  start();
  p->behave = [](event_context& ctx) -> outcome {
    auto& id = ctx.message().id;
    if (id == "std")
      throw std::runtime_error("db connection reset");
    if (id == "perm")
      throw permanent_error("invariant violated");
    throw 42;
  };
  mesh->publish(make_env("order.a", "std"));
  mesh->publish(make_env("order.b", "perm"));
  mesh->publish(make_env("order.c", "int"));
  ASSERT_TRUE(mesh->run_until_settled());
  EXPECT_EQ(p->runs("std"), 3u);
  EXPECT_EQ(p->runs("perm"), 1u);
  EXPECT_EQ(p->runs("int"), 3u);
  std::map<std::string, dead_letter_record> by_topic;
  for (auto& r : dlq())
    by_topic[r.topic] = r;
  ASSERT_EQ(by_topic.size(), 3u);
  EXPECT_EQ(by_topic["order.a"].category, "retries_exhausted");
  EXPECT_EQ(by_topic["order.a"].reason, "db connection reset");
  EXPECT_EQ(by_topic["order.b"].category, "permanent");
  EXPECT_EQ(by_topic["order.b"].reason, "invariant violated");
  EXPECT_EQ(by_topic["order.c"].category, "retries_exhausted");
  EXPECT_NE(by_topic["order.c"].reason.find("unknown type"), std::string::npos);
}

namespace {

struct order_confirmed {
  std::string order_id;
  int quantity = 0;
};
BOOST_DESCRIBE_STRUCT(order_confirmed, (), (order_id, quantity))

} // namespace

TEST_F(fixture, malformed_payload_is_dead_lettered_never_retried) {
  start();
  p->behave = [](event_context& ctx) {
    auto& evt = ctx.payload<order_confirmed>();
    auto& again = ctx.payload<order_confirmed>(); // cached, same object
    EXPECT_EQ(&evt, &again);
    return evt.quantity > 0 ? ok() : discard("empty order");
  };
  auto good = make_env("order.confirmed", "good");
  good.payload = boost::json::object{{"order_id", "A1"}, {"quantity", 2}};
  auto bad = make_env("order.confirmed", "bad");
  bad.payload = boost::json::object{{"order_id", 17}, {"quantity", "many"}};
  mesh->publish(good);
  mesh->publish(bad);
  ASSERT_TRUE(mesh->run_until_settled());
  EXPECT_EQ(p->runs("good"), 1u);
  EXPECT_EQ(p->runs("bad"), 1u);
  auto records = dlq();
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].category, "malformed_payload");
  EXPECT_EQ(records[0].attempts, 1u);
  EXPECT_EQ(mesh->runtime().stats().retried, 0u);
}

TEST_F(fixture, rejected_tenant_is_dead_lettered_without_running) {
  mesh->config().tenants_enabled = true;
  mesh->config().tenants_known = {"acme"};
  mesh->config().tenants_suspended = {"evil"};
  start();
  auto a = make_env("order.confirmed", "t-ok");
  a.tenant = "acme";
  auto b = make_env("order.confirmed", "t-evil");
  b.tenant = "evil";
  auto c = make_env("order.confirmed", "t-unknown");
  c.tenant = "nobody";
  mesh->publish(a);
  mesh->publish(b);
  mesh->publish(c);
  ASSERT_TRUE(mesh->run_until_settled());
  EXPECT_EQ(p->runs("t-ok"), 1u);
  EXPECT_EQ(p->runs("t-evil"), 0u);
  EXPECT_EQ(p->runs("t-unknown"), 0u);
  auto records = dlq();
  ASSERT_EQ(records.size(), 2u);
  for (auto& r : records) {
    EXPECT_EQ(r.category, "tenant_rejected");
    EXPECT_EQ(r.attempts, 0u);
  }
  EXPECT_EQ(mesh->broker_stats().acked, 3u);
}

TEST_F(fixture, handlers_see_the_resolved_tenant) {
  mesh->config().tenants_enabled = true;
  mesh->config().tenants_known = {"acme"};
  mesh->config().tenant_fallback = "shared";
  start();
  auto known = make_env("order.confirmed", "t-known");
  known.tenant = "acme";
  auto unknown = make_env("order.confirmed", "t-unknown");
  unknown.tenant = "nobody";
  auto none = make_env("order.confirmed", "t-none");
  mesh->publish(known);
  mesh->publish(unknown);
  mesh->publish(none);
  ASSERT_TRUE(mesh->run_until_settled());
  std::map<std::string, std::string> seen;
  for (auto& c : p->calls)
    seen[c.id] = c.tenant;
  EXPECT_EQ(seen["t-known"], "acme");
  EXPECT_EQ(seen["t-unknown"], "shared"); // the fallback, not the envelope's
  EXPECT_EQ(seen["t-none"], "");          // no tenant is accepted as is
  EXPECT_EQ(mesh->broker_stats().acked, 3u);
}

TEST_F(fixture, dead_letter_records_keep_the_bytes_and_position_as_received) {
  start();
  p->behave = [](event_context&) { return dead_letter("declined"); };
  // Not the encoder's own output: spacing and field order must survive.
  std::string bytes = R"({ "topic":"order.confirmed", "id":"raw-1",)"
                      R"( "payload": {"n": 1} })";
  mesh->broker().publish_raw("order.confirmed", bytes);
  ASSERT_TRUE(mesh->run_until_settled());
  auto records = dlq();
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].original, bytes);
  EXPECT_TRUE(records[0].original_decoded);
  EXPECT_EQ(records[0].position.rfind("inproc:", 0), 0u) << records[0].position;
  EXPECT_NE(records[0].position.find('#'), std::string::npos)
    << records[0].position;
}

TEST_F(fixture, duplicate_subscription_fails_start_clearly) {
  auto twin = make_handler("orders", "order.*");
  auto err = mesh->start({&handler, &twin}, with_probe(p));
  ASSERT_TRUE(err);
  EXPECT_EQ(err.category(), caf::atom("evmesh"));
  EXPECT_EQ(err.code(), static_cast<uint8_t>(errc::duplicate_subscription));
  auto text = render(err);
  EXPECT_NE(text.find("duplicate_subscription"), std::string::npos) << text;
  EXPECT_NE(text.find("'orders'"), std::string::npos) << text;
  EXPECT_NE(text.find("'order.*'"), std::string::npos) << text;
}

TEST_F(fixture, unmatched_topic_is_dead_lettered_as_no_handler) {
  start();
  mesh->publish(make_env("invoice.paid", "i-1"));
  mesh->broker().publish_raw("order.confirmed", "{not json");
  ASSERT_TRUE(mesh->run_until_settled());
  EXPECT_EQ(p->total(), 0u);
  auto records = dlq();
  ASSERT_EQ(records.size(), 2u);
  std::map<std::string, dead_letter_record> by_cat;
  for (auto& r : records)
    by_cat[r.category] = r;
  EXPECT_EQ(by_cat["no_handler"].topic, "invoice.paid");
  EXPECT_EQ(by_cat["decode_error"].original, "{not json");
  EXPECT_FALSE(by_cat["decode_error"].original_decoded);
  EXPECT_EQ(mesh->broker_stats().acked, 2u);
}

TEST_F(fixture, fan_out_gives_each_subscription_its_own_retries) {
  auto audit = make_handler("audit", "order.>");
  p->behave = [](event_context& ctx) {
    return ctx.consumer() == "audit" ? ok() : retry("inventory down");
  };
  auto err = mesh->start({&handler, &audit}, with_probe(p));
  ASSERT_FALSE(err) << render(err);
  mesh->publish(make_env("order.confirmed", "f-1"));
  ASSERT_TRUE(mesh->run_until_settled());
  EXPECT_EQ(p->runs("f-1"), 4u); // 3 attempts + 1 audit
  auto records = dlq();
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].consumer, "orders");
  auto s = mesh->broker_stats();
  EXPECT_EQ(s.acked, 1u); // one delivery, one terminal action
  EXPECT_EQ(s.protocol_violations, 0u);
}

TEST_F(fixture, masked_fields_never_reach_a_dead_letter_sink) {
  mesh->config().mask_fields = {"card_number", "email"};
  start();
  p->behave = [](event_context&) { return dead_letter("declined"); };
  auto e = make_env("order.confirmed", "pii-1");
  e.payload = boost::json::object{
    {"order_id", "A1"},
    {"customer", boost::json::object{{"email", "x@example.com"}}},
    {"card_number", "4111111111111111"}};
  mesh->publish(e);
  ASSERT_TRUE(mesh->run_until_settled());
  auto records = dlq(); // the broker's DLQ sink
  ASSERT_EQ(records.size(), 1u);
  auto& original = records[0].original;
  EXPECT_EQ(original.find("4111111111111111"), std::string::npos) << original;
  EXPECT_EQ(original.find("x@example.com"), std::string::npos) << original;
  EXPECT_NE(original.find("\"A1\""), std::string::npos) << original;
  EXPECT_NE(original.find("***"), std::string::npos) << original;
}

TEST_F(fixture, start_fails_clearly_on_bad_urls_and_unwritable_stores) {
  struct bad_case {
    void (*apply)(runtime_config&);
    const char* expect;
  };
  const bad_case cases[] = {
    {[](runtime_config& c) { c.transport_url = "kafkaa://x"; }, "kafkaa"},
    {[](runtime_config& c) { c.transport_url = "inproc://x?bogus=1"; },
     "bogus"},
    {[](runtime_config& c) { c.dedupe_url = "mongo://db"; }, "mongo://db"},
    {[](runtime_config& c) {
       c.dead_letter_url = "sqlite:///proc/forbidden/dlq.db";
     },
     "/proc/forbidden"},
    {[](runtime_config& c) { c.trace_sink = "jaeger"; }, "jaeger"},
  };
  for (auto& bc : cases) {
    auto cfg = evmesh::testing::test_config(test_name());
    bc.apply(cfg);
    evmesh::testing::test_mesh m{cfg};
    auto err = m.start({&handler}, with_probe(p));
    ASSERT_TRUE(err) << bc.expect;
    auto text = render(err);
    EXPECT_NE(text.find(bc.expect), std::string::npos) << text;
  }
}

namespace {

/// A dead-letter store that fails its first `failures` writes.
class flaky_dlq : public dead_letter_store {
public:
  explicit flaky_dlq(int failures) : failures_(failures) {
  }
  caf::expected<int64_t> write(const dead_letter_record& rec) override {
    ++attempts;
    if (failures_-- > 0)
      return make_error(errc::io_error, "disk full");
    records.push_back(rec);
    return static_cast<int64_t>(records.size());
  }
  caf::expected<std::vector<dead_letter_record>>
  list(const dead_letter_query&) override {
    return records;
  }
  caf::expected<dead_letter_record> get(int64_t) override {
    return make_error(errc::not_found, "n/a");
  }
  caf::error mark_replayed(int64_t, int64_t) override {
    return {};
  }
  caf::error remove(int64_t) override {
    return {};
  }
  int attempts = 0;
  std::vector<dead_letter_record> records;

private:
  int failures_;
};

} // namespace

TEST_F(fixture,
       failed_dead_letter_writes_are_retried_and_never_acked_meanwhile) {
  auto store = std::make_shared<flaky_dlq>(3);
  container_builder b;
  b.add<probe>(p);
  b.add<dead_letter_store>(store);
  ASSERT_FALSE(mesh->start({&handler}, b.freeze()));
  p->behave = [](event_context&) { return dead_letter("bad order"); };
  mesh->publish(make_env("order.confirmed", "dlq-1"));
  ASSERT_TRUE(mesh->run_until([&] { return store->attempts >= 2; }));
  EXPECT_EQ(mesh->broker_stats().acked, 0u); // not durable yet: not acked
  EXPECT_EQ(mesh->broker_stats().unacked, 1u);
  ASSERT_TRUE(mesh->run_until_settled());
  EXPECT_EQ(store->attempts, 4);
  ASSERT_EQ(store->records.size(), 1u);
  EXPECT_EQ(store->records[0].category, "permanent");
  EXPECT_EQ(p->runs("dlq-1"), 1u); // the handler is not run again
  EXPECT_EQ(mesh->broker_stats().acked, 1u);
  EXPECT_EQ(mesh->broker_stats().protocol_violations, 0u);
}
