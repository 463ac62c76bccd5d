// End-to-end consume throughput on RabbitMQ: evmesh against a bare
// rabbitmq-c consumer and a NestJS @EventPattern consumer, measured in the
// same run on the same broker.
//
//   e2e_amqp [messages] [keys] [runs] [--json FILE] [--nest-script PATH]
//            [--node-path DIR] [--no-nest 1] [--no-latency 1]
//            [--latency-rate R] [--only ROW]
//
// --no-nest 1 skips the NestJS row, --no-latency 1 the latency rows,
// --only bare|transport|evmesh|nest runs that throughput row alone (for
// profiling; implies --no-latency 1); --idle-workers (or the environment's
// EVMESH_BENCH_IDLE_WORKERS) sets the evmesh rows' runtime.idle_workers
// (default: the runtime's).
//
// Starts its own rabbitmq-server (test/integration/amqp/rabbitmq_server.hpp:
// free loopback ports, temp dir, always stopped). Per run and consumer a
// fresh durable classic queue is preloaded through the default exchange with
// `messages` persistent ~200-byte native envelopes (`keys` ordering keys);
// the NestJS queue gets the same envelopes wrapped as NestJS events
// {"pattern":"bench.created","data":ENVELOPE}. The clock starts at the first
// message consumed and stops when the last one is acked (the broker's queue
// is then checked empty for the bare consumer). CPU is the consumer
// process's only — rabbitmq-server's is excluded:
//
// - bare rabbitmq-c: basic.qos prefetch 1000, basic.consume with manual
//   acks, one basic.ack per message, nothing decoded; getrusage of this
//   process over the drain.
// - the amqp:// transport alone (no runtime): one thread polls up to 256
//   and acks each message, sleeping on the transport's wakeup when a poll
//   comes back short; splits the evmesh row's CPU into transport and
//   runtime.
// - evmesh: consumer_runtime on amqp://…?queue=Q&prefetch=1000 with
//   guarantees on: memory dedupe (claim + commit per message), a span per
//   attempt to a counting sink, per-key ordering, concurrency 2x cores;
//   getrusage from the first handler call to the last ack.
// - NestJS (bench/peers/nestjs/consume.js, node): @EventPattern handler,
//   noAck false, channel.ack per message, prefetch 1000; its rate from its
//   own clock (first event to last ack), its CPU from /proc/PID/stat between
//   "listening" and "done". Skipped with a hint when node or the npm
//   packages are missing (scripts/bench-amqp.sh installs them).
//
// Every run prints a line with each row's msg/s, CPU µs/msg and context
// switches per message ("cs/msg", the consumer process's voluntary +
// involuntary ones over the drain: each thread sleep and wake-up is one).
//
// Then the evmesh latency at about half its measured rate: a publisher paced
// in 1 ms ticks on a second connection while the runtime consumes; latency =
// publish call to handler call. The same for the bare consumer at half its
// rate (latency = publish call to receipt; the id is found in the bytes).
// --latency-rate R offers R msg/s to both instead (the broker also carries
// the publisher, so rows at different rates are not comparable).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "evmesh/amqp.hpp"
#include "evmesh/consumer.hpp"
#include "evmesh/memory_store.hpp"

#include "amqp/rabbitmq_server.hpp"
#include "common.hpp"

using namespace std::chrono;
namespace eb = evmesh::bench;

#ifndef EVMESH_BENCH_NEST_SCRIPT
#  define EVMESH_BENCH_NEST_SCRIPT ""
#endif
#ifndef EVMESH_BENCH_NEST_MODULES
#  define EVMESH_BENCH_NEST_MODULES ""
#endif

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "e2e_amqp: %s\n", what.c_str());
  std::exit(1);
}

/// Context switches (voluntary + involuntary) of this process so far: every
/// sleep and wake-up of a thread is one, the main cost of handing messages
/// between threads on a busy machine.
double ctx_switches() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_nvcsw + ru.ru_nivcsw);
}

/// The same without the calling thread's own (the evmesh row's main thread
/// only sleeps in 1 ms steps while it waits for the runtime).
double other_threads_ctx_switches() {
  rusage ru{};
  getrusage(RUSAGE_THREAD, &ru);
  return ctx_switches() - static_cast<double>(ru.ru_nvcsw + ru.ru_nivcsw);
}

/// `runtime.idle_workers` of the evmesh rows (`--idle-workers poll|sleep`,
/// else EVMESH_BENCH_IDLE_WORKERS, else the runtime's default).
std::string idle_workers;

/// Context switches per message of the last run_* call.
double last_ctx_per_msg = 0;

void check(amqp_rpc_reply_t r, const char* what) {
  if (r.reply_type != AMQP_RESPONSE_NORMAL)
    die(std::string{what} + " failed (reply type "
        + std::to_string(r.reply_type) + ")");
}

/// A plain rabbitmq-c connection with channel 1 open.
class conn {
public:
  explicit conn(uint16_t port) {
    c_ = amqp_new_connection();
    auto* sock = amqp_tcp_socket_new(c_);
    if (sock == nullptr || amqp_socket_open(sock, "127.0.0.1", port) != 0)
      die("cannot connect to the broker");
    check(amqp_login(c_, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest",
                     "guest"),
          "login");
    amqp_channel_open(c_, 1);
    check(amqp_get_rpc_reply(c_), "channel.open");
  }
  ~conn() {
    amqp_channel_close(c_, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(c_, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(c_);
  }
  conn(const conn&) = delete;
  conn& operator=(const conn&) = delete;

  amqp_connection_state_t get() const {
    return c_;
  }

  /// Declares the durable queue `q` (or checks it with `passive`); returns
  /// its message count.
  uint32_t declare(const std::string& q, bool passive = false) {
    auto* ok = amqp_queue_declare(c_, 1, amqp_cstring_bytes(q.c_str()),
                                  passive ? 1 : 0, 1, 0, 0, amqp_empty_table);
    check(amqp_get_rpc_reply(c_), "queue.declare");
    return ok->message_count;
  }

  /// Publishes `body` persistently to queue `q` (default exchange).
  void publish(const std::string& q, const std::string& body) {
    amqp_basic_properties_t props{};
    props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG;
    props.delivery_mode = 2;
    props.content_type = amqp_cstring_bytes("application/json");
    amqp_bytes_t b{body.size(), const_cast<char*>(body.data())};
    if (amqp_basic_publish(c_, 1, amqp_empty_bytes,
                           amqp_cstring_bytes(q.c_str()), 0, 0, &props, b)
        != AMQP_STATUS_OK)
      die("publish failed");
  }

  /// Declares `q` and fills it with `bodies`; waits until the broker counts
  /// them all.
  void preload(const std::string& q, const std::vector<std::string>& bodies) {
    declare(q);
    for (auto& b : bodies)
      publish(q, b);
    auto deadline = steady_clock::now() + minutes{2};
    while (declare(q, true) < bodies.size()) {
      if (steady_clock::now() > deadline)
        die("the broker did not count the preloaded messages of " + q);
      std::this_thread::sleep_for(milliseconds{20});
    }
  }

private:
  amqp_connection_state_t c_ = nullptr;
};

eb::result run_bare(uint16_t port, const std::string& q,
                    const std::vector<std::string>& bodies) {
  conn c{port};
  c.preload(q, bodies);
  auto* cs = c.get();
  amqp_basic_qos(cs, 1, 0, 1000, 0);
  check(amqp_get_rpc_reply(cs), "basic.qos");
  amqp_basic_consume(cs, 1, amqp_cstring_bytes(q.c_str()), amqp_empty_bytes, 0,
                     0, 0, amqp_empty_table);
  check(amqp_get_rpc_reply(cs), "basic.consume");
  const uint64_t n = bodies.size();
  uint64_t got = 0;
  double cpu0 = 0;
  double ctx0 = 0;
  steady_clock::time_point start;
  auto deadline = steady_clock::now() + minutes{3};
  while (got < n) {
    if (steady_clock::now() > deadline)
      die("bare consumer did not finish within 3 minutes");
    amqp_maybe_release_buffers(cs);
    amqp_envelope_t env;
    timeval tv{1, 0};
    auto r = amqp_consume_message(cs, &env, &tv, 0);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
      if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION
          && r.library_error == AMQP_STATUS_TIMEOUT)
        continue;
      die("consume failed");
    }
    if (got == 0) {
      cpu0 = eb::cpu_seconds();
      ctx0 = ctx_switches();
      start = steady_clock::now();
    }
    ++got;
    if (amqp_basic_ack(cs, 1, env.delivery_tag, 0) != AMQP_STATUS_OK)
      die("ack failed");
    amqp_destroy_envelope(&env);
  }
  // The acks precede this declare on the channel: once it answers, the
  // broker has processed them all.
  auto left = c.declare(q, true);
  auto secs = duration<double>(steady_clock::now() - start).count();
  auto cpu = eb::cpu_seconds() - cpu0;
  last_ctx_per_msg = (ctx_switches() - ctx0) / static_cast<double>(n);
  if (left != 0)
    std::fprintf(stderr, "bare: %u messages left in %s\n", left, q.c_str());
  return {static_cast<double>(n) / secs, 1e6 * cpu / static_cast<double>(n)};
}

/// The bare consumer's latency: `bodies` published at `rate` to queue `q`
/// from a second connection (after a warm-up message that shows the consumer
/// is subscribed) while this thread consumes and acks as in run_bare;
/// latency = publish call to the consumer's receipt.
void run_bare_latency(uint16_t port, const std::string& q,
                      const std::vector<std::string>& bodies, double rate,
                      eb::latency_recorder& lat) {
  conn c{port};
  c.declare(q);
  auto* cs = c.get();
  amqp_basic_qos(cs, 1, 0, 1000, 0);
  check(amqp_get_rpc_reply(cs), "basic.qos");
  amqp_basic_consume(cs, 1, amqp_cstring_bytes(q.c_str()), amqp_empty_bytes, 0,
                     0, 0, amqp_empty_table);
  check(amqp_get_rpc_reply(cs), "basic.consume");
  std::atomic<bool> warm{false};
  std::thread pacer{[&] {
    conn p{port};
    evmesh::envelope w;
    w.topic = "bench.created";
    w.id = "warmup";
    w.payload = boost::json::object{};
    p.publish(q, evmesh::encode_envelope(w));
    while (!warm)
      std::this_thread::sleep_for(milliseconds{1});
    eb::paced(bodies.size(), rate, [&](size_t i) {
      lat.sent(i);
      p.publish(q, bodies[i]);
    });
  }};
  uint64_t got = 0;
  auto deadline = steady_clock::now() + minutes{3};
  while (got < bodies.size() + 1 && steady_clock::now() < deadline) {
    amqp_maybe_release_buffers(cs);
    amqp_envelope_t env;
    timeval tv{1, 0};
    auto r = amqp_consume_message(cs, &env, &tv, 0);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
      if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION
          && r.library_error == AMQP_STATUS_TIMEOUT)
        continue;
      die("consume failed");
    }
    std::string_view bytes{static_cast<const char*>(env.message.body.bytes),
                           env.message.body.len};
    auto id = eb::envelope_id(bytes);
    if (id == "warmup")
      warm = true;
    else
      lat.seen(id);
    ++got;
    amqp_basic_ack(cs, 1, env.delivery_tag, 0);
    amqp_destroy_envelope(&env);
  }
  warm = true;
  pacer.join();
  if (got < bodies.size() + 1)
    std::fprintf(stderr, "bare latency run: only %llu messages in 3 minutes\n",
                 static_cast<unsigned long long>(got));
}

/// The transport alone, without the runtime: one thread polls up to 256,
/// acks each message and, when a poll comes back short, sleeps until the
/// transport's wakeup (bounded). The clock runs from the first message to
/// the last ack call; close() (not measured) then flushes the acks, and the
/// queue is checked empty. Splits the evmesh row's CPU into transport and
/// runtime.
eb::result run_transport(const std::string& url, uint16_t port,
                         const std::string& q, uint64_t n) {
  auto t = evmesh::make_transport(url + "?queue=" + q + "&prefetch=1000",
                                  {{}, "bench"});
  if (!t)
    die("transport: " + evmesh::render(t.error()));
  std::mutex m;
  std::condition_variable cv;
  bool woken = false;
  (*t)->set_wakeup([&] {
    std::lock_guard g{m};
    woken = true;
    cv.notify_one();
  });
  if (auto err = (*t)->subscribe({">"}))
    die("transport subscribe: " + evmesh::render(err));
  std::vector<evmesh::raw_message> buf;
  uint64_t got = 0;
  double cpu0 = 0;
  double ctx0 = 0;
  steady_clock::time_point start;
  auto deadline = steady_clock::now() + minutes{3};
  while (got < n) {
    if (steady_clock::now() > deadline)
      die("transport run did not finish within 3 minutes");
    buf.clear();
    {
      std::lock_guard g{m};
      woken = false;
    }
    if (auto err = (*t)->poll(256, buf))
      die("poll: " + evmesh::render(err));
    if (!buf.empty() && got == 0) {
      cpu0 = eb::cpu_seconds();
      ctx0 = ctx_switches();
      start = steady_clock::now();
    }
    for (auto& msg : buf)
      if (auto err = (*t)->ack(msg.tag))
        die("ack: " + evmesh::render(err));
    got += buf.size();
    if (buf.size() < 256) {
      std::unique_lock g{m};
      cv.wait_for(g, milliseconds{100}, [&] { return woken; });
    }
  }
  auto secs = duration<double>(steady_clock::now() - start).count();
  auto cpu = eb::cpu_seconds() - cpu0;
  last_ctx_per_msg = (ctx_switches() - ctx0) / static_cast<double>(n);
  (*t)->close();
  conn c{port};
  if (auto left = c.declare(q, true); left != 0)
    std::fprintf(stderr, "transport: %u messages left in %s\n", left,
                 q.c_str());
  return {static_cast<double>(n) / secs, 1e6 * cpu / static_cast<double>(n)};
}

/// Drains `n` messages of queue `q` (preloaded, or published by `pace` once
/// the runtime consumes).
template <class Pace>
eb::result run_evmesh(const std::string& url, const std::string& q, uint64_t n,
                      Pace pace, eb::latency_recorder* lat = nullptr) {
  eb::reset_counters(lat);
  evmesh::runtime_config cfg;
  cfg.node_name = "bench";
  cfg.transport_url = url + "?queue=" + q + "&prefetch=1000";
  cfg.dedupe_url = "none"; // the container's memory store is used instead
  cfg.dead_letter_url = "none";
  cfg.trace_sink = "none";
  cfg.defaults.concurrency = 2 * std::thread::hardware_concurrency();
  cfg.max_in_flight = 8192;
  cfg.poll_batch = 512;
  eb::runtime_overrides_from_env(cfg);
  if (!idle_workers.empty())
    cfg.idle_workers = idle_workers; // else the runtime's default
  auto sink = std::make_shared<eb::counting_sink>();
  evmesh::container_builder b;
  b.add<evmesh::idempotency_store>(
    std::make_shared<evmesh::memory_idempotency_store>(16));
  b.add<evmesh::span_sink>(sink);
  evmesh::handler_descriptor h;
  h.consumer = "bench";
  h.pattern = ">";
  h.fn = &eb::counting_handler;
  evmesh::consumer_runtime rt{cfg, b.freeze()};
  rt.set_handlers({&h});
  if (auto err = rt.start())
    die("start failed: " + evmesh::render(err));
  auto deadline = steady_clock::now() + minutes{3};
  double ctx0 = -1;
  auto wait = [&](auto done) {
    while (!done()) {
      if (ctx0 < 0 && eb::handled.load() > 0)
        ctx0 = other_threads_ctx_switches(); // within 1 ms of the first
      if (steady_clock::now() > deadline)
        die("evmesh run did not finish within 3 minutes (handled "
            + std::to_string(eb::handled.load()) + " of " + std::to_string(n)
            + ")");
      std::this_thread::sleep_for(milliseconds{1});
    }
  };
  uint64_t expect = pace(wait);
  wait([&] { return rt.stats().acked >= expect; });
  auto end = eb::now_ns();
  auto cpu = eb::cpu_seconds() - eb::first_handled_cpu.load();
  auto secs = static_cast<double>(end - eb::first_handled_ns.load()) / 1e9;
  last_ctx_per_msg = (other_threads_ctx_switches() - std::max(ctx0, 0.0))
                     / static_cast<double>(n);
  rt.stop(seconds{5});
  eb::recorder = nullptr;
  if (eb::handled < expect || sink->spans < expect)
    std::fprintf(stderr, "mismatch: handled %llu spans %llu of %llu\n",
                 static_cast<unsigned long long>(eb::handled.load()),
                 static_cast<unsigned long long>(sink->spans.load()),
                 static_cast<unsigned long long>(expect));
  return {static_cast<double>(n) / secs, 1e6 * cpu / static_cast<double>(n)};
}

bool exists(const std::string& p) {
  std::error_code ec;
  return !p.empty() && std::filesystem::exists(p, ec);
}

std::string slurp(const std::string& path) {
  std::ifstream in{path};
  return {std::istreambuf_iterator<char>{in}, {}};
}

/// Runs the NestJS peer on a preloaded queue; nullopt-like {0, 0} on error.
eb::result run_nest(const std::string& url, uint16_t port, const std::string& q,
                    const std::vector<std::string>& bodies,
                    const std::string& script, const std::string& modules) {
  conn c{port};
  c.preload(q, bodies);
  char tmpl[] = "/tmp/evmesh-bench-nest-XXXXXX";
  if (mkdtemp(tmpl) == nullptr)
    die("mkdtemp failed");
  std::string dir = tmpl;
  auto out = dir + "/out";
  auto n = std::to_string(bodies.size());
  auto pid = fork();
  if (pid < 0)
    die("fork failed");
  if (pid == 0) {
    // node dies with this process, whatever happens to it.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    setenv("NODE_PATH", modules.c_str(), 1);
    execlp("node", "node", script.c_str(), url.c_str(), q.c_str(), n.c_str(),
           out.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  auto deadline = steady_clock::now() + minutes{3};
  auto alive = [&] {
    int status = 0;
    return waitpid(pid, &status, WNOHANG) == 0;
  };
  auto wait_file = [&](const std::string& f) {
    while (!exists(f)) {
      if (!alive())
        return false;
      if (steady_clock::now() > deadline) {
        kill(pid, SIGKILL);
        waitpid(pid, nullptr, 0);
        return false;
      }
      std::this_thread::sleep_for(milliseconds{1});
    }
    return true;
  };
  eb::result r;
  if (wait_file(out + ".ready")) {
    auto cpu0 = eb::proc_cpu_seconds(pid);
    if (wait_file(out + ".done")) {
      auto cpu1 = eb::proc_cpu_seconds(pid);
      boost::system::error_code ec;
      auto parsed = boost::json::parse(slurp(out + ".done"), ec);
      if (ec || !parsed.is_object() || !parsed.as_object().contains("secs")) {
        kill(pid, SIGKILL);
        waitpid(pid, nullptr, 0);
        std::fprintf(stderr, "NestJS peer wrote a bad result file\n");
        return r;
      }
      auto& done = parsed.as_object();
      auto secs = done.at("secs").to_number<double>();
      r.rate = static_cast<double>(bodies.size()) / secs;
      r.cpu_us = 1e6 * (cpu1 - cpu0) / static_cast<double>(bodies.size());
      auto own = done.at("cpu_us").to_number<double>()
                 / static_cast<double>(bodies.size());
      std::printf("  (NestJS run: %.0f msg/s, %.1f µs CPU/msg from /proc, "
                  "%.1f µs by process.cpuUsage from its first event)\n",
                  r.rate, r.cpu_us, own);
      kill(pid, SIGTERM);
      waitpid(pid, nullptr, 0);
    }
  }
  if (r.rate == 0)
    std::fprintf(stderr, "NestJS peer failed (node %s %s ...)\n",
                 script.c_str(), url.c_str());
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return r;
}

} // namespace

const char* const usage
  = "usage: e2e_amqp [messages=50000] [keys=1000] [runs=3] [--json FILE]\n"
    "       [--nest-script PATH] [--node-path DIR] [--no-nest 1]\n"
    "       [--no-latency 1] [--latency-rate R]\n"
    "       [--only bare|transport|evmesh|nest] [--idle-workers poll|sleep]\n"
    "Starts its own rabbitmq-server; bare rabbitmq-c vs evmesh vs the\n"
    "NestJS peer, medians of `runs`, then latency at half the rates (or at\n"
    "R msg/s for both).\n";

int main(int argc, char** argv) {
  if (eb::wants_help(argc, argv)) {
    std::fputs(usage, stdout);
    return 0;
  }
  bool skip_nest = eb::take_option(argc, argv, "no-nest") == "1";
  bool skip_latency = eb::take_option(argc, argv, "no-latency") == "1";
  // One offered rate for both latency rows (msg/s); default: half of each
  // row's own measured maximum.
  auto latency_rate
    = std::stod(eb::take_option(argc, argv, "latency-rate", "0"));
  auto only = eb::take_option(argc, argv, "only");
  if (auto* env = std::getenv("EVMESH_BENCH_IDLE_WORKERS"))
    idle_workers = env;
  idle_workers = eb::take_option(argc, argv, "idle-workers", idle_workers);
  if (!only.empty() && only != "bare" && only != "transport" && only != "evmesh"
      && only != "nest")
    die("--only takes bare, transport, evmesh or nest");
  auto want = [&](const char* row) { return only.empty() || only == row; };
  if (!want("nest"))
    skip_nest = true;
  if (!only.empty())
    skip_latency = true;
  auto json_path = eb::take_option(argc, argv, "json");
  auto script = eb::take_option(argc, argv, "nest-script",
                                EVMESH_BENCH_NEST_SCRIPT);
  auto modules = eb::take_option(argc, argv, "node-path",
                                 EVMESH_BENCH_NEST_MODULES);
  eb::reject_unknown_options(argc, argv, usage);
  uint64_t n = eb::positional_count(argc, argv, 1, 50'000, usage);
  uint64_t keys = eb::positional_count(argc, argv, 2, 1000, usage);
  int runs = static_cast<int>(eb::positional_count(argc, argv, 3, 3, usage));
  spdlog::set_level(spdlog::level::warn);
  if (!evmesh::testing::rabbitmq_server::available())
    die("rabbitmq-server is not installed (scripts/install-deps.sh "
        "--with-servers)");
  bool nest = !skip_nest && exists(script)
              && exists(modules + "/@nestjs/microservices")
              && std::system("command -v node >/dev/null 2>&1") == 0;
  if (!nest && !skip_nest)
    std::printf("NestJS row skipped: needs node and the npm packages in %s "
                "(scripts/bench-amqp.sh installs them)\n",
                modules.c_str());
  evmesh::register_amqp_transport();
  eb::json_out json{json_path, "e2e_amqp"};
  evmesh::testing::rabbitmq_server server;
  const auto port = server.port();
  auto url = server.url();
  const std::string topic = "bench.created";
  auto bodies = eb::make_payloads(topic, n, keys);
  std::vector<std::string> nest_bodies;
  if (nest)
    for (auto& b : bodies)
      nest_bodies.push_back(R"({"pattern":"bench.created","data":)" + b + "}");
  std::vector<eb::result> bare, mesh, nestjs, transport;
  std::vector<double> bare_ctx, transport_ctx, mesh_ctx;
  for (int r = 0; r < runs; ++r) {
    auto no = std::to_string(r);
    if (want("bare")) {
      bare.push_back(run_bare(port, "bare" + no, bodies));
      bare_ctx.push_back(last_ctx_per_msg);
    }
    if (want("transport")) {
      {
        conn c{port};
        c.preload("transport" + no, bodies);
      }
      transport.push_back(run_transport(url, port, "transport" + no, n));
      transport_ctx.push_back(last_ctx_per_msg);
    }
    if (want("evmesh")) {
      {
        conn c{port};
        c.preload("evmesh" + no, bodies);
      }
      mesh.push_back(
        run_evmesh(url, "evmesh" + no, n, [&](auto&&) { return n; }));
      mesh_ctx.push_back(last_ctx_per_msg);
    }
    if (nest)
      nestjs.push_back(
        run_nest(url, port, "nest" + no, nest_bodies, script, modules));
    auto last = [](const std::vector<eb::result>& v) {
      return v.empty() ? eb::result{} : v.back();
    };
    auto ctx = [](const std::vector<double>& v) {
      return v.empty() ? 0.0 : v.back();
    };
    std::printf("run %d (load %.2f): bare %.0f msg/s %.2f us/msg %.2f cs/msg"
                " | transport alone %.0f msg/s %.2f us/msg %.2f cs/msg"
                " | evmesh %.0f msg/s %.2f us/msg %.2f cs/msg"
                " | NestJS %.0f msg/s %.2f us/msg\n",
                r, eb::load_average(), last(bare).rate, last(bare).cpu_us,
                ctx(bare_ctx), last(transport).rate, last(transport).cpu_us,
                ctx(transport_ctx), last(mesh).rate, last(mesh).cpu_us,
                ctx(mesh_ctx), last(nestjs).rate, last(nestjs).cpu_us);
    std::fflush(stdout);
  }
  if (!only.empty())
    return 0; // one row, for profiling: the per-run lines above
  auto m = eb::median_of(mesh);
  auto b = eb::median_of(bare);
  std::printf("messages %llu, keys %llu, runs %d (medians), cores %u, load "
              "average %.2f\n",
              static_cast<unsigned long long>(n),
              static_cast<unsigned long long>(keys), runs,
              std::thread::hardware_concurrency(), eb::load_average());
  auto conc = 2 * std::thread::hardware_concurrency();
  auto tr = eb::median_of(transport);
  eb::print_row("bare rabbitmq-c, prefetch 1000, manual acks", b, b.rate);
  eb::print_row("amqp transport alone, poll 256 + ack each", tr, b.rate);
  eb::print_row("evmesh amqp, memory dedupe", m, b.rate);
  json.throughput("bare rabbitmq-c", n, keys, 1, b, 0, runs);
  json.throughput("amqp transport alone (poll + ack, no runtime)", n, keys, 1,
                  tr, b.rate, runs);
  json.throughput("evmesh amqp, memory dedupe", n, keys, conc, m, b.rate, runs);
  if (nest) {
    auto ns = eb::median_of(nestjs);
    eb::print_row("NestJS @EventPattern, manual ack", ns, b.rate);
    json.throughput("NestJS @EventPattern, manual ack", n, keys, 1, ns, b.rate,
                    runs);
    if (ns.cpu_us > 0)
      std::printf("CPU per message: evmesh %.2fx bare rabbitmq-c, NestJS "
                  "%.2fx evmesh\n",
                  m.cpu_us / b.cpu_us, ns.cpu_us / m.cpu_us);
  }
  if (skip_latency)
    return 0;
  // Latency at about half the evmesh rate, ~3 s of load.
  auto half = latency_rate > 0 ? latency_rate : m.rate / 2;
  auto lat_n = static_cast<uint64_t>(std::max(1000.0, half * 3));
  eb::latency_recorder lat{lat_n};
  auto lat_bodies = eb::make_payloads(topic, lat_n, keys);
  {
    conn c{port};
    c.declare("latency");
  }
  run_evmesh(
    url, "latency", lat_n,
    [&](auto&& wait) {
      conn c{port};
      evmesh::envelope w;
      w.topic = topic;
      w.id = "warmup";
      w.idempotency_key = "warmup";
      w.payload = boost::json::object{};
      c.publish("latency", evmesh::encode_envelope(w));
      wait([] { return eb::handled.load() >= 1; });
      eb::paced(lat_n, half, [&](size_t i) {
        lat.sent(i);
        c.publish("latency", lat_bodies[i]);
      });
      return lat_n + 1;
    },
    &lat);
  eb::print_latency("evmesh amqp", half, lat, lat_n);
  json.latency("evmesh amqp, memory dedupe", half, lat, lat_n);
  {
    auto bare_half = latency_rate > 0 ? latency_rate : b.rate / 2;
    auto bn = static_cast<uint64_t>(std::max(1000.0, bare_half * 3));
    eb::latency_recorder blat{bn};
    run_bare_latency(port, "latency_bare", eb::make_payloads(topic, bn, keys),
                     bare_half, blat);
    eb::print_latency("bare rabbitmq-c", bare_half, blat, bn);
    json.latency("bare rabbitmq-c", bare_half, blat, bn);
  }
  return 0;
}
