// The consumer runtime on kafka:// (librdkafka's mock cluster): a record
// whose handler kills the process is dead-lettered as crash_loop after
// max_attempts, because the transport's attempt ledger counts the handler
// runs each crash cut short (DESIGN.md §4) — and only those. The binary
// re-executes itself as the consumer process.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <string>
#include <thread>

#include <boost/json.hpp>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "evmesh/kafka.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/testing.hpp"

#include "kafka_mock.hpp"

using namespace std::chrono_literals;
using evmesh::testing::kafka_fast_settings;
using evmesh::testing::kafka_mock_cluster;

namespace {

constexpr std::string_view worker_flag = "--evmesh-kafka-runtime-worker";

constexpr uint32_t max_attempts = 3;

int journal_fd = -1;

// Kills the process on the poison event; journals every other one.
evmesh::outcome worker_handler(evmesh::event_context& ctx) {
  const auto& id = ctx.message().id;
  if (id == "poison")
    ::_exit(42); // dies mid-handler: no ack, no commit, no clean stop
  auto line = id + "\n";
  if (::write(journal_fd, line.data(), line.size()) < 0)
    return evmesh::retry("cannot write the journal");
  return evmesh::ok();
}

// argv: EXE FLAG KAFKA_URL JOURNAL
int run_worker(const std::string& url, const std::string& journal) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  journal_fd = ::open(journal.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (journal_fd < 0)
    return 2;
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  evmesh::register_kafka_transport();
  evmesh::handler_descriptor h;
  h.consumer = "orders-svc";
  h.pattern = "orders";
  h.fn = &worker_handler;
  auto cfg = evmesh::testing::test_config("unused");
  cfg.transport_url = url;
  cfg.dedupe_url = "none";
  cfg.dead_letter_url = "none"; // orders.dlq keeps the records
  cfg.defaults.max_attempts = max_attempts;
  cfg.stop_timeout = 5s;
  evmesh::consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  if (auto err = rt.start()) {
    std::cerr << "worker: start failed: " << evmesh::render(err) << "\n";
    return 3;
  }
  int sig = 0;
  sigwait(&stop_signals, &sig);
  rt.stop(5s);
  return 0;
}

std::set<std::string> read_lines(const std::filesystem::path& p) {
  std::set<std::string> result;
  std::ifstream in{p};
  std::string line;
  while (std::getline(in, line))
    result.insert(line);
  return result;
}

// One consumer process; SIGKILLed and reaped by the destructor.
class worker_process {
public:
  worker_process(const std::string& url, const std::filesystem::path& journal,
                 const std::filesystem::path& log) {
    char exe[4096];
    auto len = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (len <= 0)
      throw std::runtime_error{"readlink /proc/self/exe failed"};
    exe[len] = '\0';
    pid_ = ::fork();
    if (pid_ < 0)
      throw std::runtime_error{"fork failed"};
    if (pid_ == 0) {
      auto fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::execl(exe, exe, std::string{worker_flag}.c_str(), url.c_str(),
              journal.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
  }

  ~worker_process() {
    if (!reaped_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }

  /// The exit code once the process ended by itself within `timeout`.
  std::optional<int> wait_exit(caf::timespan timeout) {
    auto until = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < until) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        reaped_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
      }
      std::this_thread::sleep_for(50ms);
    }
    return std::nullopt;
  }

  /// SIGTERM (clean stop); whether it exited 0 within `timeout`.
  bool terminate(caf::timespan timeout) {
    ::kill(pid_, SIGTERM);
    auto code = wait_exit(timeout);
    return code && *code == 0;
  }

private:
  pid_t pid_ = -1;
  bool reaped_ = false;
};

TEST(kafka_runtime,
     a_record_that_kills_the_process_is_dead_lettered_crash_loop) {
  evmesh::register_kafka_transport();
  kafka_mock_cluster cluster;
  ASSERT_TRUE(cluster.create_topic("orders", 2));
  // Removed however the test ends.
  struct temp_dir {
    std::filesystem::path path
      = std::filesystem::temp_directory_path()
        / ("evmesh-kafka-runtime-" + std::to_string(::getpid()));
    temp_dir() {
      std::filesystem::create_directories(path);
    }
    ~temp_dir() {
      std::error_code ignored;
      std::filesystem::remove_all(path, ignored);
    }
  } tmp;
  const auto& dir = tmp.path;
  auto producer = evmesh::make_transport(cluster.url(kafka_fast_settings),
                                         {{}, "producer"});
  ASSERT_TRUE(producer) << evmesh::render(producer.error());
  std::set<std::string> normal;
  for (size_t n = 0; n < 20; ++n) {
    evmesh::envelope e;
    e.id = n == 5 ? "poison" : "order-" + std::to_string(n);
    e.topic = "orders";
    e.key = "k" + std::to_string(n % 4);
    e.payload = boost::json::object{{"n", n}};
    if (n != 5)
      normal.insert(e.id);
    ASSERT_FALSE((*producer)->publish(e));
  }
  auto url = cluster.url(std::string{kafka_fast_settings}
                         + "&group=orders-svc&topics=orders&ledger="
                         + (dir / "ledger.db").string());
  auto journal = dir / "journal";
  auto log = dir / "worker.log";
  auto log_text = [&] {
    std::ifstream in{log};
    return std::string{std::istreambuf_iterator<char>{in}, {}};
  };
  // Every run up to max_attempts dies on the poison record...
  for (uint32_t run = 1; run <= max_attempts; ++run) {
    worker_process w{url, journal, log};
    auto code = w.wait_exit(60s);
    ASSERT_TRUE(code) << "run " << run << " did not die on the poison "
                      << "record:\n"
                      << log_text();
    ASSERT_EQ(*code, 42) << "run " << run << " ended otherwise:\n"
                         << log_text();
  }
  // ... and the next one dead-letters it without running it, then handles
  // the rest. Only handler runs that were under way when a process died
  // count (the transport's run slots, through attempt_started/finished):
  // the records merely fetched with the poison, or waiting behind it on its
  // key, in every crashed run are not driven to max_attempts.
  worker_process last{url, journal, log};
  auto deadline = std::chrono::steady_clock::now() + 60s;
  std::vector<evmesh::dead_letter_record> records;
  auto dlq_url
    = cluster.url(std::string{kafka_fast_settings} + "&topics=orders");
  while (std::chrono::steady_clock::now() < deadline) {
    if (auto code = last.wait_exit(0s)) {
      FAIL() << "the last run exited with " << *code << ":\n" << log_text();
    }
    auto got = evmesh::kafka_dead_letters(dlq_url);
    ASSERT_TRUE(got) << evmesh::render(got.error());
    std::set<std::string> accounted = read_lines(journal);
    for (auto& r : *got)
      accounted.insert(r.original);
    auto poison_in = std::any_of(got->begin(), got->end(), [](auto& r) {
      return r.original.find("\"poison\"") != std::string::npos;
    });
    size_t handled_or_dead = 0;
    for (auto& id : normal)
      handled_or_dead
        += read_lines(journal).count(id) != 0
               || std::any_of(got->begin(), got->end(),
                              [&id](auto& r) {
                                return r.original.find("\"" + id + "\"")
                                       != std::string::npos;
                              })
             ? 1
             : 0;
    if (poison_in && handled_or_dead == normal.size()) {
      records = std::move(*got);
      break;
    }
    std::this_thread::sleep_for(200ms);
  }
  EXPECT_TRUE(last.terminate(20s)) << "the last run did not stop cleanly:\n"
                                   << log_text();
  ASSERT_FALSE(records.empty()) << "the poison record was not dead-lettered:\n"
                                << log_text();
  auto journal_ids = read_lines(journal);
  EXPECT_EQ(journal_ids.count("poison"), 0u);
  size_t crash_looped_innocents = 0;
  for (auto& r : records) {
    EXPECT_EQ(r.category, "crash_loop") << r.reason;
    EXPECT_EQ(r.topic, "orders");
    if (r.original.find("\"poison\"") == std::string::npos)
      ++crash_looped_innocents;
  }
  EXPECT_EQ(crash_looped_innocents, 0u)
    << "records that never ran in the crashed runs were counted as attempts";
  EXPECT_EQ(records.size(), 1u);
  for (auto& id : normal)
    EXPECT_EQ(journal_ids.count(id), 1u) << id << " was not handled";
  std::cout << "[ info ] " << journal_ids.size() << " of " << normal.size()
            << " others handled; " << crash_looped_innocents
            << " others dead-lettered as crash_loop\n";
}

} // namespace

int main(int argc, char** argv) {
  if (argc == 4 && argv[1] == worker_flag)
    return run_worker(argv[2], argv[3]);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
