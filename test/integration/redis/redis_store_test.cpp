// The redis:// idempotency store against a real redis-server, started by each
// test on a free loopback port and always stopped. Every wait has a deadline.
#include "evmesh/redis_store.hpp"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "evmesh/stores.hpp"

using namespace evmesh;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

using steady = std::chrono::steady_clock;

errc code_of(const caf::error& err) {
  if (err.category() != caf::atom("evmesh"))
    return errc::none;
  return static_cast<errc>(err.code());
}

template <class Pred>
bool wait_for(Pred pred, std::chrono::milliseconds limit = 10s) {
  auto deadline = steady::now() + limit;
  while (!pred()) {
    if (steady::now() > deadline)
      return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

/// A loopback TCP port nobody listens on right now.
uint16_t free_port() {
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
    return 0;
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

/// Whether something on `port` answers a PING with any RESP reply (a
/// password-protected server answers -NOAUTH: ready too).
bool answers_ping(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0)
    return false;
  timeval tv{0, 200'000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  bool ok = false;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    constexpr char ping[] = "PING\r\n";
    char buf[64];
    if (::send(fd, ping, sizeof(ping) - 1, MSG_NOSIGNAL) > 0)
      ok = ::recv(fd, buf, sizeof(buf), 0) > 0;
  }
  ::close(fd);
  return ok;
}

/// One redis-server child process on a loopback port.
class redis_server {
public:
  redis_server() : port_(free_port()) {
    auto base = fs::temp_directory_path()
                / ("evmesh-redis-" + std::to_string(::getpid()) + "-"
                   + std::to_string(port_));
    fs::create_directories(base);
    dir_ = base;
  }

  redis_server(const redis_server&) = delete;
  redis_server& operator=(const redis_server&) = delete;

  ~redis_server() {
    stop();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  /// Starts the server (again, on the same port) and waits until it answers.
  bool start(std::string password = {}) {
    password_ = std::move(password);
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
                                  dir_.string(),
                                  "--logfile",
                                  (dir_ / "redis.log").string()};
    if (!password_.empty()) {
      args.emplace_back("--requirepass");
      args.push_back(password_);
    }
    std::vector<char*> argv;
    for (auto& arg : args)
      argv.push_back(arg.data());
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::execvp("redis-server", argv.data());
      ::_exit(127);
    }
    if (pid_ < 0)
      return false;
    return wait_for([this] { return answers_ping(port_) || exited(); })
           && !exited();
  }

  /// Kills the server and reaps it (idempotent).
  void stop() {
    if (pid_ <= 0)
      return;
    ::kill(pid_, SIGCONT);
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  /// Freezes (true) or thaws (false) the server: connections stay open but
  /// nothing answers.
  void freeze(bool on) {
    if (pid_ > 0)
      ::kill(pid_, on ? SIGSTOP : SIGCONT);
  }

  uint16_t port() const noexcept {
    return port_;
  }

  std::string url(std::string_view suffix = "/0") const {
    std::string out = "redis://";
    if (!password_.empty())
      out += ":" + password_ + "@";
    out += "127.0.0.1:" + std::to_string(port_);
    out += suffix;
    return out;
  }

private:
  bool exited() {
    if (pid_ <= 0)
      return true;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return true;
    }
    return false;
  }

  uint16_t port_;
  fs::path dir_;
  pid_t pid_ = -1;
  std::string password_;
};

struct redis_store_test : testing::Test {
  redis_server server;
  std::shared_ptr<redis_idempotency_store> store;

  void SetUp() override {
    if (std::system("command -v redis-server >/dev/null 2>&1") != 0)
      GTEST_SKIP() << "redis-server is not installed";
    ASSERT_NE(server.port(), 0);
    ASSERT_TRUE(server.start()) << "redis-server did not start";
    // Commands may wait longer than the 200 ms default on a saturated
    // machine; the tests about timeouts open their own stores.
    store = open(server.url("/0?timeout_ms=5000"));
  }

  std::shared_ptr<redis_idempotency_store> open(const std::string& url) {
    auto res = redis_idempotency_store::open(url);
    EXPECT_TRUE(res) << (res ? "" : render(res.error()));
    return res ? *res : nullptr;
  }
};

} // namespace

// -- URL parsing (no server) -----------------------------------------------------

TEST(parse_redis_url, applies_defaults) {
  auto opts = parse_redis_url("redis://");
  ASSERT_TRUE(opts) << render(opts.error());
  EXPECT_EQ(opts->host, "127.0.0.1");
  EXPECT_EQ(opts->port, 6379);
  EXPECT_EQ(opts->db, 0);
  EXPECT_EQ(opts->pool, 8u);
  EXPECT_EQ(opts->timeout, 200ms);
  EXPECT_EQ(opts->prefix, "evmesh:idem:");
  EXPECT_TRUE(opts->password.empty());
}

TEST(parse_redis_url, reads_every_part) {
  auto opts = parse_redis_url("REDIS://app:p%40ss@cache.local:6380/3?pool=2&"
                              "timeout_ms=50&connect_timeout_ms=75&prefix=x:");
  ASSERT_TRUE(opts) << render(opts.error());
  EXPECT_EQ(opts->user, "app");
  EXPECT_EQ(opts->password, "p@ss");
  EXPECT_EQ(opts->host, "cache.local");
  EXPECT_EQ(opts->port, 6380);
  EXPECT_EQ(opts->db, 3);
  EXPECT_EQ(opts->pool, 2u);
  EXPECT_EQ(opts->timeout, 50ms);
  EXPECT_EQ(opts->connect_timeout, 75ms);
  EXPECT_EQ(opts->prefix, "x:");
  EXPECT_EQ(opts->display_url(), "redis://app:***@cache.local:6380/3");
}

TEST(parse_redis_url, accepts_a_password_alone_and_ipv6) {
  auto opts = parse_redis_url("redis://:secret@[::1]:7000/1");
  ASSERT_TRUE(opts) << render(opts.error());
  EXPECT_EQ(opts->user, "");
  EXPECT_EQ(opts->password, "secret");
  EXPECT_EQ(opts->host, "::1");
  EXPECT_EQ(opts->port, 7000);
  EXPECT_EQ(opts->display_url(), "redis://:***@[::1]:7000/1");
}

TEST(parse_redis_url, rejects_bad_urls_with_the_reason) {
  struct row {
    const char* url;
    const char* reason;
  };
  row rows[] = {
    {"http://x", "scheme"},
    {"redis://h:0", "port"},
    {"redis://h:70000", "port"},
    {"redis://h:", "empty port"},
    {"redis://h/x", "database"},
    {"redis://h/-1", "database"},
    {"redis://secret@h", "':'"},
    {"redis://:%zz@h", "percent"},
    {"redis://[::1", "'['"},
    {"redis://h?pool=0", "pool"},
    {"redis://h?pool=1000", "pool"},
    {"redis://h?timeout_ms=abc", "timeout_ms"},
    {"redis://h?color=red", "unknown parameter 'color'"},
  };
  for (auto& r : rows) {
    auto opts = parse_redis_url(r.url);
    ASSERT_FALSE(opts) << r.url;
    EXPECT_EQ(code_of(opts.error()), errc::invalid_url) << r.url;
    auto text = render(opts.error());
    EXPECT_NE(text.find(r.reason), std::string::npos) << r.url << ": " << text;
  }
}

// -- the idempotency contract ----------------------------------------------------

TEST_F(redis_store_test, first_claim_is_fresh_and_commit_makes_a_duplicate) {
  ASSERT_TRUE(store);
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  EXPECT_FALSE(store->commit("k", 1h));
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::duplicate);
  EXPECT_EQ(store->try_begin("other", 30s), claim_result::fresh);
  EXPECT_EQ(store->pending_claims(), 1u); // "other"
}

TEST_F(redis_store_test, leased_key_is_in_flight_for_everyone) {
  ASSERT_TRUE(store);
  auto peer = open(server.url());
  ASSERT_TRUE(peer);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::in_flight);
  EXPECT_EQ(peer->try_begin("k", 30s), claim_result::in_flight);
}

TEST_F(redis_store_test, expired_lease_can_be_claimed_again) {
  ASSERT_TRUE(store);
  ASSERT_EQ(store->try_begin("k", 50ms), claim_result::fresh);
  EXPECT_TRUE(wait_for(
    [&] { return store->try_begin("k", 30s) == claim_result::fresh; }));
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::in_flight);
}

TEST_F(redis_store_test, commit_is_forgotten_after_keep) {
  ASSERT_TRUE(store);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  ASSERT_FALSE(store->commit("k", 50ms));
  EXPECT_TRUE(wait_for(
    [&] { return store->try_begin("k", 30s) == claim_result::fresh; }));
}

TEST_F(redis_store_test, commit_without_claim_is_an_upsert) {
  ASSERT_TRUE(store);
  EXPECT_FALSE(store->commit("k", 1h));
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::duplicate);
}

TEST_F(redis_store_test, commit_with_zero_keep_forgets_the_key) {
  ASSERT_TRUE(store);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  EXPECT_FALSE(store->commit("k", 0s));
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  EXPECT_FALSE(store->commit("k", 1h));
  EXPECT_FALSE(store->commit("k", 0s));
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::fresh);
}

TEST_F(redis_store_test, abort_releases_the_claim) {
  ASSERT_TRUE(store);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  EXPECT_FALSE(store->abort("k"));
  EXPECT_EQ(store->pending_claims(), 0u);
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::fresh);
}

TEST_F(redis_store_test, abort_after_commit_keeps_it_committed) {
  ASSERT_TRUE(store);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  ASSERT_FALSE(store->commit("k", 1h));
  EXPECT_EQ(store->pending_claims(), 0u);
  EXPECT_FALSE(store->abort("k"));
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::duplicate);
}

TEST_F(redis_store_test, abort_of_an_unknown_key_is_harmless) {
  ASSERT_TRUE(store);
  EXPECT_FALSE(store->abort("nobody"));
  auto peer = open(server.url());
  ASSERT_TRUE(peer);
  ASSERT_EQ(peer->try_begin("theirs", 30s), claim_result::fresh);
  // Never claimed here: this instance has no token, so nothing is removed.
  EXPECT_FALSE(store->abort("theirs"));
  EXPECT_EQ(store->try_begin("theirs", 30s), claim_result::in_flight);
}

// Unlike the owner-less memory store, a claim carries a token: worker A's
// lease expires, B re-claims, and A's late abort leaves B's claim alone.
TEST_F(redis_store_test, late_abort_does_not_remove_a_newer_claim) {
  ASSERT_TRUE(store);
  auto b = open(server.url());
  ASSERT_TRUE(b);
  ASSERT_EQ(store->try_begin("k", 50ms), claim_result::fresh); // A
  ASSERT_TRUE(wait_for([&] {                                   // B
    return b->try_begin("k", 30s) == claim_result::fresh;
  }));
  EXPECT_FALSE(store->abort("k")); // A, late
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::in_flight);
  EXPECT_FALSE(b->commit("k", 1h));
  EXPECT_FALSE(store->abort("k"));
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::duplicate);
}

TEST_F(redis_store_test, late_commit_after_a_newer_claim_still_counts) {
  ASSERT_TRUE(store);
  auto b = open(server.url());
  ASSERT_TRUE(b);
  ASSERT_EQ(store->try_begin("k", 50ms), claim_result::fresh); // A
  ASSERT_TRUE(wait_for([&] {                                   // B
    return b->try_begin("k", 30s) == claim_result::fresh;
  }));
  EXPECT_FALSE(store->commit("k", 1h)); // A handled it after all
  EXPECT_FALSE(b->abort("k"));          // B failed: the commit stays
  EXPECT_EQ(b->try_begin("k", 30s), claim_result::duplicate);
}

TEST_F(redis_store_test, huge_ttls_do_not_overflow) {
  ASSERT_TRUE(store);
  ASSERT_EQ(store->try_begin("k", caf::timespan::max()), claim_result::fresh);
  EXPECT_EQ(store->try_begin("k", 1s), claim_result::in_flight);
  ASSERT_FALSE(store->commit("k", caf::timespan::max()));
  EXPECT_EQ(store->try_begin("k", 1s), claim_result::duplicate);
}

TEST_F(redis_store_test, racing_threads_claim_each_key_exactly_once) {
  ASSERT_TRUE(store);
  constexpr int threads = 8;
  constexpr int keys = 100;
  std::atomic<int> fresh[keys] = {};
  std::atomic<int> other{0};
  std::barrier sync{threads};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&] {
      for (int k = 0; k < keys; ++k) {
        sync.arrive_and_wait();
        auto res = store->try_begin("race-" + std::to_string(k), 30s);
        if (res == claim_result::fresh)
          ++fresh[k];
        else if (res != claim_result::in_flight)
          ++other;
      }
    });
  for (auto& w : workers)
    w.join();
  for (int k = 0; k < keys; ++k)
    EXPECT_EQ(fresh[k].load(), 1) << "key " << k;
  EXPECT_EQ(other.load(), 0);
}

// Many callers on one connection: their commands share pipelined writes
// (fewer round trips than commands) and every caller still gets its own
// reply — a mixed-up reply would show as a wrong claim result.
TEST_F(redis_store_test, concurrent_calls_share_pipelined_round_trips) {
  // A generous command timeout: on a saturated machine a pipelined write of
  // hundreds of commands may take longer than the default, and this test is
  // about replies reaching the right callers, not about latency.
  auto single = open(server.url("/0?pool=1&timeout_ms=20000"));
  ASSERT_TRUE(single);
  constexpr int threads = 16;
  constexpr int keys = 200;
  std::atomic<int> wrong{0};
  std::barrier sync{threads};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      sync.arrive_and_wait();
      for (int k = 0; k < keys; ++k) {
        auto key = "pipe-" + std::to_string(t) + "-" + std::to_string(k);
        if (single->try_begin(key, 30s) != claim_result::fresh)
          ++wrong;
        if (single->commit(key, 1h))
          ++wrong;
        if (single->try_begin(key, 30s) != claim_result::duplicate)
          ++wrong;
      }
    });
  for (auto& w : workers)
    w.join();
  EXPECT_EQ(wrong.load(), 0);
  auto stats = single->pipelining();
  EXPECT_GE(stats.commands, uint64_t{threads} * keys * 3);
  EXPECT_LT(stats.round_trips, stats.commands)
    << "16 threads on one connection never shared a round trip";
  // Another instance sees every key committed.
  EXPECT_EQ(store->try_begin("pipe-7-123", 30s), claim_result::duplicate);
}

TEST_F(redis_store_test, databases_are_separate) {
  ASSERT_TRUE(store);
  auto db1 = open(server.url("/1"));
  ASSERT_TRUE(db1);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  EXPECT_EQ(db1->try_begin("k", 30s), claim_result::fresh);
}

TEST_F(redis_store_test, prefix_namespaces_the_keys) {
  ASSERT_TRUE(store);
  auto other = open(server.url("/0?prefix=other:"));
  ASSERT_TRUE(other);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  EXPECT_EQ(other->try_begin("k", 30s), claim_result::fresh);
}

TEST_F(redis_store_test, out_of_range_database_fails_at_open) {
  auto res = redis_idempotency_store::open(server.url("/999"));
  ASSERT_FALSE(res);
  EXPECT_EQ(code_of(res.error()), errc::invalid_config);
  auto text = render(res.error());
  EXPECT_NE(text.find("DB index"), std::string::npos) << text;
}

TEST_F(redis_store_test, make_idempotency_store_opens_redis_once_registered) {
  register_redis_store();
  register_redis_store(); // idempotent
  auto res = make_idempotency_store(server.url());
  ASSERT_TRUE(res) << render(res.error());
  EXPECT_EQ((*res)->try_begin("k", 30s), claim_result::fresh);
  auto bad = make_idempotency_store("redis://h?pool=0");
  ASSERT_FALSE(bad);
  EXPECT_EQ(code_of(bad.error()), errc::invalid_url);
}

// -- failures ----------------------------------------------------------------------

TEST(redis_store_open, unreachable_server_fails_fast_with_unavailable) {
  auto port = free_port();
  ASSERT_NE(port, 0);
  auto start = steady::now();
  auto res = redis_idempotency_store::open(
    "redis://127.0.0.1:" + std::to_string(port) + "/0");
  ASSERT_FALSE(res);
  EXPECT_LT(steady::now() - start, 2s);
  EXPECT_EQ(code_of(res.error()), errc::unavailable);
  auto text = render(res.error());
  EXPECT_NE(text.find("is redis-server running"), std::string::npos) << text;
}

TEST(redis_store_auth, wrong_or_missing_password_fails_at_open) {
  if (std::system("command -v redis-server >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "redis-server is not installed";
  redis_server server;
  ASSERT_TRUE(server.start("s3cret"));
  auto port = std::to_string(server.port());
  auto good = redis_idempotency_store::open(server.url());
  ASSERT_TRUE(good) << render(good.error());
  EXPECT_EQ((*good)->try_begin("k", 30s), claim_result::fresh);
  auto wrong = redis_idempotency_store::open("redis://:nope@127.0.0.1:" + port);
  ASSERT_FALSE(wrong);
  EXPECT_EQ(code_of(wrong.error()), errc::invalid_config);
  auto text = render(wrong.error());
  EXPECT_NE(text.find("authenticate"), std::string::npos) << text;
  EXPECT_NE(text.find("password"), std::string::npos) << text;
  EXPECT_EQ(text.find("nope"), std::string::npos) << "leaks the password";
  auto missing = redis_idempotency_store::open("redis://127.0.0.1:" + port);
  ASSERT_FALSE(missing);
  EXPECT_EQ(code_of(missing.error()), errc::invalid_config);
  text = render(missing.error());
  EXPECT_NE(text.find("NOAUTH"), std::string::npos) << text;
}

TEST_F(redis_store_test, stopped_server_is_unavailable_then_reconnects) {
  ASSERT_TRUE(store);
  ASSERT_EQ(store->try_begin("before", 30s), claim_result::fresh);
  ASSERT_FALSE(store->commit("before", 1h));
  server.stop();
  auto start = steady::now();
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::unavailable);
  EXPECT_EQ(code_of(store->commit("k", 1h)), errc::unavailable);
  // Every pooled connection notices the loss on its own.
  for (int i = 0; i < 20; ++i)
    EXPECT_EQ(store->try_begin("k", 30s), claim_result::unavailable);
  EXPECT_LT(steady::now() - start, 5s) << "calls must not hang";
  // The store remembers the claim it may have made, so abort still tries.
  EXPECT_EQ(code_of(store->abort("k")), errc::unavailable);
  ASSERT_TRUE(server.start());
  // The server came back empty (no persistence): "before" is gone.
  EXPECT_TRUE(wait_for(
    [&] { return store->try_begin("k", 30s) == claim_result::fresh; }));
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::in_flight);
  EXPECT_FALSE(store->commit("k", 1h));
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::duplicate);
}

TEST_F(redis_store_test, frozen_server_times_out_instead_of_hanging) {
  // One connection, already open: the timeout hits a command, not a connect.
  auto single = open(server.url("/0?pool=1&timeout_ms=200"));
  ASSERT_TRUE(single);
  ASSERT_EQ(single->try_begin("k", 30s), claim_result::fresh);
  server.freeze(true);
  auto start = steady::now();
  EXPECT_EQ(single->try_begin("x", 30s), claim_result::unavailable);
  auto took = steady::now() - start;
  EXPECT_GE(took, 150ms);
  EXPECT_LT(took, 2s);
  // Reconnecting to a frozen server is bounded by the connect timeout too.
  for (int i = 0; i < 3; ++i) {
    start = steady::now();
    EXPECT_EQ(single->try_begin("x", 30s), claim_result::unavailable);
    EXPECT_LT(steady::now() - start, 2s);
    std::this_thread::sleep_for(110ms); // past the reconnect pause
  }
  EXPECT_EQ(code_of(single->commit("k", 1h)), errc::unavailable);
  server.freeze(false);
  EXPECT_TRUE(wait_for(
    [&] { return single->try_begin("k", 30s) == claim_result::in_flight; }));
}

TEST_F(redis_store_test, concurrent_calls_survive_repeated_server_stalls) {
  // Many callers share pipelined connections while the server stalls again
  // and again (SIGSTOP past the command timeout, then SIGCONT): writers time
  // out with queued callers behind them, connections drop and reconnect.
  // Every call must come back with an answer (under ASan: without touching
  // freed memory), and the store must work normally afterwards.
  auto shared = open(server.url("/0?pool=2&timeout_ms=100"));
  ASSERT_TRUE(shared);
  constexpr int threads = 12;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> calls{0};
  std::atomic<uint64_t> unavailable{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      for (int k = 0; !stop.load(); ++k) {
        auto key = "stall-" + std::to_string(t) + "-" + std::to_string(k);
        auto res = shared->try_begin(key, 30s);
        if (res == claim_result::unavailable)
          ++unavailable;
        if (res == claim_result::fresh) {
          if (k % 3 == 0)
            (void) shared->abort(key);
          else
            (void) shared->commit(key, 1h);
        }
        ++calls;
      }
    });
  for (int round = 0; round < 6; ++round) {
    server.freeze(true);
    std::this_thread::sleep_for(250ms);
    server.freeze(false);
    std::this_thread::sleep_for(150ms);
  }
  stop = true;
  for (auto& w : workers)
    w.join();
  EXPECT_GT(calls.load(), uint64_t{threads});
  EXPECT_GT(unavailable.load(), 0u) << "the stalls never made a call time out";
  // Recovered: a new key is fresh, then a duplicate once committed.
  EXPECT_TRUE(wait_for(
    [&] { return shared->try_begin("after", 30s) == claim_result::fresh; }));
  ASSERT_FALSE(shared->commit("after", 1h));
  EXPECT_EQ(shared->try_begin("after", 30s), claim_result::duplicate);
}

// -- batch calls: one pipelined write per batch -------------------------------------

namespace {

std::vector<std::string_view> views_of(const std::vector<std::string>& keys) {
  return {keys.begin(), keys.end()};
}

size_t count_of(const std::vector<claim_result>& out, claim_result what) {
  return static_cast<size_t>(std::count(out.begin(), out.end(), what));
}

} // namespace

TEST_F(redis_store_test, batch_claim_answers_per_key_in_one_round_trip) {
  ASSERT_TRUE(store);
  auto other = open(server.url("/0?timeout_ms=5000"));
  ASSERT_TRUE(other);
  ASSERT_EQ(store->try_begin("done", 30s), claim_result::fresh);
  ASSERT_FALSE(store->commit("done", 1h));
  ASSERT_EQ(other->try_begin("held", 30s), claim_result::fresh);
  std::vector<std::string_view> keys{"new1", "done", "held", "new2", "new1"};
  std::vector<claim_result> out(keys.size(), claim_result::unavailable);
  auto before = store->pipelining();
  store->try_begin_many(keys, 30s, out);
  auto after = store->pipelining();
  EXPECT_EQ(out, (std::vector<claim_result>{
                   claim_result::fresh, claim_result::duplicate,
                   claim_result::in_flight, claim_result::fresh,
                   claim_result::in_flight}));
  EXPECT_EQ(after.commands - before.commands, keys.size());
  EXPECT_EQ(after.round_trips - before.round_trips, 1u)
    << "the batch must go out in one pipelined write";
  // The batch's claims are ordinary claims of this instance.
  EXPECT_EQ(other->try_begin("new2", 30s), claim_result::in_flight);
  EXPECT_EQ(store->pending_claims(), 2u) << "new1 and new2 only";
}

TEST_F(redis_store_test, batch_finish_commits_and_aborts_in_one_round_trip) {
  ASSERT_TRUE(store);
  auto other = open(server.url("/0?timeout_ms=5000"));
  ASSERT_TRUE(other);
  std::vector<std::string_view> keys{"a", "b", "c", "d"};
  std::vector<claim_result> out(keys.size(), claim_result::unavailable);
  store->try_begin_many(keys, 30s, out);
  ASSERT_EQ(out, std::vector<claim_result>(4, claim_result::fresh));
  std::vector<finish_op> ops{{"a", finish_op::commit},
                             {"b", finish_op::abort},
                             {"c", finish_op::commit},
                             {"c", finish_op::abort},
                             {"never-claimed", finish_op::abort},
                             {"d", finish_op::abort}};
  std::vector<caf::error> errors(ops.size(), make_error(errc::io_error, "x"));
  auto before = store->pipelining();
  EXPECT_FALSE(store->finish_many(ops, 1h, errors));
  auto after = store->pipelining();
  for (size_t i = 0; i < errors.size(); ++i)
    EXPECT_FALSE(errors[i]) << "step " << i;
  EXPECT_EQ(after.round_trips - before.round_trips, 1u);
  // Nothing is sent for the key never claimed here; c's abort after its
  // commit is sent (the tokens are read before the batch runs) and finds
  // the key committed, which it leaves alone.
  EXPECT_EQ(after.commands - before.commands, 5u);
  EXPECT_EQ(other->try_begin("a", 30s), claim_result::duplicate);
  EXPECT_EQ(other->try_begin("b", 30s), claim_result::fresh);
  EXPECT_EQ(other->try_begin("c", 30s), claim_result::duplicate);
  EXPECT_EQ(other->try_begin("d", 30s), claim_result::fresh);
  EXPECT_EQ(store->pending_claims(), 0u);
}

TEST_F(redis_store_test, batch_abort_leaves_a_newer_claim_and_commits_alone) {
  ASSERT_TRUE(store);
  auto other = open(server.url("/0?timeout_ms=5000"));
  ASSERT_TRUE(other);
  // Our lease on "late" expires and another worker claims it; "kept" is
  // committed by someone else before our abort arrives.
  std::vector<std::string_view> keys{"late", "kept"};
  std::vector<claim_result> out(keys.size());
  store->try_begin_many(keys, 50ms, out);
  ASSERT_EQ(out, std::vector<claim_result>(2, claim_result::fresh));
  ASSERT_TRUE(wait_for(
    [&] { return other->try_begin("late", 30s) == claim_result::fresh; }));
  ASSERT_FALSE(other->commit("kept", 1h));
  std::vector<finish_op> ops{{"late", finish_op::abort},
                             {"kept", finish_op::abort}};
  std::vector<caf::error> errors(ops.size());
  EXPECT_FALSE(store->finish_many(ops, 1h, errors));
  EXPECT_EQ(store->try_begin("late", 30s), claim_result::in_flight)
    << "a late abort released another worker's claim";
  EXPECT_EQ(store->try_begin("kept", 30s), claim_result::duplicate);
}

TEST_F(redis_store_test, batches_larger_than_one_write_keep_their_order) {
  ASSERT_TRUE(store);
  std::vector<std::string> names;
  for (int i = 0; i < 1500; ++i)
    names.push_back("big-" + std::to_string(i));
  // Every third key is committed already: the answers must line up.
  for (size_t i = 0; i < names.size(); i += 3)
    ASSERT_FALSE(store->commit(names[i], 1h));
  auto keys = views_of(names);
  std::vector<claim_result> out(keys.size(), claim_result::unavailable);
  auto before = store->pipelining();
  store->try_begin_many(keys, 30s, out);
  auto after = store->pipelining();
  for (size_t i = 0; i < out.size(); ++i)
    ASSERT_EQ(out[i],
              i % 3 == 0 ? claim_result::duplicate : claim_result::fresh)
      << names[i];
  // 512 commands per write at most.
  EXPECT_EQ(after.round_trips - before.round_trips, 3u);
  std::vector<finish_op> ops;
  for (size_t i = 0; i < keys.size(); ++i)
    if (out[i] == claim_result::fresh)
      ops.push_back({keys[i], finish_op::commit});
  std::vector<caf::error> errors(ops.size());
  EXPECT_FALSE(store->finish_many(ops, 1h, errors));
  store->try_begin_many(keys, 30s, out);
  EXPECT_EQ(count_of(out, claim_result::duplicate), keys.size());
}

TEST_F(redis_store_test,
       batch_against_a_stopped_server_is_unavailable_per_key) {
  ASSERT_TRUE(store);
  std::vector<std::string> names{"s0", "s1", "s2", "s3", "s4", "s5"};
  auto keys = views_of(names);
  std::vector<claim_result> out(keys.size(), claim_result::fresh);
  store->try_begin_many({keys.data(), 2}, 30s, {out.data(), 2});
  ASSERT_EQ(out[0], claim_result::fresh);
  server.stop();
  auto start = steady::now();
  store->try_begin_many(keys, 30s, out);
  EXPECT_EQ(count_of(out, claim_result::unavailable), keys.size());
  std::vector<finish_op> ops{{"s0", finish_op::commit},
                             {"s1", finish_op::abort},
                             {"s2", finish_op::abort}};
  std::vector<caf::error> errors(ops.size());
  auto first = store->finish_many(ops, 1h, errors);
  EXPECT_EQ(code_of(first), errc::unavailable);
  for (auto& err : errors)
    EXPECT_EQ(code_of(err), errc::unavailable) << render(err);
  EXPECT_LT(steady::now() - start, 5s) << "calls must not hang";
  ASSERT_TRUE(server.start());
  EXPECT_TRUE(wait_for([&] {
    store->try_begin_many(keys, 30s, out);
    return out[0] == claim_result::fresh;
  }));
  // The remembered tokens of the failed claims were replaced by the fresh
  // ones: a batch abort releases them.
  std::vector<finish_op> release;
  for (auto key : keys)
    release.push_back({key, finish_op::abort});
  std::vector<caf::error> release_errors(release.size());
  EXPECT_FALSE(store->finish_many(release, 1h, release_errors));
  store->try_begin_many(keys, 30s, out);
  EXPECT_EQ(count_of(out, claim_result::fresh), keys.size());
}

TEST_F(redis_store_test, batch_against_a_frozen_server_times_out_per_key) {
  auto single = open(server.url("/0?pool=1&timeout_ms=200"));
  ASSERT_TRUE(single);
  std::vector<std::string> names;
  for (int i = 0; i < 40; ++i)
    names.push_back("frozen-" + std::to_string(i));
  auto keys = views_of(names);
  std::vector<claim_result> out(keys.size(), claim_result::fresh);
  single->try_begin_many({keys.data(), 1}, 30s, {out.data(), 1});
  ASSERT_EQ(out[0], claim_result::fresh);
  server.freeze(true);
  auto start = steady::now();
  single->try_begin_many(keys, 30s, out);
  auto took = steady::now() - start;
  EXPECT_EQ(count_of(out, claim_result::unavailable), keys.size());
  EXPECT_GE(took, 150ms);
  EXPECT_LT(took, 2s);
  std::vector<finish_op> ops;
  for (auto key : keys)
    ops.push_back({key, finish_op::commit});
  std::vector<caf::error> errors(ops.size());
  start = steady::now();
  EXPECT_EQ(code_of(single->finish_many(ops, 1h, errors)), errc::unavailable);
  EXPECT_LT(steady::now() - start, 2s);
  for (auto& err : errors)
    EXPECT_EQ(code_of(err), errc::unavailable);
  server.freeze(false);
  // Back: the first key is still ours (claimed before the freeze).
  EXPECT_TRUE(wait_for([&] {
    single->try_begin_many({keys.data(), 1}, 30s, {out.data(), 1});
    return out[0] == claim_result::in_flight;
  }));
}

TEST_F(redis_store_test, racing_batches_claim_each_key_exactly_once) {
  auto shared = open(server.url("/0?pool=2&timeout_ms=20000"));
  ASSERT_TRUE(shared);
  constexpr int threads = 8;
  std::vector<std::string> names;
  for (int i = 0; i < 64; ++i)
    names.push_back("rb-" + std::to_string(i));
  std::atomic<int> fresh{0};
  std::atomic<int> other{0};
  std::barrier sync{threads};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      auto keys = views_of(names);
      std::rotate(keys.begin(), keys.begin() + t * 7, keys.end());
      std::vector<claim_result> out(keys.size());
      sync.arrive_and_wait();
      shared->try_begin_many(keys, 30s, out);
      fresh += static_cast<int>(count_of(out, claim_result::fresh));
      other += static_cast<int>(keys.size() - count_of(out, claim_result::fresh)
                                - count_of(out, claim_result::in_flight));
    });
  for (auto& w : workers)
    w.join();
  EXPECT_EQ(fresh.load(), 64);
  EXPECT_EQ(other.load(), 0);
}

TEST_F(redis_store_test, batches_and_single_calls_survive_repeated_stalls) {
  // Batch callers and single-key callers share two pipelined connections
  // while the server stalls past the command timeout again and again. Every
  // call must come back with an answer for every key (under ASan: without
  // touching freed memory), and the store must work normally afterwards.
  auto shared = open(server.url("/0?pool=2&timeout_ms=100"));
  ASSERT_TRUE(shared);
  constexpr int threads = 8;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> batches{0};
  std::atomic<uint64_t> unavailable{0};
  std::atomic<uint64_t> wrong{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      for (int k = 0; !stop.load(); ++k) {
        auto prefix = "bs-" + std::to_string(t) + "-" + std::to_string(k) + "-";
        if (t % 4 == 3) { // a single-key caller among the batches
          auto res = shared->try_begin(prefix, 30s);
          if (res == claim_result::fresh)
            (void) shared->commit(prefix, 1h);
          continue;
        }
        std::vector<std::string> names;
        for (int i = 0; i < 16; ++i)
          names.push_back(prefix + std::to_string(i));
        auto keys = views_of(names);
        std::vector<claim_result> out(keys.size(), claim_result::duplicate);
        shared->try_begin_many(keys, 30s, out);
        std::vector<finish_op> ops;
        for (size_t i = 0; i < keys.size(); ++i) {
          if (out[i] == claim_result::unavailable)
            ++unavailable;
          else if (out[i] != claim_result::fresh)
            ++wrong; // every key is new: only fresh or unavailable
          if (out[i] == claim_result::fresh)
            ops.push_back(
              {keys[i], i % 3 == 0 ? finish_op::abort : finish_op::commit});
        }
        std::vector<caf::error> errors(ops.size());
        (void) shared->finish_many(ops, 1h, errors);
        ++batches;
      }
    });
  for (int round = 0; round < 6; ++round) {
    server.freeze(true);
    std::this_thread::sleep_for(250ms);
    server.freeze(false);
    std::this_thread::sleep_for(150ms);
  }
  stop = true;
  for (auto& w : workers)
    w.join();
  EXPECT_GT(batches.load(), uint64_t{threads});
  EXPECT_EQ(wrong.load(), 0u);
  EXPECT_GT(unavailable.load(), 0u) << "the stalls never made a batch time out";
  std::vector<std::string_view> keys{"after-1", "after-2"};
  std::vector<claim_result> out(keys.size());
  EXPECT_TRUE(wait_for([&] {
    shared->try_begin_many(keys, 30s, out);
    return out[0] == claim_result::fresh && out[1] == claim_result::fresh;
  }));
  std::vector<finish_op> ops{{"after-1", finish_op::commit},
                             {"after-2", finish_op::commit}};
  std::vector<caf::error> errors(ops.size());
  ASSERT_FALSE(shared->finish_many(ops, 1h, errors));
  EXPECT_EQ(shared->try_begin("after-2", 30s), claim_result::duplicate);
}

TEST_F(redis_store_test, batch_scripts_survive_a_script_flush) {
  ASSERT_TRUE(store);
  if (std::system("command -v redis-cli >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "redis-cli is not installed";
  auto flush = "redis-cli -p " + std::to_string(server.port())
               + " SCRIPT FLUSH >/dev/null";
  ASSERT_EQ(std::system(flush.c_str()), 0);
  std::vector<std::string_view> keys{"f1", "f2"};
  std::vector<claim_result> out(keys.size());
  store->try_begin_many(keys, 30s, out);
  EXPECT_EQ(out, std::vector<claim_result>(2, claim_result::fresh))
    << "NOSCRIPT must fall back to EVAL";
  ASSERT_EQ(std::system(flush.c_str()), 0);
  std::vector<finish_op> ops{{"f1", finish_op::abort},
                             {"f2", finish_op::abort}};
  std::vector<caf::error> errors(ops.size());
  EXPECT_FALSE(store->finish_many(ops, 1h, errors));
  store->try_begin_many(keys, 30s, out);
  EXPECT_EQ(out, std::vector<claim_result>(2, claim_result::fresh))
    << "the aborts after the flush released both claims";
}

// -- how claims are sent ---------------------------------------------------------

namespace {

/// Output of `redis-cli -p PORT ARGS...` (empty when it fails).
std::string redis_cli(uint16_t port, const std::string& args) {
  auto cmd = "redis-cli -p " + std::to_string(port) + " " + args;
  std::string out;
  if (auto* pipe = ::popen(cmd.c_str(), "r")) {
    char buf[4096];
    size_t n = 0;
    while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0)
      out.append(buf, n);
    ::pclose(pipe);
  }
  return out;
}

/// Calls of `command` since the server started, from INFO commandstats.
long command_calls(uint16_t port, const std::string& command) {
  auto stats = redis_cli(port, "INFO commandstats");
  auto field = "cmdstat_" + command + ":calls=";
  auto at = stats.find(field);
  if (at == std::string::npos)
    return 0;
  return std::stol(stats.substr(at + field.size()));
}

int server_major_version(uint16_t port) {
  auto info = redis_cli(port, "INFO server");
  auto at = info.find("redis_version:");
  if (at == std::string::npos)
    return 0;
  return std::atoi(info.c_str() + at + 14);
}

} // namespace

TEST(parse_redis_url, reads_the_claim_mode) {
  auto def = parse_redis_url("redis://h");
  ASSERT_TRUE(def);
  EXPECT_EQ(def->claim, redis_store_options::claim_mode::automatic);
  auto script = parse_redis_url("redis://h?claim=script");
  ASSERT_TRUE(script);
  EXPECT_EQ(script->claim, redis_store_options::claim_mode::script);
  auto automatic = parse_redis_url("redis://h?claim=auto");
  ASSERT_TRUE(automatic);
  EXPECT_EQ(automatic->claim, redis_store_options::claim_mode::automatic);
  auto bad = parse_redis_url("redis://h?claim=lua");
  ASSERT_FALSE(bad);
  EXPECT_EQ(code_of(bad.error()), errc::invalid_url);
  EXPECT_NE(render(bad.error()).find("auto or script"), std::string::npos)
    << render(bad.error());
}

TEST_F(redis_store_test, claims_on_redis_7_are_one_set_command_without_lua) {
  ASSERT_TRUE(store);
  if (std::system("command -v redis-cli >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "redis-cli is not installed";
  if (server_major_version(server.port()) < 7)
    GTEST_SKIP() << "redis-server older than 7 claims with the script";
  auto before = command_calls(server.port(), "evalsha");
  EXPECT_EQ(store->try_begin("s1", 30s), claim_result::fresh);
  EXPECT_EQ(store->try_begin("s1", 30s), claim_result::in_flight);
  EXPECT_FALSE(store->commit("s1", 1h));
  EXPECT_EQ(store->try_begin("s1", 30s), claim_result::duplicate);
  std::vector<std::string_view> keys{"s1", "s2", "s2"};
  std::vector<claim_result> out(keys.size());
  store->try_begin_many(keys, 30s, out);
  EXPECT_EQ(out, (std::vector<claim_result>{claim_result::duplicate,
                                            claim_result::fresh,
                                            claim_result::in_flight}));
  EXPECT_EQ(command_calls(server.port(), "evalsha"), before)
    << "no claim ran a script";
  // A claimed key holds the token: abort still releases only our claim.
  EXPECT_FALSE(store->abort("s2"));
  EXPECT_EQ(store->try_begin("s2", 30s), claim_result::fresh);
}

TEST_F(redis_store_test, claim_script_mode_answers_the_same_with_lua) {
  if (std::system("command -v redis-cli >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "redis-cli is not installed";
  auto lua = open(server.url("/0?timeout_ms=5000&claim=script"));
  ASSERT_TRUE(lua);
  auto before = command_calls(server.port(), "evalsha");
  EXPECT_EQ(lua->try_begin("l1", 30s), claim_result::fresh);
  EXPECT_EQ(lua->try_begin("l1", 30s), claim_result::in_flight);
  EXPECT_FALSE(lua->commit("l1", 1h));
  EXPECT_EQ(lua->try_begin("l1", 30s), claim_result::duplicate);
  std::vector<std::string_view> keys{"l1", "l2", "l2"};
  std::vector<claim_result> out(keys.size());
  lua->try_begin_many(keys, 30s, out);
  EXPECT_EQ(out, (std::vector<claim_result>{claim_result::duplicate,
                                            claim_result::fresh,
                                            claim_result::in_flight}));
  EXPECT_GE(command_calls(server.port(), "evalsha"), before + 6)
    << "every claim ran the script";
  // Both kinds of store see each other's claims and commits.
  EXPECT_EQ(store->try_begin("l2", 30s), claim_result::in_flight);
  EXPECT_EQ(store->try_begin("l1", 30s), claim_result::duplicate);
  EXPECT_EQ(lua->try_begin("l3", 30s), claim_result::fresh);
  EXPECT_EQ(store->try_begin("l3", 30s), claim_result::in_flight);
  EXPECT_EQ(store->try_begin("s3", 30s), claim_result::fresh);
  EXPECT_EQ(lua->try_begin("s3", 30s), claim_result::in_flight);
  // A single claim after SCRIPT FLUSH falls back to EVAL.
  redis_cli(server.port(), "SCRIPT FLUSH");
  EXPECT_EQ(lua->try_begin("l4", 30s), claim_result::fresh)
    << "NOSCRIPT must fall back to EVAL";
  EXPECT_EQ(lua->try_begin("l4", 30s), claim_result::in_flight);
}

TEST_F(redis_store_test, a_key_of_another_type_makes_a_claim_unavailable) {
  if (std::system("command -v redis-cli >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "redis-cli is not installed";
  ASSERT_TRUE(store);
  auto lua = open(server.url("/0?timeout_ms=5000&claim=script"));
  ASSERT_TRUE(lua);
  redis_cli(server.port(), "LPUSH evmesh:idem:listkey x");
  // Both claim forms answer unavailable (WRONGTYPE), never fresh.
  EXPECT_EQ(store->try_begin("listkey", 30s), claim_result::unavailable);
  EXPECT_EQ(lua->try_begin("listkey", 30s), claim_result::unavailable);
  std::vector<std::string_view> keys{"listkey", "fine"};
  std::vector<claim_result> out(keys.size());
  store->try_begin_many(keys, 30s, out);
  EXPECT_EQ(out, (std::vector<claim_result>{claim_result::unavailable,
                                            claim_result::fresh}));
}
