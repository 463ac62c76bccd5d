// How the source polls (virtual time): a transport that wakes the source is
// not polled on the `poll_idle` timer while idle, messages reach handlers on
// the wakeup alone, and wakeups never pile up poll timers; a transport
// without the capability is polled every `poll_idle`.
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <caf/all.hpp>
#include <gtest/gtest.h>

#include "evmesh/consumer.hpp"
#include "evmesh/testing.hpp"

#include "probe.hpp"

using namespace evmesh;
using namespace evmesh::test;
using namespace std::chrono_literals;

namespace {

std::atomic<size_t> polls{0};
std::atomic<size_t> handled{0};

/// inproc, counting polls; `wakes` decides the wakeup capability (without it
/// the wakeup is not passed on either).
class counting_transport : public transport {
public:
  counting_transport(transport_ptr inner, bool wakes)
    : inner_(std::move(inner)), wakes_(wakes) {
  }

  std::string_view scheme() const noexcept override {
    return "pollcount";
  }
  transport_capabilities capabilities() const noexcept override {
    auto caps = inner_->capabilities();
    caps.wakeup = wakes_;
    return caps;
  }
  caf::error subscribe(const std::vector<std::string>& patterns) override {
    return inner_->subscribe(patterns);
  }
  caf::error poll(size_t max, std::vector<raw_message>& out) override {
    ++polls;
    return inner_->poll(max, out);
  }
  caf::error ack(uint64_t tag) override {
    return inner_->ack(tag);
  }
  caf::error nack(uint64_t tag, caf::timespan delay) override {
    return inner_->nack(tag, delay);
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
    if (wakes_)
      inner_->set_wakeup(std::move(fn));
  }
  caf::error close() override {
    return inner_->close();
  }

private:
  transport_ptr inner_;
  bool wakes_;
};

outcome count(event_context&) {
  ++handled;
  return ok();
}

/// "pollcount://NAME?wakes=0|1" wraps inproc://NAME.
void register_counting_transport() {
  register_transport(
    "pollcount",
    [](std::string_view url,
       const transport_environment& env) -> caf::expected<transport_ptr> {
      auto rest
        = std::string{url.substr(std::string_view{"pollcount://"}.size())};
      auto q = rest.find('?');
      auto wakes = rest.substr(q + 1) == "wakes=1";
      auto inner = make_transport("inproc://" + rest.substr(0, q), env);
      if (!inner)
        return inner.error();
      return std::make_shared<counting_transport>(std::move(*inner), wakes);
    });
}

struct poll_fixture {
  handler_descriptor h;
  std::unique_ptr<evmesh::testing::test_mesh> mesh;
  std::shared_ptr<inproc_broker> broker;

  explicit poll_fixture(bool wakes) {
    register_counting_transport();
    polls = 0;
    handled = 0;
    auto name = test_name();
    broker = inproc_broker::get(name);
    broker->reset();
    auto cfg = evmesh::testing::test_config(name);
    cfg.transport_url = "pollcount://" + name + "?wakes=" + (wakes ? "1" : "0");
    h.consumer = "poll";
    h.pattern = "orders.*";
    h.fn = &count;
    mesh = std::make_unique<evmesh::testing::test_mesh>(cfg);
    if (auto err = mesh->start({&h}))
      ADD_FAILURE() << render(err);
  }

  void publish(int i) {
    envelope e;
    e.topic = "orders.created";
    e.id = "m-" + std::to_string(i);
    e.key = "k-" + std::to_string(i % 3);
    broker->publish(e);
  }

  /// Advances virtual time 1 ms at a time (CAF's test clock fires only the
  /// timers due at the end of one advance, not the ones they schedule).
  void advance(std::chrono::milliseconds total) {
    for (auto t = 0ms; t < total; t += 1ms)
      mesh->advance(1ms);
  }

  size_t timers() {
    return mesh->sched().clock().schedule().size();
  }
};

} // namespace

TEST(poll, a_waking_transport_is_not_polled_on_the_idle_timer) {
  poll_fixture f{true};
  polls = 0;
  // poll_idle is 5 ms: a timer-driven source would poll ten times here.
  f.advance(50ms);
  EXPECT_LE(polls.load(), 1u);
  // The safety net: 20 x poll_idle.
  f.advance(250ms);
  EXPECT_GE(polls.load(), 1u);
  EXPECT_LE(polls.load(), 4u);
  // A message is handled on the wakeup alone, without time passing.
  f.publish(1);
  f.mesh->run();
  EXPECT_EQ(handled.load(), 1u);
}

TEST(poll, wakeups_do_not_pile_up_poll_timers) {
  poll_fixture f{true};
  f.mesh->run();
  auto before = f.timers();
  for (int i = 0; i < 50; ++i) {
    f.publish(i);
    f.mesh->run(); // wakeup -> poll -> dispatch -> settle, no time passes
  }
  EXPECT_EQ(handled.load(), 50u);
  // Each of those polls came back short; at most one idle timer is pending.
  EXPECT_LE(f.timers(), before + 1);
}

TEST(poll, a_transport_without_wakeup_is_polled_every_poll_idle) {
  poll_fixture f{false};
  polls = 0;
  f.advance(50ms);
  EXPECT_GE(polls.load(), 8u);
  EXPECT_LE(polls.load(), 12u);
  // Without a wakeup a message waits for the next timer.
  f.publish(1);
  f.mesh->run();
  EXPECT_EQ(handled.load(), 0u);
  f.advance(5ms);
  EXPECT_EQ(handled.load(), 1u);
}
