// transport::defer on a real scheduler: a retry due later than the
// transport's `defer_after` leaves through `defer` (with the attempts so far),
// and the key's successors the supervisor held go back to the transport as
// nacks after the deferral, never running before it.
#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/consumer.hpp"
#include "evmesh/testing.hpp"

#include "probe.hpp"

using namespace evmesh;
using namespace evmesh::test;
using namespace std::chrono_literals;

namespace {

/// What the runtime asked the transport, in order ("defer K-1 1", "nack K-2",
/// "ack L-1").
struct call_log {
  std::mutex mtx;
  std::vector<std::string> calls;
  std::map<uint64_t, std::string> ids; // tag -> message id

  void add(std::string x) {
    std::lock_guard guard{mtx};
    calls.push_back(std::move(x));
  }

  std::vector<std::string> snapshot() {
    std::lock_guard guard{mtx};
    return calls;
  }
};

std::shared_ptr<call_log> the_log;

/// inproc with a retry topic of sorts: `defer` logs and acks.
class deferring_transport : public transport {
public:
  explicit deferring_transport(transport_ptr inner) : inner_(std::move(inner)) {
  }

  std::string_view scheme() const noexcept override {
    return "defer-inproc";
  }
  transport_capabilities capabilities() const noexcept override {
    auto caps = inner_->capabilities();
    caps.defer_after = 1s;
    return caps;
  }
  caf::error subscribe(const std::vector<std::string>& patterns) override {
    return inner_->subscribe(patterns);
  }
  caf::error poll(size_t max, std::vector<raw_message>& out) override {
    auto first = out.size();
    auto err = inner_->poll(max, out);
    for (auto i = first; i < out.size(); ++i)
      if (auto env = decode_envelope(out[i].bytes, {}); env) {
        std::lock_guard guard{the_log->mtx};
        the_log->ids[out[i].tag] = env->id;
      }
    return err;
  }
  caf::error ack(uint64_t tag) override {
    the_log->add("ack " + id_of(tag));
    return inner_->ack(tag);
  }
  caf::error nack(uint64_t tag, caf::timespan delay) override {
    the_log->add("nack " + id_of(tag));
    return inner_->nack(tag, delay);
  }
  caf::error defer(uint64_t tag, caf::timespan delay,
                   uint32_t attempts) override {
    the_log->add("defer " + id_of(tag) + " " + std::to_string(attempts)
                 + (delay >= 1s ? "" : " (too early)"));
    return inner_->ack(tag);
  }
  caf::error dead_letter(uint64_t tag, const dead_letter_record& rec) override {
    return inner_->dead_letter(tag, rec);
  }
  caf::error extend(uint64_t tag) override {
    return inner_->extend(tag);
  }
  caf::error publish(const envelope& env) override {
    return inner_->publish(env);
  }
  void set_wakeup(std::function<void()> fn) override {
    inner_->set_wakeup(std::move(fn));
  }
  caf::error close() override {
    return inner_->close();
  }

private:
  static std::string id_of(uint64_t tag) {
    std::lock_guard guard{the_log->mtx};
    return the_log->ids[tag];
  }

  transport_ptr inner_;
};

std::mutex runs_mtx;
std::vector<std::string> runs;

outcome fail_k1(event_context& ctx) {
  {
    std::lock_guard guard{runs_mtx};
    runs.push_back(ctx.message().id);
  }
  return ctx.message().id == "K-1" ? retry("not yet") : ok();
}

} // namespace

TEST(defer, a_late_retry_leaves_through_the_transport_and_parks_its_key) {
  the_log = std::make_shared<call_log>();
  register_transport(
    "defer-inproc",
    [](std::string_view url,
       const transport_environment& env) -> caf::expected<transport_ptr> {
      auto inner = make_transport("inproc://" + std::string{url.substr(15)},
                                  env);
      if (!inner)
        return inner.error();
      return std::make_shared<deferring_transport>(std::move(*inner));
    });
  auto broker = inproc_broker::get(test_name());
  broker->reset();
  auto cfg = evmesh::testing::test_config(test_name());
  cfg.transport_url = "defer-inproc://" + test_name();
  cfg.defaults.concurrency = 2;
  cfg.defaults.max_attempts = 5;
  cfg.defaults.backoff = {5s, 2.0, 30s, jitter::none}; // >= defer_after
  for (auto id : {"K-1", "K-2", "K-3", "L-1"})
    broker->publish(make_env("order.placed", id, std::string{id}.substr(0, 1)));
  handler_descriptor h;
  h.consumer = "orders";
  h.pattern = "order.*";
  h.fn = &fail_k1;
  consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  ASSERT_FALSE(rt.start());
  auto has = [](const std::string& call) {
    auto calls = the_log->snapshot();
    return std::find(calls.begin(), calls.end(), call) != calls.end();
  };
  ASSERT_TRUE(wait_for([&] { return has("ack K-3") && has("ack L-1"); }, 20s));
  rt.stop(5s);
  auto calls = the_log->snapshot();
  auto at = [&](const std::string& call) {
    return std::find(calls.begin(), calls.end(), call) - calls.begin();
  };
  // K-1 failed once and left through defer, with its one attempt counted.
  ASSERT_TRUE(has("defer K-1 1")) << ::testing::PrintToString(calls);
  // Its successors, held behind it, went back after the deferral ...
  ASSERT_TRUE(has("nack K-2") && has("nack K-3"))
    << ::testing::PrintToString(calls);
  EXPECT_LT(at("defer K-1 1"), at("nack K-2"));
  EXPECT_LT(at("nack K-2"), at("nack K-3"));
  // ... and only ran once the transport delivered them again.
  std::lock_guard guard{runs_mtx};
  auto first_k2 = std::find(runs.begin(), runs.end(), "K-2");
  ASSERT_NE(first_k2, runs.end());
  EXPECT_EQ(std::count(runs.begin(), first_k2, "K-1"), 1);
  EXPECT_EQ(std::count(runs.begin(), runs.end(), "K-1"), 1); // not retried here
  EXPECT_EQ(rt.stats().nacked, 2u);
}
