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
#include <iostream>
#include <string>
#include <string_view>
#include <thread>

#include <unistd.h>

#include "evmesh/amqp.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/testing.hpp"

#include "../child_process.hpp"

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
  append_line(amqp_worker_journal(), ctx.message().id);
  return ok();
}

inline bool is_amqp_worker(int argc, char** argv) {
  return has_worker_flag(argc, argv, amqp_worker_flag);
}

/// argv: EXE --evmesh-amqp-worker URL JOURNAL [MAX_ATTEMPTS]. Handles
/// `work.*` (2 ms per message; the message with id `crash` exits the process
/// at once), writes JOURNAL.ready once consuming.
inline int run_amqp_worker(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::cerr << "worker: expected URL JOURNAL [MAX_ATTEMPTS]\n";
    return 2;
  }
  auto stop_signals = block_stop_signals();
  std::string journal = argv[3];
  amqp_worker_journal() = open_journal(journal);
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
  mark_ready(journal);
  wait_for_stop_signal(stop_signals);
  rt.stop(std::chrono::seconds{5});
  ::close(amqp_worker_journal());
  return 0;
}

/// One worker child process; SIGKILLed and reaped by the destructor.
class amqp_worker : public worker_child {
public:
  amqp_worker(const std::string& url, const std::string& journal,
              int max_attempts = 10)
    : worker_child(amqp_worker_flag,
                   {url, journal, std::to_string(max_attempts)}, journal) {
  }
};

} // namespace evmesh::testing
