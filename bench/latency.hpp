// Latency bookkeeping for the end-to-end benchmarks: the publisher stamps
// message i's send time, the handler its arrival (message ids are "m<i>"),
// and percentiles come from the differences once the run is over.
#pragma once

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string_view>
#include <thread>
#include <vector>

namespace evmesh::bench {

inline int64_t now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
           std::chrono::steady_clock::now().time_since_epoch())
    .count();
}

class latency_recorder {
public:
  explicit latency_recorder(size_t n)
    : n_(n),
      sent_(std::make_unique<std::atomic<int64_t>[]>(n)),
      seen_(std::make_unique<std::atomic<int64_t>[]>(n)) {
  }

  void sent(size_t i) noexcept {
    sent_[i].store(now_ns(), std::memory_order_relaxed);
  }

  /// Records the arrival of the message with id "m<i>" (first one counts).
  void seen(std::string_view id) noexcept {
    size_t i = 0;
    if (id.size() < 2
        || std::from_chars(id.data() + 1, id.data() + id.size(), i).ec
             != std::errc{}
        || i >= n_)
      return;
    int64_t zero = 0;
    seen_[i].compare_exchange_strong(zero, now_ns(), std::memory_order_relaxed);
  }

  /// Latencies in microseconds of every message seen, ascending.
  std::vector<double> sorted_us() const {
    std::vector<double> d;
    d.reserve(n_);
    for (size_t i = 0; i < n_; ++i) {
      auto s = sent_[i].load(std::memory_order_relaxed);
      auto r = seen_[i].load(std::memory_order_relaxed);
      if (s != 0 && r != 0)
        d.push_back(static_cast<double>(r - s) / 1000.0);
    }
    std::sort(d.begin(), d.end());
    return d;
  }

  /// Percentiles in microseconds of every message seen: {p50, p99, p99.9}.
  std::vector<double> percentiles() const {
    auto d = sorted_us();
    if (d.empty())
      return {0, 0, 0};
    auto at = [&](double q) {
      return d[static_cast<size_t>(q * static_cast<double>(d.size() - 1))];
    };
    return {at(0.50), at(0.99), at(0.999)};
  }

  /// Writes "ms-since-first-send max-latency-us messages" per 10 ms of send
  /// time to `path` (to find where in a run the tail comes from).
  void write_series(const char* path) const {
    auto* f = std::fopen(path, "w");
    if (f == nullptr)
      return;
    int64_t t0 = sent_[0].load(std::memory_order_relaxed);
    std::fprintf(f, "# first send at %lld ns (steady clock)\n",
                 static_cast<long long>(t0));
    std::vector<std::pair<double, size_t>> buckets;
    for (size_t i = 0; i < n_; ++i) {
      auto s = sent_[i].load(std::memory_order_relaxed);
      auto r = seen_[i].load(std::memory_order_relaxed);
      if (s == 0 || r == 0)
        continue;
      auto b = static_cast<size_t>((s - t0) / 10'000'000);
      if (b >= buckets.size())
        buckets.resize(b + 1);
      buckets[b].first = std::max(buckets[b].first,
                                  static_cast<double>(r - s) / 1000.0);
      ++buckets[b].second;
    }
    for (size_t b = 0; b < buckets.size(); ++b)
      std::fprintf(f, "%zu %.0f %zu\n", b * 10, buckets[b].first,
                   buckets[b].second);
    std::fclose(f);
  }

private:
  size_t n_;
  std::unique_ptr<std::atomic<int64_t>[]> sent_;
  std::unique_ptr<std::atomic<int64_t>[]> seen_;
};

/// Calls `publish(i)` for i in [0, n) at `rate` messages per second, in
/// 1 ms ticks (each tick publishes what is due by then).
template <class F>
void paced(size_t n, double rate, F publish) {
  using namespace std::chrono;
  auto start = steady_clock::now();
  size_t i = 0;
  while (i < n) {
    auto elapsed = duration<double>(steady_clock::now() - start).count();
    auto due = std::min(n, static_cast<size_t>(elapsed * rate) + 1);
    for (; i < due; ++i)
      publish(i);
    std::this_thread::sleep_until(
      start
      + duration_cast<steady_clock::duration>(
        duration<double>(static_cast<double>(i) / rate)));
  }
}

} // namespace evmesh::bench
