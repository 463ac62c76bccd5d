#include "evmesh/main.hpp"

#include <atomic>
#include <chrono>
#include <csignal>
#include <exception>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include "evmesh/error.hpp"

namespace evmesh {

namespace {

// Written by the signal handler, read by the main thread: must be lock-free
// to be async-signal-safe.
std::atomic<int> received_signal{0};
static_assert(std::atomic<int>::is_always_lock_free);

extern "C" void on_stop_signal(int sig) {
  // A second signal means "now": skip the graceful stop.
  if (received_signal.exchange(sig) != 0)
    _exit(128 + sig);
}

/// Installs the handlers for the lifetime of the guard and restores the
/// previous ones afterwards (run_main may be called more than once in tests).
class signal_guard {
public:
  signal_guard() {
    received_signal.store(0);
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
  }

  ~signal_guard() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }

  signal_guard(const signal_guard&) = delete;
  signal_guard& operator=(const signal_guard&) = delete;

private:
  struct sigaction old_int_ {};
  struct sigaction old_term_ {};
};

std::string program_name(int argc, char** argv) {
  if (argc < 1 || argv == nullptr || argv[0] == nullptr)
    return "evmesh";
  std::string_view path = argv[0];
  if (auto slash = path.rfind('/'); slash != std::string_view::npos)
    path.remove_prefix(slash + 1);
  return path.empty() ? std::string{"evmesh"} : std::string{path};
}

std::optional<errc> code_of(const caf::error& err) {
  if (!err || err.category() != caf::atom("evmesh"))
    return std::nullopt;
  return static_cast<errc>(err.code());
}

bool is_config_error(const caf::error& err) {
  auto code = code_of(err);
  return code == errc::invalid_config || code == errc::invalid_url;
}

const char* hint_for(const caf::error& err) {
  switch (code_of(err).value_or(errc::none)) {
    case errc::invalid_config:
    case errc::invalid_url:
      return "check the value in your configuration file or flags; "
             "'--help' lists every key with its default";
    case errc::invalid_pattern:
    case errc::duplicate_subscription:
      return "fix the EVMESH_EVENT_PATTERN registration named above";
    case errc::unavailable:
    case errc::io_error:
      return "is the server running, and is the state directory writable? "
             "(transport.url, dedupe.url, dead_letter.url)";
    default:
      return "run with '--runtime.log_level debug' for details";
  }
}

void set_log_level(const std::string& name) {
  auto level = spdlog::level::from_str(name);
  // spdlog spells it "warning"; from_str maps unknown names to off.
  if (name == "warn")
    level = spdlog::level::warn;
  spdlog::set_level(level);
}

int run_main_impl(int argc, char** argv, app_hooks& hooks,
                  const std::string& prog) {
  auto doc = hooks.description.empty()
               ? std::string{"An evmesh event consumer."}
               : hooks.description;
  auto cl = parse_command_line(argc, argv, doc, hooks.flags);
  if (cl.exit_now)
    return cl.exit_code;
  const auto& cfg = cl.config;
  set_log_level(cfg.log_level);
  container_builder builder;
  if (hooks.configure) {
    if (auto err = hooks.configure(builder, cl)) {
      std::cerr << prog << ": cannot set up the services: " << render(err)
                << "\n  hint: " << hint_for(err) << '\n';
      return is_config_error(err) ? 2 : 1;
    }
  }
  consumer_runtime rt{cfg, builder.freeze()};
  if (auto err = rt.start()) {
    std::cerr << prog << ": cannot start: " << render(err)
              << "\n  hint: " << hint_for(err) << '\n';
    return is_config_error(err) ? 2 : 1;
  }
  int code = 0;
  {
    signal_guard signals;
    if (hooks.run) {
      code = hooks.run(rt, cl);
    } else {
      spdlog::info("consuming; press Ctrl-C to stop");
      code = wait_for_stop(rt);
    }
    if (auto sig = received_signal.load(); sig != 0)
      std::cerr << prog << ": received "
                << (sig == SIGINT ? "SIGINT" : "SIGTERM")
                << ", stopping (running handlers get up to "
                << format_duration(cfg.stop_timeout)
                << "; press Ctrl-C again to exit at once)\n";
    std::cout << std::flush;
    rt.stop(cfg.stop_timeout);
  }
  std::cerr << prog << ": stopped — " << summary_line(rt.stats()) << '\n';
  return code;
}

} // namespace

bool stop_requested() noexcept {
  return received_signal.load() != 0;
}

int wait_for_stop(consumer_runtime& rt) {
  using namespace std::chrono_literals;
  while (!stop_requested()) {
    if (rt.stopped() || rt.health() == health_status::stopped) {
      std::cerr << "evmesh: the consumer runtime stopped unexpectedly (see the "
                   "log above)\n";
      return 1;
    }
    std::this_thread::sleep_for(50ms);
  }
  return 0;
}

std::string summary_line(const runtime_stats& s) {
  auto out = "received " + std::to_string(s.received) + ", handled "
             + std::to_string(s.handled) + ", duplicates "
             + std::to_string(s.duplicates) + ", retried "
             + std::to_string(s.retried) + ", dead-lettered "
             + std::to_string(s.dead_lettered) + ", discarded "
             + std::to_string(s.discarded) + ", acked "
             + std::to_string(s.acked) + ", nacked " + std::to_string(s.nacked);
  if (s.timeouts != 0)
    out += ", timeouts " + std::to_string(s.timeouts);
  if (s.lane_restarts != 0)
    out += ", lane restarts " + std::to_string(s.lane_restarts);
  return out;
}

int run_main(int argc, char** argv, app_hooks hooks) {
  std::string prog = "evmesh";
  try {
    prog = program_name(argc, argv);
    return run_main_impl(argc, argv, hooks, prog);
  } catch (const std::exception& ex) {
    try {
      std::cerr << prog << ": fatal: " << ex.what() << '\n';
    } catch (...) {
      // Nothing left to report with.
    }
  } catch (...) {
    try {
      std::cerr << prog << ": fatal: unknown exception\n";
    } catch (...) {
      // Nothing left to report with.
    }
  }
  return 1;
}

} // namespace evmesh
