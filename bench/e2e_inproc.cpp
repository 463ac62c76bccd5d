// End-to-end throughput of the in-process mesh with guarantees on, against a
// naive CAF pipeline of the same shape and a raw CAF one-hop message rate
// measured in the same run.
//
//   e2e_inproc [messages] [keys] [--runs R] [--concurrency C] [--json FILE]
//   e2e_inproc --mode memory [--in-flight N] [--json FILE]
//   e2e_inproc --mode soak [--seconds S] [--rate R] [--keep K] [--json FILE]
//   e2e_inproc --mode latency [--rates R1,R2,...] [--json FILE]
//
// throughput (default): medians of R runs (default 3) of each row, then the
// mesh latency at about half its measured rate. C is the handler concurrency
// (default 2x cores).
// memory: bytes per in-flight message beyond its payload — RSS with N
// (default 65 536) deliveries parked behind blocked handlers minus RSS with
// none, divided by N, minus the envelope's size; and the same from the heap
// bytes in use (mallinfo2), split into the in-process broker's own share
// (measured by publishing and polling N messages on a broker of their own
// with no runtime) and the consumer's.
// latency: the mesh latency at fixed offered rates (default 1 000, 5 000,
// 20 000 msg/s), about 3 s each.
// soak: the mesh at a steady R msg/s (default 2 000) for S seconds (default
// 600), RSS sampled every 10 s (dedupe.keep = K s, default 60, so the dedupe
// window, not the run length, bounds the store).
//
// Mesh: inproc broker -> source -> topic supervisor -> lanes (memory dedupe
// claim + commit, a span per attempt to a counting sink, per-key ordering over
// `keys` keys, concurrency 2x cores) -> settle -> ack.
// Baseline: source -> supervisor -> worker -> supervisor -> sink, one shared
// 200-byte payload per message, no framework work, no batching.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string_view>
#include <thread>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include "evmesh/consumer.hpp"
#include "evmesh/memory_store.hpp"

#include "common.hpp"

using namespace std::chrono;
namespace eb = evmesh::bench;

namespace {

using eb::counting_sink;
using eb::handled;
using eb::recorder;

/// Handler concurrency of the mesh rows (--concurrency).
uint32_t concurrency = 2 * std::thread::hardware_concurrency();

evmesh::outcome bench_handler(evmesh::event_context& ctx) {
  return eb::counting_handler(ctx);
}

/// While set, the memory mode's handler holds its lane.
std::atomic<bool> hold{false};

evmesh::outcome holding_handler(evmesh::event_context& ctx) {
  while (hold.load())
    std::this_thread::sleep_for(milliseconds{1});
  return eb::counting_handler(ctx);
}

/// A runtime on inproc://bench with guarantees on (memory dedupe, a span per
/// attempt to `sink`, per-key ordering, `concurrency` lanes).
std::unique_ptr<evmesh::consumer_runtime>
start_mesh(const std::shared_ptr<counting_sink>& sink,
           evmesh::handler_descriptor& h, size_t max_in_flight = 8192,
           caf::timespan keep = std::chrono::hours{24}) {
  eb::reset_counters();
  evmesh::inproc_broker::get("bench")->reset();
  evmesh::runtime_config cfg;
  cfg.node_name = "bench";
  cfg.transport_url = "inproc://bench";
  cfg.dedupe_url = "none"; // the container's memory store is used instead
  cfg.dead_letter_url = "none";
  cfg.trace_sink = "none";
  cfg.defaults.concurrency = concurrency;
  cfg.max_in_flight = max_in_flight;
  cfg.poll_batch = 512;
  eb::runtime_overrides_from_env(cfg);
  if (auto* idle = std::getenv("EVMESH_BENCH_IDLE_WORKERS"))
    cfg.idle_workers = idle; // runtime.idle_workers: poll | sleep
  cfg.dedupe_keep = keep;
  evmesh::container_builder b;
  b.add<evmesh::idempotency_store>(
    std::make_shared<evmesh::memory_idempotency_store>(16));
  b.add<evmesh::span_sink>(sink);
  h.consumer = "bench";
  h.pattern = "bench.*";
  if (h.fn == nullptr)
    h.fn = &bench_handler;
  auto rt = std::make_unique<evmesh::consumer_runtime>(cfg, b.freeze());
  rt->set_handlers({&h});
  if (auto err = rt->start()) {
    std::fprintf(stderr, "start failed: %s\n", evmesh::render(err).c_str());
    std::exit(1);
  }
  return rt;
}

/// Throughput of draining `n` messages (CPU: getrusage, every thread of the
/// process, over the drain); with `rate` > 0 the messages are published at
/// that rate instead of all at once and `lat` records their latency.
eb::result run_mesh(uint64_t n, uint64_t keys, double rate = 0,
                    eb::latency_recorder* lat = nullptr) {
  auto sink = std::make_shared<counting_sink>();
  evmesh::handler_descriptor h;
  auto rt = start_mesh(sink, h);
  auto broker = evmesh::inproc_broker::get("bench");
  // Pre-encode the messages so the producer is not what we measure.
  auto bytes = eb::make_payloads("bench.created", n, keys);
  recorder = lat;
  eb::perf_control(true);
  auto cpu0 = eb::cpu_seconds();
  auto start = steady_clock::now();
  if (rate > 0) {
    eb::paced(n, rate, [&](size_t i) {
      lat->sent(i);
      broker->publish_raw("bench.created", std::move(bytes[i]));
    });
  } else {
    for (auto& x : bytes)
      broker->publish_raw("bench.created", std::move(x));
  }
  while (broker->stats().acked < n)
    std::this_thread::sleep_for(microseconds{200});
  auto secs = duration<double>(steady_clock::now() - start).count();
  auto cpu = eb::cpu_seconds() - cpu0;
  eb::perf_control(false);
  rt->stop(seconds{5});
  recorder = nullptr;
  if (handled < n || sink->spans < n)
    std::fprintf(stderr, "mismatch: handled %llu spans %llu\n",
                 static_cast<unsigned long long>(handled.load()),
                 static_cast<unsigned long long>(sink->spans.load()));
  return {static_cast<double>(n) / secs, 1e6 * cpu / static_cast<double>(n)};
}

using work_atom = caf::atom_constant<caf::atom("work")>;
using done_atom = caf::atom_constant<caf::atom("done")>;

caf::actor_system_config& quiet(caf::actor_system_config& cfg) {
  cfg.set("logger.verbosity", caf::atom("quiet"));
  return cfg;
}

eb::result run_naive_pipeline(uint64_t n) {
  caf::actor_system_config cfg;
  caf::actor_system sys{quiet(cfg)};
  auto payload = std::make_shared<const std::string>(200, 'x');
  std::atomic<uint64_t> received{0};
  auto sink = sys.spawn([&](caf::event_based_actor*) -> caf::behavior {
    return {[&](done_atom, uint64_t) {
      received.fetch_add(1, std::memory_order_relaxed);
    }};
  });
  auto worker = sys.spawn([](caf::event_based_actor*) -> caf::behavior {
    // Returning a value answers the sender with an ordinary message.
    return {[](work_atom, uint64_t i, const std::string&) {
      return caf::make_message(done_atom::value, i);
    }};
  });
  auto supervisor
    = sys.spawn([=](caf::event_based_actor* self) -> caf::behavior {
        return {
          [=](work_atom, uint64_t i) {
            self->send(worker, work_atom::value, i, *payload);
          },
          [=](done_atom, uint64_t j) { self->send(sink, done_atom::value, j); },
        };
      });
  auto cpu0 = eb::cpu_seconds();
  auto start = steady_clock::now();
  for (uint64_t i = 0; i < n; ++i)
    caf::anon_send(supervisor, work_atom::value, i);
  while (received < n)
    std::this_thread::sleep_for(microseconds{200});
  auto secs = duration<double>(steady_clock::now() - start).count();
  auto cpu = eb::cpu_seconds() - cpu0;
  return {static_cast<double>(n) / secs, 1e6 * cpu / static_cast<double>(n)};
}

/// Raw CAF message rate over one hop: this thread sends `n` messages (an
/// index and the shared 200-byte payload) to one actor that counts them.
eb::result run_one_hop(uint64_t n) {
  caf::actor_system_config cfg;
  caf::actor_system sys{quiet(cfg)};
  auto payload = std::make_shared<const std::string>(200, 'x');
  std::atomic<uint64_t> received{0};
  auto counter = sys.spawn([&](caf::event_based_actor*) -> caf::behavior {
    return {[&](work_atom, uint64_t, const std::string&) {
      received.fetch_add(1, std::memory_order_relaxed);
    }};
  });
  auto cpu0 = eb::cpu_seconds();
  auto start = steady_clock::now();
  for (uint64_t i = 0; i < n; ++i)
    caf::anon_send(counter, work_atom::value, i, *payload);
  while (received < n)
    std::this_thread::sleep_for(microseconds{200});
  auto secs = duration<double>(steady_clock::now() - start).count();
  auto cpu = eb::cpu_seconds() - cpu0;
  return {static_cast<double>(n) / secs, 1e6 * cpu / static_cast<double>(n)};
}

/// Heap bytes the in-process broker itself holds per unacked message (its
/// stored copy and queue entries): `n` messages published to a broker of
/// their own and polled (the polled copies freed at once), with no runtime.
/// In the memory mode that share belongs to the broker, which for NATS,
/// Kafka or RabbitMQ lives in another process.
double broker_bytes_per_message(size_t n, uint64_t keys) {
  auto bytes = eb::make_payloads("bench.created", n, keys);
  auto t = evmesh::make_transport("inproc://bench-broker-only",
                                  evmesh::transport_environment{});
  if (!t || (*t)->subscribe({"bench.created"})) {
    std::fprintf(stderr, "broker-only transport failed\n");
    std::exit(1);
  }
  auto broker = evmesh::inproc_broker::get("bench-broker-only");
  auto heap0 = eb::heap_bytes();
  for (auto& x : bytes)
    broker->publish_raw("bench.created", std::move(x));
  std::vector<evmesh::raw_message> out;
  for (size_t polled = 0; polled < n;) {
    out.clear();
    if ((*t)->poll(4096, out) || out.empty())
      break;
    polled += out.size();
  }
  out = {};
  auto per_msg = static_cast<double>(eb::heap_bytes() - heap0)
                 / static_cast<double>(n);
  (*t)->close();
  broker->reset();
  return per_msg;
}

/// Memory mode: RSS per in-flight delivery beyond the envelope itself.
int run_memory(size_t in_flight, uint64_t keys, const eb::json_out& json) {
  auto sink = std::make_shared<counting_sink>();
  evmesh::handler_descriptor h;
  h.fn = &holding_handler;
  h.options.execution = evmesh::execution::blocking;
  h.options.timeout = std::chrono::seconds{50}; // below dedupe.lease
  auto rt = start_mesh(sink, h, in_flight);
  auto broker = evmesh::inproc_broker::get("bench");
  auto bytes = eb::make_payloads("bench.created", in_flight, keys);
  size_t payload_bytes = 0;
  for (auto& b : bytes)
    payload_bytes += b.size();
  // Warm the runtime up (allocator arenas, lanes), then measure idle RSS.
  hold = false;
  for (int i = 0; i < 2000; ++i) {
    evmesh::envelope e;
    e.topic = "bench.created";
    e.id = "warm" + std::to_string(i);
    e.key = "k" + std::to_string(i);
    broker->publish_raw("bench.created", evmesh::encode_envelope(e));
  }
  while (rt->stats().acked < 2000)
    std::this_thread::sleep_for(milliseconds{1});
  std::this_thread::sleep_for(milliseconds{200});
  auto rss0 = eb::rss_bytes();
  auto heap0 = eb::heap_bytes();
  hold = true;
  for (auto& x : bytes)
    broker->publish_raw("bench.created", std::move(x));
  auto deadline = steady_clock::now() + minutes{2};
  while (rt->stats().in_flight < in_flight) {
    if (steady_clock::now() > deadline) {
      std::fprintf(stderr, "only %llu deliveries in flight\n",
                   static_cast<unsigned long long>(rt->stats().in_flight));
      break;
    }
    std::this_thread::sleep_for(milliseconds{5});
  }
  std::this_thread::sleep_for(milliseconds{200});
  auto held = rt->stats().in_flight;
  auto rss1 = eb::rss_bytes();
  auto heap1 = eb::heap_bytes();
  hold = false;
  while (rt->stats().acked < 2000 + in_flight)
    std::this_thread::sleep_for(milliseconds{1});
  rt->stop(seconds{5});
  rt.reset();
  auto n = static_cast<double>(held);
  auto per_msg = static_cast<double>(rss1 - rss0) / n;
  auto heap_per_msg = static_cast<double>(heap1 - heap0) / n;
  auto envelope = static_cast<double>(payload_bytes)
                  / static_cast<double>(in_flight);
  auto broker_share = broker_bytes_per_message(in_flight, keys);
  auto consumer = heap_per_msg - broker_share;
  std::printf("in flight %llu (max_in_flight %zu, handlers blocked), load "
              "average %.2f\n"
              "RSS idle %.1f MiB, with them %.1f MiB: %.0f bytes per "
              "in-flight message, of which the envelope is %.0f bytes: "
              "%.0f bytes beyond it\n"
              "heap in use: %.0f bytes per in-flight message, of which the "
              "in-process broker's own copy and queue entries are %.0f: the "
              "consumer holds %.0f bytes, %.0f beyond the envelope\n",
              static_cast<unsigned long long>(held), in_flight,
              eb::load_average(), static_cast<double>(rss0) / 1048576.0,
              static_cast<double>(rss1) / 1048576.0, per_msg, envelope,
              per_msg - envelope, heap_per_msg, broker_share, consumer,
              consumer - envelope);
  boost::json::object o;
  o["kind"] = "memory";
  o["in_flight"] = held;
  o["rss_idle_bytes"] = rss0;
  o["rss_held_bytes"] = rss1;
  o["bytes_per_in_flight"] = per_msg;
  o["envelope_bytes"] = envelope;
  o["bytes_beyond_payload"] = per_msg - envelope;
  o["heap_bytes_per_in_flight"] = heap_per_msg;
  o["broker_heap_bytes_per_message"] = broker_share;
  o["consumer_heap_bytes_beyond_payload"] = consumer - envelope;
  json.row(std::move(o));
  return 0;
}

/// Soak mode: a steady `rate` for `secs` seconds, RSS every 10 s.
int run_soak(double rate, int secs, int keep, uint64_t keys,
             const eb::json_out& json) {
  auto sink = std::make_shared<counting_sink>();
  evmesh::handler_descriptor h;
  auto rt = start_mesh(sink, h, 8192, std::chrono::seconds{keep});
  auto broker = evmesh::inproc_broker::get("bench");
  auto n = static_cast<uint64_t>(rate * secs);
  std::vector<size_t> samples;
  auto t0 = steady_clock::now();
  auto next_sample = t0;
  auto sample = [&] {
    auto rss = eb::rss_bytes();
    samples.push_back(rss);
    auto at = duration<double>(steady_clock::now() - t0).count();
    auto st = rt->stats();
    std::printf("t %5.0f s  RSS %7.1f MiB  acked %llu  in flight %llu  load "
                "%.2f\n",
                at, static_cast<double>(rss) / 1048576.0,
                static_cast<unsigned long long>(st.acked),
                static_cast<unsigned long long>(st.in_flight),
                eb::load_average());
    std::fflush(stdout);
    boost::json::object o;
    o["kind"] = "soak_sample";
    o["t_s"] = at;
    o["rss_bytes"] = rss;
    o["acked"] = st.acked;
    o["rate"] = rate;
    o["dedupe_keep_s"] = keep;
    json.row(std::move(o));
    next_sample += seconds{10};
  };
  sample();
  eb::paced(n, rate, [&](size_t i) {
    evmesh::envelope e;
    e.topic = "bench.created";
    e.id = "m" + std::to_string(i);
    e.idempotency_key = e.id;
    e.key = "k" + std::to_string(i % keys);
    e.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    e.payload = boost::json::object{{"order_id", e.id}, {"quantity", 1}};
    broker->publish_raw("bench.created", evmesh::encode_envelope(e));
    if (steady_clock::now() >= next_sample)
      sample();
  });
  while (rt->stats().acked < n)
    std::this_thread::sleep_for(milliseconds{10});
  sample();
  rt->stop(seconds{5});
  auto mx = *std::max_element(samples.begin(), samples.end());
  std::printf("soak %d s at %.0f msg/s: RSS first %.1f MiB, last %.1f MiB, "
              "max %.1f MiB\n",
              secs, rate, static_cast<double>(samples.front()) / 1048576.0,
              static_cast<double>(samples.back()) / 1048576.0,
              static_cast<double>(mx) / 1048576.0);
  boost::json::object o;
  o["kind"] = "soak";
  o["dedupe_keep_s"] = keep;
  o["seconds"] = secs;
  o["rate"] = rate;
  o["rss_first_bytes"] = samples.front();
  o["rss_last_bytes"] = samples.back();
  o["rss_max_bytes"] = mx;
  json.row(std::move(o));
  return 0;
}

} // namespace

constexpr const char* usage
  = "usage: e2e_inproc [messages] [keys] [--runs R] [--concurrency C] "
    "[--json FILE]\n"
    "       e2e_inproc --mode memory [--in-flight N] [--json FILE]\n"
    "       e2e_inproc --mode soak [--seconds S] [--rate R] [--keep K] "
    "[--json FILE]\n"
    "       e2e_inproc --mode latency [--rates R1,R2,...] [--json FILE]\n"
    "       e2e_inproc --mode mesh [messages] [keys]   (evmesh row only, "
    "for profiling)\n"
    "EVMESH_BENCH_IDLE_WORKERS=poll|sleep sets runtime.idle_workers.\n";

int run_main(int argc, char** argv);

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::string_view{argv[i]} == "--help"
        || std::string_view{argv[i]} == "-h") {
      std::fputs(usage, stdout);
      return 0;
    }
  try {
    return run_main(argc, argv);
  } catch (const std::invalid_argument&) {
    std::fprintf(stderr, "not a number where one was expected\n%s", usage);
  } catch (const std::out_of_range&) {
    std::fprintf(stderr, "a number is out of range\n%s", usage);
  }
  return 2;
}

int run_main(int argc, char** argv) {
  eb::json_out json{eb::take_option(argc, argv, "json"), "e2e_inproc"};
  auto mode = eb::take_option(argc, argv, "mode", "throughput");
  int runs = std::stoi(eb::take_option(argc, argv, "runs", "3"));
  concurrency = static_cast<uint32_t>(std::stoul(
    eb::take_option(argc, argv, "concurrency", std::to_string(concurrency))));
  auto in_flight
    = std::stoull(eb::take_option(argc, argv, "in-flight", "65536"));
  auto soak_secs = std::stoi(eb::take_option(argc, argv, "seconds", "600"));
  auto soak_rate = std::stod(eb::take_option(argc, argv, "rate", "2000"));
  auto keep = std::stoi(eb::take_option(argc, argv, "keep", "60"));
  auto rates = eb::take_option(argc, argv, "rates", "1000,5000,20000");
  eb::reject_unknown_options(argc, argv, usage);
  uint64_t n = argc > 1 ? std::stoull(argv[1]) : 200000;
  uint64_t keys = argc > 2 ? std::stoull(argv[2]) : 1000;
  spdlog::set_level(spdlog::level::warn);
  if (mode == "memory")
    return run_memory(in_flight, keys, json);
  if (mode == "latency") {
    // Fixed offered rates, about 3 s each.
    std::printf("concurrency %u, load average %.2f\n", concurrency,
                eb::load_average());
    for (size_t pos = 0; pos < rates.size();) {
      auto comma = rates.find(',', pos);
      auto rate = std::stod(rates.substr(pos, comma - pos));
      pos = comma == std::string::npos ? rates.size() : comma + 1;
      auto ln = static_cast<uint64_t>(std::max(1000.0, rate * 3));
      eb::latency_recorder lat{ln};
      run_mesh(ln, keys, rate, &lat);
      if (auto* series = std::getenv("EVMESH_BENCH_SERIES"))
        lat.write_series(
          (std::string{series} + "." + std::to_string(static_cast<long>(rate)))
            .c_str());
      auto p = lat.percentiles();
      std::printf("evmesh inproc latency at a fixed %.0f msg/s, %llu "
                  "messages: p50 %.0f µs, p99 %.0f µs, p99.9 %.0f µs\n",
                  rate, static_cast<unsigned long long>(ln), p[0], p[1], p[2]);
      json.latency("evmesh inproc @ fixed rate", rate, lat, ln);
    }
    return 0;
  }
  if (mode == "soak")
    return run_soak(soak_rate, soak_secs, keep, keys, json);
  if (mode == "mesh") {
    // Only the evmesh row, once: for profilers (perf record -g).
    auto r = run_mesh(n, keys);
    eb::print_row("evmesh inproc, guarantees on", r, 0);
    return 0;
  }
  if (mode != "throughput") {
    std::fprintf(stderr,
                 "unknown --mode %s (throughput|mesh|memory|soak|latency)\n",
                 mode.c_str());
    return 2;
  }
  std::vector<eb::result> hop, naive_runs, mesh_runs;
  for (int r = 0; r < runs; ++r) {
    hop.push_back(run_one_hop(5 * n));
    naive_runs.push_back(run_naive_pipeline(n));
    mesh_runs.push_back(run_mesh(n, keys));
  }
  auto one = eb::median_of(hop);
  auto naive = eb::median_of(naive_runs);
  auto mesh = eb::median_of(mesh_runs);
  std::printf("messages %llu, keys %llu, runs %d (medians), cores %u, "
              "concurrency %u, load average %.2f\n",
              static_cast<unsigned long long>(n),
              static_cast<unsigned long long>(keys), runs,
              std::thread::hardware_concurrency(), concurrency,
              eb::load_average());
  eb::print_row("raw CAF, one hop", one, 0);
  eb::print_row("naive CAF pipeline (4 hops, no framework work)", naive, 0);
  eb::print_row("evmesh inproc, guarantees on", mesh, naive.rate);
  json.throughput("raw CAF one hop", 5 * n, 0, 1, one, 0, runs);
  json.throughput("naive CAF pipeline", n, 0, 1, naive, 0, runs);
  json.throughput("evmesh inproc, guarantees on", n, keys, concurrency, mesh,
                  naive.rate, runs);
  // Latency at half the measured maximum rate, over about 3 seconds.
  auto half = mesh.rate / 2;
  auto lat_n = static_cast<uint64_t>(std::max(1000.0, half * 3));
  eb::latency_recorder lat{lat_n};
  run_mesh(lat_n, keys, half, &lat);
  eb::print_latency("evmesh inproc", half, lat, lat_n);
  json.latency("evmesh inproc, guarantees on", half, lat, lat_n);
  return 0;
}
