// Issue 6: nodes over CAF's middleman. The test process is the ingress node
// (inproc:// broker, local lanes too); worker nodes are child processes of
// the same binary (cluster_node.hpp). Every wait has a deadline.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include "evmesh/inproc.hpp"
#include "evmesh/runtime.hpp"

#include "cluster_node.hpp"

using namespace std::chrono_literals;
namespace cl = evmesh::testing::cluster;

namespace {

constexpr auto secret = "cluster-test-secret-0123456789";

using evmesh::testing::temp_dir;

template <class Pred>
bool wait_until(Pred pred, std::chrono::milliseconds limit) {
  return evmesh::testing::wait_for(pred, limit, 10ms);
}

std::string key_name(int k) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "key-%03d", k);
  return buf;
}

/// Ids of published messages: "key-KKK-SSSSSS".
std::string message_id(int k, int s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "key-%03d-%06d", k, s);
  return buf;
}

size_t alive_peers(const evmesh::cluster_status& st) {
  return static_cast<size_t>(
    std::count_if(st.peers.begin(), st.peers.end(),
                  [](auto& p) { return p.state == "alive"; }));
}

class cluster_test : public ::testing::Test {
protected:
  void SetUp() override {
    static std::atomic<int> counter{0};
    broker_ = "cluster-" + std::to_string(::getpid()) + "-"
              + std::to_string(counter++);
    cl::node_label() = "ingress";
    cl::journal_fd() = ::open(dir_.file("ingress.journal").c_str(),
                              O_WRONLY | O_CREAT | O_APPEND, 0644);
    ASSERT_GE(cl::journal_fd(), 0);
  }

  void TearDown() override {
    if (ingress_)
      ingress_->stop(5s);
    ingress_.reset();
    ::close(cl::journal_fd());
  }

  void start_ingress(const cl::tls_files& tls = {}) {
    auto cfg = cl::node_config("ingress", broker_, secret, tls);
    cfg.cluster_listen = "127.0.0.1:0";
    ingress_ = std::make_unique<evmesh::consumer_runtime>(cfg);
    ingress_->set_handlers({&cl::work_handler()});
    auto err = ingress_->start();
    ASSERT_FALSE(err) << evmesh::render(err);
    auto st = ingress_->cluster();
    ASSERT_TRUE(st.enabled);
    ASSERT_NE(st.port, 0);
    seed_ = "127.0.0.1:" + std::to_string(st.port);
  }

  std::unique_ptr<cl::worker_process>
  start_worker(const std::string& name, const std::string& journal,
               const std::string& with_secret = secret,
               const cl::tls_files& tls = {}) {
    journals_.push_back(journal);
    return std::make_unique<cl::worker_process>(name, seed_, with_secret,
                                                journal, tls);
  }

  /// Waits until `n` peers are alive on the ingress.
  bool wait_for_peers(size_t n, std::chrono::milliseconds limit = 20s) {
    return wait_until([&] { return alive_peers(ingress_->cluster()) >= n; },
                      limit);
  }

  /// Publishes sequence numbers [from, to) of `keys` keys, interleaved.
  void publish(int keys, int from, int to) {
    auto broker = evmesh::inproc_broker::get(broker_);
    for (int s = from; s < to; ++s)
      for (int k = 0; k < keys; ++k) {
        evmesh::envelope env;
        env.id = message_id(k, s);
        env.topic = "work.item";
        env.key = key_name(k);
        env.payload = boost::json::object{{"n", s}};
        broker->publish(env);
        ++published_;
        if (cl::is_poison(static_cast<uint64_t>(s)))
          ++poison_;
      }
  }

  /// Waits until every published message reached its terminal action.
  bool wait_settled(std::chrono::milliseconds limit) {
    return wait_until(
      [&] {
        auto st = ingress_->stats();
        return st.acked >= published_ && st.in_flight == 0;
      },
      limit);
  }

  struct verdict {
    std::map<std::string, size_t> per_node;
    size_t duplicates = 0;
    /// Executions that started after a later message of their key.
    size_t late_runs = 0;
  };

  /// How `verify` checks per-key execution order.
  enum class order_check {
    /// In time order, a key's sequence numbers never go back.
    strict,
    /// The *first* execution of each message is in sequence order per key;
    /// later executions (re-runs of attempts that were under way when the
    /// supervisor crashed) are counted in `verdict::late_runs`.
    first_runs,
    /// Not checked (a partition: a cut-off node may run old attempts late).
    none,
  };

  /// Checks that every non-poison message was handled at least once and that
  /// per key, execution order holds as `check` says.
  verdict verify(int keys, int to, order_check check = order_check::strict) {
    verdict v;
    std::vector<cl::handled_entry> all;
    std::vector<std::string> files = journals_;
    files.push_back(dir_.file("ingress.journal"));
    for (auto& f : files)
      for (auto& e : cl::read_journal(f))
        all.push_back(std::move(e));
    std::stable_sort(all.begin(), all.end(),
                     [](auto& a, auto& b) { return a.t_ns < b.t_ns; });
    std::map<std::string, uint64_t> last;
    std::map<std::string, uint64_t> last_first;
    std::set<std::pair<std::string, uint64_t>> seen;
    size_t order_violations = 0;
    auto violation = [&](const cl::handled_entry& e, uint64_t after) {
      if (order_violations++ < 5)
        ADD_FAILURE() << "key " << e.key << ": seq " << e.seq << " on "
                      << e.node << " ran after seq " << after;
    };
    for (auto& e : all) {
      ++v.per_node[e.node];
      bool first = seen.emplace(e.key, e.seq).second;
      if (!first)
        ++v.duplicates;
      auto [i, added] = last.emplace(e.key, e.seq);
      if (!added) {
        if (e.seq < i->second) {
          if (check == order_check::strict)
            violation(e, i->second);
          else
            ++v.late_runs;
        }
        i->second = std::max(i->second, e.seq);
      }
      if (check == order_check::first_runs && first) {
        auto [j, fresh] = last_first.emplace(e.key, e.seq);
        if (!fresh) {
          if (e.seq < j->second)
            violation(e, j->second);
          j->second = std::max(j->second, e.seq);
        }
      }
    }
    EXPECT_EQ(order_violations, 0u);
    size_t missing = 0;
    for (int k = 0; k < keys; ++k)
      for (int s = 0; s < to; ++s) {
        if (cl::is_poison(static_cast<uint64_t>(s)))
          continue;
        if (!seen.count({key_name(k), static_cast<uint64_t>(s)})
            && missing++ < 5)
          ADD_FAILURE() << "never handled: " << message_id(k, s);
      }
    EXPECT_EQ(missing, 0u);
    auto st = ingress_->stats();
    EXPECT_EQ(st.dead_lettered, poison_);
    EXPECT_EQ(st.acked, published_);
    // One terminal action each: handled, dead-lettered, or (after a
    // supervisor restart only) absorbed by dedupe because an attempt under
    // way at the crash had already committed it.
    EXPECT_EQ(st.handled + st.dead_lettered + st.duplicates, published_);
    if (check != order_check::first_runs) {
      EXPECT_EQ(st.duplicates, 0u);
    }
    EXPECT_EQ(evmesh::inproc_broker::get(broker_)->dead_letters().size(),
              poison_);
    return v;
  }

  std::string report(const verdict& v) {
    std::ostringstream out;
    for (auto& [node, n] : v.per_node)
      out << node << "=" << n << " ";
    out << "duplicates=" << v.duplicates << " late_runs=" << v.late_runs;
    return out.str();
  }

  temp_dir dir_{"evmesh-cluster"};
  std::string broker_;
  std::string seed_;
  std::unique_ptr<evmesh::consumer_runtime> ingress_;
  std::vector<std::string> journals_;
  uint64_t published_ = 0;
  uint64_t poison_ = 0;
};

// Test 1: 3 nodes, 20 000 messages over 200 keys.
TEST_F(cluster_test, three_nodes_handle_every_message_in_key_order) {
  start_ingress();
  auto w1 = start_worker("w1", dir_.file("w1.journal"));
  auto w2 = start_worker("w2", dir_.file("w2.journal"));
  ASSERT_TRUE(wait_for_peers(2)) << w1->log_tail() << w2->log_tail();
  auto t0 = std::chrono::steady_clock::now();
  publish(200, 0, 100);
  ASSERT_TRUE(wait_settled(240s))
    << "acked " << ingress_->stats().acked << " of " << published_;
  auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(
    std::chrono::steady_clock::now() - t0);
  auto v = verify(200, 100);
  EXPECT_GT(v.per_node["w1"], 0u) << report(v);
  EXPECT_GT(v.per_node["w2"], 0u) << report(v);
  EXPECT_EQ(v.duplicates, 0u) << report(v);
  auto st = ingress_->cluster();
  EXPECT_EQ(alive_peers(st), 2u) << evmesh::to_json(st);
  for (auto& p : st.peers) {
    EXPECT_EQ(p.lanes, 4u);
    EXPECT_EQ(p.in_flight, 0u);
    EXPECT_GE(p.last_heartbeat_ms, 0);
    EXPECT_LT(p.last_heartbeat_ms, 2000); // heartbeat_timeout
  }
  // `evmesh cluster status`: an observer joins with the secret and asks.
  auto cfg = cl::node_config("status-probe", broker_, secret, {});
  auto json = evmesh::query_cluster_status(cfg, seed_);
  ASSERT_TRUE(json) << evmesh::render(json.error());
  EXPECT_NE(json->find("\"node\":\"ingress\""), std::string::npos) << *json;
  EXPECT_NE(json->find("\"name\":\"w1\",\"state\":\"alive\""),
            std::string::npos)
    << *json;
  std::cout << "[ measure  ] 3 nodes, " << published_ << " messages in "
            << elapsed.count() << " ms: " << report(v) << "\n"
            << "[ status   ] " << evmesh::to_json(st) << "\n";
  EXPECT_TRUE(w1->terminate(10s)) << w1->log_tail();
  EXPECT_TRUE(w2->terminate(10s)) << w2->log_tail();
}

// Test 2: kill -9 one worker mid-stream; a restarted node rejoins.
TEST_F(cluster_test, killed_worker_loses_nothing_and_a_restarted_one_rejoins) {
  start_ingress();
  auto w1 = start_worker("w1", dir_.file("w1.journal"));
  auto w2 = start_worker("w2", dir_.file("w2.journal"));
  ASSERT_TRUE(wait_for_peers(2)) << w1->log_tail() << w2->log_tail();
  publish(200, 0, 100);
  ASSERT_TRUE(wait_until(
    [&] {
      return cl::read_journal(dir_.file("w1.journal")).size() >= 1000
             || ingress_->stats().acked >= published_ / 2;
    },
    120s));
  auto t_kill = std::chrono::steady_clock::now();
  w1->kill9();
  ASSERT_TRUE(wait_until(
    [&] {
      for (auto& p : ingress_->cluster().peers)
        if (p.name == "w1")
          return p.state == "dead";
      return false;
    },
    5s));
  auto detect = std::chrono::duration_cast<std::chrono::milliseconds>(
    std::chrono::steady_clock::now() - t_kill);
  ASSERT_TRUE(wait_settled(240s))
    << "acked " << ingress_->stats().acked << " of " << published_;
  auto v = verify(200, 100);
  EXPECT_GT(v.per_node["w1"], 0u) << report(v);
  auto redispatched = ingress_->cluster().redispatched;
  std::cout << "[ measure  ] kill -9 of w1 detected in " << detect.count()
            << " ms; " << redispatched
            << " attempt(s) re-dispatched: " << report(v) << "\n";
  // The restarted node joins again under the same name and gets work.
  auto w1b = start_worker("w1", dir_.file("w1b.journal"));
  ASSERT_TRUE(wait_until(
    [&] {
      for (auto& p : ingress_->cluster().peers)
        if (p.name == "w1")
          return p.state == "alive";
      return false;
    },
    20s))
    << w1b->log_tail();
  publish(200, 100, 120);
  ASSERT_TRUE(wait_settled(120s));
  auto v2 = verify(200, 120);
  EXPECT_GT(cl::read_journal(dir_.file("w1b.journal")).size(), 0u)
    << report(v2);
  std::cout << "[ measure  ] after the restart: " << report(v2) << "\n";
  EXPECT_TRUE(w1b->terminate(10s));
  EXPECT_TRUE(w2->terminate(10s));
}

// A frozen worker (SIGSTOP: alive but silent) is declared dead by the
// heartbeat timeout, its attempts go elsewhere, and after SIGCONT it joins
// again with fresh lanes. Every message still ends in exactly one terminal
// action on the ingress. (The frozen node may still run attempts it had
// received before the freeze after the key moved on, so per-key execution
// order is not checked here: docs/cluster.md, "No double ownership".)
TEST_F(cluster_test, frozen_worker_is_declared_dead_and_rejoins_after_thaw) {
  start_ingress();
  auto w1 = start_worker("w1", dir_.file("w1.journal"));
  auto w2 = start_worker("w2", dir_.file("w2.journal"));
  ASSERT_TRUE(wait_for_peers(2)) << w1->log_tail() << w2->log_tail();
  publish(100, 0, 60);
  ASSERT_TRUE(wait_until(
    [&] { return cl::read_journal(dir_.file("w1.journal")).size() >= 200; },
    120s));
  auto t_stop = std::chrono::steady_clock::now();
  ::kill(w1->pid(), SIGSTOP);
  auto w1_state = [&] {
    for (auto& p : ingress_->cluster().peers)
      if (p.name == "w1")
        return p.state;
    return std::string{};
  };
  ASSERT_TRUE(wait_until([&] { return w1_state() == "dead"; }, 10s));
  auto detect = std::chrono::duration_cast<std::chrono::milliseconds>(
    std::chrono::steady_clock::now() - t_stop);
  EXPECT_GE(detect, 1500ms); // heartbeat_timeout = 2 s
  std::this_thread::sleep_for(500ms);
  ::kill(w1->pid(), SIGCONT);
  ASSERT_TRUE(wait_until([&] { return w1_state() == "alive"; }, 20s))
    << w1->log_tail();
  ASSERT_TRUE(wait_settled(240s));
  auto v = verify(100, 60, order_check::none);
  auto st = ingress_->stats();
  EXPECT_EQ(st.acked, published_); // one terminal action each, never two
  std::cout << "[ measure  ] frozen w1 declared dead after " << detect.count()
            << " ms; " << ingress_->cluster().redispatched
            << " attempt(s) re-dispatched: " << report(v) << "\n";
  EXPECT_TRUE(w1->terminate(10s)) << w1->log_tail();
  EXPECT_TRUE(w2->terminate(10s)) << w2->log_tail();
}

// Test 4: the topic supervisor on the ingress crashes mid-stream, twice
// (injected: it throws inside its message handler, as a bug would). The mesh
// supervisor restarts it, the source dispatches every delivery it had not
// settled to the new one in delivery order, and the cluster node hands the
// new one the workers' lanes again. Promised (docs/cluster.md, "Topic
// supervisor crash"): every message handled or dead-lettered, one terminal
// action each; only deliveries unsettled at a crash (at most max_in_flight)
// may run again (at-least-once), and dedupe absorbs the re-runs whose first
// attempt had committed on the same node; the first execution of each message
// keeps per-key order, while a re-run may start after its key moved on (its
// result is ignored); the runtime stays healthy and keeps using the workers.
TEST_F(cluster_test, ingress_supervisor_crash_loses_no_in_flight_record) {
  start_ingress();
  auto w1 = start_worker("w1", dir_.file("w1.journal"));
  auto w2 = start_worker("w2", dir_.file("w2.journal"));
  ASSERT_TRUE(wait_for_peers(2)) << w1->log_tail() << w2->log_tail();
  constexpr int keys = 200;
  constexpr uint64_t crashes = 2;
  const uint64_t window = cl::node_config("x", "x", "x", {}).max_in_flight;
  publish(keys, 0, 60);
  std::vector<uint64_t> in_flight_at_crash;
  for (uint64_t c = 1; c <= crashes; ++c) {
    ASSERT_TRUE(wait_until(
      [&] { return ingress_->stats().acked >= published_ * c / (crashes + 1); },
      120s))
      << "acked " << ingress_->stats().acked << " of " << published_;
    auto st = ingress_->stats();
    ASSERT_LT(st.acked, published_) << "crash " << c << " was not mid-stream";
    in_flight_at_crash.push_back(st.in_flight);
    ASSERT_TRUE(
      evmesh::testing::inject_supervisor_crash(*ingress_, "cluster/work.*"));
    ASSERT_TRUE(wait_until(
      [&] { return ingress_->stats().supervisor_restarts >= c; }, 10s))
      << "the topic supervisor was not restarted after crash " << c;
  }
  EXPECT_FALSE(evmesh::testing::inject_supervisor_crash(*ingress_, "no/such"));
  ASSERT_TRUE(wait_settled(240s))
    << "acked " << ingress_->stats().acked << " of " << published_;
  auto v = verify(keys, 60, order_check::first_runs);
  auto st = ingress_->stats();
  EXPECT_EQ(st.supervisor_restarts, crashes);
  EXPECT_EQ(ingress_->health(), evmesh::health_status::healthy);
  for (auto n : in_flight_at_crash)
    EXPECT_GT(n, 0u) << "no delivery was in flight at a crash";
  // Re-runs and dedupe-absorbed re-dispatches come only from the deliveries
  // that were unsettled at a crash.
  EXPECT_LE(v.duplicates, crashes * window) << report(v);
  EXPECT_LE(st.duplicates, crashes * window);
  EXPECT_LE(v.late_runs, v.duplicates) << report(v);
  std::cout << "[ measure  ] " << crashes << " supervisor crashes with "
            << in_flight_at_crash[0] << " and " << in_flight_at_crash[1]
            << " deliveries in flight: " << report(v) << ", " << st.duplicates
            << " re-dispatched attempt(s) absorbed by dedupe"
            << "\n";
  // Healthy afterwards: the restarted supervisor still dispatches to both
  // workers, and a new stream runs without a duplicate.
  auto w1_before = cl::read_journal(dir_.file("w1.journal")).size();
  auto w2_before = cl::read_journal(dir_.file("w2.journal")).size();
  auto runs_before = v.duplicates;
  auto absorbed_before = st.duplicates;
  publish(keys, 60, 80);
  ASSERT_TRUE(wait_settled(120s))
    << "acked " << ingress_->stats().acked << " of " << published_;
  auto v2 = verify(keys, 80, order_check::first_runs);
  EXPECT_EQ(v2.duplicates, runs_before) << report(v2);
  EXPECT_EQ(ingress_->stats().duplicates, absorbed_before);
  EXPECT_GT(cl::read_journal(dir_.file("w1.journal")).size(), w1_before);
  EXPECT_GT(cl::read_journal(dir_.file("w2.journal")).size(), w2_before);
  EXPECT_EQ(alive_peers(ingress_->cluster()), 2u)
    << evmesh::to_json(ingress_->cluster());
  EXPECT_EQ(ingress_->health(), evmesh::health_status::healthy);
  EXPECT_TRUE(w1->terminate(10s)) << w1->log_tail();
  EXPECT_TRUE(w2->terminate(10s)) << w2->log_tail();
}

// Test 3: a peer with the wrong secret is refused; nothing runs there.
TEST_F(cluster_test, peer_with_wrong_secret_is_refused) {
  start_ingress();
  auto bad = start_worker("intruder", dir_.file("bad.journal"),
                          "not-the-cluster-secret-at-all");
  ASSERT_TRUE(wait_until([&] { return ingress_->cluster().refused >= 1; }, 20s))
    << bad->log_tail();
  EXPECT_EQ(alive_peers(ingress_->cluster()), 0u);
  publish(10, 0, 20);
  ASSERT_TRUE(wait_settled(60s));
  verify(10, 20);
  EXPECT_TRUE(cl::read_journal(dir_.file("bad.journal")).empty());
  auto probe = cl::node_config("probe", broker_, "not-the-cluster-secret!!",
                               {});
  probe.cluster_connect_timeout = 500ms;
  auto json = evmesh::query_cluster_status(probe, seed_);
  ASSERT_FALSE(json) << *json;
  EXPECT_NE(evmesh::render(json.error()).find("could not join"),
            std::string::npos)
    << evmesh::render(json.error());
  EXPECT_FALSE(bad->ready());
  EXPECT_NE(bad->log_tail().find("refused"), std::string::npos)
    << bad->log_tail();
}

// -- TLS -----------------------------------------------------------------------

/// Makes a CA and a node certificate signed by it (openssl CLI).
bool make_pki(const temp_dir& dir, const std::string& ca,
              const std::vector<std::string>& nodes) {
  auto run = [](const std::string& cmd) {
    return std::system((cmd + " >/dev/null 2>&1").c_str()) == 0;
  };
  auto c = dir.file(ca);
  if (!run("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=" + ca
           + " -keyout " + c + ".key -out " + c + ".pem"))
    return false;
  for (auto& n : nodes) {
    auto f = dir.file(n);
    if (!run("openssl req -newkey rsa:2048 -nodes -subj /CN=" + n + " -keyout "
             + f + ".key -out " + f + ".csr")
        || !run("openssl x509 -req -days 1 -in " + f + ".csr -CA " + c
                + ".pem -CAkey " + c + ".key -CAcreateserial -out " + f
                + ".pem"))
      return false;
  }
  return true;
}

TEST_F(cluster_test, tls_admits_nodes_of_the_cluster_ca_only) {
  if (std::system("command -v openssl >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "openssl CLI not installed";
  ASSERT_TRUE(make_pki(dir_, "ca", {"ingress", "good"}));
  ASSERT_TRUE(make_pki(dir_, "other-ca", {"rogue"}));
  auto tls = [&](const std::string& ca, const std::string& node) {
    return cl::tls_files{dir_.file(ca + ".pem"), dir_.file(node + ".pem"),
                         dir_.file(node + ".key")};
  };
  start_ingress(tls("ca", "ingress"));
  auto good = start_worker("good", dir_.file("good.journal"), secret,
                           tls("ca", "good"));
  ASSERT_TRUE(wait_for_peers(1)) << good->log_tail();
  auto plain = start_worker("plain", dir_.file("plain.journal"));
  auto rogue = start_worker("rogue", dir_.file("rogue.journal"), secret,
                            tls("other-ca", "rogue"));
  // Give the refused ones time to fail a few connects. CAF 0.17.6's TLS
  // layer may drop the good node's link when another peer fails its TLS
  // handshake; the good node then joins again (docs/cluster.md).
  std::this_thread::sleep_for(1500ms);
  ASSERT_TRUE(wait_for_peers(1)) << good->log_tail();
  auto st = ingress_->cluster();
  ASSERT_EQ(alive_peers(st), 1u) << evmesh::to_json(st) << "\n--- good:\n"
                                 << good->log_tail() << "\n--- plain:\n"
                                 << plain->log_tail() << "\n--- rogue:\n"
                                 << rogue->log_tail();
  EXPECT_EQ(st.peers.front().name, "good");
  EXPECT_TRUE(st.tls);
  EXPECT_FALSE(plain->ready()) << plain->log_tail();
  EXPECT_FALSE(rogue->ready()) << rogue->log_tail();
  // Their retries would keep disturbing the good link (see above).
  plain->kill9();
  rogue->kill9();
  // A handshake the rogue had under way when it died may still drop the good
  // link once; publish in rounds (at most five) until the good node, joined
  // again, has run work.
  int rounds = 0;
  verdict v;
  do {
    ASSERT_TRUE(wait_for_peers(1)) << good->log_tail();
    publish(20, rounds * 20, (rounds + 1) * 20);
    ++rounds;
    ASSERT_TRUE(wait_settled(60s));
    // A dropped link is a partition, not a death: the good node may still run
    // an attempt it had received after the ingress moved that key on, so the
    // execution order is not checked (the ingress's acks are).
    v = verify(20, rounds * 20, order_check::none);
  } while (v.per_node["good"] == 0 && rounds < 5);
  EXPECT_GT(v.per_node["good"], 0u) << report(v);
  EXPECT_EQ(v.per_node.count("plain"), 0u);
  EXPECT_EQ(v.per_node.count("rogue"), 0u);
}

// A node that cannot start its cluster fails start() clearly.
TEST(cluster_config, start_fails_clearly_without_secret_or_with_bad_tls_files) {
  auto cfg = cl::node_config("n", "cluster-bad-config", "", {});
  cfg.cluster_listen = "127.0.0.1:0";
  {
    evmesh::consumer_runtime rt{cfg};
    rt.set_handlers({&cl::work_handler()});
    auto err = rt.start();
    ASSERT_TRUE(err);
    EXPECT_NE(evmesh::render(err).find("cluster.secret"), std::string::npos)
      << evmesh::render(err);
  }
  cfg.cluster_secret = secret;
  cfg.cluster_tls_ca = "/nonexistent/ca.pem";
  cfg.cluster_tls_cert = "/nonexistent/node.pem";
  cfg.cluster_tls_key = "/nonexistent/node.key";
  {
    evmesh::consumer_runtime rt{cfg};
    rt.set_handlers({&cl::work_handler()});
    auto err = rt.start();
    ASSERT_TRUE(err);
    EXPECT_NE(evmesh::render(err).find("/nonexistent/ca.pem"),
              std::string::npos)
      << evmesh::render(err);
  }
}

} // namespace

int main(int argc, char** argv) {
  if (cl::is_worker(argc, argv)) {
    auto rc = cl::run_worker(argc, argv);
    std::cerr << "worker: exit " << rc << std::endl;
    return rc;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
