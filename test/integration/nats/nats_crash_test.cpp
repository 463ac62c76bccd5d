// Issue 3, integration test 2: consumer *processes* on one NATS durable are
// killed with SIGKILL mid-stream, several times, and restarted; every
// published message still ends handled (or in the DLQ stream). The test
// binary re-executes itself as the worker (nats_worker.hpp). Every wait has a
// deadline; the server and every worker are stopped by their fixtures.
#include <chrono>
#include <iostream>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/error.hpp"
#include "evmesh/nats.hpp"

#include "nats_server.hpp"
#include "nats_worker.hpp"

using namespace evmesh;
using namespace std::chrono_literals;
using evmesh::testing::nats_server;
using evmesh::testing::read_lines;
using evmesh::testing::temp_dir;
using evmesh::testing::wait_for;
using evmesh::testing::worker_process;

namespace {

transport_environment env() {
  return {{}, "test-node"};
}

} // namespace

TEST(nats_crash, kill_9_of_consumer_processes_mid_stream_loses_nothing) {
  if (!nats_server::available())
    GTEST_SKIP() << "nats-server is not installed (scripts/install-deps.sh "
                    "--with-servers)";
  register_nats_transport();
  nats_server server;
  temp_dir dir{"evmesh-crash"};
  // ack_wait 2s: what a killed worker held comes back to the next one soon.
  auto url = server.url()
             + "?stream=WORK&durable=work-svc&subjects=work.>&ack_wait=2s";
  constexpr int count = 3000;
  {
    auto producer = make_transport(url, env());
    ASSERT_TRUE(producer) << render(producer.error());
    for (int i = 0; i < count; ++i) {
      envelope e;
      e.topic = "work.item";
      e.id = "w-" + std::to_string(i);
      e.idempotency_key = e.id;
      e.payload = boost::json::object{{"n", i}};
      ASSERT_FALSE((*producer)->publish(std::move(e)));
    }
  }
  // Distinct ids over every worker's journal.
  auto handled = [&](int workers) {
    std::set<std::string> ids;
    for (int w = 0; w < workers; ++w)
      for (auto& id : read_lines(dir.file("w" + std::to_string(w))))
        ids.insert(id);
    return ids;
  };
  constexpr int kills = 3;
  std::vector<size_t> at_kill;
  size_t lines_before = 0;
  for (int w = 0; w < kills; ++w) {
    auto journal = dir.file("w" + std::to_string(w));
    worker_process worker{"plain", url, "none", journal, 0};
    // Let it handle a few hundred messages, then kill it mid-stream.
    auto progressed = wait_for(
      [&] { return read_lines(journal).size() >= 300 || worker.exited(); },
      60s);
    ASSERT_TRUE(progressed) << "worker " << w << " made no progress:\n"
                            << worker.log_tail();
    ASSERT_FALSE(worker.exited()) << "worker " << w << " died:\n"
                                  << worker.log_tail();
    worker.kill9();
    auto seen = handled(w + 1).size();
    at_kill.push_back(seen);
    std::cout << "[ info ] worker " << w << " killed (SIGKILL) after "
              << read_lines(journal).size() << " handles; " << seen
              << " distinct of " << count << " handled so far\n";
    EXPECT_LT(seen, size_t{count}) << "kill " << w << " was not mid-stream";
    EXPECT_GT(seen, lines_before);
    lines_before = seen;
  }
  // A last worker finishes the stream (what the killed ones held comes back
  // after ack_wait), then stops cleanly.
  auto journal = dir.file("w" + std::to_string(kills));
  worker_process last{"plain", url, "none", journal, 0};
  auto done = wait_for(
    [&] { return handled(kills + 1).size() == size_t{count} || last.exited(); },
    90s);
  auto ids = handled(kills + 1);
  ASSERT_FALSE(last.exited()) << "last worker died:\n" << last.log_tail();
  // Give the last runtime a moment to settle its acks, then stop it.
  std::this_thread::sleep_for(300ms);
  EXPECT_TRUE(last.terminate(15s)) << "last worker did not stop cleanly:\n"
                                   << last.log_tail();
  auto st = last.stats();
  std::cout << "[ info ] last worker: handled " << st[0] << ", dead-lettered "
            << st[1] << ", received " << st[2] << "\n";
  // Everything not handled must be in the DLQ stream.
  std::set<std::string> dead;
  auto records = nats_dead_letters(url);
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
  EXPECT_TRUE(lost.empty())
    << lost.size() << " messages lost, first " << lost.front();
  size_t total_lines = 0;
  for (int w = 0; w <= kills; ++w)
    total_lines += read_lines(dir.file("w" + std::to_string(w))).size();
  std::cout << "[ info ] " << count << " messages: " << ids.size()
            << " handled, " << dead.size() << " dead-lettered, "
            << total_lines - ids.size()
            << " duplicate handles (redeliveries after SIGKILL)\n";
}

int main(int argc, char** argv) {
  if (evmesh::testing::is_worker(argc, argv))
    return evmesh::testing::run_worker(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
