// Shared test helpers: a probe service handlers reach through DI.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/context.hpp"
#include "evmesh/registry.hpp"
#include "evmesh/testing.hpp"

namespace evmesh::test {

/// Records every handler call; `behave` decides the outcome.
struct probe {
  std::mutex mtx;
  struct call {
    std::string topic;
    std::string id;
    std::string key;
    uint32_t attempt;
    trace_context trace;
    std::string tenant;
  };
  std::vector<call> calls;
  std::function<outcome(event_context&)> behave = [](event_context&) {
    return ok();
  };

  size_t runs(const std::string& id) {
    std::lock_guard guard{mtx};
    size_t n = 0;
    for (auto& c : calls)
      n += c.id == id ? 1 : 0;
    return n;
  }

  size_t total() {
    std::lock_guard guard{mtx};
    return calls.size();
  }
};

inline outcome probe_handler(event_context& ctx) {
  auto& p = ctx.inject<probe>();
  {
    std::lock_guard guard{p.mtx};
    p.calls.push_back({ctx.message().topic, ctx.message().id, ctx.message().key,
                       ctx.attempt(), ctx.trace(), ctx.tenant()});
  }
  return p.behave(ctx);
}

inline handler_descriptor make_handler(const char* consumer,
                                       const char* pattern,
                                       handler_options opts = {}) {
  handler_descriptor d;
  d.consumer = consumer;
  d.pattern = pattern;
  d.fn = &probe_handler;
  d.options = opts;
  d.file = __FILE__;
  d.line = __LINE__;
  return d;
}

inline envelope make_env(std::string topic, std::string id,
                         std::string key = {}) {
  envelope e;
  e.topic = std::move(topic);
  e.id = id;
  e.idempotency_key = std::move(id);
  e.key = std::move(key);
  e.payload = boost::json::object{{"n", 1}};
  return e;
}

/// For tests on a real scheduler: waits (yielding) until `pred` holds;
/// false after `limit`.
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

/// The running test's name (unique broker names per test).
inline std::string test_name() {
  return ::testing::UnitTest::GetInstance()->current_test_info()->name();
}

inline container with_probe(std::shared_ptr<probe> p) {
  container_builder b;
  b.add<probe>(std::move(p));
  return b.freeze();
}

} // namespace evmesh::test
