// End-to-end throughput of the in-process mesh with guarantees on, against a
// naive CAF pipeline of the same shape measured in the same run.
//
//   e2e_inproc [messages] [keys]
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
#include <thread>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include "evmesh/consumer.hpp"
#include "evmesh/memory_store.hpp"

#include "latency.hpp"

using namespace std::chrono;

namespace {

std::atomic<uint64_t> handled{0};
std::atomic<evmesh::bench::latency_recorder*> recorder{nullptr};

evmesh::outcome bench_handler(evmesh::event_context& ctx) {
  handled.fetch_add(1, std::memory_order_relaxed);
  if (auto* r = recorder.load(std::memory_order_relaxed))
    r->seen(ctx.message().id);
  return evmesh::ok();
}

class counting_sink : public evmesh::span_sink {
public:
  std::atomic<uint64_t> spans{0};
  void record(const evmesh::span_record&) noexcept override {
    spans.fetch_add(1, std::memory_order_relaxed);
  }
};

/// Throughput (msg/s) of draining `n` messages; with `rate` > 0 the
/// messages are published at that rate instead of all at once and `lat`
/// records their latency.
double run_mesh(uint64_t n, uint64_t keys, double rate = 0,
                evmesh::bench::latency_recorder* lat = nullptr) {
  handled = 0;
  evmesh::inproc_broker::get("bench")->reset();
  evmesh::runtime_config cfg;
  cfg.node_name = "bench";
  cfg.transport_url = "inproc://bench";
  cfg.dedupe_url = "none"; // the container's memory store is used instead
  cfg.dead_letter_url = "none";
  cfg.trace_sink = "none";
  cfg.defaults.concurrency = 2 * std::thread::hardware_concurrency();
  cfg.max_in_flight = 8192;
  cfg.poll_batch = 512;
  auto sink = std::make_shared<counting_sink>();
  evmesh::container_builder b;
  b.add<evmesh::idempotency_store>(
    std::make_shared<evmesh::memory_idempotency_store>(16));
  b.add<evmesh::span_sink>(sink);
  evmesh::handler_descriptor h;
  h.consumer = "bench";
  h.pattern = "bench.*";
  h.fn = &bench_handler;
  evmesh::consumer_runtime rt{cfg, b.freeze()};
  rt.set_handlers({&h});
  if (auto err = rt.start()) {
    std::fprintf(stderr, "start failed: %s\n", evmesh::render(err).c_str());
    std::exit(1);
  }
  auto broker = evmesh::inproc_broker::get("bench");
  // Pre-encode the messages so the producer is not what we measure.
  std::vector<std::string> bytes;
  bytes.reserve(n);
  for (uint64_t i = 0; i < n; ++i) {
    evmesh::envelope e;
    e.topic = "bench.created";
    e.id = "m" + std::to_string(i);
    e.idempotency_key = e.id;
    e.key = "k" + std::to_string(i % keys);
    e.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    e.payload = boost::json::object{{"order_id", e.id}, {"quantity", 1}};
    bytes.push_back(evmesh::encode_envelope(e));
  }
  recorder = lat;
  auto start = steady_clock::now();
  if (rate > 0) {
    evmesh::bench::paced(n, rate, [&](size_t i) {
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
  rt.stop(seconds{5});
  recorder = nullptr;
  if (handled != n || sink->spans < n)
    std::fprintf(stderr, "mismatch: handled %llu spans %llu\n",
                 static_cast<unsigned long long>(handled.load()),
                 static_cast<unsigned long long>(sink->spans.load()));
  return static_cast<double>(n) / secs;
}

using work_atom = caf::atom_constant<caf::atom("work")>;
using done_atom = caf::atom_constant<caf::atom("done")>;

double run_naive_pipeline(uint64_t n) {
  caf::actor_system_config cfg;
  cfg.set("logger.verbosity", caf::atom("quiet"));
  caf::actor_system sys{cfg};
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
  auto start = steady_clock::now();
  for (uint64_t i = 0; i < n; ++i)
    caf::anon_send(supervisor, work_atom::value, i);
  while (received < n)
    std::this_thread::sleep_for(microseconds{200});
  return static_cast<double>(n)
         / duration<double>(steady_clock::now() - start).count();
}

} // namespace

int main(int argc, char** argv) {
  uint64_t n = argc > 1 ? std::stoull(argv[1]) : 200000;
  uint64_t keys = argc > 2 ? std::stoull(argv[2]) : 1000;
  spdlog::set_level(spdlog::level::warn);
  auto naive = run_naive_pipeline(n);
  auto mesh = run_mesh(n, keys);
  std::printf("messages %llu, keys %llu, cores %u\n",
              static_cast<unsigned long long>(n),
              static_cast<unsigned long long>(keys),
              std::thread::hardware_concurrency());
  std::printf("naive CAF pipeline (4 hops, no framework work): %10.0f msg/s\n",
              naive);
  std::printf("evmesh inproc, guarantees on:                   %10.0f msg/s "
              "(%.0f%% of naive)\n",
              mesh, 100.0 * mesh / naive);
  // Latency at half the measured maximum rate, over about 3 seconds.
  auto half = mesh / 2;
  auto lat_n = static_cast<uint64_t>(std::max(1000.0, half * 3));
  evmesh::bench::latency_recorder lat{lat_n};
  run_mesh(lat_n, keys, half, &lat);
  auto p = lat.percentiles();
  std::printf("latency at %.0f msg/s (half of max), %llu messages: p50 %.0f "
              "µs, p99 %.0f µs, p99.9 %.0f µs\n",
              half, static_cast<unsigned long long>(lat_n), p[0], p[1], p[2]);
  return 0;
}
