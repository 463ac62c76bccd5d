// Issue 3, integration tests 1 and 4: the mesh on a real nats-server with
// dedupe on a real redis-server.
//  1. 10 000 messages with random (seeded) failures, two consumer *processes*
//     on one durable sharing Redis: every message ends handled or
//     dead-lettered, and no idempotency key is handled successfully twice.
//  4. redis-server stopped mid-stream: fail_open keeps processing, fail_closed
//     holds the messages through retries (nothing dead-lettered, nothing lost)
//     and resumes when Redis is back on the same port.
// The binary re-executes itself as the worker (nats_worker.hpp). Every wait
// has a deadline; servers and workers are always stopped by their fixtures.
#include <atomic>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include "evmesh/error.hpp"
#include "evmesh/nats.hpp"
#include "evmesh/redis_store.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/testing.hpp"

#include "nats_server.hpp"
#include "nats_worker.hpp"
#include "redis_server.hpp"

using namespace evmesh;
using namespace std::chrono_literals;
using evmesh::testing::fate;
using evmesh::testing::fate_of;
using evmesh::testing::nats_server;
using evmesh::testing::read_journal;
using evmesh::testing::redis_server;
using evmesh::testing::worker_process;

namespace {

template <class Pred>
bool wait_for(Pred pred, std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline)
      return false;
    std::this_thread::sleep_for(10ms);
  }
  return true;
}

struct temp_dir {
  std::string path;
  temp_dir() {
    char tmpl[] = "/tmp/evmesh-nats-redis-XXXXXX";
    if (mkdtemp(tmpl) == nullptr)
      throw std::runtime_error("mkdtemp failed");
    path = tmpl;
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

transport_environment env() {
  return {{}, "test-node"};
}

envelope make_env(const std::string& id, int64_t n) {
  envelope e;
  e.topic = "work.item";
  e.id = id;
  e.idempotency_key = id;
  e.payload = boost::json::object{{"n", n}};
  return e;
}

// Publishes ids PREFIX0..PREFIX{count-1} on `url`.
caf::error publish_all(const std::string& url, const std::string& prefix,
                       int count) {
  auto producer = make_transport(url, env());
  if (!producer)
    return producer.error();
  for (int i = 0; i < count; ++i)
    if (auto err
        = (*producer)->publish(make_env(prefix + std::to_string(i), i)))
      return err;
  return {};
}

// `publish_all` from `threads` producers at once (ids interleaved).
caf::error publish_parallel(const std::string& url, const std::string& prefix,
                            int count, int threads) {
  std::vector<caf::error> errors(static_cast<size_t>(threads));
  std::vector<std::thread> producers;
  for (int t = 0; t < threads; ++t)
    producers.emplace_back([&, t] {
      auto producer = make_transport(url, env());
      if (!producer) {
        errors[static_cast<size_t>(t)] = producer.error();
        return;
      }
      for (int i = t; i < count; i += threads)
        if (auto err
            = (*producer)->publish(make_env(prefix + std::to_string(i), i))) {
          errors[static_cast<size_t>(t)] = err;
          return;
        }
    });
  for (auto& p : producers)
    p.join();
  for (auto& err : errors)
    if (err)
      return err;
  return {};
}

// The ids of the records in the DLQ stream of `url`.
std::multiset<std::string> dead_letter_ids(const std::string& url) {
  std::multiset<std::string> out;
  auto records = nats_dead_letters(url);
  if (!records) {
    ADD_FAILURE() << render(records.error());
    return out;
  }
  for (auto& rec : *records) {
    auto original = decode_envelope(rec.original, {});
    if (!original) {
      ADD_FAILURE() << "undecodable DLQ original: " << rec.original;
      continue;
    }
    out.insert(original->id);
  }
  return out;
}

class nats_redis : public ::testing::Test {
protected:
  void SetUp() override {
    if (!nats_server::available() || !redis_server::available())
      GTEST_SKIP() << "nats-server or redis-server is not installed "
                      "(scripts/install-deps.sh --with-servers)";
    register_nats_transport();
    register_redis_store();
    nats_ = std::make_unique<nats_server>();
    redis_ = std::make_unique<redis_server>();
  }

  void TearDown() override {
    redis_.reset();
    nats_.reset();
  }

  std::string url(const std::string& stream) const {
    return nats_->url() + "?stream=" + stream + "&durable=" + stream
           + "-svc&subjects=work.>";
  }

  std::unique_ptr<nats_server> nats_;
  std::unique_ptr<redis_server> redis_;
};

} // namespace

// -- test 1: two processes, random failures, shared Redis dedupe ---------------

TEST_F(nats_redis, two_processes_random_failures_every_message_ends_once) {
  constexpr int count = 10'000;
  constexpr uint64_t seed = 20261127;
  temp_dir dir;
  auto nats_url = url("RAND");
  // Create the stream and durable before the workers race to do it.
  {
    auto t = make_transport(nats_url, env());
    ASSERT_TRUE(t) << render(t.error());
  }
  std::vector<std::string> journals{dir.path + "/a", dir.path + "/b"};
  worker_process a{"random", nats_url, redis_->url(), journals[0], seed};
  worker_process b{"random", nats_url, redis_->url(), journals[1], seed};
  ASSERT_TRUE(wait_for(
    [&] { return (a.ready() && b.ready()) || a.exited() || b.exited(); }, 30s))
    << "workers did not start:\n"
    << a.log_tail() << "\n"
    << b.log_tail();
  ASSERT_TRUE(a.ready() && b.ready()) << a.log_tail() << "\n" << b.log_tail();
  auto t0 = std::chrono::steady_clock::now();
  auto err = publish_parallel(nats_url, "r-", count, 4);
  ASSERT_FALSE(err) << render(err);
  auto t1 = std::chrono::steady_clock::now();
  std::set<std::string> expect_ok;
  std::set<std::string> expect_dead;
  for (int i = 0; i < count; ++i) {
    auto id = "r-" + std::to_string(i);
    if (fate_of(id, seed).kind == fate::always_fails)
      expect_dead.insert(id);
    else
      expect_ok.insert(id);
  }
  auto successes = [&] {
    size_t n = 0;
    for (auto& j : journals)
      n += read_journal(j).size();
    return n;
  };
  auto all_handled = wait_for(
    [&] { return successes() >= expect_ok.size() || a.exited() || b.exited(); },
    150s);
  EXPECT_TRUE(all_handled) << successes() << " of " << expect_ok.size()
                           << " successes";
  ASSERT_FALSE(a.exited()) << "worker a died:\n" << a.log_tail();
  ASSERT_FALSE(b.exited()) << "worker b died:\n" << b.log_tail();
  // The always-failing ones reach the DLQ stream after max_attempts.
  std::multiset<std::string> dead;
  auto all_dead = wait_for(
    [&] {
      dead = dead_letter_ids(nats_url);
      std::this_thread::sleep_for(200ms);
      return dead.size() >= expect_dead.size();
    },
    60s);
  EXPECT_TRUE(all_dead) << dead.size() << " of " << expect_dead.size()
                        << " dead letters";
  auto t2 = std::chrono::steady_clock::now();
  // Stop both cleanly; a redelivery now would have shown up as a duplicate.
  std::this_thread::sleep_for(500ms);
  EXPECT_TRUE(a.terminate(15s)) << a.log_tail();
  EXPECT_TRUE(b.terminate(15s)) << b.log_tail();
  // Successful handles: the union has no duplicates and is exactly the set
  // of messages meant to succeed.
  std::map<std::string, int> runs;
  std::vector<size_t> per_worker;
  for (auto& j : journals) {
    auto lines = read_journal(j);
    per_worker.push_back(lines.size());
    for (auto& id : lines)
      ++runs[id];
  }
  std::vector<std::string> twice;
  for (auto& [id, n] : runs)
    if (n > 1)
      twice.push_back(id);
  EXPECT_TRUE(twice.empty())
    << twice.size() << " keys handled successfully twice, first "
    << twice.front();
  std::set<std::string> ok_ids;
  for (auto& [id, n] : runs)
    ok_ids.insert(id);
  EXPECT_EQ(ok_ids, expect_ok);
  EXPECT_GT(per_worker[0], 0u) << "worker a handled nothing";
  EXPECT_GT(per_worker[1], 0u) << "worker b handled nothing";
  // Dead letters: exactly the always-failing ones, one record each.
  EXPECT_EQ(std::set<std::string>(dead.begin(), dead.end()), expect_dead);
  EXPECT_EQ(dead.size(), expect_dead.size()) << "a message dead-lettered twice";
  // Every success was committed in Redis: a fresh claim is a duplicate.
  auto store = redis_idempotency_store::open(redis_->url());
  ASSERT_TRUE(store) << render(store.error());
  size_t not_committed = 0;
  for (auto& id : ok_ids)
    if ((*store)->try_begin("workers:work.*:" + id, 1s)
        != claim_result::duplicate)
      ++not_committed;
  EXPECT_EQ(not_committed, 0u) << "successful handles without a commit";
  auto sa = a.stats();
  auto sb = b.stats();
  auto ms = [](auto d) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
  };
  std::cout << "[ info ] " << count << " messages (published in " << ms(t1 - t0)
            << " ms, settled " << ms(t2 - t1) << " ms later): " << ok_ids.size()
            << " handled (worker a " << per_worker[0] << ", b " << per_worker[1]
            << "), " << dead.size() << " dead-lettered (workers: " << sa[1]
            << " + " << sb[1] << ")\n";
}

// -- test 4: redis-server stopped mid-stream -----------------------------------

namespace {

struct outage_journal {
  std::mutex mtx;
  std::set<std::string> handled;
  std::atomic<uint64_t> runs{0};

  size_t count() {
    std::lock_guard guard{mtx};
    return handled.size();
  }
};

outage_journal oj;

outcome outage_handler(event_context& ctx) {
  std::this_thread::sleep_for(2ms);
  std::lock_guard guard{oj.mtx};
  oj.handled.insert(ctx.message().id);
  ++oj.runs;
  return ok();
}

} // namespace

class nats_redis_outage
  : public nats_redis,
    public ::testing::WithParamInterface<store_failure_policy> {};

TEST_P(nats_redis_outage, redis_stopped_mid_stream) {
  auto policy = GetParam();
  auto fail_closed = policy == store_failure_policy::fail_closed;
  {
    std::lock_guard guard{oj.mtx};
    oj.handled.clear();
    oj.runs = 0;
  }
  // One warning per message while Redis is down under fail_open: keep quiet.
  spdlog::set_level(spdlog::level::err);
  constexpr int count = 2000;
  auto nats_url = url(fail_closed ? "CLOSED" : "OPEN");
  ASSERT_FALSE(publish_all(nats_url, "o-", count));
  handler_descriptor h;
  h.consumer = "outage";
  h.pattern = "work.*";
  h.fn = &outage_handler;
  h.options.execution = execution::blocking;
  h.options.ordering = ordering::none;
  h.options.concurrency = 2;
  auto cfg = evmesh::testing::test_config("unused");
  cfg.transport_url = nats_url;
  cfg.dedupe_url = redis_->url();
  cfg.dedupe_policy = policy;
  cfg.dead_letter_url = "none";
  cfg.max_in_flight = 64;
  cfg.poll_batch = 32;
  cfg.defaults.max_attempts = 3;
  cfg.defaults.backoff.initial = 20ms;
  cfg.defaults.backoff.max = 100ms;
  consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  ASSERT_FALSE(rt.start());
  ASSERT_TRUE(wait_for([] { return oj.count() >= 200; }, 30s)) << oj.count();
  redis_->stop();
  auto at_stop = oj.count();
  if (fail_closed) {
    // Attempts that claimed before the outage finish; then nothing runs.
    std::this_thread::sleep_for(500ms);
    auto held = oj.count();
    auto deferred = rt.stats().deferred;
    std::this_thread::sleep_for(1500ms);
    EXPECT_EQ(oj.count(), held) << "handlers ran without the store";
    EXPECT_GT(rt.stats().deferred, deferred) << "not retried meanwhile";
    EXPECT_EQ(rt.stats().dead_lettered, 0u);
    EXPECT_LT(held, size_t{count});
    std::cout << "[ info ] fail_closed: " << at_stop << " handled at the stop, "
              << held << " after 0.5 s, held " << rt.stats().deferred - deferred
              << " retries in 1.5 s\n";
  } else {
    // Processing continues without the store.
    EXPECT_TRUE(wait_for([&] { return oj.count() >= at_stop + 300; }, 30s))
      << oj.count() << " handled, " << at_stop << " at the stop";
    std::cout << "[ info ] fail_open: " << at_stop << " handled at the stop, "
              << oj.count() << " while Redis was down\n";
  }
  redis_->start(); // same port, empty
  EXPECT_TRUE(wait_for([] { return oj.count() == size_t{count}; }, 60s))
    << oj.count() << " of " << count << " handled";
  rt.stop(5s);
  auto st = rt.stats();
  EXPECT_EQ(st.dead_lettered, 0u);
  EXPECT_TRUE(dead_letter_ids(nats_url).empty());
  std::cout << "[ info ] " << count << " handled, " << oj.runs.load()
            << " handler runs, " << st.deferred << " deferred attempts\n";
}

INSTANTIATE_TEST_SUITE_P(policies, nats_redis_outage,
                         ::testing::Values(store_failure_policy::fail_open,
                                           store_failure_policy::fail_closed),
                         [](const auto& param_info) {
                           return param_info.param
                                      == store_failure_policy::fail_open
                                    ? std::string{"fail_open"}
                                    : std::string{"fail_closed"};
                         });

int main(int argc, char** argv) {
  if (evmesh::testing::is_worker(argc, argv))
    return evmesh::testing::run_worker(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
