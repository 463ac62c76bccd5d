// A rabbitmq-server child process for integration tests: one node on free
// loopback ports (AMQP, distribution, its own epmd) with its database, logs
// and Erlang cookie in a fresh temporary directory. Started as root, the
// broker runs as the `rabbitmq` user, which then owns the directory. The
// processes are always stopped: by the destructor, and (PR_SET_PDEATHSIG) by
// the kernel if the test binary dies first (child_process.hpp). Booting takes
// 5-15 s, so test binaries start one server and share it.
#pragma once

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <pwd.h>
#include <sys/types.h>
#include <unistd.h>

#include "../child_process.hpp"

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
    : boot_limit_(boot_limit), dir_(dir_holder_.path()) {
    port_ = free_loopback_port();
    dist_port_ = free_loopback_port();
    epmd_port_ = free_loopback_port();
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
      epmd_.stop(SIGKILL, std::chrono::seconds{1});
      throw;
    }
  }

  rabbitmq_server(const rabbitmq_server&) = delete;
  rabbitmq_server& operator=(const rabbitmq_server&) = delete;

  ~rabbitmq_server() {
    kill();
    epmd_.stop(SIGKILL, std::chrono::seconds{1});
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
    broker_.stop(SIGKILL, std::chrono::seconds{5});
  }

  /// Stops the broker gracefully (SIGTERM), SIGKILL after `limit`.
  void stop(std::chrono::seconds limit = std::chrono::seconds{30}) {
    broker_.stop(SIGTERM, limit);
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
    broker_.start(options({server_script}, env, log));
    broker_.wait_ready([this] { return loopback_listening(port_); },
                       boot_limit_,
                       "rabbitmq-server (logs in " + log_dir() + ")",
                       std::chrono::milliseconds{50});
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
    epmd_.start(options(
      {"epmd", "-port", std::to_string(epmd_port_), "-address", "127.0.0.1"},
      {"PATH=/usr/bin:/bin", "HOME=" + dir_}, dir_ + "/epmd.log"));
    epmd_.wait_ready([this] { return loopback_listening(epmd_port_); },
                     std::chrono::seconds{10}, "epmd");
  }

  // `args` with environment `env` in its own process group (the server
  // script starts helpers), as the rabbitmq user when running as root,
  // output appended to `log`.
  spawn_options options(std::vector<std::string> args,
                        std::vector<std::string> env,
                        const std::string& log) const {
    spawn_options opts;
    opts.args = std::move(args);
    opts.env = std::move(env);
    opts.log = log;
    opts.cwd = dir_;
    opts.null_stdin = true;
    opts.own_group = true;
    if (geteuid() == 0)
      opts.user = std::make_pair(uid_, gid_);
    return opts;
  }

  std::chrono::seconds boot_limit_;
  temp_dir dir_holder_{"evmesh-rabbitmq"};
  std::string dir_;
  std::string node_;
  uint16_t port_ = 0;
  uint16_t dist_port_ = 0;
  uint16_t epmd_port_ = 0;
  uid_t uid_ = 0;
  gid_t gid_ = 0;
  // Declared last: stopped before the directory is removed.
  child_process epmd_;
  child_process broker_;
};

} // namespace evmesh::testing
