// End-to-end consume throughput on librdkafka's mock cluster, evmesh against
// a bare librdkafka consumer measured in the same run.
//
//   e2e_kafka [messages] [keys] [runs] [--partitions P] [--json FILE]
//             [--evmesh-query K=V&...]   (appended to the evmesh URLs)
//             [--latency 0]              (throughput rows only)
//             [--rows bare,evmesh,alone,naive] (which throughput rows to run)
//
// EVMESH_BENCH_PERF_CTL=ctl perf record -D -1 --control fifo:ctl -- e2e_kafka
// samples only the evmesh runs (group join included: the process is idle).
//
// A 3-broker mock cluster (rdkafka_mock.h) lives inside this process. One
// topic of P partitions (default 16, replication 3) is preloaded once with
// `messages` pre-encoded ~200-byte native envelopes keyed over `keys` keys;
// every run and consumer then drains it from the start in a fresh consumer
// group. The clock and the CPU account (getrusage, every thread of the
// process — the mock brokers' threads included, the same for both rows)
// start at the first message consumed, so the group join (~3 s on the mock)
// is not measured, and stop when the last message is committed (bare) or
// acked by the runtime (evmesh). Medians over `runs`.
//
// - bare: rd_kafka_consumer_poll, nothing decoded, a synchronous explicit
//   offset commit every 1 000 messages and at the end (manual commits);
//   queued.min.messages as the transport sets it (see bare_prefetch).
// - evmesh: consumer_runtime on kafka://…?group=G&topics=T with guarantees
//   on: memory dedupe (claim + commit per message), a span per attempt to a
//   counting sink, per-key ordering, concurrency 2x cores, with the
//   transport's defaults (max_buffered 8192, retry topics on).
// - transport alone: the kafka:// transport polled (512 at a time) and acked
//   by one thread, no runtime: the transport's own cost.
// - naive CAF pipeline over librdkafka: the bare consumer's loop feeding the
//   in-process baseline's actor shape (supervisor -> worker -> supervisor ->
//   sink, one message per record carrying its bytes, no framework work, no
//   batching, no flow control); the sink publishes each partition's next
//   offset and the polling thread commits those as the bare row does. The
//   limit of the actor design on Kafka, measured in the same run.
//
// Then the evmesh latency at about half its measured rate: a second topic,
// a producer paced in 1 ms ticks (linger.ms=0) while the runtime consumes;
// latency = produce call to handler call. The same for the bare consumer at
// half its rate (latency = produce call to poll return; the id is found in
// the bytes without decoding).
#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <caf/all.hpp>
#include <librdkafka/rdkafka.h>
#include <spdlog/spdlog.h>

#include "evmesh/consumer.hpp"
#include "evmesh/kafka.hpp"
#include "evmesh/memory_store.hpp"

#include "common.hpp"
#include "kafka/kafka_mock.hpp"

using namespace std::chrono;
namespace eb = evmesh::bench;

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "e2e_kafka: %s\n", what.c_str());
  std::exit(1);
}

rd_kafka_conf_t*
make_conf(const std::string& bootstraps,
          std::vector<std::pair<std::string, std::string>> extra) {
  char errstr[512];
  auto* conf = rd_kafka_conf_new();
  extra.emplace_back("bootstrap.servers", bootstraps);
  extra.emplace_back("log_level", "3");
  for (auto& [k, v] : extra)
    if (rd_kafka_conf_set(conf, k.c_str(), v.c_str(), errstr, sizeof errstr)
        != RD_KAFKA_CONF_OK)
      die("config " + k + ": " + errstr);
  return conf;
}

/// A producer that writes keyed envelopes with a traceparent header, as the
/// transport's publish does.
class producer {
public:
  producer(const std::string& bootstraps, const std::string& linger_ms) {
    char errstr[512];
    auto* conf = make_conf(bootstraps,
                           {{"linger.ms", linger_ms},
                            {"queue.buffering.max.messages", "1000000"}});
    rk_ = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (rk_ == nullptr)
      die(std::string{"producer: "} + errstr);
  }
  ~producer() {
    rd_kafka_destroy(rk_);
  }
  producer(const producer&) = delete;
  producer& operator=(const producer&) = delete;

  void send(const std::string& topic, const std::string& key,
            const std::string& value) {
    static const std::string tp
      = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for (;;) {
      auto err = rd_kafka_producev(
        rk_, RD_KAFKA_V_TOPIC(topic.c_str()),
        RD_KAFKA_V_KEY(key.data(), key.size()),
        RD_KAFKA_V_VALUE(const_cast<char*>(value.data()), value.size()),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_HEADER("traceparent", tp.data(),
                          static_cast<ssize_t>(tp.size())),
        RD_KAFKA_V_END);
      if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
        break;
      if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
        die(std::string{"produce: "} + rd_kafka_err2str(err));
      rd_kafka_poll(rk_, 10);
    }
    rd_kafka_poll(rk_, 0);
  }

  void flush() {
    if (rd_kafka_flush(rk_, 120'000) != RD_KAFKA_RESP_ERR_NO_ERROR)
      die("flush timed out");
  }

private:
  rd_kafka_t* rk_ = nullptr;
};

std::string key_of(uint64_t i, uint64_t keys) {
  return "k" + std::to_string(i % keys);
}

// The bare consumers prefetch as the transport does (its default): with
// librdkafka's default of 100 000, librdkafka 2.0 stops fetching once the
// consumer queue holds that many records and looks again only when a broker
// thread next wakes, up to 1 s later, so a preloaded drain took ~0.25 s or
// ~1 s at random.
const std::pair<std::string, std::string> bare_prefetch{"queued.min.messages",
                                                        "1000000"};

// Partitions the bare consumers track offsets for (the topic has 16 by
// default; --partitions is checked against this).
constexpr size_t max_partitions = 1024;

/// A consumer in `group` subscribed to `topic` from its earliest offset,
/// with manual commits and the transport's prefetch.
rd_kafka_t* bare_consumer(const std::string& bootstraps,
                          const std::string& topic, const std::string& group) {
  char errstr[512];
  auto* conf = make_conf(bootstraps, {{"group.id", group},
                                      {"enable.auto.commit", "false"},
                                      {"enable.auto.offset.store", "false"},
                                      {"auto.offset.reset", "earliest"},
                                      {"session.timeout.ms", "4000"},
                                      {"heartbeat.interval.ms", "500"},
                                      bare_prefetch});
  auto* rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);
  if (rk == nullptr)
    die(std::string{"consumer: "} + errstr);
  rd_kafka_poll_set_consumer(rk);
  auto* subs = rd_kafka_topic_partition_list_new(1);
  rd_kafka_topic_partition_list_add(subs, topic.c_str(), RD_KAFKA_PARTITION_UA);
  if (auto err = rd_kafka_subscribe(rk, subs))
    die(std::string{"subscribe: "} + rd_kafka_err2str(err));
  rd_kafka_topic_partition_list_destroy(subs);
  return rk;
}

/// Commits, synchronously, `next(p)` for each of the first `parts` partitions
/// of `topic` where it is not negative (the next offset to read).
template <class Next>
rd_kafka_resp_err_t
commit_next(rd_kafka_t* rk, const std::string& topic, size_t parts, Next next) {
  auto* list = rd_kafka_topic_partition_list_new(16);
  for (size_t p = 0; p < parts; ++p)
    if (int64_t off = next(p); off >= 0)
      rd_kafka_topic_partition_list_add(list, topic.c_str(),
                                        static_cast<int32_t>(p))
        ->offset
        = off;
  auto err = rd_kafka_commit(rk, list, 0);
  rd_kafka_topic_partition_list_destroy(list);
  return err;
}

/// Drains `n` records of `topic` in consumer group `group` on this thread:
/// `take(m)` for each record, a synchronous commit of `next(p)` every 1 000
/// records, then `finish(deadline)` (waits until the records taken are done
/// with) and a last commit. The clock and the CPU account start at the first
/// record.
template <class Take, class Next, class Finish>
eb::result drain(const std::string& bootstraps, const std::string& topic,
                 const std::string& group, uint64_t n, const std::string& what,
                 Take take, Next next, Finish finish) {
  auto* rk = bare_consumer(bootstraps, topic, group);
  auto commit = [&] {
    auto err = commit_next(rk, topic, max_partitions, next);
    if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
      die(std::string{"commit: "} + rd_kafka_err2str(err));
  };
  uint64_t got = 0;
  double cpu0 = 0;
  steady_clock::time_point start;
  auto deadline = steady_clock::now() + minutes{3};
  while (got < n) {
    if (steady_clock::now() > deadline)
      die(what + " did not finish within 3 minutes");
    auto* m = rd_kafka_consumer_poll(rk, 100);
    if (m == nullptr)
      continue;
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
      if (got == 0) {
        cpu0 = eb::cpu_seconds();
        start = steady_clock::now();
      }
      ++got;
      take(m);
      if (got % 1000 == 0)
        commit();
    } else if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF) {
      std::fprintf(stderr, "%s: %s\n", what.c_str(),
                   rd_kafka_message_errstr(m));
    }
    rd_kafka_message_destroy(m);
  }
  finish(deadline);
  commit();
  auto secs = duration<double>(steady_clock::now() - start).count();
  auto cpu = eb::cpu_seconds() - cpu0;
  rd_kafka_consumer_close(rk);
  rd_kafka_destroy(rk);
  return {static_cast<double>(n) / secs, 1e6 * cpu / static_cast<double>(n)};
}

/// The bare consumer: nothing decoded, each record's offset marked for the
/// next commit as soon as it is polled.
eb::result run_bare(const std::string& bootstraps, const std::string& topic,
                    const std::string& group, uint64_t n) {
  std::vector<int64_t> next(max_partitions, -1);
  return drain(
    bootstraps, topic, group, n, "bare consumer",
    [&](const rd_kafka_message_t* m) {
      next[static_cast<size_t>(m->partition)] = m->offset + 1;
    },
    [&](size_t p) { return next[p]; }, [](steady_clock::time_point) {});
}

using work_atom = caf::atom_constant<caf::atom("work")>;
using done_atom = caf::atom_constant<caf::atom("done")>;

/// The bare consumer's loop feeding a naive CAF pipeline of the card's shape
/// (see the file comment): each record's bytes go, in one message, from the
/// polling thread to a supervisor, to a worker and back, and on to a sink that
/// counts it and publishes its partition's next offset; the polling thread
/// commits the published offsets every 1 000 records and, once the sink has
/// seen all `n`, at the end.
eb::result run_naive(const std::string& bootstraps, const std::string& topic,
                     const std::string& group, uint64_t n) {
  // Next offset to commit per partition, written by the sink only.
  std::vector<std::atomic<int64_t>> done(max_partitions);
  for (auto& x : done)
    x = -1;
  std::atomic<uint64_t> received{0};
  caf::actor_system_config cfg;
  cfg.set("logger.verbosity", caf::atom("quiet"));
  caf::actor_system sys{cfg};
  auto sink = sys.spawn([&](caf::event_based_actor*) -> caf::behavior {
    return {[&](done_atom, int32_t p, int64_t off) {
      done[static_cast<size_t>(p)].store(off + 1, std::memory_order_relaxed);
      received.fetch_add(1, std::memory_order_release);
    }};
  });
  auto worker = sys.spawn([](caf::event_based_actor*) -> caf::behavior {
    return {[](work_atom, int32_t p, int64_t off, const std::string&) {
      return caf::make_message(done_atom::value, p, off);
    }};
  });
  auto supervisor
    = sys.spawn([=](caf::event_based_actor* self) -> caf::behavior {
        return {
          [=](work_atom, int32_t p, int64_t off, std::string& bytes) {
            self->send(worker, work_atom::value, p, off, std::move(bytes));
          },
          [=](done_atom, int32_t p, int64_t off) {
            self->send(sink, done_atom::value, p, off);
          },
        };
      });
  return drain(
    bootstraps, topic, group, n, "naive pipeline",
    [&](const rd_kafka_message_t* m) {
      caf::anon_send(supervisor, work_atom::value, m->partition, m->offset,
                     std::string{static_cast<const char*>(m->payload), m->len});
    },
    [&](size_t p) { return done[p].load(std::memory_order_relaxed); },
    [&](steady_clock::time_point deadline) {
      while (received.load(std::memory_order_acquire) < n) {
        if (steady_clock::now() > deadline)
          die("naive pipeline did not finish within 3 minutes");
        std::this_thread::sleep_for(microseconds{200});
      }
    });
}

/// The bare consumer's latency: `n` messages produced at `rate` on `topic`
/// (after a warm-up message that shows the group has been joined) while the
/// consumer polls and commits as in run_bare; latency = produce call to
/// poll return.
void run_bare_latency(const std::string& bootstraps, const std::string& topic,
                      const std::vector<std::string>& payloads, uint64_t keys,
                      double rate, eb::latency_recorder& lat) {
  auto* rk = bare_consumer(bootstraps, topic, "bare-latency");
  std::atomic<bool> warm{false};
  std::thread pacer{[&] {
    producer prod{bootstraps, "0"};
    evmesh::envelope w;
    w.topic = topic;
    w.id = "warmup";
    w.payload = boost::json::object{};
    prod.send(topic, "w", evmesh::encode_envelope(w));
    while (!warm)
      std::this_thread::sleep_for(milliseconds{1});
    eb::paced(payloads.size(), rate, [&](size_t i) {
      lat.sent(i);
      prod.send(topic, key_of(i, keys), payloads[i]);
    });
    prod.flush();
  }};
  std::vector<int64_t> next(max_partitions, -1);
  auto commit = [&] {
    commit_next(rk, topic, next.size(), [&](size_t p) { return next[p]; });
  };
  uint64_t got = 0;
  auto deadline = steady_clock::now() + minutes{3};
  while (got < payloads.size() + 1 && steady_clock::now() < deadline) {
    auto* m = rd_kafka_consumer_poll(rk, 100);
    if (m == nullptr)
      continue;
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
      std::string_view bytes{static_cast<const char*>(m->payload), m->len};
      auto id = eb::envelope_id(bytes);
      if (id == "warmup")
        warm = true;
      else
        lat.seen(id);
      ++got;
      next[static_cast<size_t>(m->partition)] = m->offset + 1;
      if (got % 1000 == 0)
        commit();
    }
    rd_kafka_message_destroy(m);
  }
  warm = true;
  pacer.join();
  commit();
  rd_kafka_consumer_close(rk);
  rd_kafka_destroy(rk);
  if (got < payloads.size() + 1)
    std::fprintf(stderr, "bare latency run: only %llu messages in 3 minutes\n",
                 static_cast<unsigned long long>(got));
}

/// The Kafka transport alone, without the runtime: one thread polls batches
/// of 512 and acks each record (what the runtime's source does, minus
/// decoding, dispatch, dedupe and spans). Shows what the transport itself
/// costs next to the bare consumer.
eb::result run_transport(const evmesh::testing::kafka_mock_cluster& cluster,
                         const std::string& topic, const std::string& group,
                         const std::string& extra, uint64_t n) {
  auto url = cluster.url(std::string{evmesh::testing::kafka_fast_settings}
                         + "&group=" + group + "&topics=" + topic + extra);
  auto t = evmesh::make_transport(url, {{}, "bench"});
  if (!t)
    die("transport: " + evmesh::render(t.error()));
  if (auto err = (*t)->subscribe({}))
    die("subscribe: " + evmesh::render(err));
  evmesh::raw_batch out; // reused, as the runtime's source does
  uint64_t got = 0;
  double cpu0 = 0;
  steady_clock::time_point start;
  auto deadline = steady_clock::now() + minutes{3};
  while (got < n) {
    if (steady_clock::now() > deadline)
      die("transport-only consumer did not finish within 3 minutes");
    out.clear();
    if (auto err = (*t)->poll_into(512, out))
      die("poll: " + evmesh::render(err));
    if (out.empty()) {
      std::this_thread::sleep_for(microseconds{200});
      continue;
    }
    if (got == 0) {
      cpu0 = eb::cpu_seconds();
      start = steady_clock::now();
    }
    for (auto& m : out)
      if (auto err = (*t)->ack(m.tag))
        die("ack: " + evmesh::render(err));
    got += out.size();
  }
  auto secs = duration<double>(steady_clock::now() - start).count();
  auto cpu = eb::cpu_seconds() - cpu0;
  (*t)->close();
  return {static_cast<double>(n) / secs, 1e6 * cpu / static_cast<double>(n)};
}

evmesh::runtime_config runtime_cfg(const std::string& url) {
  evmesh::runtime_config cfg;
  cfg.node_name = "bench";
  cfg.transport_url = url;
  cfg.dedupe_url = "none"; // the container's memory store is used instead
  cfg.dead_letter_url = "none";
  cfg.trace_sink = "none";
  cfg.defaults.concurrency = 2 * std::thread::hardware_concurrency();
  cfg.max_in_flight = 8192;
  cfg.poll_batch = 512;
  eb::runtime_overrides_from_env(cfg);
  return cfg;
}

/// Drains `n` messages of `topic` (preloaded, or produced by `pace` once the
/// runtime consumes) in group `group`.
template <class Pace>
eb::result run_evmesh(const evmesh::testing::kafka_mock_cluster& cluster,
                      const std::string& topic, const std::string& group,
                      const std::string& extra, uint64_t n, Pace pace,
                      eb::latency_recorder* lat = nullptr) {
  eb::reset_counters(lat);
  auto url = cluster.url(std::string{evmesh::testing::kafka_fast_settings}
                         + "&group=" + group + "&topics=" + topic + extra);
  auto sink = std::make_shared<eb::counting_sink>();
  evmesh::container_builder b;
  b.add<evmesh::idempotency_store>(
    std::make_shared<evmesh::memory_idempotency_store>(16));
  b.add<evmesh::span_sink>(sink);
  evmesh::handler_descriptor h;
  h.consumer = "bench";
  h.pattern = ">";
  h.fn = &eb::counting_handler;
  evmesh::consumer_runtime rt{runtime_cfg(url), b.freeze()};
  rt.set_handlers({&h});
  if (auto err = rt.start())
    die("start failed: " + evmesh::render(err));
  auto deadline = steady_clock::now() + minutes{3};
  auto wait = [&](auto done) {
    while (!done()) {
      if (steady_clock::now() > deadline)
        die("evmesh run did not finish within 3 minutes (handled "
            + std::to_string(eb::handled.load()) + " of " + std::to_string(n)
            + ")");
      std::this_thread::sleep_for(milliseconds{1});
    }
  };
  eb::perf_control(true);
  uint64_t expect = pace(rt, wait);
  wait([&] { return rt.stats().acked >= expect; });
  auto end = eb::now_ns();
  eb::perf_control(false);
  auto cpu = eb::cpu_seconds() - eb::first_handled_cpu.load();
  auto secs = static_cast<double>(end - eb::first_handled_ns.load()) / 1e9;
  rt.stop(seconds{5});
  eb::recorder = nullptr;
  if (eb::handled < expect || sink->spans < expect)
    std::fprintf(stderr, "mismatch: handled %llu spans %llu of %llu\n",
                 static_cast<unsigned long long>(eb::handled.load()),
                 static_cast<unsigned long long>(sink->spans.load()),
                 static_cast<unsigned long long>(expect));
  return {static_cast<double>(n) / secs, 1e6 * cpu / static_cast<double>(n)};
}

} // namespace

const char* const usage
  = "usage: e2e_kafka [messages=200000] [keys=1000] [runs=3] [--json FILE]\n"
    "       [--partitions P] [--evmesh-query K=V&...] [--latency 0]\n"
    "       [--rows bare,evmesh,alone,naive]\n"
    "A 3-broker librdkafka mock cluster in this process; bare librdkafka vs\n"
    "evmesh vs the transport alone vs a naive CAF pipeline fed by\n"
    "librdkafka, medians of `runs`, then latency.\n";

int main(int argc, char** argv) {
  if (eb::wants_help(argc, argv)) {
    std::fputs(usage, stdout);
    return 0;
  }
  auto json_path = eb::take_option(argc, argv, "json");
  int partitions = std::stoi(eb::take_option(argc, argv, "partitions", "16"));
  if (partitions < 1 || static_cast<size_t>(partitions) > max_partitions)
    die("--partitions must be 1.." + std::to_string(max_partitions));
  auto extra = eb::take_option(argc, argv, "evmesh-query");
  bool latency = eb::take_option(argc, argv, "latency", "1") != "0";
  // Which throughput rows to run (for profiling one of them).
  auto rows = eb::take_option(argc, argv, "rows", "bare,evmesh,alone,naive");
  eb::reject_unknown_options(argc, argv, usage);
  auto want = [&](const char* row) {
    return rows.find(row) != std::string::npos;
  };
  uint64_t n = eb::positional_count(argc, argv, 1, 200'000, usage);
  uint64_t keys = eb::positional_count(argc, argv, 2, 1000, usage);
  int runs = static_cast<int>(eb::positional_count(argc, argv, 3, 3, usage));
  if (!extra.empty())
    extra = "&" + extra;
  spdlog::set_level(spdlog::level::warn);
  evmesh::register_kafka_transport();
  eb::json_out json{json_path, "e2e_kafka"};
  evmesh::testing::kafka_mock_cluster cluster{3};
  const std::string topic = "bench.created";
  if (!cluster.create_topic(topic, partitions, 3))
    die("cannot create the topic on the mock cluster");
  {
    auto payloads = eb::make_payloads(topic, n, keys);
    producer p{cluster.bootstraps(), "5"};
    for (uint64_t i = 0; i < n; ++i)
      p.send(topic, key_of(i, keys), payloads[i]);
    p.flush();
  }
  std::vector<eb::result> bare, mesh, alone, naive;
  auto all = [&](auto&, auto&&) { return n; };
  for (int r = 0; r < runs; ++r) {
    auto no = std::to_string(r);
    bare.push_back(want("bare")
                     ? run_bare(cluster.bootstraps(), topic, "bare" + no, n)
                     : eb::result{});
    mesh.push_back(want("evmesh")
                     ? run_evmesh(cluster, topic, "evmesh" + no, extra, n, all)
                     : eb::result{});
    alone.push_back(want("alone")
                      ? run_transport(cluster, topic, "alone" + no, extra, n)
                      : eb::result{});
    naive.push_back(want("naive")
                      ? run_naive(cluster.bootstraps(), topic, "naive" + no, n)
                      : eb::result{});
    std::printf("run %d: bare %.0f msg/s %.2f us/msg, evmesh %.0f msg/s %.2f "
                "us/msg, transport alone %.0f msg/s %.2f us/msg, naive CAF "
                "pipeline %.0f msg/s %.2f us/msg\n",
                r, bare.back().rate, bare.back().cpu_us, mesh.back().rate,
                mesh.back().cpu_us, alone.back().rate, alone.back().cpu_us,
                naive.back().rate, naive.back().cpu_us);
    std::fflush(stdout);
  }
  auto b = eb::median_of(bare);
  auto m = eb::median_of(mesh);
  auto a = eb::median_of(alone);
  auto nv = eb::median_of(naive);
  auto conc = 2 * std::thread::hardware_concurrency();
  std::printf("messages %llu, keys %llu, partitions %d, runs %d (medians), "
              "cores %u, load average %.2f\n",
              static_cast<unsigned long long>(n),
              static_cast<unsigned long long>(keys), partitions, runs,
              std::thread::hardware_concurrency(), eb::load_average());
  eb::print_row("bare librdkafka consumer, manual commits", b, b.rate);
  eb::print_row("evmesh kafka, memory dedupe", m, b.rate);
  eb::print_row("kafka transport alone (poll + ack)", a, b.rate);
  eb::print_row("naive CAF pipeline over librdkafka", nv, b.rate);
  if (nv.rate > 0)
    std::printf("evmesh kafka / naive CAF pipeline over librdkafka: %.0f%%\n",
                100 * m.rate / nv.rate);
  json.throughput("bare librdkafka", n, keys, 1, b, 0, runs);
  json.throughput("evmesh kafka, memory dedupe", n, keys, conc, m, b.rate,
                  runs);
  json.throughput("kafka transport alone (poll 512 + ack, no runtime)", n, keys,
                  1, a, b.rate, runs);
  json.throughput("naive CAF pipeline over librdkafka (4 hops, no framework "
                  "work)",
                  n, keys, 1, nv, b.rate, runs);
  if (!latency)
    return 0;
  // Latency at about half the evmesh rate, ~3 s of load, on a fresh topic.
  auto half = m.rate / 2;
  auto lat_n = static_cast<uint64_t>(std::max(1000.0, half * 3));
  const std::string lat_topic = "bench.latency";
  if (!cluster.create_topic(lat_topic, partitions, 3))
    die("cannot create the latency topic");
  eb::latency_recorder lat{lat_n};
  auto lat_payloads = eb::make_payloads(lat_topic, lat_n, keys);
  producer prod{cluster.bootstraps(), "0"};
  run_evmesh(
    cluster, lat_topic, "latency", extra, lat_n,
    [&](auto&, auto&& wait) {
      // A warm-up message (not counted) shows the group has been joined.
      evmesh::envelope w;
      w.topic = lat_topic;
      w.id = "warmup";
      w.idempotency_key = "warmup";
      w.payload = boost::json::object{};
      prod.send(lat_topic, "w", evmesh::encode_envelope(w));
      wait([] { return eb::handled.load() >= 1; });
      eb::paced(lat_n, half, [&](size_t i) {
        lat.sent(i);
        prod.send(lat_topic, key_of(i, keys), lat_payloads[i]);
      });
      prod.flush();
      return lat_n + 1;
    },
    &lat);
  eb::print_latency("evmesh kafka", half, lat, lat_n);
  // The bare consumer at half its own rate, on another fresh topic.
  {
    auto bare_half = b.rate / 2;
    auto bn = static_cast<uint64_t>(std::max(1000.0, bare_half * 3));
    const std::string bare_topic = "bench.latency.bare";
    if (!cluster.create_topic(bare_topic, partitions, 3))
      die("cannot create the bare latency topic");
    eb::latency_recorder blat{bn};
    run_bare_latency(cluster.bootstraps(), bare_topic,
                     eb::make_payloads(bare_topic, bn, keys), keys, bare_half,
                     blat);
    eb::print_latency("bare librdkafka", bare_half, blat, bn);
    json.latency("bare librdkafka", bare_half, blat, bn);
  }
  json.latency("evmesh kafka, memory dedupe", half, lat, lat_n);
  return 0;
}
