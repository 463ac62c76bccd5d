// Cluster worker *processes* for the cluster tests. The test binary is the
// ingress node (a consumer_runtime on an inproc:// broker); it re-executes
// itself (`/proc/self/exe --evmesh-cluster-worker ...`) for each worker node.
// Every node runs the same handler, which appends "KEY SEQ NODE T_NS\n" to
// its node's journal with one write(2) (O_APPEND), so a SIGKILL loses nothing
// that was written; T_NS is CLOCK_MONOTONIC, comparable across processes.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <unistd.h>

#include "evmesh/runtime.hpp"
#include "evmesh/testing.hpp"

#include "../child_process.hpp"

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
  append_line(journal_fd(), env.key + ' ' + std::to_string(seq) + ' '
                              + node_label() + ' ' + std::to_string(start));
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
  return has_worker_flag(argc, argv, worker_flag);
}

/// argv: EXE --evmesh-cluster-worker NAME SEED SECRET JOURNAL [CA CERT KEY]
/// Runs a worker node until SIGTERM (clean stop, exit 0) or SIGKILL; writes
/// JOURNAL.ready once it has joined its seed.
inline int run_worker(int argc, char** argv) {
  if (argc != 6 && argc != 9) {
    std::cerr << "worker: expected NAME SEED SECRET JOURNAL [CA CERT KEY]\n";
    return 2;
  }
  auto stop_signals = block_stop_signals();
  node_label() = argv[2];
  std::string journal = argv[5];
  journal_fd() = open_journal(journal);
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
          mark_ready(journal);
          return;
        }
      std::this_thread::sleep_for(std::chrono::milliseconds{10});
    }
  }};
  wait_for_stop_signal(stop_signals);
  stopping = true;
  ready.join();
  std::cerr << "worker: stopping" << std::endl;
  rt.stop(std::chrono::seconds{5});
  std::cerr << "worker: stopped" << std::endl;
  ::close(journal_fd());
  return 0;
}

/// One worker child process; SIGKILLed and reaped by the destructor.
class worker_process : public worker_child {
public:
  worker_process(const std::string& name, const std::string& seed,
                 const std::string& secret, const std::string& journal,
                 const tls_files& tls = {})
    : worker_child(worker_flag, args(name, seed, secret, journal, tls),
                   journal) {
  }

private:
  static std::vector<std::string>
  args(const std::string& name, const std::string& seed,
       const std::string& secret, const std::string& journal,
       const tls_files& tls) {
    std::vector<std::string> out{name, seed, secret, journal};
    if (!tls.ca.empty()) {
      out.push_back(tls.ca);
      out.push_back(tls.cert);
      out.push_back(tls.key);
    }
    return out;
  }
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
  std::vector<handled_entry> out;
  for (auto& text : read_lines(path)) {
    std::istringstream line{text};
    handled_entry e;
    if (line >> e.key >> e.seq >> e.node >> e.t_ns)
      out.push_back(std::move(e));
  }
  return out;
}

} // namespace evmesh::testing::cluster
