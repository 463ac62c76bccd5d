// A redis-server child process for the NATS integration tests: a free
// loopback port, no persistence, its files in a fresh temporary directory.
// Always stopped: by `stop()`, the destructor, and (PR_SET_PDEATHSIG) by the
// kernel if the test binary dies first (child_process.hpp). `start()` again
// reuses the port.
#pragma once

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../child_process.hpp"

namespace evmesh::testing {

class redis_server {
public:
  /// Whether a `redis-server` binary is on the PATH.
  static bool available() {
    return std::system("command -v redis-server >/dev/null 2>&1") == 0;
  }

  /// Starts the server; throws std::runtime_error when it does not answer
  /// within 10 s.
  redis_server() : port_(free_loopback_port()) {
    start();
  }

  redis_server(const redis_server&) = delete;
  redis_server& operator=(const redis_server&) = delete;

  /// `redis://127.0.0.1:PORT/0`.
  std::string url() const {
    return "redis://127.0.0.1:" + std::to_string(port_) + "/0";
  }

  /// The server's process id (for benchmarks that read its CPU time).
  pid_t pid() const noexcept {
    return proc_.pid();
  }

  uint16_t port() const noexcept {
    return port_;
  }

  /// Kills the server (SIGKILL) and reaps it; idempotent.
  void stop() {
    proc_.kill9();
  }

  /// (Re)starts the server on the same port; waits until it answers PING.
  void start() {
    spawn_options opts;
    opts.args
      = {"redis-server", "--port", std::to_string(port_), "--bind", "127.0.0.1",
         "--save",       "",       "--appendonly",        "no",     "--dir",
         dir_.path()};
    opts.log = dir_.file("redis.log");
    proc_.start(opts);
    proc_.wait_ready([this] { return answers_ping(); },
                     std::chrono::seconds{10}, "redis-server");
  }

private:
  bool answers_ping() const {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
      return false;
    timeval tv{0, 200'000};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port_);
    bool ok = false;
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      constexpr char ping[] = "PING\r\n";
      char buf[16];
      if (::send(fd, ping, sizeof(ping) - 1, MSG_NOSIGNAL) > 0)
        ok = ::recv(fd, buf, sizeof(buf), 0) > 0;
    }
    ::close(fd);
    return ok;
  }

  uint16_t port_ = 0;
  temp_dir dir_{"evmesh-redis"};
  // Declared last: stopped (SIGKILL) before the directory is removed.
  child_process proc_;
};

} // namespace evmesh::testing
