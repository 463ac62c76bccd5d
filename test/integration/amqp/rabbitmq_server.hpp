// A rabbitmq-server child process for integration tests: one node on free
// loopback ports (AMQP, distribution, its own epmd) with its database, logs
// and Erlang cookie in a fresh temporary directory. Started as root, the
// broker runs as the `rabbitmq` user, which then owns the directory. The
// processes are always stopped: by the destructor, and (PR_SET_PDEATHSIG) by
// the kernel if the test binary dies first. Booting takes 5-15 s, so test
// binaries start one server and share it.
#pragma once

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <pwd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

namespace evmesh::testing {

class rabbitmq_server {
public:
  static constexpr const char* server_script
    = "/usr/lib/rabbitmq/bin/rabbitmq-server";

  /// Whether rabbitmq-server (Debian's package) and epmd are installed.
  static bool available() {
    return access(server_script, X_OK) == 0
           && std::system("command -v epmd >/dev/null 2>&1") == 0;
  }

  /// Starts epmd and the broker; throws std::runtime_error when the broker
  /// does not accept connections within `boot_limit`.
  explicit rabbitmq_server(std::chrono::seconds boot_limit
                           = std::chrono::seconds{90})
    : boot_limit_(boot_limit) {
    char tmpl[] = "/tmp/evmesh-rabbitmq-XXXXXX";
    if (mkdtemp(tmpl) == nullptr)
      throw std::runtime_error("mkdtemp failed");
    dir_ = tmpl;
    port_ = free_port();
    dist_port_ = free_port();
    epmd_port_ = free_port();
    // A long node name on the loopback IP: Erlang then needs no name
    // resolution at all (a minimal root may have no /etc/hosts, and
    // "localhost" would not resolve).
    node_ = "evmesh" + std::to_string(port_) + "@127.0.0.1";
    write_file(dir_ + "/rabbitmq.conf",
               "listeners.tcp.1 = 127.0.0.1:" + std::to_string(port_)
                 + "\n"
                   "disk_free_limit.absolute = 50MB\n"
                   "log.file.level = info\n");
    write_file(dir_ + "/enabled_plugins", "[].\n");
    if (geteuid() == 0) {
      auto* pw = getpwnam("rabbitmq");
      if (pw == nullptr)
        throw std::runtime_error("running as root, but there is no rabbitmq "
                                 "user to run the broker as");
      uid_ = pw->pw_uid;
      gid_ = pw->pw_gid;
      for (auto& entry : std::filesystem::recursive_directory_iterator(dir_))
        chown_path(entry.path().string());
      chown_path(dir_);
    }
    start_epmd();
    try {
      start();
    } catch (...) {
      stop_process(epmd_pid_, SIGKILL, std::chrono::seconds{1});
      throw;
    }
  }

  rabbitmq_server(const rabbitmq_server&) = delete;
  rabbitmq_server& operator=(const rabbitmq_server&) = delete;

  ~rabbitmq_server() {
    kill();
    stop_process(epmd_pid_, SIGKILL, std::chrono::seconds{1});
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  /// `amqp://guest:guest@127.0.0.1:PORT/` (guest may log in over loopback).
  std::string url() const {
    return "amqp://guest:guest@127.0.0.1:" + std::to_string(port_) + "/";
  }

  uint16_t port() const {
    return port_;
  }

  /// Where the broker writes its logs (for failure messages).
  std::string log_dir() const {
    return dir_ + "/log";
  }

  /// Stops the broker at once (SIGKILL); its database stays for `start`.
  void kill() {
    stop_process(pid_, SIGKILL, std::chrono::seconds{5});
  }

  /// Stops the broker gracefully (SIGTERM), SIGKILL after `limit`.
  void stop(std::chrono::seconds limit = std::chrono::seconds{30}) {
    stop_process(pid_, SIGTERM, limit);
  }

  /// (Re)starts the broker on the same ports and database; waits until it
  /// accepts connections.
  void start() {
    auto log = dir_ + "/server.log";
    std::vector<std::string> env{
      "HOME=" + dir_,
      "PATH=/usr/bin:/bin:/usr/sbin:/sbin",
      "LANG=C.UTF-8",
      "RABBITMQ_NODENAME=" + node_,
      "RABBITMQ_USE_LONGNAME=true",
      "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
      "RABBITMQ_NODE_PORT=" + std::to_string(port_),
      "RABBITMQ_DIST_PORT=" + std::to_string(dist_port_),
      "ERL_EPMD_PORT=" + std::to_string(epmd_port_),
      "ERL_EPMD_ADDRESS=127.0.0.1",
      "RABBITMQ_MNESIA_BASE=" + dir_ + "/mnesia",
      "RABBITMQ_LOG_BASE=" + dir_ + "/log",
      "RABBITMQ_FEATURE_FLAGS_FILE=" + dir_ + "/feature_flags",
      "RABBITMQ_ENABLED_PLUGINS_FILE=" + dir_ + "/enabled_plugins",
      "RABBITMQ_CONFIG_FILE=" + dir_ + "/rabbitmq.conf",
      "RABBITMQ_ADVANCED_CONFIG_FILE=" + dir_ + "/advanced.config",
      "RABBITMQ_CONF_ENV_FILE=" + dir_ + "/rabbitmq-env.conf",
      "RABBITMQ_PID_FILE=" + dir_ + "/rabbitmq.pid",
      "RABBITMQ_PLUGINS_EXPAND_DIR=" + dir_ + "/plugins-expand",
      "RABBITMQ_QUORUM_DIR=" + dir_ + "/quorum",
      "RABBITMQ_STREAM_DIR=" + dir_ + "/stream",
      // The script then execs the VM in place: the broker is our direct child
      // and inherits PR_SET_PDEATHSIG. -noinput keeps it off stdin.
      "RABBITMQ_ALLOW_INPUT=1",
      "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-noinput -kernel "
      "inet_dist_use_interface {127,0,0,1}",
    };
    pid_ = spawn({server_script}, env, log);
    auto deadline = std::chrono::steady_clock::now() + boot_limit_;
    while (!listening(port_)) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error("rabbitmq-server exited at start; see " + log
                                 + " and " + log_dir());
      }
      if (std::chrono::steady_clock::now() > deadline) {
        kill();
        throw std::runtime_error("rabbitmq-server did not listen within "
                                 + std::to_string(boot_limit_.count())
                                 + "s; see " + log);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds{50});
    }
  }

private:
  static void write_file(const std::string& path, const std::string& text) {
    std::ofstream out{path};
    out << text;
    if (!out)
      throw std::runtime_error("cannot write " + path);
  }

  void chown_path(const std::string& path) const {
    if (::chown(path.c_str(), uid_, gid_) != 0)
      throw std::runtime_error("cannot chown " + path + " to rabbitmq");
  }

  void start_epmd() {
    epmd_pid_ = spawn(
      {"epmd", "-port", std::to_string(epmd_port_), "-address", "127.0.0.1"},
      {"PATH=/usr/bin:/bin", "HOME=" + dir_}, dir_ + "/epmd.log");
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds{10};
    while (!listening(epmd_port_)) {
      if (std::chrono::steady_clock::now() > deadline)
        throw std::runtime_error("epmd did not listen within 10s");
      std::this_thread::sleep_for(std::chrono::milliseconds{20});
    }
  }

  // Forks and execs `args` with environment `env`, as the rabbitmq user when
  // running as root, output appended to `log`.
  pid_t spawn(std::vector<std::string> args, std::vector<std::string> env,
              const std::string& log) const {
    auto parent = getpid();
    auto pid = fork();
    if (pid < 0)
      throw std::runtime_error("fork failed");
    if (pid > 0)
      return pid;
    int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    int null = open("/dev/null", O_RDONLY);
    if (null >= 0)
      dup2(null, 0);
    setpgid(0, 0);
    if (geteuid() == 0) {
      if (setgroups(0, nullptr) != 0 || setgid(gid_) != 0 || setuid(uid_) != 0)
        _exit(126);
    }
    // After setuid: a credential change clears the parent-death signal.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
      _exit(1);
    if (chdir(dir_.c_str()) != 0)
      _exit(125);
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    std::vector<char*> envp;
    for (auto& e : env)
      envp.push_back(e.data());
    envp.push_back(nullptr);
    execvpe(argv[0], argv.data(), envp.data());
    _exit(127);
  }

  // Signals the process group of `pid`; SIGKILL after `limit`.
  static void stop_process(pid_t& pid, int sig, std::chrono::seconds limit) {
    if (pid <= 0)
      return;
    ::kill(-pid, sig);
    ::kill(pid, sig);
    auto deadline = std::chrono::steady_clock::now() + limit;
    int status = 0;
    while (waitpid(pid, &status, WNOHANG) != pid) {
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(-pid, SIGKILL);
        ::kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds{20});
    }
    pid = -1;
  }

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

  static bool listening(uint16_t port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr))
              == 0;
    close(fd);
    return ok;
  }

  std::chrono::seconds boot_limit_;
  std::string dir_;
  std::string node_;
  uint16_t port_ = 0;
  uint16_t dist_port_ = 0;
  uint16_t epmd_port_ = 0;
  uid_t uid_ = 0;
  gid_t gid_ = 0;
  pid_t pid_ = -1;
  pid_t epmd_pid_ = -1;
};

} // namespace evmesh::testing
