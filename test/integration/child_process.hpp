// Child processes for the integration tests: servers (nats-server,
// redis-server, rabbitmq-server) and worker processes that re-execute the test
// binary. One place for the fork/exec, stop and wait-for-port code:
//
// - `child_process` forks and execs, output appended to a log file, and
//   always stops the child: its destructor SIGKILLs and reaps it, and
//   PR_SET_PDEATHSIG has the kernel kill it if the test binary dies first.
// - `free_loopback_port`, `loopback_listening`, `wait_for`, `temp_dir`.
// - Worker processes: `worker_child` re-executes `/proc/self/exe FLAG ARGS`
//   (parent side); `block_stop_signals`, `wait_for_stop_signal`,
//   `open_journal`, `append_line`, `mark_ready` (child side). A worker
//   appends one line per handled message to its journal with one write(2)
//   on an O_APPEND descriptor, so a SIGKILL loses nothing that was written;
//   `read_lines` reads the complete lines back.
#pragma once

#include <chrono>
#include <climits>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

namespace evmesh::testing {

// -- waiting, ports, files ------------------------------------------------------

/// Polls `pred` every `poll` until it holds (true) or `limit` passed (false).
template <class Pred>
bool wait_for(Pred pred, std::chrono::milliseconds limit,
              std::chrono::milliseconds poll = std::chrono::milliseconds{20}) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline)
      return false;
    std::this_thread::sleep_for(poll);
  }
  return true;
}

/// A loopback TCP port nobody listens on right now; throws when there is
/// none. (Another process may take it before the caller binds it: tests that
/// start servers run one at a time, RESOURCE_LOCK loopback_servers.)
inline uint16_t free_loopback_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
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

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
inline bool loopback_listening(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0)
    return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr))
            == 0;
  ::close(fd);
  return ok;
}

/// A fresh directory `/tmp/PREFIX-XXXXXX`, removed with its contents by the
/// destructor.
class temp_dir {
public:
  explicit temp_dir(const std::string& prefix = "evmesh-test") {
    auto tmpl = "/tmp/" + prefix + "-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr)
      throw std::runtime_error("mkdtemp failed for " + tmpl);
    path_ = tmpl;
  }

  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }

  const std::string& path() const noexcept {
    return path_;
  }

  /// `PATH/name`.
  std::string file(const std::string& name) const {
    return path_ + "/" + name;
  }

private:
  std::string path_;
};

/// The complete lines of a file (a torn last line is ignored; a missing file
/// has none).
inline std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in{path};
  std::string text{std::istreambuf_iterator<char>{in}, {}};
  std::vector<std::string> out;
  size_t pos = 0;
  for (auto nl = text.find('\n'); nl != std::string::npos;
       nl = text.find('\n', pos)) {
    out.emplace_back(text.substr(pos, nl - pos));
    pos = nl + 1;
  }
  return out;
}

/// The last `max_chars` characters of a file (for failure messages).
inline std::string file_tail(const std::string& path, size_t max_chars) {
  std::ifstream in{path};
  std::string text{std::istreambuf_iterator<char>{in}, {}};
  if (text.size() > max_chars)
    text = text.substr(text.size() - max_chars);
  return text;
}

// -- child processes ------------------------------------------------------------

/// How to start a child process.
struct spawn_options {
  /// argv; argv[0] is looked up on the PATH.
  std::vector<std::string> args;
  /// The child's whole environment; empty: inherit the test's.
  std::vector<std::string> env;
  /// Where stdout and stderr are appended (empty: inherited).
  std::string log;
  /// Working directory (empty: unchanged).
  std::string cwd;
  /// stdin from /dev/null.
  bool null_stdin = false;
  /// Its own process group; `stop`/`kill9` then signal the whole group.
  bool own_group = false;
  /// Run as this user and group (the test runs as root).
  std::optional<std::pair<uid_t, gid_t>> user;
};

/// One child process; SIGKILLed (with its group when `own_group`) and reaped
/// by the destructor.
class child_process {
public:
  child_process() = default;

  explicit child_process(const spawn_options& opts) {
    start(opts);
  }

  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;

  ~child_process() {
    kill9();
  }

  /// Forks and execs `opts.args` (a running child is killed first). Exit
  /// codes of a child that could not start: 125 chdir, 126 credentials,
  /// 127 exec, 1 the parent was already gone.
  void start(const spawn_options& opts) {
    kill9();
    if (opts.args.empty())
      throw std::runtime_error("child_process: no program");
    // Everything the child needs is built before fork: between fork and exec
    // only async-signal-safe calls (the test binary runs threads).
    auto args = opts.args;
    auto env = opts.env;
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    std::vector<char*> envp;
    for (auto& e : env)
      envp.push_back(e.data());
    envp.push_back(nullptr);
    const char* log = opts.log.empty() ? nullptr : opts.log.c_str();
    const char* cwd = opts.cwd.empty() ? nullptr : opts.cwd.c_str();
    own_group_ = opts.own_group;
    log_ = opts.log;
    auto parent = ::getpid();
    auto pid = ::fork();
    if (pid < 0)
      throw std::runtime_error("fork failed");
    if (pid > 0) {
      pid_ = pid;
      status_ = 0;
      return;
    }
    if (log != nullptr) {
      int fd = ::open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
    }
    if (opts.null_stdin) {
      int fd = ::open("/dev/null", O_RDONLY);
      if (fd >= 0)
        ::dup2(fd, 0);
    }
    if (opts.own_group)
      ::setpgid(0, 0);
    if (opts.user
        && (::setgroups(0, nullptr) != 0 || ::setgid(opts.user->second) != 0
            || ::setuid(opts.user->first) != 0))
      ::_exit(126);
    // After setuid: a credential change clears the parent-death signal.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent)
      ::_exit(1);
    if (cwd != nullptr && ::chdir(cwd) != 0)
      ::_exit(125);
    if (env.empty())
      ::execvp(argv[0], argv.data());
    else
      ::execvpe(argv[0], argv.data(), envp.data());
    ::_exit(127);
  }

  pid_t pid() const noexcept {
    return pid_;
  }

  /// Whether a child was started and has not been reaped.
  bool running() const noexcept {
    return pid_ > 0;
  }

  /// Whether the child has exited (reaps it; true when none runs).
  bool exited() {
    if (pid_ <= 0)
      return true;
    if (::waitpid(pid_, &status_, WNOHANG) == pid_) {
      pid_ = -1;
      return true;
    }
    return false;
  }

  /// The exit status of a reaped child (-1 when killed by a signal).
  int exit_code() const {
    return WIFEXITED(status_) ? WEXITSTATUS(status_) : -1;
  }

  /// Sends `sig` (to the group too when `own_group`).
  void signal(int sig) {
    if (pid_ <= 0)
      return;
    if (own_group_)
      ::kill(-pid_, sig);
    ::kill(pid_, sig);
  }

  /// SIGKILL and reap (idempotent).
  void kill9() {
    if (pid_ <= 0)
      return;
    signal(SIGKILL);
    ::waitpid(pid_, &status_, 0);
    pid_ = -1;
  }

  /// Sends `sig`, then waits up to `limit` for the child to exit; SIGKILLs
  /// it after. Returns whether it exited by itself in time.
  bool stop(int sig, std::chrono::milliseconds limit) {
    if (pid_ <= 0)
      return false;
    signal(sig);
    if (wait_for([this] { return exited(); }, limit,
                 std::chrono::milliseconds{10}))
      return true;
    kill9();
    return false;
  }

  /// SIGTERM, up to `limit` for a clean exit (SIGKILL after). Returns
  /// whether the child exited with status 0 in time.
  bool terminate(std::chrono::milliseconds limit) {
    return stop(SIGTERM, limit) && WIFEXITED(status_)
           && WEXITSTATUS(status_) == 0;
  }

  /// Waits until `ready()` holds; throws std::runtime_error naming `what` and
  /// the log when the child exits first or `limit` passes (then it is
  /// killed).
  template <class Pred>
  void
  wait_ready(Pred ready, std::chrono::milliseconds limit,
             const std::string& what,
             std::chrono::milliseconds poll = std::chrono::milliseconds{20}) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (!ready()) {
      if (exited())
        throw std::runtime_error(what + " exited at start; see " + log_);
      if (std::chrono::steady_clock::now() > deadline) {
        kill9();
        throw std::runtime_error(what + " was not ready within "
                                 + std::to_string(limit.count()) + " ms; see "
                                 + log_);
      }
      std::this_thread::sleep_for(poll);
    }
  }

  /// The last characters of the child's log (for failure messages).
  std::string log_tail(size_t max_chars = 3000) const {
    return file_tail(log_, max_chars);
  }

private:
  pid_t pid_ = -1;
  int status_ = 0;
  bool own_group_ = false;
  std::string log_;
};

// -- worker processes: the test binary re-executed -----------------------------

/// The running executable (`/proc/self/exe`).
inline std::string self_exe() {
  char exe[PATH_MAX] = {};
  auto n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0)
    throw std::runtime_error("readlink /proc/self/exe failed");
  return std::string{exe, static_cast<size_t>(n)};
}

/// Parent side: `/proc/self/exe FLAG ARGS...` as a child, output appended to
/// JOURNAL.log. The child's `main` recognises FLAG (argv[1]) and runs the
/// worker instead of the tests; it writes JOURNAL.ready (`mark_ready`) once
/// it works.
class worker_child : public child_process {
public:
  worker_child(std::string_view flag, std::vector<std::string> args,
               std::string journal)
    : journal_(std::move(journal)) {
    std::remove((journal_ + ".ready").c_str());
    spawn_options opts;
    opts.args = {self_exe(), std::string{flag}};
    opts.args.insert(opts.args.end(), args.begin(), args.end());
    opts.log = journal_ + ".log";
    start(opts);
  }

  const std::string& journal() const noexcept {
    return journal_;
  }

  /// Whether the child wrote its ready marker.
  bool ready() const {
    return std::ifstream{journal_ + ".ready"}.good();
  }

private:
  std::string journal_;
};

/// Whether argv[1] is `flag` (this process is a worker child).
inline bool has_worker_flag(int argc, char** argv, std::string_view flag) {
  return argc > 1 && std::string_view{argv[1]} == flag;
}

/// Child side: blocks SIGTERM and SIGINT in this thread and every thread it
/// starts afterwards (call first); `wait_for_stop_signal` takes them.
inline sigset_t block_stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return set;
}

/// Child side: waits for SIGTERM or SIGINT; returns the signal.
inline int wait_for_stop_signal(const sigset_t& set) {
  int sig = 0;
  sigwait(&set, &sig);
  return sig;
}

/// Child side: the journal, opened for appending (-1 on failure).
inline int open_journal(const std::string& path) {
  return ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
}

/// Appends `line` and a newline with one write(2).
inline void append_line(int fd, std::string_view line) {
  std::string text{line};
  text += '\n';
  auto rc = ::write(fd, text.data(), text.size());
  static_cast<void>(rc);
}

/// Child side: writes JOURNAL.ready (this process's id).
inline void mark_ready(const std::string& journal) {
  std::ofstream{journal + ".ready"} << ::getpid() << "\n";
}

} // namespace evmesh::testing
