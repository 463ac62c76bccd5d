// A redis-server child process for the NATS integration tests: a free
// loopback port, no persistence, its files in a fresh temporary directory.
// Always stopped: by `stop()`, the destructor, and (PR_SET_PDEATHSIG) by the
// kernel if the test binary dies first. `start()` again reuses the port.
#pragma once

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

namespace evmesh::testing {

class redis_server {
public:
  /// Whether a `redis-server` binary is on the PATH.
  static bool available() {
    return std::system("command -v redis-server >/dev/null 2>&1") == 0;
  }

  /// Starts the server; throws std::runtime_error when it does not answer
  /// within 10 s.
  redis_server() {
    char tmpl[] = "/tmp/evmesh-redis-XXXXXX";
    if (mkdtemp(tmpl) == nullptr)
      throw std::runtime_error("mkdtemp failed");
    dir_ = tmpl;
    port_ = pick_port();
    start();
  }

  redis_server(const redis_server&) = delete;
  redis_server& operator=(const redis_server&) = delete;

  ~redis_server() {
    stop();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  /// `redis://127.0.0.1:PORT/0`.
  std::string url() const {
    return "redis://127.0.0.1:" + std::to_string(port_) + "/0";
  }

  uint16_t port() const noexcept {
    return port_;
  }

  /// Kills the server (SIGKILL) and reaps it; idempotent.
  void stop() {
    if (pid_ <= 0)
      return;
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }

  /// (Re)starts the server on the same port; waits until it answers PING.
  void start() {
    std::vector<std::string> args{"redis-server",
                                  "--port",
                                  std::to_string(port_),
                                  "--bind",
                                  "127.0.0.1",
                                  "--save",
                                  "",
                                  "--appendonly",
                                  "no",
                                  "--dir",
                                  dir_};
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    auto log = dir_ + "/redis.log";
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
      ::execvp(argv[0], argv.data());
      ::_exit(127);
    }
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds{10};
    while (!answers_ping()) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error("redis-server exited at start; see " + log);
      }
      if (std::chrono::steady_clock::now() > deadline) {
        stop();
        throw std::runtime_error("redis-server did not answer within 10s");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds{20});
    }
  }

private:
  static uint16_t pick_port() {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0
        || ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      if (fd >= 0)
        ::close(fd);
      throw std::runtime_error("no free port");
    }
    ::close(fd);
    return ntohs(addr.sin_port);
  }

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

  std::string dir_;
  uint16_t port_ = 0;
  pid_t pid_ = -1;
};

} // namespace evmesh::testing
