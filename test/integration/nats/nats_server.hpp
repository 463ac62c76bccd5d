// A nats-server child process for integration tests: JetStream on a free
// loopback port with its store in a fresh temporary directory. The process is
// always stopped: by the destructor, and (PR_SET_PDEATHSIG) by the kernel if
// the test binary dies first (child_process.hpp).
#pragma once

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include "../child_process.hpp"

namespace evmesh::testing {

class nats_server {
public:
  /// Whether a `nats-server` binary is on the PATH.
  static bool available() {
    return std::system("command -v nats-server >/dev/null 2>&1") == 0;
  }

  /// Starts the server; `extra` are additional arguments (e.g. --user u
  /// --pass p). Throws std::runtime_error when it does not listen within 10s.
  explicit nats_server(std::vector<std::string> extra = {})
    : extra_(std::move(extra)), port_(free_loopback_port()) {
    start();
  }

  nats_server(const nats_server&) = delete;
  nats_server& operator=(const nats_server&) = delete;

  /// `nats://127.0.0.1:PORT`.
  std::string url() const {
    return "nats://127.0.0.1:" + std::to_string(port_);
  }

  uint16_t port() const {
    return port_;
  }

  /// The server's process id (for benchmarks that read its CPU time).
  pid_t pid() const noexcept {
    return proc_.pid();
  }

  /// Stops the server at once (SIGKILL); its store stays for `start`.
  void kill() {
    proc_.kill9();
  }

  /// (Re)starts the server on the same port and store directory; waits until
  /// it accepts connections.
  void start() {
    spawn_options opts;
    opts.args = {"nats-server",         "-js", "-a",       "127.0.0.1", "-p",
                 std::to_string(port_), "-sd", dir_.path()};
    opts.args.insert(opts.args.end(), extra_.begin(), extra_.end());
    opts.log = dir_.file("server.log");
    proc_.start(opts);
    proc_.wait_ready([this] { return loopback_listening(port_); },
                     std::chrono::seconds{10}, "nats-server");
  }

private:
  std::vector<std::string> extra_;
  uint16_t port_ = 0;
  temp_dir dir_{"evmesh-nats"};
  // Declared last: stopped (SIGKILL) before the directory is removed.
  child_process proc_;
};

} // namespace evmesh::testing
