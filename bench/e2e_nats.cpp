// End-to-end consume throughput on a real nats-server (JetStream), evmesh
// against a bare nats.c pull consumer measured in the same run.
//
//   e2e_nats [messages] [keys] [runs] [--json FILE] [--no-redis 1]
//            [--rows bare,memory,redis,redis-script] [--latency 0]
//
// Starts its own nats-server (and redis-server when installed) on free
// loopback ports in temp dirs and stops them. Per run and consumer, a fresh
// file-storage stream is preloaded with `messages` pre-encoded envelopes
// (~200 bytes, `keys` ordering keys); then the consumer drains it and the
// clock stops when the last message is acked (bare) or handled and settled
// (evmesh). Reported: msg/s and this process's CPU µs per message (getrusage,
// every thread of the process, nats-server excluded), medians over `runs`.
//
// - bare: js_PullSubscribe on a durable with explicit ack, fetch 256 (no
//   wait), plain `natsMsg_Ack` per message — nothing decoded.
// - evmesh, memory dedupe: the runtime with the nats:// transport, guarantees
//   on (claim + commit per message in the memory store, a span per attempt to
//   a counting sink, per-key ordering, concurrency 2x cores).
// - evmesh, Redis dedupe: the same with the redis:// store (pipelined).
//
// --rows picks the throughput rows to run (for profiling one of them; the
// ratios need `bare`; redis-script is the Redis row with claim=script, the
// Lua claim, for comparing claim paths in one run); --latency 0 skips the
// latency runs. To profile only the timed phases (no preload): mkfifo ctl;
// EVMESH_BENCH_PERF_CTL=ctl perf record -D -1 --control fifo:ctl -g -- e2e_nats
// ...
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nats/nats.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include "evmesh/consumer.hpp"
#include "evmesh/memory_store.hpp"
#include "evmesh/nats.hpp"
#ifdef EVMESH_BENCH_HAS_REDIS
#  include "evmesh/redis_store.hpp"
#endif

#include "common.hpp"
#include "latency.hpp"
#include "nats/nats_server.hpp"
#include "nats/redis_server.hpp"

using namespace std::chrono;

namespace {

using evmesh::bench::counting_sink;
using evmesh::bench::cpu_seconds;
using evmesh::bench::handled;

/// Messages per pull request, bare and evmesh alike (--fetch).
int fetch_batch = 256;

/// CPU seconds process `pid` used so far (0 if unreadable).
double proc_cpu_seconds(pid_t pid) {
  if (pid <= 0)
    return 0;
  std::ifstream in{"/proc/" + std::to_string(pid) + "/stat"};
  std::string line;
  std::getline(in, line);
  auto close = line.rfind(')');
  if (close == std::string::npos)
    return 0;
  std::istringstream fields{line.substr(close + 2)};
  std::string skip;
  // After the command: state and 10 more fields, then utime and stime.
  for (int i = 0; i < 11; ++i)
    fields >> skip;
  double utime = 0;
  double stime = 0;
  fields >> utime >> stime;
  return (utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// The servers' pids, to report their CPU per message beside ours.
pid_t nats_pid = 0;
pid_t redis_pid = 0;

struct result {
  double rate = 0;     // msg/s
  double cpu_us = 0;   // CPU µs per message
  double nats_us = 0;  // nats-server CPU µs per message
  double redis_us = 0; // redis-server CPU µs per message
};

/// CPU of this process and the servers over one timed phase.
struct cpu_meter {
  double self = cpu_seconds();
  double nats = proc_cpu_seconds(nats_pid);
  double redis = proc_cpu_seconds(redis_pid);

  result done(double secs, uint64_t n) const {
    auto per = [n](double s) { return 1e6 * s / static_cast<double>(n); };
    return {static_cast<double>(n) / secs, per(cpu_seconds() - self),
            per(proc_cpu_seconds(nats_pid) - nats),
            per(proc_cpu_seconds(redis_pid) - redis)};
  }
};

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "e2e_nats: %s\n", what.c_str());
  std::exit(1);
}

void check(natsStatus st, const char* what) {
  if (st != NATS_OK)
    die(std::string{what} + ": " + natsStatus_GetText(st));
}

std::vector<std::string> make_payloads(const std::string& topic, uint64_t n,
                                       uint64_t keys) {
  std::vector<std::string> out;
  out.reserve(n);
  for (uint64_t i = 0; i < n; ++i) {
    evmesh::envelope e;
    e.topic = topic;
    e.id = "m" + std::to_string(i);
    e.idempotency_key = topic + ":" + e.id;
    e.key = "k" + std::to_string(i % keys);
    e.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    e.payload = boost::json::object{{"order_id", e.id}, {"quantity", 1}};
    out.push_back(evmesh::encode_envelope(e));
  }
  return out;
}

/// A plain nats.c connection with a JetStream context.
struct js_conn {
  natsConnection* nc = nullptr;
  jsCtx* js = nullptr;

  explicit js_conn(const std::string& url) {
    check(natsConnection_ConnectTo(&nc, url.c_str()), "connect");
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.PublishAsync.MaxPending = 4096;
    // A loaded machine can stall acks past the 200 ms default.
    jo.PublishAsync.StallWait = 30'000;
    check(natsConnection_JetStream(&js, nc, &jo), "jetstream");
  }
  ~js_conn() {
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
  }
  js_conn(const js_conn&) = delete;
  js_conn& operator=(const js_conn&) = delete;

  /// Creates stream `name` on `subject.>` (file storage, as the transport
  /// creates them) and fills it with `payloads` on `subject.created`.
  void preload(const std::string& name, const std::string& subject,
               const std::vector<std::string>& payloads) {
    jsStreamConfig cfg;
    jsStreamConfig_Init(&cfg);
    cfg.Name = name.c_str();
    auto wildcard = subject + ".>";
    const char* subjects[] = {wildcard.c_str()};
    cfg.Subjects = subjects;
    cfg.SubjectsLen = 1;
    cfg.Storage = js_FileStorage;
    jsStreamInfo* si = nullptr;
    jsErrCode jerr{};
    check(js_AddStream(&si, js, &cfg, nullptr, &jerr), "add stream");
    jsStreamInfo_Destroy(si);
    auto topic = subject + ".created";
    for (auto& p : payloads)
      check(js_PublishAsync(js, topic.c_str(), p.data(),
                            static_cast<int>(p.size()), nullptr),
            "publish");
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MaxWait = 60'000;
    check(js_PublishAsyncComplete(js, &po), "publish complete");
  }
};

result run_bare(const std::string& url, const std::string& stream,
                const std::vector<std::string>& payloads) {
  js_conn c{url};
  auto subject = "s" + stream;
  c.preload(stream, subject, payloads);
  jsOptions jo;
  jsOptions_Init(&jo);
  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Stream = stream.c_str();
  so.Config.AckPolicy = js_AckExplicit;
  so.Config.MaxAckPending = 20'000;
  so.Config.DeliverPolicy = js_DeliverAll;
  natsSubscription* sub = nullptr;
  jsErrCode jerr{};
  auto filter = subject + ".>";
  check(js_PullSubscribe(&sub, c.js, filter.c_str(), "bare", &jo, &so, &jerr),
        "pull subscribe");
  const uint64_t n = payloads.size();
  uint64_t acked = 0;
  evmesh::bench::perf_control(true);
  cpu_meter meter;
  auto start = steady_clock::now();
  while (acked < n) {
    natsMsgList list{nullptr, 0};
    auto st = natsSubscription_Fetch(&list, sub, fetch_batch, 5000, &jerr);
    if (st != NATS_OK && st != NATS_TIMEOUT)
      die(std::string{"fetch: "} + natsStatus_GetText(st));
    for (int i = 0; i < list.Count; ++i)
      natsMsg_Ack(list.Msgs[i], nullptr);
    acked += static_cast<uint64_t>(list.Count);
    natsMsgList_Destroy(&list);
  }
  // Acks are sent without waiting; flush so they reached the server.
  natsConnection_FlushTimeout(c.nc, 10'000);
  auto secs = duration<double>(steady_clock::now() - start).count();
  auto res = meter.done(secs, n);
  evmesh::bench::perf_control(false);
  natsSubscription_Destroy(sub);
  return res;
}

/// The bare consumer's latency: an empty stream, `payloads` published at
/// `rate` from a second connection (after a warm-up message that shows the
/// consumer is subscribed) while this thread fetches and acks as in
/// run_bare; latency = publish call to fetch return.
void run_bare_latency(const std::string& url, const std::string& stream,
                      const std::vector<std::string>& payloads, double rate,
                      evmesh::bench::latency_recorder& lat) {
  auto subject = "s" + stream;
  js_conn producer{url};
  producer.preload(stream, subject, {});
  js_conn c{url};
  jsOptions jo;
  jsOptions_Init(&jo);
  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Stream = stream.c_str();
  so.Config.AckPolicy = js_AckExplicit;
  so.Config.MaxAckPending = 20'000;
  so.Config.DeliverPolicy = js_DeliverAll;
  natsSubscription* sub = nullptr;
  jsErrCode jerr{};
  auto filter = subject + ".>";
  check(js_PullSubscribe(&sub, c.js, filter.c_str(), "bare", &jo, &so, &jerr),
        "pull subscribe");
  std::atomic<bool> warm{false};
  auto topic = subject + ".created";
  std::thread pacer{[&] {
    evmesh::envelope w;
    w.topic = topic;
    w.id = "warmup";
    w.payload = boost::json::object{};
    auto wb = evmesh::encode_envelope(w);
    check(js_PublishAsync(producer.js, topic.c_str(), wb.data(),
                          static_cast<int>(wb.size()), nullptr),
          "publish");
    while (!warm)
      std::this_thread::sleep_for(milliseconds{1});
    evmesh::bench::paced(payloads.size(), rate, [&](size_t i) {
      lat.sent(i);
      check(js_PublishAsync(producer.js, topic.c_str(), payloads[i].data(),
                            static_cast<int>(payloads[i].size()), nullptr),
            "publish");
    });
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MaxWait = 60'000;
    check(js_PublishAsyncComplete(producer.js, &po), "publish complete");
  }};
  uint64_t got = 0;
  auto deadline = steady_clock::now() + minutes{3};
  while (got < payloads.size() + 1 && steady_clock::now() < deadline) {
    natsMsgList list{nullptr, 0};
    auto st = natsSubscription_Fetch(&list, sub, fetch_batch, 100, &jerr);
    if (st != NATS_OK && st != NATS_TIMEOUT)
      die(std::string{"fetch: "} + natsStatus_GetText(st));
    for (int i = 0; i < list.Count; ++i) {
      auto* m = list.Msgs[i];
      std::string_view bytes{natsMsg_GetData(m),
                             static_cast<size_t>(natsMsg_GetDataLength(m))};
      auto id = evmesh::bench::envelope_id(bytes);
      if (id == "warmup")
        warm = true;
      else
        lat.seen(id);
      natsMsg_Ack(m, nullptr);
    }
    got += static_cast<uint64_t>(list.Count);
    natsMsgList_Destroy(&list);
  }
  warm = true;
  pacer.join();
  natsSubscription_Destroy(sub);
  if (got < payloads.size() + 1)
    std::fprintf(stderr, "bare latency run: only %llu messages in 3 minutes\n",
                 static_cast<unsigned long long>(got));
}

/// Drains a preloaded stream; with `rate` > 0 the stream starts empty and a
/// second connection publishes the payloads at that rate while the runtime
/// consumes, and `lat` records each message's latency.
result run_evmesh(const std::string& url, const std::string& stream,
                  const std::vector<std::string>& payloads,
                  std::shared_ptr<evmesh::idempotency_store> store,
                  double rate = 0,
                  evmesh::bench::latency_recorder* lat = nullptr) {
  auto subject = "s" + stream;
  auto producer = std::make_unique<js_conn>(url);
  producer->preload(stream, subject,
                    rate > 0 ? std::vector<std::string>{} : payloads);
  // The handler notes the first call: an evmesh row is measured from there,
  // as the method says (start-up, connect and consumer creation are not).
  evmesh::bench::reset_counters(lat);
  const uint64_t n = payloads.size();
  evmesh::runtime_config cfg;
  cfg.node_name = "bench";
  cfg.transport_url = url + "?stream=" + stream + "&durable=evmesh&fetch="
                      + std::to_string(fetch_batch) + "&max_ack_pending=20000";
  cfg.dedupe_url = "none"; // the container's store is used instead
  cfg.dead_letter_url = "none";
  cfg.trace_sink = "none";
  cfg.defaults.concurrency = 2 * std::thread::hardware_concurrency();
  cfg.max_in_flight = 8192;
  cfg.poll_batch = 512;
  evmesh::bench::runtime_overrides_from_env(cfg);
  if (auto* idle = std::getenv("EVMESH_BENCH_IDLE_WORKERS"))
    cfg.idle_workers = idle; // runtime.idle_workers: poll | sleep
  auto sink = std::make_shared<counting_sink>();
  evmesh::container_builder b;
  b.add<evmesh::idempotency_store>(std::move(store));
  b.add<evmesh::span_sink>(sink);
  evmesh::handler_descriptor h;
  h.consumer = "bench";
  // The descriptor keeps a C string: the pattern must outlive the runtime.
  static std::vector<std::unique_ptr<std::string>> patterns;
  patterns.push_back(std::make_unique<std::string>(subject + ".*"));
  h.pattern = patterns.back()->c_str();
  h.fn = &evmesh::bench::counting_handler;
  evmesh::bench::perf_control(true);
  cpu_meter meter;
  auto start = steady_clock::now();
  evmesh::consumer_runtime rt{cfg, b.freeze()};
  rt.set_handlers({&h});
  if (auto err = rt.start())
    die("start failed: " + evmesh::render(err));
  std::thread pacer;
  if (rate > 0)
    pacer = std::thread{[&] {
      auto topic = subject + ".created";
      evmesh::bench::paced(payloads.size(), rate, [&](size_t i) {
        lat->sent(i);
        check(js_PublishAsync(producer->js, topic.c_str(), payloads[i].data(),
                              static_cast<int>(payloads[i].size()), nullptr),
              "publish");
      });
      jsPubOptions po;
      jsPubOptions_Init(&po);
      po.MaxWait = 60'000;
      check(js_PublishAsyncComplete(producer->js, &po), "publish complete");
    }};
  auto deadline = steady_clock::now() + minutes{5};
  while (rt.stats().acked < n) {
    if (steady_clock::now() > deadline)
      die("evmesh run did not finish within 5 minutes");
    std::this_thread::sleep_for(microseconds{500});
  }
  auto secs = duration<double>(steady_clock::now() - start).count();
  auto res = meter.done(secs, n);
  if (auto first = evmesh::bench::first_handled_ns.load();
      rate <= 0 && first != 0) {
    // From the first handler call (server CPU: from before the start).
    secs = static_cast<double>(evmesh::bench::now_ns() - first) / 1e9;
    res.rate = static_cast<double>(n) / secs;
    res.cpu_us = 1e6 * (cpu_seconds() - evmesh::bench::first_handled_cpu.load())
                 / static_cast<double>(n);
  }
  evmesh::bench::perf_control(false);
  if (pacer.joinable())
    pacer.join();
  rt.stop(seconds{5});
  evmesh::bench::recorder = nullptr;
  if (handled < n || sink->spans < n)
    std::fprintf(stderr, "mismatch: handled %llu spans %llu of %llu\n",
                 static_cast<unsigned long long>(handled.load()),
                 static_cast<unsigned long long>(sink->spans.load()),
                 static_cast<unsigned long long>(n));
  return res;
}

double median(std::vector<double> xs) {
  std::sort(xs.begin(), xs.end());
  return xs[xs.size() / 2];
}

void print_row(const char* name, const std::vector<result>& rs,
               double base_rate) {
  std::vector<double> rates, cpus, nats, redis;
  for (auto& r : rs) {
    rates.push_back(r.rate);
    cpus.push_back(r.cpu_us);
    nats.push_back(r.nats_us);
    redis.push_back(r.redis_us);
  }
  auto rate = median(rates);
  std::printf("%-34s %10.0f msg/s  %6.2f µs CPU/msg  %5.0f%% of bare\n", name,
              rate, median(cpus), 100.0 * rate / base_rate);
  // Per run: msg/s and CPU µs/msg of this process, nats-server and
  // redis-server (the servers share the 2 cores).
  std::printf("    runs (msg/s self/nats/redis µs):");
  for (auto& r : rs)
    std::printf("  %.0f %.2f/%.2f/%.2f", r.rate, r.cpu_us, r.nats_us,
                r.redis_us);
  std::printf("\n");
}

} // namespace

const char* const usage
  = "usage: e2e_nats [messages=100000] [keys=1000] [runs=3] [--json FILE]\n"
    "       [--no-redis 1] [--rows bare,memory,redis,redis-script]\n"
    "       [--latency 0] [--fetch N]\n"
    "Starts its own nats-server (and redis-server); bare nats.c vs evmesh,\n"
    "medians of `runs`, then latency at half the rates.\n";

int main(int argc, char** argv) {
  if (evmesh::bench::wants_help(argc, argv)) {
    std::fputs(usage, stdout);
    return 0;
  }
  evmesh::bench::json_out json{evmesh::bench::take_option(argc, argv, "json"),
                               "e2e_nats"};
  // --no-redis 1: skip the Redis dedupe row.
  bool no_redis = !evmesh::bench::take_option(argc, argv, "no-redis").empty();
  auto rows = evmesh::bench::take_option(argc, argv, "rows",
                                         "bare,memory,redis");
  auto row_on = [&rows](std::string_view name) {
    std::string_view list = rows;
    while (!list.empty()) {
      auto comma = list.find(',');
      if (list.substr(0, comma) == name)
        return true;
      list = comma == std::string_view::npos ? std::string_view{}
                                             : list.substr(comma + 1);
    }
    return false;
  };
  if (!row_on("bare") && !row_on("memory") && !row_on("redis")
      && !row_on("redis-script"))
    die("--rows takes a comma-separated list of bare, memory, redis, "
        "redis-script");
  bool latency = evmesh::bench::take_option(argc, argv, "latency", "1") != "0";
  fetch_batch
    = std::stoi(evmesh::bench::take_option(argc, argv, "fetch", "256"));
  evmesh::bench::reject_unknown_options(argc, argv, usage);
  uint64_t n = evmesh::bench::positional_count(argc, argv, 1, 100'000, usage);
  uint64_t keys = evmesh::bench::positional_count(argc, argv, 2, 1000, usage);
  int runs = static_cast<int>(
    evmesh::bench::positional_count(argc, argv, 3, 3, usage));
  spdlog::set_level(spdlog::level::warn);
  if (!evmesh::testing::nats_server::available())
    die("nats-server is not installed (apt-get install nats-server)");
  evmesh::register_nats_transport();
  evmesh::testing::nats_server server;
  nats_pid = server.pid();
  std::unique_ptr<evmesh::testing::redis_server> redis;
#ifdef EVMESH_BENCH_HAS_REDIS
  if (evmesh::testing::redis_server::available() && !no_redis)
    redis = std::make_unique<evmesh::testing::redis_server>();
  if (redis)
    redis_pid = redis->pid();
#endif
  std::vector<result> bare, mem, red, red_script;
  int stream_no = 0;
  for (int r = 0; r < runs; ++r) {
    auto next = [&] { return "B" + std::to_string(++stream_no); };
    auto payloads = [&](const std::string& s) {
      return make_payloads("s" + s + ".created", n, keys);
    };
    if (row_on("bare")) {
      auto s1 = next();
      bare.push_back(run_bare(server.url(), s1, payloads(s1)));
    }
    if (row_on("memory")) {
      auto s2 = next();
      mem.push_back(
        run_evmesh(server.url(), s2, payloads(s2),
                   std::make_shared<evmesh::memory_idempotency_store>(16)));
    }
#ifdef EVMESH_BENCH_HAS_REDIS
    // redis-script: the Redis row with claims as the Lua script (the
    // claim path before Redis 7's SET NX GET), for an A/B in the same run.
    auto redis_row = [&](const char* query, std::vector<result>& out) {
      auto store = evmesh::redis_idempotency_store::open(redis->url() + query);
      if (!store)
        die("redis: " + evmesh::render(store.error()));
      auto s3 = next();
      out.push_back(run_evmesh(server.url(), s3, payloads(s3), *store));
      auto pipe = (*store)->pipelining();
      std::fprintf(stderr,
                   "redis%s run %d: %llu commands in %llu round trips (%.1f "
                   "per write)\n",
                   query, r + 1, static_cast<unsigned long long>(pipe.commands),
                   static_cast<unsigned long long>(pipe.round_trips),
                   pipe.round_trips == 0
                     ? 0.0
                     : static_cast<double>(pipe.commands)
                         / static_cast<double>(pipe.round_trips));
    };
    if (redis && row_on("redis"))
      redis_row("", red);
    if (redis && row_on("redis-script"))
      redis_row("?claim=script", red_script);
#endif
  }
  std::printf("messages %llu, keys %llu, runs %d (medians), cores %u\n",
              static_cast<unsigned long long>(n),
              static_cast<unsigned long long>(keys), runs,
              std::thread::hardware_concurrency());
  std::vector<double> bare_rates;
  for (auto& r : bare)
    bare_rates.push_back(r.rate);
  double base = bare_rates.empty() ? 0 : median(bare_rates);
  if (!bare.empty())
    print_row("bare nats.c pull consumer", bare, base);
  if (!mem.empty())
    print_row("evmesh nats, memory dedupe", mem, base);
  if (!red.empty())
    print_row("evmesh nats, redis dedupe", red, base);
  else if (row_on("redis"))
    std::printf("evmesh nats, redis dedupe: skipped (no redis-server)\n");
  if (!red_script.empty())
    print_row("evmesh nats, redis, Lua claims", red_script, base);
  auto to_json = [&](const char* row, const std::vector<result>& rs,
                     unsigned conc, double b) {
    if (rs.empty())
      return;
    std::vector<evmesh::bench::result> v;
    for (auto& r : rs)
      v.push_back({r.rate, r.cpu_us});
    json.throughput(row, n, keys, conc, evmesh::bench::median_of(v), b, runs);
  };
  auto conc = 2 * std::thread::hardware_concurrency();
  to_json("bare nats.c", bare, 1, 0);
  to_json("evmesh nats, memory dedupe", mem, conc, base);
  to_json("evmesh nats, redis dedupe", red, conc, base);
  to_json("evmesh nats, redis dedupe, Lua claims", red_script, conc, base);
  if (!latency || mem.empty() || bare.empty())
    return 0;
  // Latency with memory dedupe at half its measured maximum, ~3 s of load.
  std::vector<double> mem_rates;
  for (auto& r : mem)
    mem_rates.push_back(r.rate);
  auto half = median(mem_rates) / 2;
  auto lat_n = static_cast<uint64_t>(std::max(1000.0, half * 3));
  evmesh::bench::latency_recorder lat{lat_n};
  auto s_lat = "B" + std::to_string(++stream_no);
  run_evmesh(server.url(), s_lat,
             make_payloads("s" + s_lat + ".created", lat_n, keys),
             std::make_shared<evmesh::memory_idempotency_store>(16), half,
             &lat);
  auto p = lat.percentiles();
  std::printf("evmesh nats latency at %.0f msg/s (half of max), %llu "
              "messages: p50 %.0f µs, p99 %.0f µs, p99.9 %.0f µs\n",
              half, static_cast<unsigned long long>(lat_n), p[0], p[1], p[2]);
  json.latency("evmesh nats, memory dedupe", half, lat, lat_n);
  // The bare consumer at half its own rate.
  auto bare_half = base / 2;
  auto bn = static_cast<uint64_t>(std::max(1000.0, bare_half * 3));
  evmesh::bench::latency_recorder blat{bn};
  auto s_bare = "B" + std::to_string(++stream_no);
  run_bare_latency(server.url(), s_bare,
                   make_payloads("s" + s_bare + ".created", bn, keys),
                   bare_half, blat);
  evmesh::bench::print_latency("bare nats.c", bare_half, blat, bn);
  json.latency("bare nats.c", bare_half, blat, bn);
  return 0;
}
