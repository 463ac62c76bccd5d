// The cluster's wire conversions and join credentials (plain functions).
#include <gtest/gtest.h>

#include "cluster/wire.hpp"

using namespace evmesh;
using namespace evmesh::internal;

namespace {

TEST(cluster_wire, attempts_survive_the_round_trip) {
  auto msg = std::make_shared<incoming_message>();
  msg->env.id = "m-1";
  msg->env.topic = "orders.created";
  msg->env.key = "order-7";
  msg->env.payload = boost::json::object{{"qty", 3}};
  msg->env.headers["h"] = "v";
  msg->set_tenant("acme");
  msg->set_dedupe_key("c/orders.*:digest-1");
  msg->prior_attempts = 2;
  attempt_msg am;
  am.msg = msg;
  am.id = 11;
  am.seq = 12;
  am.attempt = 3;
  am.trace = new_root_trace("vendor=x");
  am.trace.parent = new_span_id();
  am.link = new_span_id();
  am.deadline = caf::make_timestamp() + std::chrono::seconds{30};
  auto w = to_wire(am, "c/orders.*", "ingress");
  EXPECT_EQ(w.sub, "c/orders.*");
  EXPECT_GT(w.timeout_ns, 29'000'000'000);
  auto back = from_wire(w);
  ASSERT_TRUE(back) << render(back.error());
  EXPECT_EQ(back->id, 11u);
  EXPECT_EQ(back->seq, 12u);
  EXPECT_EQ(back->attempt, 3u);
  EXPECT_EQ(back->msg->env.id, "m-1");
  EXPECT_EQ(back->msg->env.key, "order-7");
  EXPECT_EQ(back->msg->env.payload, msg->env.payload);
  EXPECT_EQ(back->msg->env.headers, msg->env.headers);
  EXPECT_EQ(back->msg->tenant(), "acme");
  EXPECT_EQ(back->msg->dedupe_key(), "c/orders.*:digest-1");
  EXPECT_EQ(back->msg->prior_attempts, 2u);
  EXPECT_EQ(back->trace.traceparent(), am.trace.traceparent());
  EXPECT_EQ(back->trace.tracestate, "vendor=x");
  EXPECT_EQ(back->link, am.link);
  EXPECT_GT(back->deadline, caf::make_timestamp());
}

TEST(cluster_wire, malformed_attempts_are_errors_not_crashes) {
  wire_attempt w;
  w.envelope = "{not json";
  EXPECT_FALSE(from_wire(w));
  w.envelope = R"({"id":"x","topic":"t","payload":{}})";
  w.trace = "short";
  EXPECT_FALSE(from_wire(w));
}

TEST(cluster_wire, results_keep_kind_outcome_and_retry_delay) {
  attempt_result res{attempt_result::handled,
                     retry("busy", std::chrono::milliseconds{250}), 5, 6};
  auto back = from_wire(to_wire(res, "w1"));
  EXPECT_EQ(back.kind, attempt_result::handled);
  EXPECT_EQ(back.out.kind, outcome_kind::retry);
  EXPECT_EQ(back.out.reason, "busy");
  ASSERT_TRUE(back.out.after);
  EXPECT_EQ(*back.out.after, std::chrono::milliseconds{250});
  EXPECT_EQ(back.id, 5u);
  EXPECT_EQ(back.seq, 6u);
  auto ok_back = from_wire(to_wire(attempt_result{}, "w1"));
  EXPECT_FALSE(ok_back.out.after);
  wire_result bogus;
  bogus.kind = 200;
  bogus.outcome = 200;
  auto safe = from_wire(bogus);
  EXPECT_EQ(safe.kind, attempt_result::handled);
  EXPECT_EQ(safe.out.kind, outcome_kind::retry);
}

TEST(cluster_join, macs_depend_on_secret_nonces_names_and_role) {
  // RFC 4231 test case 2.
  EXPECT_EQ(hmac_hex("Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  join_hello hello{"w1", 1, random_nonce()};
  auto nonce = random_nonce();
  EXPECT_EQ(nonce.size(), 64u);
  EXPECT_NE(nonce, random_nonce());
  auto a = acceptor_mac("secret-secret-secret", hello, "ingress", nonce);
  auto c = connector_mac("secret-secret-secret", hello, "ingress", nonce);
  EXPECT_NE(a, c); // a reflected proof is worthless
  EXPECT_TRUE(
    same_mac(a, acceptor_mac("secret-secret-secret", hello, "ingress", nonce)));
  EXPECT_FALSE(
    same_mac(a, acceptor_mac("secret-secret-secreT", hello, "ingress", nonce)));
  EXPECT_FALSE(
    same_mac(a, acceptor_mac("secret-secret-secret", hello, "ingres", nonce)));
  EXPECT_FALSE(same_mac(a, acceptor_mac("secret-secret-secret", hello,
                                        "ingress", random_nonce())));
  auto other = hello;
  other.node = "w2";
  EXPECT_FALSE(same_mac(c, connector_mac("secret-secret-secret", other,
                                         "ingress", nonce)));
  EXPECT_FALSE(same_mac("", ""));
  EXPECT_FALSE(same_mac(a, a.substr(1)));
}

} // namespace
