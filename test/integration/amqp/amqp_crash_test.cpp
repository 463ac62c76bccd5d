// Issue 5, integration test 2: consumer *processes* on one RabbitMQ queue are
// killed with SIGKILL mid-stream, several times, and restarted; every
// published message still ends handled (or in the DLQ queue). The broker
// returns what a dead connection held unacked at once. Every wait has a
// deadline; the broker and every worker are stopped by their owners.
#include <chrono>
#include <iostream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/amqp.hpp"
#include "evmesh/error.hpp"

#include "amqp_worker.hpp"
#include "rabbitmq_server.hpp"

using namespace evmesh;
using namespace std::chrono_literals;
using evmesh::testing::amqp_worker;
using evmesh::testing::rabbitmq_server;
using evmesh::testing::read_lines;
using evmesh::testing::temp_dir;
using evmesh::testing::wait_for;

TEST(amqp_crash, kill_9_of_consumer_processes_mid_stream_loses_nothing) {
  if (!rabbitmq_server::available())
    GTEST_SKIP() << "rabbitmq-server is not installed (scripts/install-deps.sh "
                    "--with-servers)";
  register_amqp_transport();
  rabbitmq_server server;
  temp_dir dir{"evmesh-amqp-crash"};
  auto url = server.url() + "?queue=work-svc&prefetch=128";
  constexpr int count = 3000;
  {
    // A first consumer declares and binds the queue and leaves before the
    // stream is published (it would hold and return some of it).
    auto setup = make_transport(url, {{}, "setup"});
    ASSERT_TRUE(setup) << render(setup.error());
    ASSERT_FALSE((*setup)->subscribe({"work.*"}));
    ASSERT_FALSE((*setup)->close());
    setup = make_transport(server.url(), {{}, "producer"});
    ASSERT_TRUE(setup) << render(setup.error());
    for (int i = 0; i < count; ++i) {
      envelope e;
      e.topic = "work.item";
      e.id = "w-" + std::to_string(i);
      e.payload = boost::json::object{{"n", i}};
      ASSERT_FALSE((*setup)->publish(e));
    }
    ASSERT_FALSE((*setup)->close());
  }
  auto handled = [&](int workers) {
    std::set<std::string> ids;
    for (int w = 0; w < workers; ++w)
      for (auto& id : read_lines(dir.file("w" + std::to_string(w))))
        ids.insert(id);
    return ids;
  };
  constexpr int kills = 3;
  size_t before = 0;
  for (int w = 0; w < kills; ++w) {
    auto journal = dir.file("w" + std::to_string(w));
    amqp_worker worker{url, journal};
    auto progressed = wait_for(
      [&] { return read_lines(journal).size() >= 300 || worker.exited(); },
      60s);
    ASSERT_TRUE(progressed) << "worker " << w << " made no progress:\n"
                            << worker.log_tail();
    ASSERT_FALSE(worker.exited()) << "worker " << w << " died:\n"
                                  << worker.log_tail();
    worker.kill9();
    auto seen = handled(w + 1).size();
    std::cout << "[ info ] worker " << w << " killed (SIGKILL) after "
              << read_lines(journal).size() << " handles; " << seen
              << " distinct of " << count << " handled so far\n";
    EXPECT_LT(seen, size_t{count}) << "kill " << w << " was not mid-stream";
    EXPECT_GT(seen, before);
    before = seen;
  }
  auto journal = dir.file("w" + std::to_string(kills));
  amqp_worker last{url, journal};
  auto done = wait_for(
    [&] { return handled(kills + 1).size() == size_t{count} || last.exited(); },
    120s);
  auto ids = handled(kills + 1);
  ASSERT_FALSE(last.exited()) << "last worker died:\n" << last.log_tail();
  EXPECT_TRUE(last.terminate(15s)) << "last worker did not stop cleanly:\n"
                                   << last.log_tail();
  std::set<std::string> dead;
  auto records = amqp_dead_letters(url);
  ASSERT_TRUE(records) << render(records.error());
  for (auto& rec : *records) {
    auto original = decode_envelope(rec.original, {});
    ASSERT_TRUE(original) << rec.original;
    dead.insert(original->id);
  }
  std::vector<std::string> lost;
  for (int i = 0; i < count; ++i) {
    auto id = "w-" + std::to_string(i);
    if (!ids.contains(id) && !dead.contains(id))
      lost.push_back(id);
  }
  EXPECT_TRUE(done) << ids.size() << " of " << count << " handled, "
                    << dead.size() << " dead-lettered";
  EXPECT_TRUE(lost.empty()) << lost.size() << " messages lost, first "
                            << (lost.empty() ? "" : lost.front());
  size_t total = 0;
  for (int w = 0; w <= kills; ++w)
    total += read_lines(dir.file("w" + std::to_string(w))).size();
  std::cout << "[ info ] " << count << " messages: " << ids.size()
            << " handled, " << dead.size() << " dead-lettered, "
            << total - ids.size()
            << " duplicate handles (redeliveries after SIGKILL)\n";
}

TEST(amqp_crash,
     a_message_that_kills_every_consumer_is_dead_lettered_as_crash_loop) {
  if (!rabbitmq_server::available())
    GTEST_SKIP() << "rabbitmq-server is not installed (scripts/install-deps.sh "
                    "--with-servers)";
  register_amqp_transport();
  rabbitmq_server server;
  temp_dir dir{"evmesh-amqp-crash"};
  // A quorum queue counts deliveries across process deaths; prefetch=1 keeps
  // the other messages out of the crashing processes' hands.
  auto url = server.url() + "?queue=loop-svc&queue_type=quorum&prefetch=1";
  constexpr int max_attempts = 3;
  constexpr int others = 20;
  {
    auto setup = make_transport(url, {{}, "setup"});
    ASSERT_TRUE(setup) << render(setup.error());
    ASSERT_FALSE((*setup)->subscribe({"work.*"}));
    // Closed before publishing: a delivery to it would count.
    ASSERT_FALSE((*setup)->close());
    setup = make_transport(server.url(), {{}, "producer"});
    ASSERT_TRUE(setup) << render(setup.error());
    envelope crash;
    crash.topic = "work.item";
    crash.id = "crash";
    crash.payload = boost::json::object{{"n", -1}};
    ASSERT_FALSE((*setup)->publish(crash));
    for (int i = 0; i < others; ++i) {
      envelope e;
      e.topic = "work.item";
      e.id = "ok-" + std::to_string(i);
      e.payload = boost::json::object{{"n", i}};
      ASSERT_FALSE((*setup)->publish(e));
    }
    ASSERT_FALSE((*setup)->close());
  }
  // max_attempts executions, each one killing its process ...
  for (int w = 0; w < max_attempts; ++w) {
    amqp_worker worker{url, dir.file("w" + std::to_string(w)), max_attempts};
    ASSERT_TRUE(wait_for([&] { return worker.exited(); }, 60s))
      << "worker " << w << " survived the crashing message";
    EXPECT_EQ(worker.exit_code(), 42) << worker.log_tail();
  }
  // ... then the next process dead-letters it on arrival instead of running
  // it again, and handles the rest.
  auto journal = dir.file("w" + std::to_string(max_attempts));
  amqp_worker last{url, journal, max_attempts};
  auto done = wait_for(
    [&] {
      return read_lines(journal).size() >= size_t{others} || last.exited();
    },
    60s);
  ASSERT_FALSE(last.exited()) << "the last worker died:\n" << last.log_tail();
  EXPECT_TRUE(done) << read_lines(journal).size() << " of " << others;
  EXPECT_TRUE(last.terminate(15s)) << last.log_tail();
  auto records = amqp_dead_letters(url);
  ASSERT_TRUE(records) << render(records.error());
  ASSERT_EQ(records->size(), 1u);
  EXPECT_EQ(records->front().category, "crash_loop");
  auto original = decode_envelope(records->front().original, {});
  ASSERT_TRUE(original);
  EXPECT_EQ(original->id, "crash");
}

int main(int argc, char** argv) {
  if (evmesh::testing::is_amqp_worker(argc, argv))
    return evmesh::testing::run_amqp_worker(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
