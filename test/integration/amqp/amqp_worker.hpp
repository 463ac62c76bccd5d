// Consumer *processes* for the AMQP crash test: the test binary re-executes
// itself (`/proc/self/exe --evmesh-amqp-worker URL JOURNAL`) and the child
// runs a `consumer_runtime` on the shared queue until SIGTERM (clean stop,
// exit 0) or SIGKILL. Every successful handler run appends "ID\n" to the
// journal with one write(2) on an O_APPEND descriptor, so a SIGKILL loses
// nothing that was written. The child dies with the test binary
// (PR_SET_PDEATHSIG); `amqp_worker` SIGKILLs and reaps it in its destructor.
//
// A test binary using this header starts its `main` with
//
//     if (evmesh::testing::is_amqp_worker(argc, argv))
//       return evmesh::testing::run_amqp_worker(argc, argv);
#pragma once

#include <chrono>
#include <climits>
#include <csignal>
#include <fstream>
#include <iostream>
#include <iterator>
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

#include "evmesh/amqp.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/testing.hpp"

namespace evmesh::testing {

inline constexpr std::string_view amqp_worker_flag = "--evmesh-amqp-worker";

inline int& amqp_worker_journal() {
  static int fd = -1;
  return fd;
}

inline outcome amqp_worker_handler(event_context& ctx) {
  // The message that takes the process down, every time (crash-loop test).
  if (ctx.message().id == "crash")
    ::_exit(42);
  std::this_thread::sleep_for(std::chrono::milliseconds{2});
  auto line = ctx.message().id + "\n";
  auto rc = ::write(amqp_worker_journal(), line.data(), line.size());
  static_cast<void>(rc);
  return ok();
}

inline bool is_amqp_worker(int argc, char** argv) {
  return argc > 1 && std::string_view{argv[1]} == amqp_worker_flag;
}

/// argv: EXE --evmesh-amqp-worker URL JOURNAL [MAX_ATTEMPTS]. Handles
/// `work.*` (2 ms per message; the message with id `crash` exits the process
/// at once), writes JOURNAL.ready once consuming.
inline int run_amqp_worker(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::cerr << "worker: expected URL JOURNAL [MAX_ATTEMPTS]\n";
    return 2;
  }
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  std::string journal = argv[3];
  amqp_worker_journal() = ::open(journal.c_str(), O_WRONLY | O_CREAT | O_APPEND,
                                 0644);
  if (amqp_worker_journal() < 0) {
    std::cerr << "worker: cannot open " << journal << "\n";
    return 2;
  }
  register_amqp_transport();
  handler_descriptor h;
  h.consumer = "workers";
  h.pattern = "work.*";
  h.fn = &amqp_worker_handler;
  h.options.execution = execution::blocking;
  h.options.ordering = ordering::none;
  auto cfg = test_config("unused");
  cfg.transport_url = argv[2];
  cfg.dedupe_url = "none"; // count redeliveries, do not hide them
  cfg.dead_letter_url = "none";
  cfg.max_in_flight = 128;
  cfg.poll_batch = 64;
  cfg.stop_timeout = std::chrono::seconds{5};
  cfg.defaults.max_attempts = argc == 5 ? std::stoi(argv[4]) : 10;
  cfg.defaults.concurrency = 2;
  consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  if (auto err = rt.start()) {
    std::cerr << "worker: start failed: " << render(err) << "\n";
    return 3;
  }
  std::ofstream{journal + ".ready"} << ::getpid() << "\n";
  int sig = 0;
  sigwait(&stop_signals, &sig);
  rt.stop(std::chrono::seconds{5});
  ::close(amqp_worker_journal());
  return 0;
}

/// One worker child process; SIGKILLed and reaped by the destructor.
class amqp_worker {
public:
  amqp_worker(const std::string& url, const std::string& journal,
              int max_attempts = 10)
    : journal_(journal) {
    char exe[PATH_MAX] = {};
    auto n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n <= 0)
      throw std::runtime_error("readlink /proc/self/exe failed");
    std::vector<std::string> args{std::string{exe, static_cast<size_t>(n)},
                                  std::string{amqp_worker_flag}, url, journal,
                                  std::to_string(max_attempts)};
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(a.data());
    argv.push_back(nullptr);
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

  amqp_worker(const amqp_worker&) = delete;
  amqp_worker& operator=(const amqp_worker&) = delete;

  ~amqp_worker() {
    kill9();
  }

  /// The exit status once `exited()` (-1 when killed by a signal).
  int exit_code() const {
    return WIFEXITED(status_) ? WEXITSTATUS(status_) : -1;
  }

  /// Whether the child has exited (reaps it).
  bool exited() {
    if (pid_ <= 0)
      return true;
    if (::waitpid(pid_, &status_, WNOHANG) == pid_) {
      pid_ = -1;
      return true;
    }
    return false;
  }

  /// SIGKILL and reap (idempotent).
  void kill9() {
    if (pid_ <= 0)
      return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, &status_, 0);
    pid_ = -1;
  }

  /// SIGTERM, then up to `limit` for a clean exit (SIGKILL after). Returns
  /// whether the child exited with status 0 in time.
  bool terminate(std::chrono::milliseconds limit) {
    if (pid_ <= 0)
      return false;
    ::kill(pid_, SIGTERM);
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (!exited()) {
      if (std::chrono::steady_clock::now() > deadline) {
        kill9();
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds{10});
    }
    return WIFEXITED(status_) && WEXITSTATUS(status_) == 0;
  }

  /// The last characters of the child's log (for failure messages).
  std::string log_tail(size_t max_chars = 2000) const {
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

/// The complete lines of a journal (a torn last line is ignored).
inline std::vector<std::string> journal_lines(const std::string& path) {
  std::ifstream in{path};
  std::string text{std::istreambuf_iterator<char>{in}, {}};
  std::vector<std::string> out;
  size_t pos = 0;
  for (auto nl = text.find('\n'); nl != std::string::npos;
       nl = text.find('\n', pos)) {
    out.emplace_back(text.substr(pos, nl - pos));
    pos = nl + 1;
  }
  return out;
}

} // namespace evmesh::testing
