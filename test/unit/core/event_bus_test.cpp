#include "evmesh/event_bus.hpp"

#include <atomic>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <boost/json.hpp>
#include <gtest/gtest.h>

using namespace evmesh;
namespace json = boost::json;

TEST(event_bus, calls_every_listener_of_a_name_in_subscription_order) {
  event_bus bus;
  std::vector<std::string> calls;
  bus.subscribe("order.created", [&](const json::value& v) {
    calls.push_back("first:" + json::serialize(v));
  });
  bus.subscribe("order.deleted",
                [&](const json::value&) { calls.push_back("other"); });
  bus.subscribe("order.created", [&](const json::value& v) {
    calls.push_back("second:" + json::serialize(v));
  });
  bus.subscribe("order.created",
                [&](const json::value&) { calls.push_back("third"); });
  EXPECT_EQ(bus.emit("order.created", json::value(42)), 3u);
  EXPECT_EQ(calls,
            (std::vector<std::string>{"first:42", "second:42", "third"}));
  EXPECT_EQ(bus.listener_count("order.created"), 3u);
  EXPECT_EQ(bus.listener_count("order.deleted"), 1u);
}

TEST(event_bus, emitting_a_name_without_listeners_calls_nothing) {
  event_bus bus;
  EXPECT_EQ(bus.emit("nobody", nullptr), 0u);
  EXPECT_EQ(bus.listener_count("nobody"), 0u);
  EXPECT_EQ(bus.listener_failures(), 0u);
}

TEST(event_bus, a_subscription_made_during_an_emit_applies_from_the_next_emit) {
  event_bus bus;
  int late_calls = 0;
  int trigger_calls = 0;
  std::vector<std::string> order;
  bus.subscribe("tick", [&](const json::value&) {
    order.push_back("trigger");
    if (trigger_calls++ == 0)
      bus.subscribe("tick", [&](const json::value&) {
        order.push_back("late");
        ++late_calls;
      });
  });
  bus.subscribe("tick", [&](const json::value&) { order.push_back("second"); });
  EXPECT_EQ(bus.emit("tick", nullptr), 2u);
  EXPECT_EQ(late_calls, 0);
  EXPECT_EQ(order, (std::vector<std::string>{"trigger", "second"}));
  EXPECT_EQ(bus.listener_count("tick"), 3u);
  order.clear();
  EXPECT_EQ(bus.emit("tick", nullptr), 3u);
  EXPECT_EQ(late_calls, 1);
  EXPECT_EQ(order, (std::vector<std::string>{"trigger", "second", "late"}));
}

TEST(event_bus, listener_exceptions_are_counted_and_never_reach_the_emitter) {
  event_bus bus;
  int after = 0;
  bus.subscribe("e",
                [](const json::value&) { throw std::runtime_error("boom"); });
  bus.subscribe("e", [](const json::value&) { throw 42; });
  bus.subscribe("e", [&](const json::value&) { ++after; });
  EXPECT_NO_THROW(bus.emit("e", nullptr));
  EXPECT_NO_THROW(bus.emit("e", nullptr));
  EXPECT_EQ(bus.listener_failures(), 4u);
  EXPECT_EQ(after, 2);
}

TEST(event_bus, a_listener_may_emit_reentrantly) {
  event_bus bus;
  std::vector<std::string> order;
  bus.subscribe("outer", [&](const json::value&) {
    order.push_back("outer");
    bus.emit("inner", nullptr);
  });
  bus.subscribe("inner", [&](const json::value&) { order.push_back("inner"); });
  bus.emit("outer", nullptr);
  EXPECT_EQ(order, (std::vector<std::string>{"outer", "inner"}));
}

TEST(event_bus, rejects_an_empty_listener) {
  event_bus bus;
  EXPECT_FALSE(bus.subscribe("e", event_bus::listener{}));
  EXPECT_EQ(bus.listener_count("e"), 0u);
}

TEST(event_bus, concurrent_emits_survive_concurrent_subscriptions) {
  event_bus bus;
  std::atomic<size_t> calls{0};
  bus.subscribe("e", [&](const json::value&) { ++calls; });
  std::atomic<bool> done{false};
  std::thread emitter{[&] {
    size_t seen = 1;
    while (!done.load()) {
      auto n = bus.emit("e", nullptr);
      // Snapshots only ever grow: an emit never sees fewer listeners.
      EXPECT_GE(n, seen);
      seen = n;
    }
  }};
  for (int i = 0; i < 200; ++i)
    bus.subscribe(i % 2 == 0 ? "e" : "f", [&](const json::value&) { ++calls; });
  done = true;
  emitter.join();
  EXPECT_EQ(bus.listener_count("e"), 101u);
  EXPECT_EQ(bus.listener_count("f"), 100u);
  EXPECT_EQ(bus.emit("e", nullptr), 101u);
}
