// Issue 7: the transactional outbox and its relay.
#include "evmesh/outbox.hpp"

#include <atomic>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <caf/all.hpp>
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include "evmesh/testing.hpp"

#include "../actors/probe.hpp"

using namespace evmesh;
using namespace evmesh::test;
using namespace std::chrono_literals;

namespace {

struct temp_dir {
  std::filesystem::path path;
  temp_dir() {
    static std::atomic<int> counter{0};
    path = std::filesystem::temp_directory_path()
           / ("evmesh_outbox_test_" + std::to_string(getpid()) + "_"
              + std::to_string(counter++));
    std::filesystem::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string file(const char* name) const {
    return (path / name).string();
  }
};

/// A transport that only publishes, through `fn`.
using test_publisher = evmesh::testing::publish_transport;

outbox::relay_options test_relay_options() {
  outbox::relay_options opts;
  opts.detached = false;
  opts.poll_interval = 50ms;
  opts.backoff_initial = 10ms;
  opts.backoff_max = 100ms;
  opts.max_attempts = 3;
  return opts;
}

envelope make_event(std::string topic, std::string key, int n) {
  envelope e;
  e.topic = std::move(topic);
  e.key = std::move(key);
  e.payload = boost::json::object{{"n", n}};
  return e;
}

void exec(sqlite3* db, const char* sql) {
  char* msg = nullptr;
  ASSERT_EQ(sqlite3_exec(db, sql, nullptr, nullptr, &msg), SQLITE_OK)
    << (msg != nullptr ? msg : "");
}

void stop_relay(evmesh::testing::test_mesh& mesh, const caf::actor& relay) {
  caf::anon_send(relay, outbox::relay_stop_atom::value);
  mesh.run();
}

} // namespace

TEST(outbox_backoff, doubles_and_is_capped) {
  EXPECT_EQ(outbox::relay_backoff(0, 10ms, 100ms), caf::timespan{0});
  EXPECT_EQ(outbox::relay_backoff(1, 10ms, 100ms), caf::timespan{10ms});
  EXPECT_EQ(outbox::relay_backoff(2, 10ms, 100ms), caf::timespan{20ms});
  EXPECT_EQ(outbox::relay_backoff(4, 10ms, 100ms), caf::timespan{80ms});
  EXPECT_EQ(outbox::relay_backoff(5, 10ms, 100ms), caf::timespan{100ms});
  EXPECT_EQ(outbox::relay_backoff(500, 10ms, 100ms), caf::timespan{100ms});
}

TEST(outbox_enqueue, stamps_id_key_trace_and_time) {
  temp_dir dir;
  auto st = outbox::store::open(dir.file("app.db"));
  ASSERT_TRUE(st) << render(st.error());
  envelope stamped;
  auto seq = (*st)->enqueue(make_event("order.created", "o-1", 1), nullptr,
                            &stamped);
  ASSERT_TRUE(seq) << render(seq.error());
  EXPECT_EQ(*seq, 1);
  EXPECT_EQ(stamped.id.size(), 36u);
  EXPECT_EQ(stamped.idempotency_key, stamped.id);
  EXPECT_TRUE(parse_traceparent(stamped.traceparent));
  EXPECT_FALSE(stamped.produced_at.empty());
  auto rows = (*st)->rows();
  ASSERT_TRUE(rows);
  ASSERT_EQ(rows->size(), 1u);
  EXPECT_EQ((*rows)[0].state, "pending");
  EXPECT_EQ((*rows)[0].key, "o-1");
  EXPECT_EQ((*rows)[0].topic, "order.created");
  auto env = decode_envelope((*rows)[0].envelope_json);
  ASSERT_TRUE(env);
  EXPECT_EQ(env->id, stamped.id);
  EXPECT_EQ(env->traceparent, stamped.traceparent);
  // Given fields are kept; the current span becomes the traceparent.
  auto current = new_root_trace();
  auto e = make_event("order.created", "o-2", 2);
  e.id = "evt-2";
  e.idempotency_key = "idem-2";
  ASSERT_TRUE((*st)->enqueue(e, &current, &stamped));
  EXPECT_EQ(stamped.id, "evt-2");
  EXPECT_EQ(stamped.idempotency_key, "idem-2");
  EXPECT_EQ(stamped.traceparent, current.traceparent());
  // No topic: refused.
  EXPECT_FALSE((*st)->enqueue(envelope{}));
}

TEST(outbox_enqueue, rollback_publishes_nothing_and_commit_publishes) {
  temp_dir dir;
  auto path = dir.file("app.db");
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  exec(db, "CREATE TABLE orders (id TEXT PRIMARY KEY)");
  ASSERT_FALSE(outbox::ensure_schema(db));
  // Rolled back: neither the order nor its event exist.
  exec(db, "BEGIN");
  exec(db, "INSERT INTO orders VALUES ('o-1')");
  ASSERT_TRUE(outbox::enqueue(db, make_event("order.created", "o-1", 1)));
  exec(db, "ROLLBACK");
  // Committed: both exist.
  exec(db, "BEGIN");
  exec(db, "INSERT INTO orders VALUES ('o-2')");
  envelope committed;
  ASSERT_TRUE(outbox::enqueue(db, make_event("order.created", "o-2", 2),
                              nullptr, &committed));
  exec(db, "COMMIT");
  sqlite3_close(db);
  auto st = outbox::store::open(path);
  ASSERT_TRUE(st);
  evmesh::testing::test_mesh mesh{test_name()};
  std::vector<envelope> sent;
  auto out = std::make_shared<test_publisher>([&](const envelope& env) {
    sent.push_back(env);
    return caf::error{};
  });
  auto stats = std::make_shared<outbox::relay_stats>();
  auto relay = outbox::spawn_relay(mesh.system(), *st, out,
                                   test_relay_options(), stats);
  ASSERT_TRUE(mesh.run_until([&] { return stats->batches >= 3; }));
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent[0].id, committed.id);
  EXPECT_EQ(sent[0].key, "o-2");
  auto c = (*st)->count();
  ASSERT_TRUE(c);
  EXPECT_EQ(c->published, 1u);
  EXPECT_EQ(c->pending, 0u);
  stop_relay(mesh, relay);
  EXPECT_TRUE(stats->stopped);
}

TEST(outbox_relay,
     crash_between_publish_and_mark_publishes_again_and_consumer_dedupes) {
  temp_dir dir;
  auto st = outbox::store::open(dir.file("app.db"));
  ASSERT_TRUE(st);
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    envelope stamped;
    ASSERT_TRUE(
      (*st)->enqueue(make_event("order.created", "o-" + std::to_string(i), i),
                     nullptr, &stamped));
    ids.push_back(stamped.id);
  }
  auto p = std::make_shared<probe>();
  evmesh::testing::test_mesh mesh{test_name()};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  // A crash after the publish, before the mark: the first process published
  // row 1, then died. The row is still pending.
  auto first = (*st)->rows(0, 1);
  ASSERT_TRUE(first);
  mesh.publish(*decode_envelope((*first)[0].envelope_json));
  // And a lost confirmation: the broker got row 2, the relay saw an error.
  int calls_for_row2 = 0;
  auto inner = evmesh::testing::mesh_publisher(mesh);
  auto out = std::make_shared<test_publisher>([&](const envelope& env) {
    auto err = inner->publish(env);
    if (env.id == ids[1] && calls_for_row2++ == 0)
      return make_error(errc::io_error, "confirmation lost");
    return err;
  });
  auto stats = std::make_shared<outbox::relay_stats>();
  auto relay = outbox::spawn_relay(mesh.system(), *st, out,
                                   test_relay_options(), stats);
  ASSERT_TRUE(mesh.run_until([&] { return stats->published == 3; }));
  ASSERT_TRUE(mesh.run_until_settled());
  EXPECT_EQ(mesh.broker_stats().published, 5u); // 3 rows, 2 duplicates
  EXPECT_EQ(stats->failures, 1u);
  for (auto& id : ids)
    EXPECT_EQ(p->runs(id), 1u) << id;
  EXPECT_EQ(mesh.runtime().stats().duplicates, 2u);
  stop_relay(mesh, relay);
}

TEST(outbox_relay, ten_thousand_rows_arrive_in_order_per_key) {
  temp_dir dir;
  auto st = outbox::store::open(dir.file("app.db"));
  ASSERT_TRUE(st);
  constexpr int n = 10'000;
  constexpr int keys = 7;
  {
    sqlite3* db = (*st)->handle();
    exec(db, "BEGIN");
    for (int i = 0; i < n; ++i) {
      auto e = make_event("order.updated", "k" + std::to_string(i % keys), i);
      e.id = std::to_string(i);
      ASSERT_TRUE(outbox::enqueue(db, std::move(e)));
    }
    exec(db, "COMMIT");
  }
  auto p = std::make_shared<probe>();
  evmesh::testing::test_mesh mesh{test_name()};
  auto h = make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, with_probe(p)));
  auto stats = std::make_shared<outbox::relay_stats>();
  auto relay = outbox::spawn_relay(mesh.system(), *st,
                                   evmesh::testing::mesh_publisher(mesh),
                                   test_relay_options(), stats);
  ASSERT_TRUE(mesh.run_until([&] { return stats->published == n; }));
  ASSERT_TRUE(mesh.run_until_settled());
  ASSERT_EQ(p->total(), static_cast<size_t>(n));
  std::map<std::string, int> last;
  for (auto& c : p->calls) {
    auto i = std::stoi(c.id);
    auto it = last.find(c.key);
    if (it != last.end()) {
      ASSERT_LT(it->second, i) << "key " << c.key;
    }
    last[c.key] = i;
  }
  EXPECT_EQ(last.size(), static_cast<size_t>(keys));
  auto c = (*st)->count();
  ASSERT_TRUE(c);
  EXPECT_EQ(c->published, static_cast<uint64_t>(n));
  stop_relay(mesh, relay);
}

TEST(outbox_relay, failing_key_is_parked_while_other_keys_flow) {
  temp_dir dir;
  auto st = outbox::store::open(dir.file("app.db"));
  ASSERT_TRUE(st);
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE((*st)->enqueue(make_event("order.updated", "bad", i)));
    ASSERT_TRUE((*st)->enqueue(make_event("order.updated", "good", i)));
    ASSERT_TRUE((*st)->enqueue(make_event("order.updated", "", i)));
  }
  evmesh::testing::test_mesh mesh{test_name()};
  std::vector<envelope> sent;
  auto out = std::make_shared<test_publisher>([&](const envelope& env) {
    if (env.key == "bad")
      return make_error(errc::unavailable, "broker rejected key bad");
    sent.push_back(env);
    return caf::error{};
  });
  auto stats = std::make_shared<outbox::relay_stats>();
  auto relay = outbox::spawn_relay(mesh.system(), *st, out,
                                   test_relay_options(), stats);
  ASSERT_TRUE(mesh.run_until([&] { return stats->parked == 1; }));
  mesh.advance(1s); // more polls: nothing else of key bad goes out
  EXPECT_EQ(stats->failures, 3u);
  EXPECT_EQ(stats->parked, 1u);
  EXPECT_EQ(sent.size(), 10u);
  auto rows = (*st)->rows();
  ASSERT_TRUE(rows);
  int parked = 0;
  int waiting = 0;
  for (auto& r : *rows) {
    if (r.key != "bad") {
      EXPECT_EQ(r.state, "published");
      continue;
    }
    if (r.state == "parked") {
      ++parked;
      EXPECT_EQ(r.attempts, 3u);
      EXPECT_NE(r.last_error.find("broker rejected key bad"),
                std::string::npos);
    } else {
      ++waiting;
      EXPECT_EQ(r.state, "pending");
      EXPECT_EQ(r.attempts, 0u);
    }
  }
  EXPECT_EQ(parked, 1);
  EXPECT_EQ(waiting, 4);
  // The operator fixes the broker and unparks: the key flows, in order.
  out->fn = [&](const envelope& env) {
    sent.push_back(env);
    return caf::error{};
  };
  auto unparked = (*st)->unpark();
  ASSERT_TRUE(unparked);
  EXPECT_EQ(*unparked, 1u);
  ASSERT_TRUE(mesh.run_until([&] { return sent.size() == 15u; }));
  int next = 0;
  for (auto& e : sent)
    if (e.key == "bad") {
      EXPECT_EQ(e.payload.at("n").as_int64(), next++);
    }
  stop_relay(mesh, relay);
}

TEST(outbox_relay, stop_finishes_the_batch_and_leaves_the_rest_pending) {
  temp_dir dir;
  auto st = outbox::store::open(dir.file("app.db"));
  ASSERT_TRUE(st);
  for (int i = 0; i < 25; ++i)
    ASSERT_TRUE((*st)->enqueue(make_event("order.updated", "k", i)));
  evmesh::testing::test_mesh mesh{test_name()};
  auto opts = test_relay_options();
  opts.batch = 10;
  auto stats = std::make_shared<outbox::relay_stats>();
  auto out = std::make_shared<test_publisher>(
    [](const envelope&) { return caf::error{}; });
  auto relay = outbox::spawn_relay(mesh.system(), *st, out, opts, stats);
  mesh.sched().run_once(); // the first batch
  EXPECT_EQ(stats->published, 10u);
  caf::anon_send(relay, outbox::relay_stop_atom::value);
  mesh.run();
  EXPECT_TRUE(stats->stopped);
  EXPECT_EQ(stats->published % 10, 0u);
  auto c = (*st)->count();
  ASSERT_TRUE(c);
  EXPECT_EQ(c->published, stats->published.load());
  EXPECT_EQ(c->pending, 25u - stats->published.load());
}
