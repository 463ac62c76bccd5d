// Issue 7: `evmesh publish`, `evmesh dlq replay`, `evmesh dlq purge`.
#include <atomic>
#include <filesystem>
#include <set>
#include <sstream>
#include <string>

#include <caf/all.hpp>
#include <gtest/gtest.h>
#include <unistd.h>

#include "evmesh/outbox.hpp"
#include "evmesh/sqlite_store.hpp"
#include "evmesh/testing.hpp"

#include "../../test/unit/actors/probe.hpp"
#include "ops.hpp"

using namespace evmesh;
using namespace evmesh::cli;
using namespace std::chrono_literals;

namespace {

struct scratch_dir {
  std::filesystem::path path;
  scratch_dir() {
    static std::atomic<int> counter{0};
    path = std::filesystem::temp_directory_path()
           / ("evmesh_replay_test_" + std::to_string(getpid()) + "_"
              + std::to_string(counter++));
    std::filesystem::create_directories(path);
  }
  ~scratch_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string url(const char* scheme, const char* name) const {
    return std::string{scheme} + (path / name).string();
  }
};

constexpr const char* dlq_trace
  = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

dead_letter_record record(int i, std::string topic = "order.confirmed",
                          std::string category = "retries_exhausted") {
  dead_letter_record rec;
  rec.category = std::move(category);
  rec.reason = "inventory down";
  rec.attempts = 5;
  rec.first_failure_ms = 1714564800000 + i;
  rec.last_failure_ms = 1714564800000 + i;
  rec.consumer = "orders";
  rec.pattern = "order.*";
  rec.topic = topic;
  rec.key = "o-" + std::to_string(i % 5);
  rec.idempotency_key = "evt-" + std::to_string(i);
  rec.traceparent = dlq_trace;
  envelope env;
  env.id = "evt-" + std::to_string(i);
  env.idempotency_key = env.id;
  env.topic = topic;
  env.key = rec.key;
  env.attempt = 5;
  env.payload = boost::json::object{{"n", i}};
  rec.original = encode_envelope(env);
  rec.original_decoded = true;
  return rec;
}

std::shared_ptr<sqlite_dead_letter_store> make_dlq(const std::string& url,
                                                   int n) {
  auto st = sqlite_dead_letter_store::open(url.substr(9));
  EXPECT_TRUE(st);
  for (int i = 0; i < n; ++i)
    EXPECT_TRUE((*st)->write(record(i)));
  return *st;
}

} // namespace

TEST(dlq_replay, envelope_resets_attempt_and_continues_the_dead_letter_trace) {
  auto rec = record(7);
  rec.id = 42;
  auto env = replay_envelope(rec, "");
  ASSERT_TRUE(env);
  EXPECT_EQ(env->attempt, 0u);
  EXPECT_EQ(env->topic, "order.confirmed");
  EXPECT_EQ(env->idempotency_key, "replay:42:evt-7");
  EXPECT_EQ(env->headers.at("evmesh-replay-of"), "42");
  auto tp = parse_traceparent(env->traceparent);
  ASSERT_TRUE(tp);
  auto parent = parse_traceparent(dlq_trace);
  EXPECT_EQ(tp->trace, parent->trace);
  EXPECT_NE(tp->parent, parent->parent);
  rec.replayed_ms = 1000;
  auto again = replay_envelope(rec, "order.retry");
  ASSERT_TRUE(again);
  EXPECT_EQ(again->topic, "order.retry");
  EXPECT_EQ(again->idempotency_key, "replay:42@1000:evt-7");
  rec.original_decoded = false;
  EXPECT_FALSE(replay_envelope(rec, ""));
}

TEST(dlq_replay,
     thousand_records_into_an_outbox_are_handled_once_even_replayed_twice) {
  scratch_dir dir;
  auto dlq_url = dir.url("sqlite://", "dlq.db");
  auto outbox_url = dir.url("outbox:sqlite://", "app.db");
  auto dlq = make_dlq(dlq_url, 1000);
  // A replay that crashed after sending record 1 but before marking it.
  {
    auto st = outbox::store::open_url(outbox_url.substr(7));
    ASSERT_TRUE(st);
    auto rec = dlq->get(1);
    ASSERT_TRUE(rec);
    ASSERT_TRUE((*st)->enqueue(*replay_envelope(*rec, "")));
  }
  dlq_replay_options opts;
  opts.db = dlq_url;
  opts.target = outbox_url;
  opts.yes = true;
  std::istringstream in;
  std::ostringstream out;
  std::ostringstream err;
  ASSERT_EQ(dlq_replay(opts, terminal{}, in, out, err), 0) << err.str();
  EXPECT_NE(err.str().find("replayed 1000, skipped 0"), std::string::npos)
    << err.str();
  // Run again: everything is skipped, nothing is enqueued.
  std::ostringstream out2;
  std::ostringstream err2;
  ASSERT_EQ(dlq_replay(opts, terminal{}, in, out2, err2), 0);
  EXPECT_NE(err2.str().find("nothing to replay"), std::string::npos)
    << err2.str();
  auto st = outbox::store::open_url(outbox_url.substr(7));
  ASSERT_TRUE(st);
  auto c = (*st)->count();
  ASSERT_TRUE(c);
  EXPECT_EQ(c->pending, 1001u); // 1000 + the crashed run's row
  // The service's relay publishes, its consumer handles each record once.
  auto p = std::make_shared<evmesh::test::probe>();
  evmesh::testing::test_mesh mesh{"dlq_replay_thousand"};
  auto h = evmesh::test::make_handler("orders", "order.*");
  ASSERT_FALSE(mesh.start({&h}, evmesh::test::with_probe(p)));
  auto stats = std::make_shared<outbox::relay_stats>();
  outbox::relay_options ropts;
  ropts.detached = false;
  auto relay = outbox::spawn_relay(
    mesh.system(), *st, evmesh::testing::mesh_publisher(mesh), ropts, stats);
  ASSERT_TRUE(mesh.run_until([&] { return stats->published == 1001; }));
  ASSERT_TRUE(mesh.run_until_settled());
  EXPECT_EQ(p->total(), 1000u);
  for (int i = 0; i < 1000; i += 97)
    EXPECT_EQ(p->runs("evt-" + std::to_string(i)), 1u) << i;
  EXPECT_EQ(p->runs("evt-1"), 1u);
  for (auto& call : p->calls)
    ASSERT_EQ(call.attempt, 1u);
  caf::anon_send(relay, outbox::relay_stop_atom::value);
  mesh.run();
}

TEST(dlq_replay, again_replays_with_a_new_key_and_filters_select) {
  scratch_dir dir;
  auto dlq_url = dir.url("sqlite://", "dlq.db");
  auto outbox_url = dir.url("outbox:sqlite://", "app.db");
  auto dlq = make_dlq(dlq_url, 10);
  dlq_replay_options opts;
  opts.db = dlq_url;
  opts.target = outbox_url;
  opts.yes = true;
  opts.json = true;
  opts.query.key = "o-1"; // records 1 and 6
  std::istringstream in;
  std::ostringstream out;
  std::ostringstream err;
  ASSERT_EQ(dlq_replay(opts, terminal{}, in, out, err), 0) << err.str();
  opts.again = true;
  ASSERT_EQ(dlq_replay(opts, terminal{}, in, out, err), 0) << err.str();
  auto st = outbox::store::open_url(outbox_url.substr(7));
  ASSERT_TRUE(st);
  auto rows = (*st)->rows();
  ASSERT_TRUE(rows);
  ASSERT_EQ(rows->size(), 4u);
  std::set<std::string> keys;
  for (auto& r : *rows)
    keys.insert(decode_envelope(r.envelope_json)->idempotency_key);
  EXPECT_EQ(keys.size(), 4u);
  // Not replayed: the other keys' records.
  auto rec = dlq->get(3);
  ASSERT_TRUE(rec);
  EXPECT_EQ(rec->replayed_ms, 0);
}

TEST(dlq_purge, deletes_only_what_the_filters_select_after_confirmation) {
  scratch_dir dir;
  auto dlq_url = dir.url("sqlite://", "dlq.db");
  auto dlq = sqlite_dead_letter_store::open(dlq_url.substr(9));
  ASSERT_TRUE(dlq);
  for (int i = 0; i < 6; ++i)
    ASSERT_TRUE((*dlq)->write(record(i, i % 2 == 0 ? "order.a" : "order.b")));
  ASSERT_TRUE((*dlq)->write(record(6, "order.a", "no_handler")));
  dlq_purge_options opts;
  opts.db = dlq_url;
  opts.query.topic = "order.a";
  opts.query.category = "retries_exhausted";
  std::ostringstream out;
  std::ostringstream err;
  // Not a terminal and no --yes: refused.
  {
    std::istringstream in{"yes\n"};
    EXPECT_EQ(dlq_purge(opts, terminal{}, in, out, err), exit_usage);
    EXPECT_NE(err.str().find("--yes"), std::string::npos);
  }
  // A terminal, answered no: nothing changes.
  {
    std::istringstream in{"n\n"};
    EXPECT_EQ(dlq_purge(opts, terminal{true, false}, in, out, err),
              exit_failure);
  }
  auto all = (*dlq)->list(every_match());
  ASSERT_TRUE(all);
  EXPECT_EQ(all->size(), 7u);
  // Answered yes: only topic order.a with category retries_exhausted.
  {
    std::istringstream in{"y\n"};
    EXPECT_EQ(dlq_purge(opts, terminal{true, false}, in, out, err), 0)
      << err.str();
  }
  all = (*dlq)->list(every_match());
  ASSERT_TRUE(all);
  ASSERT_EQ(all->size(), 4u);
  for (auto& rec : *all)
    EXPECT_TRUE(rec.topic == "order.b" || rec.category == "no_handler");
  // --yes needs no terminal.
  opts.yes = true;
  opts.query = every_match();
  opts.query.topic = "order.b";
  std::istringstream none;
  EXPECT_EQ(dlq_purge(opts, terminal{}, none, out, err), 0);
  all = (*dlq)->list(every_match());
  ASSERT_TRUE(all);
  EXPECT_EQ(all->size(), 1u);
}

TEST(cli_publish, bad_json_and_missing_target_are_usage_errors) {
  scratch_dir dir;
  publish_options opts;
  opts.url = dir.url("outbox:sqlite://", "app.db");
  opts.topic = "order.created";
  opts.data = R"({"order_id": "o-1",})";
  std::ostringstream out;
  std::ostringstream err;
  EXPECT_EQ(publish(opts, out, err), exit_usage);
  EXPECT_NE(err.str().find("not valid JSON"), std::string::npos) << err.str();
  opts.data = R"({"order_id": "o-1"})";
  opts.key = "o-1";
  ASSERT_EQ(publish(opts, out, err), 0) << err.str();
  EXPECT_NE(out.str().find("outbox seq 1"), std::string::npos) << out.str();
  auto st = outbox::store::open_url(opts.url.substr(7));
  ASSERT_TRUE(st);
  auto rows = (*st)->rows();
  ASSERT_TRUE(rows);
  ASSERT_EQ(rows->size(), 1u);
  EXPECT_EQ((*rows)[0].key, "o-1");
  opts.url = "bogus://x";
  EXPECT_EQ(publish(opts, out, err), exit_failure);
  dlq_replay_options ropts;
  std::istringstream in;
  EXPECT_EQ(dlq_replay(ropts, terminal{}, in, out, err), exit_usage);
}
