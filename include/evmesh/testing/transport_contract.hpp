#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

#include <boost/json/object.hpp>
#include <caf/error.hpp>
#include <caf/expected.hpp>
#include <caf/timespan.hpp>
#include <gtest/gtest.h>

#include "evmesh/envelope.hpp"
#include "evmesh/error.hpp"
#include "evmesh/stores.hpp"
#include "evmesh/transport.hpp"

/// The transport contract: one GoogleTest suite that holds every transport
/// (inproc, NATS, Kafka, AMQP, or your own) to the broker semantics the mesh
/// relies on (DESIGN.md §4 and §7). To run it against a transport:
///
/// 1. Derive a default-constructible harness from
///    `evmesh::testing::transport_harness`. Its constructor (or `start`)
///    prepares an isolated broker for one test: in-process brokers reset a
///    fresh broker and inject a manual clock through
///    `transport_environment::now`; real brokers connect to a test server and
///    return real-time deadlines. One harness object lives for one test.
/// 2. Instantiate the suite in the `evmesh::testing` namespace (the GoogleTest
///    macros refer to the suite's names unqualified):
///
///        #include <evmesh/testing/transport_contract.hpp>
///
///        struct nats_harness : evmesh::testing::transport_harness { ... };
///
///        namespace evmesh::testing {
///        INSTANTIATE_TYPED_TEST_SUITE_P(nats, transport_contract,
///                                       nats_harness);
///        } // namespace evmesh::testing
///
/// 3. Link the test with GTest::gtest_main and the transport's library.
///
/// The suite never sleeps on its own when `poll_deadline()` is zero: a
/// harness with a manual clock runs every test deterministically. For a real
/// broker, return a `poll_deadline()` of a few seconds, a `quiet_period()`
/// long enough for a wrong redelivery to show up (but shorter than the ack
/// wait, or an unacked message comes back legitimately), and let `advance`
/// sleep. Tests that need a capability the transport lacks
/// (`transport_capabilities`, `contract_traits`) skip with a message.
///
/// What the transport must promise, test by test: a published message arrives
/// once, as `encode_envelope(env)` on `env.topic`, with delivery count 1; an
/// ack is final (also for later members of the group); `nack(0)` redelivers
/// with the count incremented, `nack(delay)` not before the delay; `close()`
/// stops consuming and hands unacked messages to the group again; groups fan
/// out, members of a group compete without duplicates; nacked messages of one
/// subject come back in publish order; traceparent, tracestate and key
/// survive (as headers or in the bytes); `dead_letter` keeps the record in the
/// broker's DLQ; settling an unknown, settled or foreign tag is an error that
/// changes nothing; `poll` never blocks; `publish` is thread-safe (also while
/// the same transport polls); the wakeup fires after an empty poll; and every
/// delivery of a mixed ack/nack/dead-letter run accepts exactly one terminal
/// action. `close()` must be idempotent: the fixture closes every transport
/// after each test, also those a test closed.
namespace evmesh::testing {

/// Promises beyond `transport_capabilities` that single tests depend on. A
/// harness turns one off, and documents why, when its broker cannot keep it;
/// the dependent test then skips.
struct contract_traits {
  /// Messages of one subject that were nacked without delay come back in
  /// publish order, whatever order they were nacked in (inproc; Kafka within
  /// a partition). JetStream and AMQP redeliver in nack order or interleave.
  bool ordered_redelivery = true;
  /// Two consumers of one group that alternately poll one message each both
  /// receive some. False for brokers that hand a whole partition to one
  /// member (Kafka with a single-partition topic).
  bool balanced_competition = true;
};

/// What a transport instance of the contract suite provides. One object per
/// test; the fixture calls `start` first and `stop` last.
class transport_harness {
public:
  virtual ~transport_harness() = default;

  /// Prepares the broker for one test (connect, create streams or queues).
  /// An error fails the test; `GTEST_SKIP()` inside skips it.
  virtual caf::error start() {
    return {};
  }

  /// Releases what `start` set up. Called after every transport the test
  /// made was closed.
  virtual void stop() {
    // nop
  }

  /// A new transport that consumes as a member of `group`, not yet
  /// subscribed: the suite calls `set_wakeup` and `subscribe` itself, in the
  /// order the runtime does. Members of one group compete for messages; every
  /// group receives every message published after it subscribed.
  virtual caf::expected<transport_ptr> make_consumer(std::string group) = 0;

  /// A transport the suite only publishes through (never subscribed).
  virtual caf::expected<transport_ptr> make_producer() = 0;

  /// A topic prefix no earlier test, and no earlier run against the same
  /// server, used. The suite publishes on `PREFIX.NAME` and subscribes to
  /// `PREFIX.>`; the broker's dead-letter destination must not match that
  /// pattern. Called once per test, after `start`.
  virtual std::string unique_topic_prefix() = 0;

  /// What the transport under test supports; decides which checks run.
  virtual transport_capabilities capabilities() const = 0;

  /// Lets `d` pass on the transport's clock: advances the manual clock given
  /// to the transport as `transport_environment::now`, or sleeps for a real
  /// broker.
  virtual void advance(caf::timespan d) = 0;

  /// The records the broker's dead-letter queue holds for `group`, oldest
  /// first; `std::nullopt` when they cannot be read back (the suite then
  /// skips its DLQ checks).
  virtual std::optional<std::vector<dead_letter_record>>
  dead_letters(const std::string& group) = 0;

  /// How long to wait for messages that should arrive. Zero means delivery
  /// is synchronous (in-process): polling loops then stop after a few polls
  /// without progress and never sleep.
  virtual caf::timespan poll_deadline() const {
    return caf::timespan{0};
  }

  /// How long to watch for messages that must *not* arrive (after an ack,
  /// for duplicates). Zero: a few immediate polls.
  virtual caf::timespan quiet_period() const {
    return poll_deadline();
  }

  /// The delay of the `nack(tag, delay)` test.
  virtual caf::timespan nack_delay() const {
    return std::chrono::seconds{2};
  }

  /// How much earlier than `nack_delay` a real broker may redeliver (timer
  /// granularity, sleep overshoot). Zero for a manual clock.
  virtual caf::timespan timer_slack() const {
    return caf::timespan{0};
  }

  /// How often the broker saw an ack or nack for a delivery that already had
  /// its terminal action in `group`; 0 when the broker cannot tell.
  virtual uint64_t violations(const std::string& /* group */) {
    return 0;
  }

  /// Promises the broker keeps beyond `capabilities()`.
  virtual contract_traits traits() const {
    return {};
  }
};

/// Bounds a polling loop. With a zero deadline (manual clock) the loop ends
/// after `idle_rounds` polls in a row without progress, or after `max_rounds`
/// polls (a transport that redelivers endlessly must fail, not hang), and
/// never sleeps; otherwise it ends at the deadline and sleeps `interval` after
/// each poll that brought nothing.
class poll_budget {
public:
  static constexpr size_t idle_rounds = 3;

  static constexpr size_t max_rounds = 1'000;

  static constexpr auto interval = std::chrono::milliseconds{5};

  explicit poll_budget(caf::timespan deadline)
    : deadline_(deadline), until_(std::chrono::steady_clock::now() + deadline) {
  }

  /// Reports whether the last poll brought messages; returns whether to poll
  /// again.
  bool next(bool progress) {
    if (deadline_.count() <= 0) {
      idle_ = progress ? 0 : idle_ + 1;
      return idle_ < idle_rounds && ++rounds_ < max_rounds;
    }
    if (std::chrono::steady_clock::now() >= until_)
      return false;
    if (!progress)
      std::this_thread::sleep_for(interval);
    return true;
  }

private:
  caf::timespan deadline_;
  std::chrono::steady_clock::time_point until_;
  size_t idle_ = 0;
  size_t rounds_ = 0;
};

/// Pass as `n` to `poll_until` to collect whatever arrives until the deadline.
inline constexpr size_t all_messages = std::numeric_limits<size_t>::max();

/// Polls `t` (at most `batch` messages a call) until `n` messages arrived or
/// the `poll_budget` for `deadline` ran out. Never returns more than `n`.
/// Returns the first error of `poll`.
inline caf::expected<std::vector<raw_message>>
poll_until(transport& t, size_t n, caf::timespan deadline, size_t batch = 64) {
  std::vector<raw_message> out;
  poll_budget budget{deadline};
  while (out.size() < n) {
    auto before = out.size();
    if (auto err = t.poll(std::min(batch, n - out.size()), out))
      return err;
    if (out.size() >= n || !budget.next(out.size() > before))
      break;
  }
  return out;
}

/// Turns a `caf::error` into a GoogleTest assertion result that prints the
/// rendered error: `EXPECT_TRUE(succeeded(t.ack(tag)))`.
inline ::testing::AssertionResult succeeded(const caf::error& err) {
  if (!err)
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << render(err);
}

/// The `id` of the envelope in `msg`, or a marker naming the decode error.
inline std::string envelope_id(const raw_message& msg) {
  auto env = decode_envelope(msg.bytes, {msg.subject, msg.traceparent,
                                         msg.tracestate, msg.key});
  if (!env)
    return "<undecodable: " + render(env.error()) + ">";
  return env->id;
}

/// The fixture of the contract suite; `Harness` is the transport instance.
/// Transports made through `consumer` and the producer are closed after each
/// test.
template <class Harness>
class transport_contract : public ::testing::Test {
public:
  static_assert(std::is_base_of_v<transport_harness, Harness>,
                "a contract harness derives from transport_harness");
  static_assert(std::is_default_constructible_v<Harness>,
                "the suite creates one harness per test");

protected:
  void SetUp() override {
    harness_ = std::make_unique<Harness>();
    auto err = harness_->start();
    if (IsSkipped())
      return;
    ASSERT_TRUE(succeeded(err)) << "harness start failed";
    prefix_ = harness_->unique_topic_prefix();
    caps_ = harness_->capabilities();
  }

  void TearDown() override {
    for (auto& t : transports_)
      if (auto err = t->close())
        ADD_FAILURE() << "close failed: " << render(err);
    transports_.clear();
    producer_.reset();
    if (harness_)
      harness_->stop();
    harness_.reset();
  }

  Harness& harness() {
    return *harness_;
  }

  const transport_capabilities& caps() const {
    return caps_;
  }

  /// The harness's `unique_topic_prefix()` for this test.
  const std::string& prefix() const {
    return prefix_;
  }

  /// The topic `PREFIX.name`.
  std::string topic(std::string_view name) const {
    return prefix_ + "." + std::string{name};
  }

  /// The pattern every consumer subscribes to: `PREFIX.>`.
  std::string pattern() const {
    return prefix_ + ".>";
  }

  /// An event on `topic(name)` with a unique id and payload `{"n": i}`.
  envelope event(std::string_view name, size_t i) const {
    envelope env;
    env.id = prefix_ + "-" + std::string{name} + "-" + std::to_string(i);
    env.topic = topic(name);
    env.payload = boost::json::object{{"n", static_cast<uint64_t>(i)}};
    return env;
  }

  /// A subscribed consumer of `group`; `wakeup`, when given, is registered
  /// before subscribing (as the runtime does). Null after a failure.
  transport_ptr consumer(const std::string& group,
                         std::function<void()> wakeup = {}) {
    auto t = harness_->make_consumer(group);
    if (!t) {
      ADD_FAILURE() << "make_consumer(" << group
                    << ") failed: " << render(t.error());
      return nullptr;
    }
    transports_.push_back(*t);
    if (wakeup)
      (*t)->set_wakeup(std::move(wakeup));
    if (auto err = (*t)->subscribe({pattern()})) {
      ADD_FAILURE() << "subscribe(" << pattern() << ") failed: " << render(err);
      return nullptr;
    }
    return *t;
  }

  /// The producer transport, made on first use. Null after a failure.
  transport_ptr producer() {
    if (!producer_) {
      auto t = harness_->make_producer();
      if (!t) {
        ADD_FAILURE() << "make_producer failed: " << render(t.error());
        return nullptr;
      }
      producer_ = *t;
      transports_.push_back(producer_);
    }
    return producer_;
  }

  /// Publishes `env` through the producer.
  void publish(const envelope& env) {
    auto p = producer();
    ASSERT_TRUE(p);
    EXPECT_TRUE(succeeded(p->publish(env))) << "publish of " << env.id;
  }

  /// Up to `n` messages that arrive within `poll_deadline()`.
  std::vector<raw_message> poll(transport& t, size_t n) {
    auto got = poll_until(t, n, harness_->poll_deadline());
    if (!got) {
      ADD_FAILURE() << "poll failed: " << render(got.error());
      return {};
    }
    return std::move(*got);
  }

  /// Whatever arrives within `quiet_period()`.
  std::vector<raw_message> drain(transport& t) {
    auto got = poll_until(t, all_messages, harness_->quiet_period());
    if (!got) {
      ADD_FAILURE() << "poll failed: " << render(got.error());
      return {};
    }
    return std::move(*got);
  }

  /// Whatever a few immediate polls bring (no waiting, also for real
  /// brokers).
  std::vector<raw_message> poll_now(transport& t) {
    auto got = poll_until(t, all_messages, caf::timespan{0});
    if (!got) {
      ADD_FAILURE() << "poll failed: " << render(got.error());
      return {};
    }
    return std::move(*got);
  }

  /// Acks every message, expecting success.
  static void ack_all(transport& t, const std::vector<raw_message>& msgs) {
    for (auto& msg : msgs)
      EXPECT_TRUE(succeeded(t.ack(msg.tag))) << "ack of " << envelope_id(msg);
  }

  /// The envelope ids of `msgs`, in order.
  static std::vector<std::string> ids(const std::vector<raw_message>& msgs) {
    std::vector<std::string> result;
    for (auto& msg : msgs)
      result.push_back(envelope_id(msg));
    return result;
  }

  /// Whether `pred` holds now or, for real brokers, turns true within
  /// `poll_deadline()`.
  bool eventually(const std::function<bool()>& pred) {
    poll_budget budget{harness_->poll_deadline()};
    for (;;) {
      if (pred())
        return true;
      if (!budget.next(false))
        return false;
    }
  }

  /// Checks a redelivery count: `expected` when the broker counts, else
  /// anything (0 means "not counted").
  void expect_delivery_count(const raw_message& msg, uint32_t expected) {
    if (caps_.delivery_count) {
      EXPECT_EQ(msg.delivery_count, expected)
        << "delivery_count of " << envelope_id(msg);
    }
  }

private:
  std::unique_ptr<Harness> harness_;
  std::string prefix_;
  transport_capabilities caps_;
  std::vector<transport_ptr> transports_;
  transport_ptr producer_;
};

TYPED_TEST_SUITE_P(transport_contract);

// -- delivery ------------------------------------------------------------------

TYPED_TEST_P(transport_contract,
             published_message_arrives_once_with_bytes_subject_and_count_1) {
  auto c = this->consumer("a");
  ASSERT_TRUE(c);
  auto env = this->event("created", 1);
  this->publish(env);
  auto got = this->poll(*c, 1);
  ASSERT_EQ(got.size(), 1u) << "the published message did not arrive";
  EXPECT_EQ(got[0].bytes, encode_envelope(env))
    << "publish(envelope) must put encode_envelope(env) on the wire verbatim";
  EXPECT_EQ(got[0].subject, env.topic);
  this->expect_delivery_count(got[0], 1);
  EXPECT_TRUE(this->drain(*c).empty())
    << "an unacked message was delivered twice to one consumer";
  EXPECT_TRUE(succeeded(c->ack(got[0].tag)));
}

TYPED_TEST_P(transport_contract, acked_message_is_never_delivered_again) {
  auto c = this->consumer("b");
  ASSERT_TRUE(c);
  this->publish(this->event("acked", 1));
  auto got = this->poll(*c, 1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_TRUE(succeeded(c->ack(got[0].tag)));
  EXPECT_TRUE(this->drain(*c).empty()) << "redelivered after ack";
  // An ack is durable: a new member of the group does not see it either.
  EXPECT_TRUE(succeeded(c->close()));
  auto again = this->consumer("b");
  ASSERT_TRUE(again);
  EXPECT_TRUE(this->drain(*again).empty())
    << "redelivered to a new consumer after ack";
}

// -- redelivery ----------------------------------------------------------------

TYPED_TEST_P(transport_contract, nack_without_delay_redelivers_with_count_2) {
  auto c = this->consumer("c");
  ASSERT_TRUE(c);
  auto env = this->event("nacked", 1);
  this->publish(env);
  auto first = this->poll(*c, 1);
  ASSERT_EQ(first.size(), 1u);
  EXPECT_TRUE(succeeded(c->nack(first[0].tag, caf::timespan{0})));
  auto second = this->poll(*c, 1);
  ASSERT_EQ(second.size(), 1u) << "nack(0) did not redeliver";
  EXPECT_EQ(second[0].bytes, first[0].bytes);
  EXPECT_EQ(second[0].subject, env.topic);
  EXPECT_NE(second[0].tag, first[0].tag) << "delivery tags must be unique";
  this->expect_delivery_count(second[0], 2);
  EXPECT_TRUE(succeeded(c->ack(second[0].tag)));
  EXPECT_TRUE(this->drain(*c).empty());
}

TYPED_TEST_P(transport_contract, nack_with_delay_redelivers_only_after_it) {
  if (!this->caps().delayed_nack)
    GTEST_SKIP() << "the transport does not honour nack delays "
                    "(capabilities().delayed_nack is false)";
  auto& h = this->harness();
  auto delay = h.nack_delay();
  auto slack = h.timer_slack();
  auto tick = caf::timespan{std::chrono::milliseconds{1}};
  ASSERT_GT(delay, slack + tick) << "nack_delay() must exceed timer_slack()";
  auto c = this->consumer("d");
  ASSERT_TRUE(c);
  this->publish(this->event("delayed", 1));
  auto first = this->poll(*c, 1);
  ASSERT_EQ(first.size(), 1u);
  EXPECT_TRUE(succeeded(c->nack(first[0].tag, delay)));
  EXPECT_TRUE(this->poll_now(*c).empty()) << "redelivered at once";
  h.advance(delay - slack - tick);
  EXPECT_TRUE(this->poll_now(*c).empty()) << "redelivered before the delay";
  h.advance(slack + 2 * tick);
  auto second = this->poll(*c, 1);
  ASSERT_EQ(second.size(), 1u) << "not redelivered after the delay";
  EXPECT_EQ(second[0].bytes, first[0].bytes);
  this->expect_delivery_count(second[0], 2);
  EXPECT_TRUE(succeeded(c->ack(second[0].tag)));
}

TYPED_TEST_P(transport_contract,
             close_makes_unacked_messages_deliverable_to_the_group) {
  auto a = this->consumer("e");
  ASSERT_TRUE(a);
  for (size_t i = 0; i < 3; ++i)
    this->publish(this->event("closed", i));
  auto first = this->poll(*a, 3);
  ASSERT_EQ(first.size(), 3u);
  EXPECT_TRUE(succeeded(a->close()));
  std::vector<raw_message> stolen;
  static_cast<void>(a->poll(64, stolen)); // an error is fine, messages not
  EXPECT_TRUE(stolen.empty()) << "a closed consumer still consumes";
  auto b = this->consumer("e");
  ASSERT_TRUE(b);
  auto second = this->poll(*b, 3);
  ASSERT_EQ(second.size(), 3u)
    << "unacked messages of a closed consumer were not redelivered";
  auto expected = this->ids(first);
  auto actual = this->ids(second);
  EXPECT_EQ(std::multiset<std::string>(actual.begin(), actual.end()),
            std::multiset<std::string>(expected.begin(), expected.end()));
  for (auto& msg : second)
    this->expect_delivery_count(msg, 2);
  this->ack_all(*b, second);
  EXPECT_TRUE(this->drain(*b).empty());
}

TYPED_TEST_P(transport_contract,
             nacked_redeliveries_come_back_in_publish_order) {
  if (!this->harness().traits().ordered_redelivery)
    GTEST_SKIP() << "the broker does not promise publish order for "
                    "redeliveries (contract_traits::ordered_redelivery)";
  auto c = this->consumer("g");
  ASSERT_TRUE(c);
  constexpr size_t count = 5;
  for (size_t i = 0; i < count; ++i)
    this->publish(this->event("ordered", i));
  auto first = this->poll(*c, count);
  ASSERT_EQ(first.size(), count);
  auto published = this->ids(first);
  // Nack in reverse so a broker that replays in nack order fails.
  for (auto i = first.rbegin(); i != first.rend(); ++i)
    EXPECT_TRUE(succeeded(c->nack(i->tag, caf::timespan{0})));
  auto second = this->poll(*c, count);
  ASSERT_EQ(second.size(), count);
  EXPECT_EQ(this->ids(second), published);
  this->ack_all(*c, second);
}

// -- groups --------------------------------------------------------------------

TYPED_TEST_P(transport_contract, every_group_gets_every_message) {
  auto a = this->consumer("fan-a");
  auto b = this->consumer("fan-b");
  ASSERT_TRUE(a && b);
  constexpr size_t count = 20;
  std::set<std::string> published;
  for (size_t i = 0; i < count; ++i) {
    auto env = this->event("fan", i);
    published.insert(env.id);
    this->publish(env);
  }
  for (auto* c : {a.get(), b.get()}) {
    auto got = this->poll(*c, count);
    auto got_ids = this->ids(got);
    EXPECT_EQ(got_ids.size(), count);
    EXPECT_EQ(std::set<std::string>(got_ids.begin(), got_ids.end()), published);
    this->ack_all(*c, got);
    EXPECT_TRUE(this->drain(*c).empty());
  }
}

TYPED_TEST_P(transport_contract, consumers_of_one_group_split_without_dupes) {
  auto a = this->consumer("split");
  auto b = this->consumer("split");
  ASSERT_TRUE(a && b);
  constexpr size_t count = 20;
  std::set<std::string> published;
  for (size_t i = 0; i < count; ++i) {
    auto env = this->event("split", i);
    published.insert(env.id);
    this->publish(env);
  }
  std::multiset<std::string> seen;
  size_t got_a = 0;
  size_t got_b = 0;
  poll_budget budget{this->harness().poll_deadline()};
  while (seen.size() < count) {
    auto progress = false;
    for (auto [c, n] :
         {std::pair{a.get(), &got_a}, std::pair{b.get(), &got_b}}) {
      std::vector<raw_message> out;
      ASSERT_TRUE(succeeded(c->poll(1, out)));
      for (auto& msg : out) {
        seen.insert(envelope_id(msg));
        ++*n;
        EXPECT_TRUE(succeeded(c->ack(msg.tag)));
      }
      progress = progress || !out.empty();
    }
    if (!budget.next(progress))
      break;
  }
  EXPECT_EQ(seen.size(), count);
  EXPECT_EQ(std::set<std::string>(seen.begin(), seen.end()), published);
  for (auto& id : published)
    EXPECT_LE(seen.count(id), 1u) << id << " went to both consumers";
  if (this->harness().traits().balanced_competition) {
    EXPECT_GT(got_a, 0u) << "the first consumer got nothing";
    EXPECT_GT(got_b, 0u) << "the second consumer got nothing";
  }
  EXPECT_TRUE(this->drain(*a).empty());
  EXPECT_TRUE(this->drain(*b).empty());
}

// -- metadata and dead letters -------------------------------------------------

TYPED_TEST_P(transport_contract, trace_context_and_key_survive_the_broker) {
  auto c = this->consumer("h");
  ASSERT_TRUE(c);
  auto env = this->event("traced", 1);
  env.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  env.tracestate = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";
  env.key = "order-42";
  this->publish(env);
  auto got = this->poll(*c, 1);
  ASSERT_EQ(got.size(), 1u);
  auto& msg = got[0];
  // Headers are optional, but when a transport fills them they must agree.
  if (!msg.traceparent.empty()) {
    EXPECT_EQ(msg.traceparent, env.traceparent);
  }
  if (!msg.tracestate.empty()) {
    EXPECT_EQ(msg.tracestate, env.tracestate);
  }
  if (!msg.key.empty()) {
    EXPECT_EQ(msg.key, env.key);
  }
  auto decoded = decode_envelope(msg.bytes, {msg.subject, msg.traceparent,
                                             msg.tracestate, msg.key});
  ASSERT_TRUE(decoded) << render(decoded.error());
  EXPECT_EQ(decoded->traceparent, env.traceparent);
  EXPECT_EQ(decoded->tracestate, env.tracestate);
  EXPECT_EQ(decoded->key, env.key);
  EXPECT_TRUE(succeeded(c->ack(msg.tag)));
}

TYPED_TEST_P(transport_contract,
             dead_lettered_message_is_kept_not_redelivered) {
  auto c = this->consumer("i");
  ASSERT_TRUE(c);
  auto env = this->event("poison", 1);
  this->publish(env);
  auto got = this->poll(*c, 1);
  ASSERT_EQ(got.size(), 1u);
  auto& msg = got[0];
  dead_letter_record rec;
  rec.category = "permanent";
  rec.reason = "contract test: poison message";
  rec.attempts = 1;
  rec.add_error(1, 0, rec.reason);
  rec.consumer = "contract";
  rec.pattern = this->pattern();
  rec.topic = env.topic;
  rec.transport = std::string{c->scheme()};
  rec.position = msg.position;
  rec.original = msg.bytes;
  rec.original_decoded = true;
  EXPECT_TRUE(succeeded(c->dead_letter(msg.tag, rec)));
  EXPECT_TRUE(succeeded(c->ack(msg.tag)));
  EXPECT_TRUE(this->drain(*c).empty()) << "redelivered after dead_letter+ack";
  if (!this->caps().broker_dead_letter)
    return; // the runtime's dead-letter store keeps the record
  auto records = this->harness().dead_letters("i");
  if (!records)
    return; // the broker's DLQ cannot be read back
  auto i = std::find_if(records->begin(), records->end(),
                        [&](const dead_letter_record& x) {
                          return x.original == msg.bytes;
                        });
  ASSERT_NE(i, records->end()) << "the record is not in the broker's DLQ";
  EXPECT_EQ(i->category, rec.category);
  EXPECT_EQ(i->reason, rec.reason);
  EXPECT_EQ(i->topic, rec.topic);
  EXPECT_EQ(i->position, rec.position);
}

// -- protocol errors and non-blocking calls ------------------------------------

TYPED_TEST_P(transport_contract, settling_unknown_or_settled_tags_is_an_error) {
  auto c = this->consumer("j");
  ASSERT_TRUE(c);
  this->publish(this->event("first", 1));
  auto first = this->poll(*c, 1);
  ASSERT_EQ(first.size(), 1u);
  auto tag = first[0].tag;
  constexpr auto unknown = std::numeric_limits<uint64_t>::max() - 7;
  ASSERT_NE(tag, unknown);
  EXPECT_TRUE(c->ack(unknown)) << "ack of an unknown tag succeeded";
  EXPECT_TRUE(c->nack(unknown, caf::timespan{0}))
    << "nack of an unknown tag succeeded";
  // The errors left the unacked delivery alone.
  EXPECT_TRUE(succeeded(c->ack(tag)));
  EXPECT_TRUE(c->ack(tag)) << "a second ack of one delivery succeeded";
  EXPECT_TRUE(c->nack(tag, caf::timespan{0})) << "nack after ack succeeded";
  // ... and did not corrupt the queue: the acked message stays gone, a new
  // one flows normally.
  this->publish(this->event("second", 2));
  auto second = this->poll(*c, 1);
  ASSERT_EQ(second.size(), 1u);
  EXPECT_EQ(envelope_id(second[0]), this->event("second", 2).id);
  this->expect_delivery_count(second[0], 1);
  EXPECT_TRUE(succeeded(c->ack(second[0].tag)));
  EXPECT_TRUE(this->drain(*c).empty());
}

TYPED_TEST_P(transport_contract,
             settling_another_members_delivery_is_an_error) {
  // Tags belong to the consumer that received the delivery. (An AMQP channel
  // closes on a foreign tag, so a transport must refuse it locally.)
  auto a = this->consumer("o");
  auto b = this->consumer("o");
  ASSERT_TRUE(a && b);
  this->publish(this->event("owned", 1));
  std::vector<raw_message> got;
  transport* owner = nullptr;
  transport* other = nullptr;
  poll_budget budget{this->harness().poll_deadline()};
  while (owner == nullptr) {
    for (auto [x, y] :
         {std::pair{a.get(), b.get()}, std::pair{b.get(), a.get()}}) {
      ASSERT_TRUE(succeeded(x->poll(1, got)));
      if (!got.empty()) {
        owner = x;
        other = y;
        break;
      }
    }
    if (owner == nullptr && !budget.next(false))
      break;
  }
  ASSERT_NE(owner, nullptr) << "the published message did not arrive";
  auto tag = got[0].tag;
  EXPECT_TRUE(other->ack(tag)) << "a member acked another member's delivery";
  EXPECT_TRUE(other->nack(tag, caf::timespan{0}))
    << "a member nacked another member's delivery";
  EXPECT_TRUE(this->poll_now(*other).empty())
    << "a foreign nack redelivered the message";
  EXPECT_TRUE(succeeded(owner->ack(tag)));
  EXPECT_TRUE(this->drain(*a).empty());
  EXPECT_TRUE(this->drain(*b).empty());
}

TYPED_TEST_P(transport_contract, poll_on_an_empty_queue_returns_promptly) {
  auto c = this->consumer("k");
  ASSERT_TRUE(c);
  for (int i = 0; i < 5; ++i) {
    std::vector<raw_message> out;
    auto start = std::chrono::steady_clock::now();
    auto err = c->poll(64, out);
    auto took = std::chrono::steady_clock::now() - start;
    EXPECT_TRUE(succeeded(err));
    EXPECT_TRUE(out.empty());
    EXPECT_LT(took, std::chrono::milliseconds{100})
      << "poll blocked on an empty queue";
  }
}

// -- concurrency and the terminal-action invariant -----------------------------

TYPED_TEST_P(transport_contract, publish_is_thread_safe) {
  // Two threads publish through the consumer while it polls and acks (as
  // handlers do while the source polls), two through the shared producer.
  auto c = this->consumer("l");
  auto p = this->producer();
  ASSERT_TRUE(c && p);
  constexpr size_t threads = 4;
  constexpr size_t per_thread = 250;
  constexpr size_t count = threads * per_thread;
  std::atomic<size_t> done{0};
  std::atomic<size_t> failures{0};
  std::vector<envelope> events;
  for (size_t i = 0; i < count; ++i)
    events.push_back(this->event("mt", i));
  std::vector<std::thread> pool;
  for (size_t t = 0; t < threads; ++t) {
    auto via = t % 2 == 0 ? c : p;
    pool.emplace_back([&, via, t] {
      for (size_t i = t * per_thread; i < (t + 1) * per_thread; ++i)
        if (via->publish(events[i]))
          ++failures;
      ++done;
    });
  }
  std::multiset<std::string> seen;
  auto take = [&](const std::vector<raw_message>& msgs) {
    for (auto& msg : msgs) {
      seen.insert(envelope_id(msg));
      EXPECT_TRUE(succeeded(c->ack(msg.tag)));
    }
  };
  while (done < threads) {
    std::vector<raw_message> out;
    EXPECT_TRUE(succeeded(c->poll(64, out)));
    take(out);
    if (out.empty())
      std::this_thread::yield();
  }
  for (auto& t : pool)
    t.join();
  EXPECT_EQ(failures.load(), 0u) << "publish failed under concurrency";
  if (seen.size() < count)
    take(this->poll(*c, count - seen.size()));
  EXPECT_EQ(seen.size(), count);
  std::set<std::string> unique(seen.begin(), seen.end());
  EXPECT_EQ(unique.size(), count) << "a message was delivered twice";
  for (auto& env : events)
    EXPECT_EQ(unique.count(env.id), 1u) << env.id << " was lost";
  EXPECT_TRUE(this->drain(*c).empty());
}

TYPED_TEST_P(transport_contract, wakeup_is_called_after_an_empty_poll) {
  if (!this->caps().wakeup)
    GTEST_SKIP() << "the transport has no wakeup (capabilities().wakeup is "
                    "false); the runtime polls it on a timer";
  // Counters outlive the test body: transports close in TearDown.
  auto calls_a = std::make_shared<std::atomic<int>>(0);
  auto calls_b = std::make_shared<std::atomic<int>>(0);
  // One registers before subscribing (as the runtime does), one after.
  auto a = this->consumer("m-a", [calls_a] { ++*calls_a; });
  auto b = this->consumer("m-b");
  ASSERT_TRUE(a && b);
  b->set_wakeup([calls_b] { ++*calls_b; });
  EXPECT_TRUE(this->poll_now(*a).empty());
  EXPECT_TRUE(this->poll_now(*b).empty());
  this->publish(this->event("wake", 1));
  EXPECT_TRUE(this->eventually([&] { return *calls_a > 0; }))
    << "no wakeup for the consumer that registered before subscribing";
  EXPECT_TRUE(this->eventually([&] { return *calls_b > 0; }))
    << "no wakeup for the consumer that registered after subscribing";
  for (auto* c : {a.get(), b.get()}) {
    auto got = this->poll(*c, 1);
    EXPECT_EQ(got.size(), 1u) << "woken up, but nothing to poll";
    this->ack_all(*c, got);
  }
}

TYPED_TEST_P(transport_contract,
             each_delivery_gets_exactly_one_terminal_action) {
  // Acts like the runtime on 1000 messages: a quarter is nacked once, a
  // quarter dead-lettered then acked, the rest acked. The broker must accept
  // every action exactly once and redeliver exactly the nacked ones.
  auto c = this->consumer("n");
  ASSERT_TRUE(c);
  constexpr size_t count = 1000;
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < count; ++i) {
    auto env = this->event("bulk" + std::to_string(i % 8), i);
    index.emplace(env.id, i);
    this->publish(env);
  }
  std::map<std::string, size_t> deliveries;
  std::set<std::string> settled;
  size_t dead_lettered = 0;
  poll_budget budget{this->harness().poll_deadline()};
  while (settled.size() < count) {
    std::vector<raw_message> out;
    ASSERT_TRUE(succeeded(c->poll(64, out)));
    for (auto& msg : out) {
      auto id = envelope_id(msg);
      auto i = index.find(id);
      ASSERT_NE(i, index.end()) << "unexpected message " << id;
      ASSERT_EQ(settled.count(id), 0u) << id << " delivered after its ack";
      auto nth = ++deliveries[id];
      this->expect_delivery_count(msg, static_cast<uint32_t>(nth));
      if (nth == 1 && i->second % 4 == 0) {
        EXPECT_TRUE(succeeded(c->nack(msg.tag, caf::timespan{0})));
        continue;
      }
      if (nth == 1 && i->second % 4 == 1) {
        dead_letter_record rec;
        rec.category = "permanent";
        rec.reason = "contract test";
        rec.topic = msg.subject;
        rec.position = msg.position;
        rec.original = msg.bytes;
        EXPECT_TRUE(succeeded(c->dead_letter(msg.tag, rec)));
        ++dead_lettered;
      }
      EXPECT_TRUE(succeeded(c->ack(msg.tag)));
      settled.insert(id);
    }
    if (!budget.next(!out.empty()))
      break;
  }
  EXPECT_EQ(settled.size(), count);
  EXPECT_TRUE(this->drain(*c).empty());
  for (auto& [id, n] : deliveries)
    EXPECT_EQ(n, index[id] % 4 == 0 ? 2u : 1u) << id;
  EXPECT_EQ(this->harness().violations("n"), 0u);
  if (!this->caps().broker_dead_letter)
    return;
  if (auto records = this->harness().dead_letters("n")) {
    auto ours = std::count_if(records->begin(), records->end(),
                              [this](const dead_letter_record& x) {
                                return x.topic.rfind(this->prefix(), 0) == 0;
                              });
    EXPECT_EQ(static_cast<size_t>(ours), dead_lettered);
  }
}

REGISTER_TYPED_TEST_SUITE_P(
  transport_contract,
  published_message_arrives_once_with_bytes_subject_and_count_1,
  acked_message_is_never_delivered_again,
  nack_without_delay_redelivers_with_count_2,
  nack_with_delay_redelivers_only_after_it,
  close_makes_unacked_messages_deliverable_to_the_group,
  nacked_redeliveries_come_back_in_publish_order,
  every_group_gets_every_message, consumers_of_one_group_split_without_dupes,
  trace_context_and_key_survive_the_broker,
  dead_lettered_message_is_kept_not_redelivered,
  settling_unknown_or_settled_tags_is_an_error,
  settling_another_members_delivery_is_an_error,
  poll_on_an_empty_queue_returns_promptly, publish_is_thread_safe,
  wakeup_is_called_after_an_empty_poll,
  each_delivery_gets_exactly_one_terminal_action);

} // namespace evmesh::testing
