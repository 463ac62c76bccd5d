// Consumer *processes* for the NATS integration tests: the test binary
// re-executes itself (`/proc/self/exe --evmesh-nats-worker ...`) and the child
// runs a `consumer_runtime` on the shared durable until SIGTERM (clean stop,
// exit 0) or SIGKILL. Every successful handler run appends "ID\n" to the
// worker's journal file with one write(2) (O_APPEND, no user-space buffer), so
// a SIGKILL loses nothing that was written. The child dies with the test
// binary (PR_SET_PDEATHSIG) and `worker_process` kills it in its destructor.
//
// A test binary using this header defines its `main` as
//
//     if (evmesh::testing::is_worker(argc, argv))
//       return evmesh::testing::run_worker(argc, argv);
//
// before initialising GoogleTest.
#pragma once

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <unistd.h>

#include "evmesh/nats.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/testing.hpp"

#include "../child_process.hpp"

namespace evmesh::testing {

inline constexpr std::string_view worker_flag = "--evmesh-nats-worker";

// -- deterministic fates for the random-failure workload ----------------------

/// What the `random` handler does with message `id`: succeed at once, fail
/// the first `fails` executions and then succeed, or always fail.
struct fate {
  enum kind_t { ok_at_once, flaky, always_fails } kind = ok_at_once;
  uint32_t fails = 0;
};

inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/// The fate of `id` under `seed`: 5 % always fail, 20 % fail once or twice
/// and then succeed, the rest succeed at once (with max_attempts = 4).
inline fate fate_of(std::string_view id, uint64_t seed) {
  uint64_t h = 1469598103934665603ULL; // FNV-1a
  for (auto c : id)
    h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ULL;
  auto r = mix64(h ^ seed);
  auto bucket = r % 100;
  if (bucket < 5)
    return {fate::always_fails, 0};
  if (bucket < 25)
    return {fate::flaky, static_cast<uint32_t>(1 + (r / 100) % 2)};
  return {};
}

// -- the worker (child side) ----------------------------------------------------

namespace detail {

struct worker_globals {
  int journal = -1;
  bool random = false;
  uint64_t seed = 0;
};

inline worker_globals& wg() {
  static worker_globals g;
  return g;
}

inline outcome worker_handler(event_context& ctx) {
  const auto& id = ctx.message().id;
  if (wg().random) {
    auto f = fate_of(id, wg().seed);
    if (f.kind == fate::always_fails)
      return retry("always fails (attempt " + std::to_string(ctx.attempt())
                   + ")");
    if (f.kind == fate::flaky && ctx.attempt() <= f.fails)
      return retry("flaky (attempt " + std::to_string(ctx.attempt()) + ")");
  } else {
    std::this_thread::sleep_for(std::chrono::milliseconds{2});
  }
  append_line(wg().journal, id);
  return ok();
}

} // namespace detail

inline bool is_worker(int argc, char** argv) {
  return has_worker_flag(argc, argv, worker_flag);
}

/// argv: EXE --evmesh-nats-worker MODE NATS_URL DEDUPE_URL JOURNAL SEED
/// MODE is `plain` (every message succeeds after 2 ms) or `random` (see
/// `fate_of`). Writes JOURNAL.ready once consuming and JOURNAL.stats
/// ("handled dead_lettered received") after a clean stop on SIGTERM.
inline int run_worker(int argc, char** argv) {
  if (argc != 7) {
    std::cerr << "worker: expected MODE NATS_URL DEDUPE_URL JOURNAL SEED\n";
    return 2;
  }
  // Block the stop signals in every thread the runtime will start.
  auto stop_signals = block_stop_signals();
  std::string mode = argv[2];
  std::string journal = argv[5];
  auto& g = detail::wg();
  g.random = mode == "random";
  g.seed = std::stoull(argv[6]);
  g.journal = open_journal(journal);
  if (g.journal < 0) {
    std::cerr << "worker: cannot open " << journal << "\n";
    return 2;
  }
  register_nats_transport();
  handler_descriptor h;
  h.consumer = "workers";
  h.pattern = "work.*";
  h.fn = &detail::worker_handler;
  h.options.execution = execution::blocking;
  h.options.ordering = ordering::none;
  auto cfg = test_config("unused");
  cfg.transport_url = argv[3];
  cfg.dedupe_url = argv[4];
  cfg.dead_letter_url = "none"; // the DLQ stream keeps the records
  // Strict dedupe for the shared-store workload: a store that does not
  // answer in time defers the message instead of running it unclaimed.
  if (g.random)
    cfg.dedupe_policy = store_failure_policy::fail_closed;
  cfg.max_in_flight = 128;
  cfg.poll_batch = 64;
  cfg.stop_timeout = std::chrono::seconds{5};
  cfg.defaults.max_attempts = g.random ? 4 : 10;
  cfg.defaults.concurrency = g.random ? 8 : 2;
  cfg.defaults.backoff.initial = std::chrono::milliseconds{5};
  cfg.defaults.backoff.max = std::chrono::milliseconds{40};
  consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  if (auto err = rt.start()) {
    std::cerr << "worker: start failed: " << render(err) << "\n";
    return 3;
  }
  mark_ready(journal);
  wait_for_stop_signal(stop_signals);
  rt.stop(std::chrono::seconds{5});
  auto st = rt.stats();
  {
    std::ofstream out{journal + ".stats.tmp"};
    out << st.handled << ' ' << st.dead_lettered << ' ' << st.received << '\n';
  }
  std::rename((journal + ".stats.tmp").c_str(), (journal + ".stats").c_str());
  ::close(g.journal);
  return 0;
}

// -- the worker (parent side) ---------------------------------------------------

/// One worker child process; SIGKILLed and reaped by the destructor.
class worker_process : public worker_child {
public:
  worker_process(const std::string& mode, const std::string& nats_url,
                 const std::string& dedupe_url, const std::string& journal,
                 uint64_t seed)
    : worker_child(worker_flag,
                   {mode, nats_url, dedupe_url, journal, std::to_string(seed)},
                   journal) {
  }

  /// The stats line the child wrote after a clean stop: handled,
  /// dead_lettered, received (all zero when missing).
  std::vector<uint64_t> stats() const {
    std::vector<uint64_t> out(3, 0);
    std::ifstream in{journal() + ".stats"};
    for (auto& x : out)
      in >> x;
    return out;
  }
};

/// The complete lines of a journal file (a torn last line is ignored).
inline std::vector<std::string> read_journal(const std::string& path) {
  return read_lines(path);
}

} // namespace evmesh::testing
