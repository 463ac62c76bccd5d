// kafka:// against librdkafka's mock cluster (3 brokers): start-up errors,
// consumer groups across a rebalance, a broker going down and up, and a
// consumer process killed without a final commit (the binary re-executes
// itself as that consumer). Every wait has a deadline.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <boost/json.hpp>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "evmesh/error.hpp"
#include "evmesh/kafka.hpp"

#include "kafka_mock.hpp"

using namespace std::chrono_literals;
using evmesh::testing::kafka_fast_settings;
using evmesh::testing::kafka_mock_cluster;

namespace {

constexpr std::string_view worker_flag = "--evmesh-kafka-worker";

evmesh::errc code_of(const caf::error& err) {
  if (err.category() != caf::atom("evmesh"))
    return evmesh::errc::none;
  return static_cast<evmesh::errc>(err.code());
}

std::string text_of(const caf::error& err) {
  return evmesh::render(err);
}

evmesh::transport_environment env(std::string node) {
  return {{}, std::move(node)};
}

evmesh::envelope event(const std::string& topic, size_t n, size_t keys) {
  evmesh::envelope e;
  e.id = topic + "-" + std::to_string(n);
  e.topic = topic;
  e.key = "k" + std::to_string(n % keys);
  e.payload = boost::json::object{{"n", static_cast<uint64_t>(n)}};
  return e;
}

// n of an event made by `event`.
int64_t number_of(const evmesh::raw_message& msg) {
  auto e = evmesh::decode_envelope(msg.bytes, {msg.subject, msg.traceparent,
                                               msg.tracestate, msg.key});
  if (!e)
    return -1;
  return e->payload.as_object().at("n").to_number<int64_t>();
}

// "kafka:topic/P@O" -> (P, O)
std::pair<int32_t, int64_t> position_of(const std::string& pos) {
  auto slash = pos.rfind('/');
  auto at = pos.rfind('@');
  return {std::stoi(pos.substr(slash + 1, at - slash - 1)),
          std::stoll(pos.substr(at + 1))};
}

evmesh::transport_ptr make(const std::string& url, const std::string& node) {
  auto t = evmesh::make_transport(url, env(node));
  if (!t) {
    ADD_FAILURE() << text_of(t.error());
    return nullptr;
  }
  return *t;
}

void publish_all(evmesh::transport& p, const std::string& topic, size_t from,
                 size_t to, size_t keys) {
  for (auto n = from; n < to; ++n) {
    auto err = p.publish(event(topic, n, keys));
    ASSERT_FALSE(err) << "publish " << n << ": " << text_of(err);
  }
}

bool wait_for(const std::function<bool()>& pred, caf::timespan timeout) {
  auto until = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= until)
      return false;
    std::this_thread::sleep_for(20ms);
  }
  return true;
}

struct temp_dir {
  std::filesystem::path path;

  temp_dir() {
    static std::atomic<int> n = 0;
    path = std::filesystem::temp_directory_path()
           / ("evmesh-kafka-" + std::to_string(::getpid()) + "-"
              + std::to_string(++n));
    std::filesystem::create_directories(path);
  }

  ~temp_dir() {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
  }
};

// One handling of one message, as the tests record it.
struct handling {
  int member = 0;
  int64_t n = -1;
  std::string key;
  std::string position;
  uint32_t count = 0;
  bool dead_lettered = false;
};

// Handles messages like the runtime on a thread of its own: dead-letters
// every message whose n % 40 == 7 (the record then acked), acks the rest.
class member {
public:
  member(int id, evmesh::transport_ptr t, std::mutex& mtx,
         std::vector<handling>& log)
    : id_(id), t_(std::move(t)), mtx_(mtx), log_(log) {
    thread_ = std::thread{[this] { run(); }};
  }

  ~member() {
    stop();
  }

  void stop() {
    stop_ = true;
    if (thread_.joinable())
      thread_.join();
  }

  evmesh::transport& transport() {
    return *t_;
  }

  size_t handled() const {
    return handled_;
  }

  size_t errors() const {
    return errors_;
  }

private:
  void run() {
    while (!stop_) {
      std::vector<evmesh::raw_message> out;
      if (t_->poll(32, out)) {
        ++errors_;
        std::this_thread::sleep_for(10ms);
        continue;
      }
      for (auto& msg : out) {
        handling h{id_,          number_of(msg),     msg.key,
                   msg.position, msg.delivery_count, false};
        if (h.n % 40 == 7) {
          evmesh::dead_letter_record rec;
          rec.category = "permanent";
          rec.reason = "test poison";
          rec.attempts = 1;
          rec.topic = msg.subject;
          rec.position = msg.position;
          rec.original = msg.bytes;
          if (t_->dead_letter(msg.tag, rec)) {
            ++errors_;
            static_cast<void>(t_->nack(msg.tag, caf::timespan{0}));
            continue;
          }
          h.dead_lettered = true;
        }
        if (t_->ack(msg.tag))
          ++errors_;
        std::lock_guard guard{mtx_};
        log_.push_back(h);
        ++handled_;
      }
      if (out.empty())
        std::this_thread::sleep_for(2ms);
    }
  }

  int id_;
  evmesh::transport_ptr t_;
  std::mutex& mtx_;
  std::vector<handling>& log_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<size_t> handled_{0};
  std::atomic<size_t> errors_{0};
};

// -- start-up errors ------------------------------------------------------------

TEST(kafka_start, unreachable_bootstrap_servers_fail_fast_and_clearly) {
  evmesh::register_kafka_transport();
  auto start = std::chrono::steady_clock::now();
  auto t = evmesh::make_transport(
    "kafka://127.0.0.1:1?group=g&connect_timeout=1s", env("n"));
  auto took = std::chrono::steady_clock::now() - start;
  ASSERT_FALSE(t) << "a transport to a closed port was created";
  EXPECT_EQ(code_of(t.error()), evmesh::errc::unavailable);
  auto msg = text_of(t.error());
  EXPECT_NE(msg.find("127.0.0.1:1"), std::string::npos) << msg;
  EXPECT_NE(msg.find("is a broker running"), std::string::npos) << msg;
  EXPECT_LT(took, 5s) << "the metadata request was not bounded";
  // SASL credentials go into the user info (masked by the runtime's log)
  // and never into error messages.
  auto secret = evmesh::make_transport(
    "kafka://svc:s3cr3t%40x@127.0.0.1:1?group=g&connect_timeout=500ms"
    "&security.protocol=sasl_plaintext",
    env("n"));
  ASSERT_FALSE(secret);
  EXPECT_EQ(code_of(secret.error()), evmesh::errc::unavailable);
  EXPECT_EQ(text_of(secret.error()).find("s3cr3t"), std::string::npos)
    << text_of(secret.error());
}

TEST(kafka_start, bad_urls_name_the_problem) {
  evmesh::register_kafka_transport();
  struct row {
    std::string url;
    std::string mentions;
  };
  std::vector<row> rows{
    {"kafka://?group=g", "no bootstrap server"},
    {"kafka://h:1?group=g&no.such.property=1", "no.such.property"},
    {"kafka://h:1?group=g&enable.auto.commit=true", "managed by the transport"},
    {"kafka://h:1?group=g&session.timeout.ms=abc", "session.timeout.ms"},
    {"kafka://h:1?group=g&discover=soon", "not a duration"},
    {"kafka://h:1?group=g&topics=a.>.b", "topic pattern"},
    {"kafka://h:1?group=g&colour=blue", "unknown parameter 'colour'"},
    {"kafka://user@h:1?group=g", "user:password@"},
    {"kafka://user:pw@h:1?group=g&sasl.username=x", "credentials given twice"},
  };
  for (auto& r : rows) {
    auto t = evmesh::make_transport(r.url, env("n"));
    ASSERT_FALSE(t) << r.url;
    EXPECT_EQ(code_of(t.error()), evmesh::errc::invalid_url) << r.url;
    auto msg = text_of(t.error());
    EXPECT_NE(msg.find(r.mentions), std::string::npos) << r.url << ": " << msg;
    EXPECT_EQ(msg.find("pw"), std::string::npos) << "password shown: " << msg;
  }
}

TEST(kafka_start, unknown_topics_group_problems_and_bad_ledger_are_errors) {
  evmesh::register_kafka_transport();
  kafka_mock_cluster cluster;
  ASSERT_TRUE(cluster.create_topic("known", 2));
  auto base = std::string{kafka_fast_settings};
  {
    auto t = make(cluster.url(base + "&group=g&topics=known,missing.topic"),
                  "n");
    ASSERT_TRUE(t);
    auto err = t->subscribe({});
    ASSERT_TRUE(err) << "subscribed to a topic that does not exist";
    EXPECT_EQ(code_of(err), evmesh::errc::invalid_config);
    EXPECT_NE(text_of(err).find("'missing.topic' does not exist"),
              std::string::npos)
      << text_of(err);
    EXPECT_FALSE(t->close());
  }
  {
    auto t = make(cluster.url(base + "&topics=known"), "n");
    ASSERT_TRUE(t);
    auto err = t->subscribe({});
    ASSERT_TRUE(err) << "consumed without a group";
    EXPECT_EQ(code_of(err), evmesh::errc::invalid_config);
    EXPECT_NE(text_of(err).find("group="), std::string::npos) << text_of(err);
    // Publishing needs no group.
    EXPECT_FALSE(t->publish(event("known", 1, 1)));
    EXPECT_FALSE(t->close());
  }
  {
    // A group configuration librdkafka refuses: an error at subscribe.
    auto t = evmesh::make_transport(
      cluster.url(
        base + "&group=g&topics=known&partition.assignment.strategy=bogus"),
      env("n"));
    caf::error err;
    if (t)
      err = (*t)->subscribe({});
    else
      err = t.error();
    ASSERT_TRUE(err) << "an unknown assignment strategy was accepted";
    EXPECT_NE(text_of(err).find("bogus"), std::string::npos) << text_of(err);
    if (t) {
      EXPECT_FALSE((*t)->close());
    }
  }
  {
    auto t = evmesh::make_transport(
      cluster.url(base + "&group=g&ledger=/nonexistent-dir/ledger.db"),
      env("n"));
    ASSERT_FALSE(t) << "a ledger in a missing directory was accepted";
    EXPECT_EQ(code_of(t.error()), evmesh::errc::invalid_config);
    EXPECT_NE(text_of(t.error()).find("ledger"), std::string::npos);
  }
}

// -- groups -----------------------------------------------------------------------

// Issue 4, test 2: one member leaves and one joins while the stream flows;
// every message ends handled or dead-lettered, each key in offset order.
// `strategy`: the group's partition.assignment.strategy.
void rebalance_mid_stream(const std::string& strategy) {
  evmesh::register_kafka_transport();
  kafka_mock_cluster cluster;
  ASSERT_TRUE(cluster.create_topic("orders", 4));
  constexpr size_t count = 600;
  constexpr size_t keys = 24;
  auto url = cluster.url(std::string{kafka_fast_settings}
                         + "&group=g&topics=orders&commit_interval=50ms"
                           "&partition.assignment.strategy="
                         + strategy);
  auto producer = make(cluster.url(kafka_fast_settings), "producer");
  ASSERT_TRUE(producer);
  std::mutex mtx;
  std::vector<handling> log;
  auto settled = [&] {
    std::lock_guard guard{mtx};
    std::set<int64_t> ids;
    for (auto& h : log)
      ids.insert(h.n);
    return ids.size();
  };
  auto a_t = make(url, "a");
  ASSERT_TRUE(a_t);
  ASSERT_FALSE(a_t->subscribe({}));
  auto a = std::make_unique<member>(1, a_t, mtx, log);
  // The stream: 600 events over ~12 s, so both rebalances happen mid-stream.
  std::thread pub{[&] {
    for (size_t n = 0; n < count; ++n) {
      if (auto err = producer->publish(event("orders", n, keys))) {
        ADD_FAILURE() << text_of(err);
        return;
      }
      std::this_thread::sleep_for(20ms);
    }
  }};
  ASSERT_TRUE(wait_for([&] { return a->handled() >= 100; }, 30s))
    << "the first member handled " << a->handled();
  auto b_t = make(url, "b");
  ASSERT_TRUE(b_t);
  ASSERT_FALSE(b_t->subscribe({}));
  member b{2, b_t, mtx, log};
  auto joined = wait_for([&] { return b.handled() >= 20; }, 30s);
  std::cout << "[ info ] second member joined: " << joined << ", handled "
            << b.handled() << " by then\n";
  EXPECT_TRUE(joined) << "the second member never got a partition";
  // The first member leaves the group (clean close, mid-stream).
  auto a_before_leave = a->handled();
  a->stop();
  EXPECT_FALSE(a_t->close());
  pub.join();
  EXPECT_TRUE(wait_for([&] { return settled() >= count; }, 60s))
    << "settled " << settled() << " of " << count;
  b.stop();
  EXPECT_EQ(a->errors(), 0u);
  EXPECT_EQ(b.errors(), 0u);
  EXPECT_FALSE(b_t->close());
  std::lock_guard guard{mtx};
  std::map<int64_t, size_t> times;
  std::map<std::string, std::vector<int64_t>> first_by_key;
  std::set<int64_t> dead;
  for (auto& h : log) {
    if (times[h.n]++ == 0)
      first_by_key[h.key].push_back(h.n);
    if (h.dead_lettered)
      dead.insert(h.n);
  }
  size_t duplicates = 0;
  for (size_t n = 0; n < count; ++n) {
    auto i = times.find(static_cast<int64_t>(n));
    EXPECT_NE(i, times.end()) << "event " << n << " was lost";
    if (i != times.end())
      duplicates += i->second - 1;
  }
  std::cout << "[ info ] member a handled " << a_before_leave << ", b "
            << b.handled() << "; redelivered after rebalances: " << duplicates
            << "\n";
  for (auto& [key, ns] : first_by_key)
    EXPECT_TRUE(std::is_sorted(ns.begin(), ns.end()))
      << "key " << key << " was handled out of order";
  // Every dead-lettered event is in orders.dlq.
  auto records = evmesh::kafka_dead_letters(
    cluster.url(std::string{kafka_fast_settings} + "&topics=orders"));
  ASSERT_TRUE(records) << text_of(records.error());
  std::set<std::string> in_dlq;
  for (auto& r : *records)
    in_dlq.insert(r.original);
  for (auto n : dead)
    EXPECT_EQ(in_dlq.count(evmesh::encode_envelope(
                event("orders", static_cast<size_t>(n), keys))),
              1u)
      << "dead letter of " << n << " missing in orders.dlq";
  EXPECT_EQ(dead.size(), count / 40);
}

TEST(kafka_group, rebalance_mid_stream_loses_nothing_and_keeps_key_order) {
  rebalance_mid_stream("range");
}

// Incremental rebalancing: the member that stays keeps its partitions.
TEST(kafka_group, cooperative_rebalance_mid_stream_loses_nothing) {
  rebalance_mid_stream("cooperative-sticky");
}

// Issue 4, test 3: a broker goes down and comes back mid-stream.
TEST(kafka_group, broker_down_and_up_mid_stream_loses_nothing) {
  evmesh::register_kafka_transport();
  kafka_mock_cluster cluster;
  ASSERT_TRUE(cluster.create_topic("orders", 4));
  // Spread the leaders so that every broker leads a partition.
  for (int32_t p = 0; p < 4; ++p)
    ASSERT_TRUE(cluster.set_leader("orders", p, 1 + p % 3));
  constexpr size_t first = 400;
  constexpr size_t second = 100;
  auto producer = make(cluster.url(kafka_fast_settings), "producer");
  ASSERT_TRUE(producer);
  publish_all(*producer, "orders", 0, first, 16);
  // A small prefetch, so the fault hits partitions with records to fetch.
  auto url = cluster.url(std::string{kafka_fast_settings}
                         + "&group=g&topics=orders&queued.min.messages=20"
                           "&max_buffered=50");
  auto t = make(url, "c");
  ASSERT_TRUE(t);
  ASSERT_FALSE(t->subscribe({}));
  std::set<int64_t> seen;
  size_t deliveries = 0;
  auto pump = [&](caf::timespan d, size_t until) {
    auto end = std::chrono::steady_clock::now() + d;
    while (seen.size() < until && std::chrono::steady_clock::now() < end) {
      std::vector<evmesh::raw_message> out;
      EXPECT_FALSE(t->poll(8, out));
      for (auto& msg : out) {
        seen.insert(number_of(msg));
        ++deliveries;
        EXPECT_FALSE(t->ack(msg.tag));
      }
      // Slow consumption: the outage hits mid-stream.
      std::this_thread::sleep_for(out.empty() ? 5ms : 20ms);
    }
  };
  pump(30s, 100);
  ASSERT_GE(seen.size(), 100u) << "no progress before the fault";
  ASSERT_TRUE(cluster.set_down(2));
  auto before = seen.size();
  pump(3s, first);
  auto during = seen.size() - before;
  ASSERT_TRUE(cluster.set_up(2));
  std::cout << "[ info ] handled during the 3 s outage of broker 2: " << during
            << "\n";
  publish_all(*producer, "orders", first, first + second, 16);
  pump(60s, first + second);
  EXPECT_EQ(seen.size(), first + second) << "messages lost across the outage";
  std::cout << "[ info ] deliveries " << deliveries << " for " << first + second
            << " messages\n";
  EXPECT_TRUE(t->connected());
  EXPECT_FALSE(t->close());
}

// -- a consumer killed without a final commit -----------------------------------

// The worker (child) side: consumes `url` and writes one line per handled
// message to `journal` with one write(2): "N PARTITION OFFSET COUNT ack|hold".
// It holds (never settles, and never finishes the announced handler run of)
// every message with n % 10 == 3, so each partition's watermark stops at its
// first held message. One message per
// poll, settled before the next: like the runtime, which runs a key's next
// message only after the previous one settled.
int run_worker(const std::string& url, const std::string& journal) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  evmesh::register_kafka_transport();
  auto t = evmesh::make_transport(url, env("worker"));
  if (!t) {
    std::cerr << text_of(t.error()) << "\n";
    return 2;
  }
  if (auto err = (*t)->subscribe({})) {
    std::cerr << text_of(err) << "\n";
    return 2;
  }
  auto fd = ::open(journal.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd < 0)
    return 3;
  for (;;) {
    std::vector<evmesh::raw_message> out;
    if (auto err = (*t)->poll(1, out)) {
      std::cerr << text_of(err) << "\n";
      return 4;
    }
    for (auto& msg : out) {
      auto n = number_of(msg);
      auto hold = n % 10 == 3;
      auto [part, off] = position_of(msg.position);
      auto line = std::to_string(n) + " " + std::to_string(part) + " "
                  + std::to_string(off) + " "
                  + std::to_string(msg.delivery_count) + " "
                  + (hold ? "hold" : "ack") + "\n";
      // Like the runtime: announce the handler run; a held message's run is
      // still under way when the process is killed.
      auto run = (*t)->attempt_started(msg.tag);
      if (!hold) {
        (*t)->attempt_finished(run);
        static_cast<void>((*t)->ack(msg.tag));
      }
      if (::write(fd, line.data(), line.size())
          != static_cast<ssize_t>(line.size()))
        return 5;
    }
    if (out.empty())
      std::this_thread::sleep_for(5ms);
  }
}

struct journal_line {
  int64_t n;
  int32_t partition;
  int64_t offset;
  uint32_t count;
  bool hold;
};

std::vector<journal_line> read_journal(const std::filesystem::path& p) {
  std::vector<journal_line> result;
  std::ifstream in{p};
  journal_line x{};
  std::string what;
  while (in >> x.n >> x.partition >> x.offset >> x.count >> what) {
    x.hold = what == "hold";
    result.push_back(x);
  }
  return result;
}

// Issue 4, test 4 (and the attempt ledger across a crash).
TEST(kafka_group, killed_consumer_resumes_from_the_watermark_elsewhere) {
  evmesh::register_kafka_transport();
  kafka_mock_cluster cluster;
  ASSERT_TRUE(cluster.create_topic("orders", 4));
  temp_dir dir;
  constexpr size_t count = 200;
  auto producer = make(cluster.url(kafka_fast_settings), "producer");
  ASSERT_TRUE(producer);
  publish_all(*producer, "orders", 0, count, 16);
  // The worker holds messages without settling them and expects their keys'
  // later messages anyway: without retry topics, keys are not handed out
  // one record at a time.
  auto url = cluster.url(std::string{kafka_fast_settings}
                         + "&group=g&topics=orders&commit_interval=50ms"
                           "&retry_topic_after=off&ledger="
                         + (dir.path / "ledger.db").string());
  auto journal = dir.path / "journal";
  char exe[4096];
  auto len = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  ASSERT_GT(len, 0);
  exe[len] = '\0';
  auto pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto log = (dir.path / "worker.log").string();
    auto fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::execl(exe, exe, std::string{worker_flag}.c_str(), url.c_str(),
            journal.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  auto kill_worker = [pid] {
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
  };
  auto got_all = wait_for([&] { return read_journal(journal).size() >= count; },
                          60s);
  if (!got_all) {
    kill_worker();
    std::ifstream log{dir.path / "worker.log"};
    FAIL() << "the worker handled " << read_journal(journal).size() << " of "
           << count << "; its log:\n"
           << std::string{std::istreambuf_iterator<char>{log}, {}};
  }
  // Let the last watermark commit land, then crash: no close, no commit.
  std::this_thread::sleep_for(1s);
  kill_worker();
  auto worked = read_journal(journal);
  std::map<int32_t, int64_t> first_hold; // partition -> lowest held offset
  std::set<int64_t> held;
  std::set<int64_t> acked;
  for (auto& x : worked) {
    EXPECT_EQ(x.count, 1u);
    if (x.hold) {
      held.insert(x.n);
      auto [i, fresh] = first_hold.emplace(x.partition, x.offset);
      if (!fresh)
        i->second = std::min(i->second, x.offset);
    } else {
      acked.insert(x.n);
    }
  }
  ASSERT_EQ(held.size(), count / 10);
  // Another member of the group takes over (after the session timeout) and
  // receives exactly what lies at or above each partition's watermark.
  auto survivor = make(url, "survivor");
  ASSERT_TRUE(survivor);
  ASSERT_FALSE(survivor->subscribe({}));
  std::map<int32_t, int64_t> first_seen;
  std::set<int64_t> redelivered;
  auto deadline = std::chrono::steady_clock::now() + 60s;
  auto quiet_until = std::chrono::steady_clock::time_point::max();
  while (std::chrono::steady_clock::now() < std::min(deadline, quiet_until)) {
    std::vector<evmesh::raw_message> out;
    ASSERT_FALSE(survivor->poll(64, out));
    for (auto& msg : out) {
      auto n = number_of(msg);
      auto [part, off] = position_of(msg.position);
      auto [i, fresh] = first_seen.emplace(part, off);
      if (!fresh)
        i->second = std::min(i->second, off);
      redelivered.insert(n);
      if (held.count(n) != 0) {
        EXPECT_EQ(msg.delivery_count, 2u)
          << "the run of " << n << " that the crash cut short was not counted";
      } else {
        EXPECT_EQ(msg.delivery_count, 1u)
          << n << " was counted although no run of it was under way";
      }
      EXPECT_FALSE(survivor->ack(msg.tag));
    }
    if (std::includes(redelivered.begin(), redelivered.end(), held.begin(),
                      held.end())
        && quiet_until == std::chrono::steady_clock::time_point::max())
      quiet_until = std::chrono::steady_clock::now() + 2s;
    if (out.empty())
      std::this_thread::sleep_for(10ms);
  }
  for (auto n : held)
    EXPECT_EQ(redelivered.count(n), 1u) << "held message " << n << " was lost";
  for (size_t n = 0; n < count; ++n)
    EXPECT_TRUE(acked.count(static_cast<int64_t>(n)) != 0
                || redelivered.count(static_cast<int64_t>(n)) != 0)
      << "message " << n << " was lost";
  // Resumed at the watermark: nothing below a partition's first held offset
  // came back, and partitions without a held message stayed quiet.
  EXPECT_EQ(first_seen, first_hold);
  // The ledger remembered what the dead worker settled above the watermark:
  // only the held messages come back.
  EXPECT_EQ(redelivered, held);
  std::cout << "[ info ] " << held.size() << " held, " << redelivered.size()
            << " redelivered to the survivor\n";
  EXPECT_FALSE(survivor->close());
}

} // namespace

int main(int argc, char** argv) {
  if (argc == 4 && argv[1] == worker_flag)
    return run_worker(argv[2], argv[3]);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
