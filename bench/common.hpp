// Shared pieces of the end-to-end benchmarks: the counting handler and span
// sink, CPU accounting, pre-encoded payloads, medians, the machine's load
// average and `--json FILE` output (one JSON object per result row).
#pragma once

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <boost/json.hpp>
#include <malloc.h>
#include <sys/resource.h>
#include <unistd.h>

#include "evmesh/consumer.hpp"

#include "latency.hpp"

namespace evmesh::bench {

/// Handler calls and the latency recorder of the run in progress.
inline std::atomic<uint64_t> handled{0};
inline std::atomic<latency_recorder*> recorder{nullptr};
/// Steady-clock time (ns) and process CPU seconds at the first handler call
/// since the last reset (so start-up and group joins are not measured).
inline std::atomic<int64_t> first_handled_ns{0};
inline std::atomic<double> first_handled_cpu{0};

double cpu_seconds();

inline void reset_counters(latency_recorder* lat = nullptr) {
  handled = 0;
  first_handled_ns = 0;
  first_handled_cpu = 0;
  recorder = lat;
}

inline outcome counting_handler(event_context& ctx) {
  if (handled.fetch_add(1, std::memory_order_relaxed) == 0) {
    first_handled_cpu = cpu_seconds();
    first_handled_ns = now_ns();
  }
  if (auto* r = recorder.load(std::memory_order_relaxed))
    r->seen(ctx.message().id);
  return ok();
}

class counting_sink : public span_sink {
public:
  std::atomic<uint64_t> spans{0};
  void record(const span_record&) noexcept override {
    spans.fetch_add(1, std::memory_order_relaxed);
  }
};

/// CPU seconds (user + system) of every thread of this process.
inline double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  auto tv = [](timeval t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
  };
  return tv(ru.ru_utime) + tv(ru.ru_stime);
}

/// CPU seconds (user + system) of process `pid` from /proc/PID/stat; -1 when
/// unreadable.
inline double proc_cpu_seconds(long pid) {
  std::ifstream in{"/proc/" + std::to_string(pid) + "/stat"};
  std::string text;
  std::getline(in, text);
  auto close = text.rfind(')');
  if (close == std::string::npos)
    return -1;
  // Fields after the command: state(3) ... utime(14) stime(15).
  std::vector<std::string> f;
  size_t pos = close + 2;
  while (pos < text.size() && f.size() < 13) {
    auto sp = text.find(' ', pos);
    f.push_back(text.substr(pos, sp - pos));
    if (sp == std::string::npos)
      break;
    pos = sp + 1;
  }
  if (f.size() < 13)
    return -1;
  auto hz = static_cast<double>(sysconf(_SC_CLK_TCK));
  return (std::stod(f[11]) + std::stod(f[12])) / hz;
}

/// Resident set size of this process in bytes (/proc/self/statm).
inline size_t rss_bytes() {
  std::ifstream in{"/proc/self/statm"};
  size_t size = 0, resident = 0;
  in >> size >> resident;
  return resident * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

/// Heap bytes in use (glibc's mallinfo2 over all arenas, including chunks
/// served by mmap): unlike RSS, it does not count memory that was freed but
/// kept by the allocator, nor miss memory reused after a free.
inline size_t heap_bytes() {
  auto mi = mallinfo2();
  return mi.uordblks + mi.hblkhd;
}

/// Tells `perf record --control fifo:FILE -D -1` (FILE in
/// EVMESH_BENCH_PERF_CTL) to sample only while a timed phase runs.
inline void perf_control(bool on) {
  static FILE* ctl = [] {
    auto* path = std::getenv("EVMESH_BENCH_PERF_CTL");
    return path != nullptr ? std::fopen(path, "w") : nullptr;
  }();
  if (ctl != nullptr) {
    std::fputs(on ? "enable\n" : "disable\n", ctl);
    std::fflush(ctl);
  }
}

/// Runtime settings for A/B runs of the evmesh rows:
/// EVMESH_BENCH_SCHEDULER_THREADS=N sets runtime.scheduler_threads (0 or
/// unset: one per core), EVMESH_BENCH_IDLE_STEAL_US=N sets
/// runtime.idle_steal_interval to N microseconds.
inline void runtime_overrides_from_env(runtime_config& cfg) {
  if (auto* n = std::getenv("EVMESH_BENCH_SCHEDULER_THREADS"))
    cfg.scheduler_threads = static_cast<size_t>(std::strtoul(n, nullptr, 10));
  if (auto* us = std::getenv("EVMESH_BENCH_IDLE_STEAL_US"))
    cfg.idle_steal_interval
      = std::chrono::microseconds{std::strtol(us, nullptr, 10)};
}

/// The 1-minute load average (/proc/loadavg).
inline double load_average() {
  std::ifstream in{"/proc/loadavg"};
  double one = -1;
  in >> one;
  return one;
}

/// `messages` pre-encoded native envelopes (~200 bytes) on `topic`, ids
/// "m<i>", ordering keys "k<i % keys>".
inline std::vector<std::string> make_payloads(const std::string& topic,
                                              uint64_t n, uint64_t keys) {
  std::vector<std::string> out;
  out.reserve(n);
  for (uint64_t i = 0; i < n; ++i) {
    envelope e;
    e.topic = topic;
    e.id = "m" + std::to_string(i);
    e.idempotency_key = topic + ":" + e.id;
    e.key = "k" + std::to_string(i % keys);
    e.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    e.payload = boost::json::object{{"order_id", e.id}, {"quantity", 1}};
    out.push_back(encode_envelope(e));
  }
  return out;
}

/// The `id` of a native envelope, found without decoding it ("" if none):
/// what the bare clients' latency rows use to recognise a message.
inline std::string_view envelope_id(std::string_view bytes) {
  constexpr std::string_view tag = "\"id\":\"";
  auto at = bytes.find(tag);
  if (at == std::string_view::npos)
    return {};
  auto from = at + tag.size();
  auto to = bytes.find('"', from);
  if (to == std::string_view::npos)
    return {};
  return bytes.substr(from, to - from);
}

inline double median(std::vector<double> xs) {
  if (xs.empty())
    return 0;
  std::sort(xs.begin(), xs.end());
  return xs[xs.size() / 2];
}

/// One measured drain.
struct result {
  double rate = 0;   // msg/s
  double cpu_us = 0; // CPU µs per message
};

inline result median_of(const std::vector<result>& rs) {
  std::vector<double> a, b;
  for (auto& r : rs) {
    a.push_back(r.rate);
    b.push_back(r.cpu_us);
  }
  return {median(a), median(b)};
}

/// Removes `--NAME VALUE` from argv; returns VALUE or `fallback`.
inline std::string take_option(int& argc, char** argv, const std::string& name,
                               std::string fallback = {}) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (argv[i] == "--" + name) {
      std::string v = argv[i + 1];
      for (int j = i; j + 2 <= argc; ++j)
        argv[j] = argv[j + 2];
      argc -= 2;
      return v;
    }
  }
  return fallback;
}

/// After every `take_option`: exits with status 2 and `usage` on stderr if
/// an option is left over (a misspelt or unknown `--NAME`), instead of
/// running with defaults the caller did not ask for.
inline void reject_unknown_options(int argc, char** argv, const char* usage) {
  for (int i = 1; i < argc; ++i) {
    if (std::string_view{argv[i]}.substr(0, 2) == "--") {
      std::fprintf(stderr, "unknown option %s\n%s", argv[i], usage);
      std::exit(2);
    }
  }
}

/// The positional argument `argv[i]` as a positive count, or `fallback` when
/// absent; exits with status 2 and `usage` if it is not a positive integer.
inline uint64_t positional_count(int argc, char** argv, int i,
                                 uint64_t fallback, const char* usage) {
  if (i >= argc)
    return fallback;
  std::string_view text{argv[i]};
  uint64_t x = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), x);
  if (ec != std::errc{} || end != text.data() + text.size() || x == 0) {
    std::fprintf(stderr, "not a positive count: %s\n%s", argv[i], usage);
    std::exit(2);
  }
  return x;
}

/// True if argv holds `--help` or `-h`.
inline bool wants_help(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::string_view{argv[i]} == "--help"
        || std::string_view{argv[i]} == "-h")
      return true;
  return false;
}

/// Appends one JSON object per line to a file (`--json FILE`); every row
/// gets the tool name, date, core count and the 1-minute load average.
class json_out {
public:
  json_out(std::string path, std::string tool)
    : path_(std::move(path)), tool_(std::move(tool)) {
  }

  void row(boost::json::object o) const {
    if (path_.empty())
      return;
    o["tool"] = tool_;
    o["cores"] = std::thread::hardware_concurrency();
    o["loadavg_1m"] = load_average();
    char date[32];
    auto t = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
    o["date"] = date;
    std::ofstream out{path_, std::ios::app};
    out << boost::json::serialize(o) << '\n';
    if (!out)
      std::fprintf(stderr, "cannot append to %s\n", path_.c_str());
  }

  /// A throughput row.
  void throughput(const std::string& row, uint64_t n, uint64_t keys,
                  unsigned concurrency, const result& r, double base_rate,
                  int runs) const {
    boost::json::object o;
    o["kind"] = "throughput";
    o["row"] = row;
    o["messages"] = n;
    o["keys"] = keys;
    o["concurrency"] = concurrency;
    o["runs"] = runs;
    o["msg_per_s"] = r.rate;
    o["cpu_us_per_msg"] = r.cpu_us;
    if (base_rate > 0)
      o["ratio"] = r.rate / base_rate;
    this->row(std::move(o));
  }

  /// A latency row with the sorted samples thinned to at most 2000 points
  /// (for the CDF plot).
  void latency(const std::string& row, double rate, const latency_recorder& lat,
               uint64_t n) const {
    auto p = lat.percentiles();
    boost::json::object o;
    o["kind"] = "latency";
    o["row"] = row;
    o["offered_msg_per_s"] = rate;
    o["messages"] = n;
    o["p50_us"] = p[0];
    o["p99_us"] = p[1];
    o["p999_us"] = p[2];
    boost::json::array cdf;
    auto sorted = lat.sorted_us();
    size_t step = std::max<size_t>(1, sorted.size() / 2000);
    for (size_t i = 0; i < sorted.size(); i += step)
      cdf.push_back(sorted[i]);
    if (!sorted.empty())
      cdf.push_back(sorted.back());
    o["sorted_us_sample"] = std::move(cdf);
    this->row(std::move(o));
  }

private:
  std::string path_;
  std::string tool_;
};

inline void print_row(const char* name, const result& r, double base_rate) {
  std::printf("%-44s %10.0f msg/s  %7.2f µs CPU/msg", name, r.rate, r.cpu_us);
  if (base_rate > 0)
    std::printf("  %5.0f%% of baseline", 100.0 * r.rate / base_rate);
  std::printf("\n");
}

inline void print_latency(const char* name, double rate,
                          const latency_recorder& lat, uint64_t n) {
  auto p = lat.percentiles();
  std::printf("%s latency at %.0f msg/s (about half of max), %llu messages: "
              "p50 %.0f µs, p99 %.0f µs, p99.9 %.0f µs\n",
              name, rate, static_cast<unsigned long long>(n), p[0], p[1], p[2]);
}

} // namespace evmesh::bench
