// A nats-server child process for integration tests: JetStream on a free
// loopback port with its store in a fresh temporary directory. The process is
// always stopped: by the destructor, and (PR_SET_PDEATHSIG) by the kernel if
// the test binary dies first.
#pragma once

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <optional>
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

class nats_server {
public:
  /// Whether a `nats-server` binary is on the PATH.
  static bool available() {
    return std::system("command -v nats-server >/dev/null 2>&1") == 0;
  }

  /// Starts the server; `extra` are additional arguments (e.g. --user u
  /// --pass p). Throws std::runtime_error when it does not listen within 10s.
  explicit nats_server(std::vector<std::string> extra = {})
    : extra_(std::move(extra)) {
    char tmpl[] = "/tmp/evmesh-nats-XXXXXX";
    if (mkdtemp(tmpl) == nullptr)
      throw std::runtime_error("mkdtemp failed");
    dir_ = tmpl;
    port_ = free_port();
    start();
  }

  nats_server(const nats_server&) = delete;
  nats_server& operator=(const nats_server&) = delete;

  ~nats_server() {
    kill();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  /// `nats://127.0.0.1:PORT`.
  std::string url() const {
    return "nats://127.0.0.1:" + std::to_string(port_);
  }

  uint16_t port() const {
    return port_;
  }

  /// Stops the server at once (SIGKILL); its store stays for `start`.
  void kill() {
    if (pid_ <= 0)
      return;
    ::kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
  }

  /// (Re)starts the server on the same port and store directory; waits until
  /// it accepts connections.
  void start() {
    std::vector<std::string> args{"nats-server", "-js", "-a",
                                  "127.0.0.1",   "-p",  std::to_string(port_),
                                  "-sd",         dir_};
    args.insert(args.end(), extra_.begin(), extra_.end());
    auto log = dir_ + "/server.log";
    auto parent = getpid();
    pid_ = fork();
    if (pid_ < 0)
      throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent)
        _exit(1);
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      std::vector<char*> argv;
      for (auto& a : args)
        argv.push_back(a.data());
      argv.push_back(nullptr);
      execvp(argv[0], argv.data());
      _exit(127);
    }
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds{10};
    while (!listening()) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error("nats-server exited at start; see " + log);
      }
      if (std::chrono::steady_clock::now() > deadline) {
        kill();
        throw std::runtime_error("nats-server did not listen within 10s");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds{20});
    }
  }

private:
  static uint16_t free_port() {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    socklen_t len = sizeof(addr);
    if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0
        || getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      if (fd >= 0)
        close(fd);
      throw std::runtime_error("no free port");
    }
    close(fd);
    return ntohs(addr.sin_port);
  }

  bool listening() const {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port_);
    bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr))
              == 0;
    close(fd);
    return ok;
  }

  std::vector<std::string> extra_;
  std::string dir_;
  uint16_t port_ = 0;
  pid_t pid_ = -1;
};

} // namespace evmesh::testing
