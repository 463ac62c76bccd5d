// Micro-benchmarks of the per-message hot path (issue 8): envelope decode and
// encode, traceparent parse, topic matching and the idempotency stores'
// claim + commit pair. Google Benchmark; never run as tests.
//
// The Redis benchmark runs only when EVMESH_BENCH_REDIS holds a redis:// URL
// (e.g. EVMESH_BENCH_REDIS=redis://127.0.0.1:6390); it is skipped otherwise.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>
#include <unistd.h>

#include "evmesh/envelope.hpp"
#include "evmesh/memory_store.hpp"
#include "evmesh/pattern.hpp"
#include "evmesh/sqlite_store.hpp"
#include "evmesh/stores.hpp"
#include "evmesh/trace.hpp"

#ifdef EVMESH_BENCH_HAS_REDIS
#  include "evmesh/redis_store.hpp"
#endif

namespace {

using namespace std::literals;

// -- inputs -------------------------------------------------------------------

// A native envelope of 225 bytes with traceparent and ordering key.
constexpr std::string_view native_bytes
  = R"({"id":"7d0c2f3e-5b1a-4c7e-9f00-3a2b1c0d9e8f","topic":"order.confirmed",)"
    R"("payload":{"order_id":48213,"total":129.9,"currency":"EUR"},)"
    R"("traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",)"
    R"("key":"customer-1042"})";

// The same event as CloudEvents 1.0 structured JSON.
constexpr std::string_view cloudevent_bytes
  = R"({"specversion":"1.0","id":"7d0c2f3e-5b1a-4c7e-9f00-3a2b1c0d9e8f",)"
    R"("source":"/orders","type":"order.confirmed",)"
    R"("datacontenttype":"application/json",)"
    R"("traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",)"
    R"("partitionkey":"customer-1042",)"
    R"("data":{"order_id":48213,"total":129.9,"currency":"EUR"}})";

constexpr std::string_view valid_traceparent
  = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

// Upper-case hex is invalid in W3C traceparent; the parser has to read far
// enough to find out.
constexpr std::string_view invalid_traceparent
  = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";

// -- envelope -----------------------------------------------------------------

void decode_or_skip(benchmark::State& state, std::string_view bytes) {
  for (auto _ : state) {
    auto env = evmesh::decode_envelope(bytes);
    if (!env) {
      state.SkipWithError("decode_envelope failed");
      return;
    }
    benchmark::DoNotOptimize(env);
  }
  state.SetItemsProcessed(state.iterations());
  state.SetBytesProcessed(state.iterations()
                          * static_cast<int64_t>(bytes.size()));
}

void BM_decode_native(benchmark::State& state) {
  decode_or_skip(state, native_bytes);
}
BENCHMARK(BM_decode_native);

void BM_decode_cloudevent(benchmark::State& state) {
  decode_or_skip(state, cloudevent_bytes);
}
BENCHMARK(BM_decode_cloudevent);

void encode_or_skip(benchmark::State& state, std::string_view bytes) {
  auto env = evmesh::decode_envelope(bytes);
  if (!env) {
    state.SkipWithError("decode_envelope failed");
    return;
  }
  size_t total = 0;
  for (auto _ : state) {
    auto out = evmesh::encode_envelope(*env);
    total += out.size();
    benchmark::DoNotOptimize(out);
  }
  state.SetItemsProcessed(state.iterations());
  state.SetBytesProcessed(static_cast<int64_t>(total));
}

void BM_encode_native(benchmark::State& state) {
  encode_or_skip(state, native_bytes);
}
BENCHMARK(BM_encode_native);

// Encodes (always as native JSON) an envelope decoded from a CloudEvent, so
// the CloudEvents extension attributes travel through `extra`.
void BM_encode_from_cloudevent(benchmark::State& state) {
  encode_or_skip(state, cloudevent_bytes);
}
BENCHMARK(BM_encode_from_cloudevent);

// -- traceparent --------------------------------------------------------------

void BM_traceparent_parse_valid(benchmark::State& state) {
  for (auto _ : state) {
    auto fields = evmesh::parse_traceparent(valid_traceparent);
    if (!fields) {
      state.SkipWithError("valid traceparent rejected");
      return;
    }
    benchmark::DoNotOptimize(fields);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_traceparent_parse_valid);

void BM_traceparent_parse_invalid(benchmark::State& state) {
  for (auto _ : state) {
    auto fields = evmesh::parse_traceparent(invalid_traceparent);
    if (fields) {
      state.SkipWithError("invalid traceparent accepted");
      return;
    }
    benchmark::DoNotOptimize(fields);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_traceparent_parse_invalid);

// -- topic matching -----------------------------------------------------------

// 50 exact patterns ("<domain>.<event>") and 20 wildcard patterns.
evmesh::topic_matcher make_matcher() {
  static constexpr std::string_view domains[]
    = {"order",   "payment", "shipment", "invoice", "customer",
       "catalog", "cart",    "refund",   "stock",   "review"};
  static constexpr std::string_view events[]
    = {"created", "updated", "confirmed", "cancelled", "deleted"};
  std::vector<std::pair<std::string, uint32_t>> patterns;
  uint32_t id = 0;
  for (auto domain : domains)
    for (auto event : events)
      patterns.emplace_back(std::string{domain} + "." + std::string{event},
                            id++);
  for (auto domain : domains) {
    patterns.emplace_back(std::string{domain} + ".audit.*", id++);
    patterns.emplace_back(std::string{domain} + ".v2.>", id++);
  }
  auto matcher = evmesh::topic_matcher::make(patterns);
  if (!matcher)
    std::abort();
  return std::move(*matcher);
}

void match_topic(benchmark::State& state, std::string_view topic,
                 bool expect_hit) {
  auto matcher = make_matcher();
  std::vector<uint32_t> ids;
  ids.reserve(8);
  for (auto _ : state) {
    ids.clear();
    matcher.match(topic, ids);
    benchmark::DoNotOptimize(ids.data());
  }
  if (ids.empty() == expect_hit)
    state.SkipWithError("unexpected match result");
  state.SetItemsProcessed(state.iterations());
}

void BM_match_exact_hit(benchmark::State& state) {
  match_topic(state, "stock.cancelled", true);
}
BENCHMARK(BM_match_exact_hit);

void BM_match_wildcard_hit(benchmark::State& state) {
  match_topic(state, "shipment.v2.parcel.delivered", true);
}
BENCHMARK(BM_match_wildcard_hit);

void BM_match_miss(benchmark::State& state) {
  match_topic(state, "warehouse.restocked", false);
}
BENCHMARK(BM_match_miss);

// -- idempotency stores -------------------------------------------------------

constexpr auto lease = std::chrono::duration_cast<caf::timespan>(30s);
constexpr auto keep = std::chrono::duration_cast<caf::timespan>(1h);

// One `try_begin` + `commit` pair per iteration, each on a key never used
// before (as for a stream of distinct events). The SQLite and Redis variants
// wait on I/O, so they report wall-clock time (`UseRealTime`): ops/s is then
// what one caller gets, while the CPU column shows this thread's own cost.
void claim_commit(benchmark::State& state, evmesh::idempotency_store& store,
                  const std::string& prefix) {
  std::string key = prefix;
  const auto base = key.size();
  uint64_t n = 0;
  for (auto _ : state) {
    key.resize(base);
    key += std::to_string(n++);
    if (store.try_begin(key, lease) != evmesh::claim_result::fresh) {
      state.SkipWithError("try_begin did not answer fresh");
      return;
    }
    if (auto err = store.commit(key, keep)) {
      state.SkipWithError("commit failed");
      return;
    }
  }
  state.SetItemsProcessed(state.iterations());
}

// Prefix unique to this process and benchmark run, so repeated runs (and the
// several runs Google Benchmark makes to size the iteration count) never
// collide on a key.
std::string unique_prefix(const std::string& name) {
  static std::atomic<uint64_t> run{0};
  auto now = std::chrono::system_clock::now().time_since_epoch().count();
  return "bench:" + std::string{name} + ":" + std::to_string(getpid()) + ":"
         + std::to_string(now) + ":" + std::to_string(run.fetch_add(1)) + ":";
}

void BM_dedupe_memory(benchmark::State& state) {
  evmesh::memory_idempotency_store store;
  claim_commit(state, store, unique_prefix("memory"));
}
BENCHMARK(BM_dedupe_memory);

void BM_dedupe_sqlite(benchmark::State& state) {
  namespace fs = std::filesystem;
  const auto path = fs::temp_directory_path()
                    / ("evmesh-bench-" + std::to_string(getpid()) + ".db");
  auto remove_files = [&path] {
    std::error_code ec;
    for (const char* suffix : {"", "-wal", "-shm"})
      fs::remove(path.string() + suffix, ec);
  };
  remove_files();
  {
    auto store = evmesh::sqlite_idempotency_store::open(path.string());
    if (!store) {
      state.SkipWithError("cannot open the SQLite store");
      return;
    }
    claim_commit(state, **store, unique_prefix("sqlite"));
  }
  remove_files();
}
BENCHMARK(BM_dedupe_sqlite)->UseRealTime();

// With several threads all of them share one store (a pool of 8
// connections), as a subscription's lanes do: items/s is then the store's
// aggregate rate, and the automatic pipelining batches the callers' commands.
void BM_dedupe_redis(benchmark::State& state) {
  const char* url = std::getenv("EVMESH_BENCH_REDIS");
  if (url == nullptr || std::string_view{url}.rfind("redis://", 0) != 0) {
    state.SkipWithError("set EVMESH_BENCH_REDIS=redis://HOST:PORT to run");
    return;
  }
#ifdef EVMESH_BENCH_HAS_REDIS
  static auto store = evmesh::redis_idempotency_store::open(url);
  if (!store) {
    state.SkipWithError("cannot connect to EVMESH_BENCH_REDIS");
    return;
  }
  auto before = (*store)->pipelining();
  claim_commit(state, **store,
               unique_prefix("redis-t" + std::to_string(state.thread_index())));
  if (state.thread_index() == 0) {
    auto after = (*store)->pipelining();
    auto trips = after.round_trips - before.round_trips;
    state.counters["depth"]
      = trips == 0 ? 0.0
                   : double(after.commands - before.commands) / double(trips);
  }
#else
  state.SkipWithError("built without the redis:// store (libhiredis-dev)");
#endif
}
BENCHMARK(BM_dedupe_redis)->UseRealTime()->ThreadRange(1, 64);

// The batch calls as a function lane makes them: `try_begin_many` for a
// batch of `state.range(0)` new keys, then `finish_many` committing all of
// them. Items are keys (claim + commit pairs), so items/s compares directly
// with the single-call rows above.
void claim_commit_batched(benchmark::State& state,
                          evmesh::idempotency_store& store,
                          const std::string& prefix) {
  auto batch = static_cast<size_t>(state.range(0));
  std::vector<std::string> names(batch);
  std::vector<std::string_view> keys(batch);
  std::vector<evmesh::claim_result> out(batch);
  std::vector<evmesh::finish_op> ops(batch);
  std::vector<caf::error> errors(batch);
  uint64_t n = 0;
  for (auto _ : state) {
    for (size_t i = 0; i < batch; ++i) {
      names[i] = prefix + std::to_string(n++);
      keys[i] = names[i];
      ops[i] = {keys[i], evmesh::finish_op::commit};
    }
    store.try_begin_many(keys, lease, out);
    for (auto res : out)
      if (res != evmesh::claim_result::fresh) {
        state.SkipWithError("try_begin_many did not answer fresh");
        return;
      }
    if (store.finish_many(ops, keep, errors)) {
      state.SkipWithError("finish_many failed");
      return;
    }
  }
  state.SetItemsProcessed(state.iterations() * state.range(0));
}

void BM_dedupe_memory_batch(benchmark::State& state) {
  evmesh::memory_idempotency_store store;
  claim_commit_batched(state, store, unique_prefix("memory-batch"));
}
BENCHMARK(BM_dedupe_memory_batch)->Arg(64);
// The same for exactly 600 000 fresh keys: the store's tables grow through
// several doublings (and their spare tables are made present) on the way.
BENCHMARK(BM_dedupe_memory_batch)->Arg(64)->Iterations(600000 / 64);

void BM_dedupe_redis_batch(benchmark::State& state) {
  const char* url = std::getenv("EVMESH_BENCH_REDIS");
  if (url == nullptr || std::string_view{url}.rfind("redis://", 0) != 0) {
    state.SkipWithError("set EVMESH_BENCH_REDIS=redis://HOST:PORT to run");
    return;
  }
#ifdef EVMESH_BENCH_HAS_REDIS
  static auto store = evmesh::redis_idempotency_store::open(url);
  if (!store) {
    state.SkipWithError("cannot connect to EVMESH_BENCH_REDIS");
    return;
  }
  auto before = (*store)->pipelining();
  claim_commit_batched(
    state, **store,
    unique_prefix("redis-batch-t" + std::to_string(state.thread_index())));
  if (state.thread_index() == 0) {
    auto after = (*store)->pipelining();
    auto trips = after.round_trips - before.round_trips;
    state.counters["depth"]
      = trips == 0 ? 0.0
                   : double(after.commands - before.commands) / double(trips);
  }
#else
  state.SkipWithError("built without the redis:// store (libhiredis-dev)");
#endif
}
BENCHMARK(BM_dedupe_redis_batch)
  ->UseRealTime()
  ->ArgsProduct({{1, 8, 64}})
  ->ThreadRange(1, 4);

} // namespace

BENCHMARK_MAIN();
