// Cluster worker *processes* for the cluster tests. The test binary is the
// ingress node (a consumer_runtime on an inproc:// broker); it re-executes
// itself (`/proc/self/exe --evmesh-cluster-worker ...`) for each worker node.
// Every node runs the same handler, which appends "KEY SEQ NODE T_NS\n" to
// its node's journal with one write(2) (O_APPEND), so a SIGKILL loses nothing
// that was written; T_NS is CLOCK_MONOTONIC, comparable across processes.
#pragma once

#include <atomic>
#include <chrono>
#include <climits>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "evmesh/runtime.hpp"
#include "evmesh/testing.hpp"

namespace evmesh::testing::cluster {

inline constexpr std::string_view worker_flag = "--evmesh-cluster-worker";

/// Messages with this sequence number modulo 101 are dead-lettered.
inline bool is_poison(uint64_t seq) {
  return seq % 101 == 50;
}

inline int& journal_fd() {
  static int fd = -1;
  return fd;
}

inline std::string& node_label() {
  static std::string name;
  return name;
}

inline int64_t mono_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

/// The handler of every node: 1 ms of "work", then a journal line.
inline outcome handle_work(event_context& ctx) {
  auto start = mono_ns();
  const auto& env = ctx.message();
  auto seq = std::stoull(env.id.substr(env.id.rfind('-') + 1));
  if (is_poison(seq))
    return dead_letter("poison message " + env.id);
  std::this_thread::sleep_for(std::chrono::milliseconds{1});
  auto line = env.key + ' ' + std::to_string(seq) + ' ' + node_label() + ' '
              + std::to_string(start) + '\n';
  auto rc = ::write(journal_fd(), line.data(), line.size());
  (void) rc;
  return ok();
}

inline handler_descriptor& work_handler() {
  static handler_descriptor h = [] {
    handler_descriptor d;
    d.consumer = "cluster";
    d.pattern = "work.*";
    d.fn = &handle_work;
    d.options.execution = execution::blocking;
    d.options.ordering = ordering::per_key;
    d.options.concurrency = 4;
    d.options.max_attempts = 20;
    return d;
  }();
  return h;
}

/// TLS files of one node (all empty: no TLS).
struct tls_files {
  std::string ca;
  std::string cert;
  std::string key;
};

/// The configuration of every node of the tests.
inline runtime_config
node_config(const std::string& name, const std::string& broker,
            const std::string& secret, const tls_files& tls) {
  auto cfg = test_config(broker);
  cfg.node_name = name;
  cfg.cluster_secret = secret;
  cfg.cluster_heartbeat_interval = std::chrono::milliseconds{100};
  cfg.cluster_heartbeat_timeout = std::chrono::milliseconds{2000};
  cfg.cluster_connect_timeout = std::chrono::milliseconds{2000};
  cfg.cluster_tls_ca = tls.ca;
  cfg.cluster_tls_cert = tls.cert;
  cfg.cluster_tls_key = tls.key;
  cfg.defaults.backoff.initial = std::chrono::milliseconds{5};
  cfg.defaults.backoff.max = std::chrono::milliseconds{50};
  cfg.max_in_flight = 512;
  cfg.poll_batch = 64;
  cfg.stop_timeout = std::chrono::seconds{5};
  return cfg;
}

inline bool is_worker(int argc, char** argv) {
  return argc > 1 && std::string_view{argv[1]} == worker_flag;
}

/// argv: EXE --evmesh-cluster-worker NAME SEED SECRET JOURNAL [CA CERT KEY]
/// Runs a worker node until SIGTERM (clean stop, exit 0) or SIGKILL; writes
/// JOURNAL.ready once it has joined its seed.
inline int run_worker(int argc, char** argv) {
  if (argc != 6 && argc != 9) {
    std::cerr << "worker: expected NAME SEED SECRET JOURNAL [CA CERT KEY]\n";
    return 2;
  }
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  node_label() = argv[2];
  std::string journal = argv[5];
  journal_fd() = ::open(journal.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (journal_fd() < 0) {
    std::cerr << "worker: cannot open " << journal << "\n";
    return 2;
  }
  tls_files tls;
  if (argc == 9)
    tls = {argv[6], argv[7], argv[8]};
  auto cfg = node_config(argv[2], std::string{"worker-"} + argv[2], argv[4],
                         tls);
  cfg.cluster_role = "worker";
  cfg.cluster_seeds = {argv[3]};
  consumer_runtime rt{cfg};
  rt.set_handlers({&work_handler()});
  if (auto err = rt.start()) {
    std::cerr << "worker: start failed: " << render(err) << "\n";
    return 3;
  }
  // Report "ready" once joined; then wait for a stop signal.
  std::atomic<bool> stopping{false};
  std::thread ready{[&rt, &stopping, journal] {
    for (int i = 0; i < 3000 && !stopping; ++i) {
      auto st = rt.cluster();
      for (auto& p : st.peers)
        if (p.state == "alive") {
          std::ofstream{journal + ".ready"} << ::getpid() << "\n";
          return;
        }
      std::this_thread::sleep_for(std::chrono::milliseconds{10});
    }
  }};
  int sig = 0;
  sigwait(&stop_signals, &sig);
  stopping = true;
  ready.join();
  std::cerr << "worker: stopping" << std::endl;
  rt.stop(std::chrono::seconds{5});
  std::cerr << "worker: stopped" << std::endl;
  ::close(journal_fd());
  return 0;
}

/// One worker child process; SIGKILLed and reaped by the destructor.
class worker_process {
public:
  worker_process(const std::string& name, const std::string& seed,
                 const std::string& secret, const std::string& journal,
                 const tls_files& tls = {})
    : journal_(journal) {
    char exe[PATH_MAX] = {};
    auto n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n <= 0)
      throw std::runtime_error("readlink /proc/self/exe failed");
    std::vector<std::string> args{std::string{exe, static_cast<size_t>(n)},
                                  std::string{worker_flag},
                                  name,
                                  seed,
                                  secret,
                                  journal};
    if (!tls.ca.empty()) {
      args.push_back(tls.ca);
      args.push_back(tls.cert);
      args.push_back(tls.key);
    }
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    std::remove((journal + ".ready").c_str());
    auto log = journal + ".log";
    auto parent = ::getpid();
    pid_ = ::fork();
    if (pid_ < 0)
      throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent)
        ::_exit(1);
      int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
  }

  worker_process(const worker_process&) = delete;
  worker_process& operator=(const worker_process&) = delete;

  ~worker_process() {
    kill9();
  }

  pid_t pid() const noexcept {
    return pid_;
  }

  bool ready() const {
    return std::ifstream{journal_ + ".ready"}.good();
  }

  void kill9() {
    if (pid_ <= 0)
      return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, &status_, 0);
    pid_ = -1;
  }

  /// SIGTERM, then up to `limit` for a clean exit (SIGKILL after).
  bool terminate(std::chrono::milliseconds limit) {
    if (pid_ <= 0)
      return false;
    ::kill(pid_, SIGTERM);
    auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      if (::waitpid(pid_, &status_, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status_) && WEXITSTATUS(status_) == 0;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        kill9();
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds{10});
    }
  }

  std::string log_tail(size_t max_chars = 3000) const {
    std::ifstream in{journal_ + ".log"};
    std::string text{std::istreambuf_iterator<char>{in}, {}};
    if (text.size() > max_chars)
      text = text.substr(text.size() - max_chars);
    return text;
  }

private:
  std::string journal_;
  pid_t pid_ = -1;
  int status_ = 0;
};

/// One journal line.
struct handled_entry {
  std::string key;
  uint64_t seq = 0;
  std::string node;
  int64_t t_ns = 0;
};

/// The complete lines of a journal (a torn last line is ignored).
inline std::vector<handled_entry> read_journal(const std::string& path) {
  std::ifstream in{path};
  std::string text{std::istreambuf_iterator<char>{in}, {}};
  std::vector<handled_entry> out;
  size_t pos = 0;
  for (;;) {
    auto nl = text.find('\n', pos);
    if (nl == std::string::npos)
      break;
    std::istringstream line{text.substr(pos, nl - pos)};
    handled_entry e;
    if (line >> e.key >> e.seq >> e.node >> e.t_ns)
      out.push_back(std::move(e));
    pos = nl + 1;
  }
  return out;
}

} // namespace evmesh::testing::cluster
