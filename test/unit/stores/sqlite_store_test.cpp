#include "evmesh/sqlite_store.hpp"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <caf/atom.hpp>
#include <gtest/gtest.h>

#include "evmesh/stores.hpp"

using namespace evmesh;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

errc code_of(const caf::error& err) {
  if (err.category() != caf::atom("evmesh"))
    return errc::none;
  return static_cast<errc>(err.code());
}

/// Virtual wall clock, shared by all stores of a test.
struct virtual_wall_clock {
  std::atomic<int64_t> ms{1'700'000'000'000};

  std::chrono::system_clock::time_point now() const {
    return std::chrono::system_clock::time_point{
      std::chrono::milliseconds{ms.load()}};
  }

  void advance(std::chrono::milliseconds d) {
    ms += d.count();
  }

  sqlite_idempotency_store::wall_clock fn() {
    return [this] { return now(); };
  }
};

/// A unique directory under the system's temp directory, removed afterwards.
struct temp_dir_fixture : testing::Test {
  fs::path dir;
  virtual_wall_clock clock;

  void SetUp() override {
    std::random_device rd;
    auto name = "evmesh-store-test-" + std::to_string(rd()) + "-"
                + std::to_string(rd());
    dir = fs::temp_directory_path() / name;
    fs::create_directories(dir);
  }

  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }

  std::string file(const std::string& name) const {
    return (dir / name).string();
  }

  std::shared_ptr<sqlite_idempotency_store>
  open_keys(std::string name = "keys.db") {
    auto store = sqlite_idempotency_store::open(file(name), clock.fn());
    EXPECT_TRUE(store) << render(store.error());
    return store ? *store : nullptr;
  }

  std::shared_ptr<sqlite_dead_letter_store>
  open_dlq(std::string name = "dlq.db") {
    auto store = sqlite_dead_letter_store::open(file(name));
    EXPECT_TRUE(store) << render(store.error());
    return store ? *store : nullptr;
  }
};

dead_letter_record make_record(std::string topic, std::string consumer,
                               std::string category, std::string key,
                               int64_t last_failure_ms) {
  dead_letter_record rec;
  rec.category = std::move(category);
  rec.reason = "failed on " + topic;
  rec.consumer = std::move(consumer);
  rec.pattern = "order.*";
  rec.topic = std::move(topic);
  rec.key = std::move(key);
  rec.original = R"({"topic":")" + rec.topic + R"(","payload":{}})";
  rec.original_decoded = true;
  rec.add_error(1, last_failure_ms - 10, "first try failed");
  rec.add_error(2, last_failure_ms, "second try failed");
  return rec;
}

std::vector<int64_t> ids_of(const std::vector<dead_letter_record>& recs) {
  std::vector<int64_t> ids;
  for (auto& rec : recs)
    ids.push_back(rec.id);
  return ids;
}

} // namespace

// -- idempotency ---------------------------------------------------------------

using sqlite_idempotency_store_test = temp_dir_fixture;

TEST_F(sqlite_idempotency_store_test, committed_key_is_a_duplicate) {
  auto store = open_keys();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  EXPECT_FALSE(store->commit("k", 1h));
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::duplicate);
  EXPECT_EQ(store->try_begin("other", 30s), claim_result::fresh);
}

TEST_F(sqlite_idempotency_store_test, leased_key_is_in_flight) {
  auto store = open_keys();
  ASSERT_NE(store, nullptr);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  clock.advance(29s);
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::in_flight);
}

TEST_F(sqlite_idempotency_store_test, expired_lease_can_be_claimed_again) {
  auto store = open_keys();
  ASSERT_NE(store, nullptr);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  clock.advance(30s);
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::in_flight);
}

TEST_F(sqlite_idempotency_store_test, commit_is_forgotten_after_keep) {
  auto store = open_keys();
  ASSERT_NE(store, nullptr);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  ASSERT_FALSE(store->commit("k", 1h));
  clock.advance(1h - 1ms);
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::duplicate);
  clock.advance(1ms);
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::fresh);
}

TEST_F(sqlite_idempotency_store_test, commit_without_claim_is_an_upsert) {
  auto store = open_keys();
  ASSERT_NE(store, nullptr);
  EXPECT_FALSE(store->commit("k", 1h));
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::duplicate);
}

TEST_F(sqlite_idempotency_store_test, abort_releases_the_claim) {
  auto store = open_keys();
  ASSERT_NE(store, nullptr);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  EXPECT_FALSE(store->abort("k"));
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::fresh);
}

TEST_F(sqlite_idempotency_store_test, abort_after_commit_keeps_it_committed) {
  auto store = open_keys();
  ASSERT_NE(store, nullptr);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh);
  ASSERT_FALSE(store->commit("k", 1h));
  EXPECT_FALSE(store->abort("k"));
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::duplicate);
}

// Same owner-less lease semantics as the memory store (see its test).
TEST_F(sqlite_idempotency_store_test, late_abort_releases_a_newer_claim) {
  auto store = open_keys();
  ASSERT_NE(store, nullptr);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh); // A
  clock.advance(31s);
  ASSERT_EQ(store->try_begin("k", 30s), claim_result::fresh); // B
  EXPECT_FALSE(store->abort("k"));                            // A, late
  EXPECT_EQ(store->try_begin("k", 30s), claim_result::fresh); // C
}

TEST_F(sqlite_idempotency_store_test, keys_are_binary_safe_text) {
  auto store = open_keys();
  ASSERT_NE(store, nullptr);
  std::string key = "tenant/\xC3\xA9v\xC3\xA9nement 'quoted' \"double\"";
  ASSERT_EQ(store->try_begin(key, 30s), claim_result::fresh);
  ASSERT_FALSE(store->commit(key, 1h));
  EXPECT_EQ(store->try_begin(key, 30s), claim_result::duplicate);
  EXPECT_EQ(store->try_begin(key.substr(0, 6), 30s), claim_result::fresh);
}

TEST_F(sqlite_idempotency_store_test, batch_calls_commit_and_abort_durably) {
  {
    auto store = open_keys();
    ASSERT_NE(store, nullptr);
    ASSERT_EQ(store->try_begin("done", 30s), claim_result::fresh);
    ASSERT_FALSE(store->commit("done", 1h));
    std::vector<std::string_view> keys{"a", "b", "c", "done", "a"};
    std::vector<claim_result> out(keys.size(), claim_result::unavailable);
    store->try_begin_many(keys, 30s, out);
    EXPECT_EQ(out,
              (std::vector<claim_result>{
                claim_result::fresh, claim_result::fresh, claim_result::fresh,
                claim_result::duplicate, claim_result::in_flight}));
    std::vector<finish_op> ops{{"a", finish_op::commit},
                               {"b", finish_op::abort},
                               {"c", finish_op::commit},
                               {"c", finish_op::abort}};
    std::vector<caf::error> errors(ops.size(),
                                   make_error(errc::io_error, "unset"));
    EXPECT_FALSE(store->finish_many(ops, 1h, errors));
    for (auto& err : errors)
      EXPECT_FALSE(err) << render(err);
  }
  // Reopened: the batch's transaction was committed.
  auto store = open_keys();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->try_begin("a", 30s), claim_result::duplicate);
  EXPECT_EQ(store->try_begin("b", 30s), claim_result::fresh);
  EXPECT_EQ(store->try_begin("c", 30s), claim_result::duplicate)
    << "an abort after the commit keeps it committed";
  clock.advance(1h + 1s);
  EXPECT_EQ(store->try_begin("a", 30s), claim_result::fresh)
    << "the batch's keep TTL applies";
  std::vector<finish_op> none;
  EXPECT_FALSE(store->finish_many(none, 1h, {}));
}

TEST_F(sqlite_idempotency_store_test, survives_restart) {
  {
    auto store = open_keys();
    ASSERT_NE(store, nullptr);
    ASSERT_EQ(store->try_begin("done", 30s), claim_result::fresh);
    ASSERT_FALSE(store->commit("done", 24h));
    ASSERT_EQ(store->try_begin("running", 30s), claim_result::fresh);
    ASSERT_FALSE(store->flush());
  }
  auto store = open_keys();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->try_begin("done", 30s), claim_result::duplicate);
  // The lease of the process that "died" still holds until it expires.
  EXPECT_EQ(store->try_begin("running", 30s), claim_result::in_flight);
  clock.advance(30s);
  EXPECT_EQ(store->try_begin("running", 30s), claim_result::fresh);
}

TEST_F(sqlite_idempotency_store_test, purges_expired_rows) {
  auto store = open_keys();
  ASSERT_NE(store, nullptr);
  for (int i = 0; i < 10; ++i)
    ASSERT_EQ(store->try_begin("lease-" + std::to_string(i), 10s),
              claim_result::fresh);
  for (int i = 0; i < 5; ++i)
    ASSERT_FALSE(store->commit("kept-" + std::to_string(i), 1h));
  clock.advance(10s);
  auto purged = store->purge_expired();
  ASSERT_TRUE(purged) << render(purged.error());
  EXPECT_EQ(*purged, 10u);
  auto size = store->size();
  ASSERT_TRUE(size);
  EXPECT_EQ(*size, 5u);
}

TEST_F(sqlite_idempotency_store_test, purges_expired_rows_without_being_asked) {
  auto store = open_keys();
  ASSERT_NE(store, nullptr);
  auto n = sqlite_idempotency_store::purge_interval;
  for (size_t i = 0; i < n; ++i)
    ASSERT_EQ(store->try_begin("old-" + std::to_string(i), 1s),
              claim_result::fresh);
  clock.advance(2s);
  for (size_t i = 0; i < n; ++i)
    ASSERT_EQ(store->try_begin("new-" + std::to_string(i), 1h),
              claim_result::fresh);
  auto size = store->size();
  ASSERT_TRUE(size);
  EXPECT_LE(*size, n + 1);
}

TEST_F(sqlite_idempotency_store_test, two_instances_on_one_file_share_claims) {
  auto a = open_keys();
  auto b = open_keys();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(a->try_begin("k", 30s), claim_result::fresh);
  EXPECT_EQ(b->try_begin("k", 30s), claim_result::in_flight);
  ASSERT_FALSE(a->commit("k", 1h));
  EXPECT_EQ(b->try_begin("k", 30s), claim_result::duplicate);
}

TEST_F(sqlite_idempotency_store_test, only_one_of_racing_instances_is_fresh) {
  // Two instances (connections) on one file, four threads each.
  constexpr size_t instances = 2;
  constexpr size_t threads = 8;
  constexpr size_t rounds = 50;
  std::vector<std::shared_ptr<sqlite_idempotency_store>> stores;
  for (size_t i = 0; i < instances; ++i) {
    stores.push_back(open_keys());
    ASSERT_NE(stores.back(), nullptr);
  }
  std::vector<std::vector<claim_result>> results(
    rounds, std::vector<claim_result>(threads, claim_result::unavailable));
  std::barrier sync{static_cast<std::ptrdiff_t>(threads)};
  std::vector<std::thread> workers;
  for (size_t i = 0; i < threads; ++i)
    workers.emplace_back([&, i] {
      auto& store = *stores[i % instances];
      for (size_t round = 0; round < rounds; ++round) {
        sync.arrive_and_wait();
        results[round][i] = store.try_begin("race-" + std::to_string(round),
                                            1h);
      }
    });
  for (auto& worker : workers)
    worker.join();
  for (size_t round = 0; round < rounds; ++round) {
    auto& r = results[round];
    ASSERT_EQ(std::count(r.begin(), r.end(), claim_result::fresh), 1)
      << "round " << round;
    ASSERT_EQ(std::count(r.begin(), r.end(), claim_result::in_flight),
              static_cast<std::ptrdiff_t>(threads - 1))
      << "round " << round;
  }
}

TEST_F(sqlite_idempotency_store_test, creates_missing_parent_directories) {
  auto store = open_keys("nested/deeper/keys.db");
  ASSERT_NE(store, nullptr);
  EXPECT_TRUE(fs::exists(dir / "nested" / "deeper" / "keys.db"));
  EXPECT_EQ(store->path(), file("nested/deeper/keys.db"));
}

TEST(sqlite_idempotency_store, unwritable_path_is_a_clear_error) {
  auto store = sqlite_idempotency_store::open("/proc/forbidden/x.db");
  ASSERT_FALSE(store);
  EXPECT_EQ(code_of(store.error()), errc::unavailable);
  auto text = render(store.error());
  EXPECT_NE(text.find("/proc/forbidden/x.db"), std::string::npos) << text;
  EXPECT_NE(text.find("writable"), std::string::npos) << text;
}

TEST_F(sqlite_idempotency_store_test, directory_as_database_is_a_clear_error) {
  fs::create_directories(dir / "a_directory.db");
  auto store = sqlite_idempotency_store::open(file("a_directory.db"));
  ASSERT_FALSE(store);
  EXPECT_EQ(code_of(store.error()), errc::unavailable);
  auto text = render(store.error());
  EXPECT_NE(
    text.find("cannot open SQLite database '" + file("a_directory.db") + "'"),
    std::string::npos)
    << text;
  EXPECT_NE(text.find("check the directory exists and is writable"),
            std::string::npos)
    << text;
}

TEST_F(sqlite_idempotency_store_test, file_that_is_not_a_database_is_refused) {
  {
    std::ofstream out{file("junk.db")};
    out << std::string(4096, 'j');
  }
  auto store = sqlite_idempotency_store::open(file("junk.db"));
  ASSERT_FALSE(store);
  EXPECT_EQ(code_of(store.error()), errc::unavailable);
  EXPECT_NE(render(store.error()).find(file("junk.db")), std::string::npos)
    << render(store.error());
}

// -- dead letters --------------------------------------------------------------

using sqlite_dead_letter_store_test = temp_dir_fixture;

TEST_F(sqlite_dead_letter_store_test, write_then_get_returns_the_record) {
  auto store = open_dlq();
  ASSERT_NE(store, nullptr);
  auto rec = make_record("order.confirmed", "order_events", "retries_exhausted",
                         "order-1", 5000);
  auto id = store->write(rec);
  ASSERT_TRUE(id) << render(id.error());
  EXPECT_GT(*id, 0);
  auto back = store->get(*id);
  ASSERT_TRUE(back) << render(back.error());
  EXPECT_EQ(back->id, *id);
  EXPECT_EQ(back->category, "retries_exhausted");
  EXPECT_EQ(back->topic, "order.confirmed");
  EXPECT_EQ(back->consumer, "order_events");
  EXPECT_EQ(back->key, "order-1");
  EXPECT_EQ(back->original, rec.original);
  EXPECT_EQ(back->last_failure_ms, 5000);
  ASSERT_EQ(back->errors.size(), 2u);
  EXPECT_EQ(back->errors.back().message, "second try failed");
}

TEST_F(sqlite_dead_letter_store_test, ids_are_never_reused) {
  auto store = open_dlq();
  ASSERT_NE(store, nullptr);
  auto first = store->write(make_record("t", "c", "permanent", "", 1));
  ASSERT_TRUE(first);
  ASSERT_FALSE(store->remove(*first));
  auto second = store->write(make_record("t", "c", "permanent", "", 2));
  ASSERT_TRUE(second);
  EXPECT_GT(*second, *first);
}

TEST_F(sqlite_dead_letter_store_test, records_remain_after_reopen) {
  int64_t id = 0;
  {
    auto store = open_dlq();
    ASSERT_NE(store, nullptr);
    auto res = store->write(make_record("order.confirmed", "order_events",
                                        "permanent", "order-9", 7000));
    ASSERT_TRUE(res);
    id = *res;
  }
  auto store = open_dlq();
  ASSERT_NE(store, nullptr);
  auto back = store->get(id);
  ASSERT_TRUE(back) << render(back.error());
  EXPECT_EQ(back->key, "order-9");
  auto all = store->list({});
  ASSERT_TRUE(all);
  EXPECT_EQ(ids_of(*all), std::vector<int64_t>{id});
}

TEST_F(sqlite_dead_letter_store_test, list_filters_and_orders_newest_first) {
  auto store = open_dlq();
  ASSERT_NE(store, nullptr);
  struct row {
    const char* topic;
    const char* consumer;
    const char* category;
    const char* key;
    int64_t at;
  };
  row rows[] = {
    {"order.confirmed", "orders", "permanent", "k1", 1000},         // id 1
    {"order.cancelled", "orders", "retries_exhausted", "k2", 2000}, // id 2
    {"order.confirmed", "audit", "retries_exhausted", "k1", 3000},  // id 3
    {"payment.settled", "payments", "no_handler", "k3", 4000},      // id 4
    {"order.confirmed", "orders", "retries_exhausted", "k4", 5000}, // id 5
  };
  std::vector<int64_t> ids;
  for (auto& r : rows) {
    auto id
      = store->write(make_record(r.topic, r.consumer, r.category, r.key, r.at));
    ASSERT_TRUE(id) << render(id.error());
    ids.push_back(*id);
  }
  auto list = [&](dead_letter_query q) {
    auto res = store->list(q);
    EXPECT_TRUE(res) << render(res.error());
    return res ? ids_of(*res) : std::vector<int64_t>{};
  };
  auto with = [](auto&& set) {
    dead_letter_query q;
    set(q);
    return q;
  };
  using ids_t = std::vector<int64_t>;
  EXPECT_EQ(list({}), (ids_t{ids[4], ids[3], ids[2], ids[1], ids[0]}));
  EXPECT_EQ(list(with([](auto& q) { q.topic = "order.confirmed"; })),
            (ids_t{ids[4], ids[2], ids[0]}));
  EXPECT_EQ(list(with([](auto& q) { q.consumer = "orders"; })),
            (ids_t{ids[4], ids[1], ids[0]}));
  EXPECT_EQ(list(with([](auto& q) { q.category = "retries_exhausted"; })),
            (ids_t{ids[4], ids[2], ids[1]}));
  EXPECT_EQ(list(with([](auto& q) { q.key = "k1"; })), (ids_t{ids[2], ids[0]}));
  EXPECT_EQ(list(with([](auto& q) {
              q.topic = "order.confirmed";
              q.consumer = "orders";
            })),
            (ids_t{ids[4], ids[0]}));
  EXPECT_EQ(list(with([](auto& q) {
              q.since_ms = 2000;
              q.until_ms = 4000;
            })),
            (ids_t{ids[3], ids[2], ids[1]}));
  EXPECT_EQ(list(with([](auto& q) { q.since_ms = 4000; })),
            (ids_t{ids[4], ids[3]}));
  EXPECT_EQ(list(with([](auto& q) { q.until_ms = 1000; })), (ids_t{ids[0]}));
  EXPECT_EQ(list(with([](auto& q) { q.limit = 2; })), (ids_t{ids[4], ids[3]}));
  EXPECT_EQ(list(with([](auto& q) { q.limit = 0; })).size(), 5u);
  EXPECT_EQ(list(with([](auto& q) { q.topic = "nothing.here"; })), ids_t{});
  // The same filter twice reuses its prepared statement.
  EXPECT_EQ(list(with([](auto& q) { q.key = "k1"; })), (ids_t{ids[2], ids[0]}));
}

TEST_F(sqlite_dead_letter_store_test,
       mark_replayed_is_visible_in_get_and_list) {
  auto store = open_dlq();
  ASSERT_NE(store, nullptr);
  auto id = store->write(make_record("t", "c", "permanent", "k", 1000));
  ASSERT_TRUE(id);
  ASSERT_FALSE(store->mark_replayed(*id, 123456));
  auto back = store->get(*id);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->replayed_ms, 123456);
  auto all = store->list({});
  ASSERT_TRUE(all);
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ(all->front().replayed_ms, 123456);
}

TEST_F(sqlite_dead_letter_store_test, remove_deletes_the_record) {
  auto store = open_dlq();
  ASSERT_NE(store, nullptr);
  auto id = store->write(make_record("t", "c", "permanent", "k", 1000));
  ASSERT_TRUE(id);
  ASSERT_FALSE(store->remove(*id));
  auto back = store->get(*id);
  ASSERT_FALSE(back);
  EXPECT_EQ(code_of(back.error()), errc::not_found);
}

TEST_F(sqlite_dead_letter_store_test, missing_ids_are_not_found) {
  auto store = open_dlq();
  ASSERT_NE(store, nullptr);
  auto back = store->get(99);
  ASSERT_FALSE(back);
  EXPECT_EQ(code_of(back.error()), errc::not_found);
  EXPECT_NE(render(back.error()).find("99"), std::string::npos);
  EXPECT_EQ(code_of(store->mark_replayed(99, 1)), errc::not_found);
  EXPECT_EQ(code_of(store->remove(99)), errc::not_found);
}

TEST_F(sqlite_dead_letter_store_test, concurrent_writers_get_distinct_ids) {
  auto a = open_dlq();
  auto b = open_dlq();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  constexpr int threads = 4;
  constexpr int per_thread = 10;
  std::vector<std::vector<int64_t>> ids(threads);
  std::vector<std::thread> workers;
  for (int i = 0; i < threads; ++i)
    workers.emplace_back([&, i] {
      auto& store = i % 2 == 0 ? *a : *b;
      for (int j = 0; j < per_thread; ++j) {
        auto id = store.write(make_record("t", "c", "permanent", "k", j + 1));
        if (id)
          ids[static_cast<size_t>(i)].push_back(*id);
      }
    });
  for (auto& worker : workers)
    worker.join();
  std::vector<int64_t> all;
  for (auto& v : ids)
    all.insert(all.end(), v.begin(), v.end());
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all.size(), static_cast<size_t>(threads * per_thread));
  EXPECT_EQ(std::adjacent_find(all.begin(), all.end()), all.end());
  dead_letter_query everything;
  everything.limit = 0;
  auto listed = a->list(everything);
  ASSERT_TRUE(listed);
  EXPECT_EQ(listed->size(), static_cast<size_t>(threads * per_thread));
}

TEST(sqlite_dead_letter_store, unwritable_path_is_a_clear_error) {
  auto store = sqlite_dead_letter_store::open("/proc/forbidden/x.db");
  ASSERT_FALSE(store);
  EXPECT_EQ(code_of(store.error()), errc::unavailable);
  auto text = render(store.error());
  EXPECT_NE(text.find("/proc/forbidden/x.db"), std::string::npos) << text;
}

// -- factories -----------------------------------------------------------------

using sqlite_factories_test = temp_dir_fixture;

TEST_F(sqlite_factories_test, sqlite_url_with_absolute_path) {
  auto path = file("state/dedupe.db");
  ASSERT_TRUE(path.starts_with("/"));
  auto store = make_idempotency_store("sqlite://" + path);
  ASSERT_TRUE(store) << render(store.error());
  EXPECT_EQ((*store)->try_begin("k", 1h), claim_result::fresh);
  EXPECT_TRUE(fs::exists(path));
  auto dlq = make_dead_letter_store("sqlite://" + file("state/dlq.db"));
  ASSERT_TRUE(dlq) << render(dlq.error());
  EXPECT_TRUE(fs::exists(file("state/dlq.db")));
}

TEST_F(sqlite_factories_test, sqlite_url_with_relative_path) {
  auto old_cwd = fs::current_path();
  fs::current_path(dir);
  auto store = make_idempotency_store("sqlite://state/dedupe.db");
  auto dlq = make_dead_letter_store("sqlite://state/dlq.db");
  fs::current_path(old_cwd);
  ASSERT_TRUE(store) << render(store.error());
  ASSERT_TRUE(dlq) << render(dlq.error());
  EXPECT_TRUE(fs::exists(dir / "state" / "dedupe.db"));
  EXPECT_TRUE(fs::exists(dir / "state" / "dlq.db"));
}

TEST(make_dead_letter_store, unknown_scheme_names_the_expected_one) {
  auto store = make_dead_letter_store("memory://");
  ASSERT_FALSE(store);
  EXPECT_EQ(render(store.error()),
            "invalid_url: unknown dead-letter store URL 'memory://': expected "
            "sqlite://PATH");
}

TEST(make_dead_letter_store, sqlite_url_needs_a_path) {
  auto store = make_dead_letter_store("sqlite://");
  ASSERT_FALSE(store);
  EXPECT_EQ(code_of(store.error()), errc::invalid_url);
}

TEST(make_idempotency_store, unwritable_sqlite_path_is_unavailable) {
  auto store = make_idempotency_store("sqlite:///proc/forbidden/x.db");
  ASSERT_FALSE(store);
  EXPECT_EQ(code_of(store.error()), errc::unavailable);
}
