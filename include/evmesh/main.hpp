#pragma once

#include <functional>
#include <string>
#include <vector>

#include <caf/error.hpp>

#include "evmesh/config.hpp"
#include "evmesh/container.hpp"
#include "evmesh/runtime.hpp"

namespace evmesh {

/// What an application adds to the standard `main` of an evmesh service. Every
/// member is optional: `EVMESH_MAIN()` alone runs the statically registered
/// handlers with the configuration from `evmesh.toml` and the flags until
/// SIGINT or SIGTERM.
struct app_hooks {
  /// First paragraph of `--help`: what the service does.
  std::string description;

  /// Extra boolean flags (`--demo`); read them with `has_flag(cl, "demo")`.
  std::vector<cli_flag> flags;

  /// Registers services. Called after the command line was parsed and before
  /// the runtime starts. An error aborts the program (exit code 2 for
  /// `errc::invalid_config` and `errc::invalid_url`, 1 otherwise).
  std::function<caf::error(container_builder&, const command_line&)> configure;

  /// Runs after a successful start on the main thread. Its return value is the
  /// exit code; the runtime is stopped (within `runtime.stop_timeout`)
  /// afterwards. May poll `stop_requested()` to honour Ctrl-C. Unset: run
  /// until SIGINT/SIGTERM.
  std::function<int(consumer_runtime&, const command_line&)> run;
};

/// The standard `main` of an evmesh service:
///
/// 1. parses the command line (`--config FILE`, `--section.key VALUE`,
///    `hooks.flags`, `--help`) and exits early when it says so;
/// 2. sets spdlog's level from `runtime.log_level`;
/// 3. builds the container with `hooks.configure`;
/// 4. starts a `consumer_runtime` (errors are printed with a hint; exit code 2
///    for configuration errors, 1 otherwise);
/// 5. installs SIGINT/SIGTERM handlers, then calls `hooks.run` or waits for a
///    signal. A second signal exits at once (code 130). Should the runtime stop
///    on its own meanwhile (a fatal actor failure), exits with code 1;
/// 6. stops the runtime within `runtime.stop_timeout` and prints one line of
///    counters to stderr.
///
/// Never throws: exceptions are printed and yield exit code 1.
int run_main(int argc, char** argv, app_hooks hooks = {});

/// Whether SIGINT or SIGTERM arrived since `run_main` installed its handlers.
/// Lets an `app_hooks::run` end early. Thread-safe, lock-free.
bool stop_requested() noexcept;

/// Blocks until SIGINT/SIGTERM (see `stop_requested`) or until `rt` stops on
/// its own. Returns 0 after a signal, 1 (after printing why to stderr) when
/// the runtime stopped unexpectedly. What `run_main` does when
/// `app_hooks::run` is unset; a `run` hook may call it after its own work.
int wait_for_stop(consumer_runtime& rt);

/// One line of counters: "received 26, handled 40, duplicates 4, ...".
std::string summary_line(const runtime_stats& stats);

} // namespace evmesh

/// Defines `main` as `evmesh::run_main(argc, argv[, hooks])`:
///
/// ```cpp
/// EVMESH_MAIN()              // handlers + configuration only
/// EVMESH_MAIN(make_hooks())  // with services, flags or a run function
/// ```
#define EVMESH_MAIN(...)                                                       \
  int main(int argc, char** argv) {                                            \
    return ::evmesh::run_main(argc, argv __VA_OPT__(, ) __VA_ARGS__);          \
  }
