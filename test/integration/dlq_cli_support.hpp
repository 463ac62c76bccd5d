// Shared by the broker DLQ CLI tests (nats/, kafka/, amqp/): make dead letters
// the way the runtime does (consume, dead_letter, ack) and read them back
// through `evmesh dlq list --json`.
#pragma once

#include <chrono>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/envelope.hpp"
#include "evmesh/error.hpp"
#include "evmesh/transport.hpp"

#include "dlq.hpp"

namespace evmesh::testing {

constexpr const char* dlq_cli_trace
  = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Polls `t` until `n` messages arrived or `limit` passed.
inline std::vector<raw_message> poll_n(transport& t, size_t n,
                                       caf::timespan limit) {
  using namespace std::chrono_literals;
  std::vector<raw_message> got;
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (got.size() < n && std::chrono::steady_clock::now() < deadline) {
    if (auto err = t.poll(n - got.size(), got)) {
      ADD_FAILURE() << render(err);
      break;
    }
    if (got.size() < n)
      std::this_thread::sleep_for(5ms);
  }
  return got;
}

/// Publishes `n` envelopes on `topic` through `consumer` and dead-letters
/// each as `category` from consumer `who`, like the runtime: dead_letter,
/// then ack. `scheme` names the transport in the records.
inline void dead_letter_n(transport& consumer, int n, const std::string& topic,
                          const std::string& category, const std::string& who,
                          const std::string& scheme, caf::timespan limit) {
  for (int i = 0; i < n; ++i) {
    envelope e;
    e.topic = topic;
    e.id = topic + "-" + std::to_string(i);
    e.idempotency_key = e.id;
    e.key = "k" + std::to_string(i % 4);
    e.payload = boost::json::object{{"n", i}};
    ASSERT_FALSE(consumer.publish(e));
  }
  auto got = poll_n(consumer, static_cast<size_t>(n), limit);
  ASSERT_EQ(got.size(), static_cast<size_t>(n));
  for (auto& m : got) {
    auto decoded = decode_envelope(m.bytes);
    ASSERT_TRUE(decoded) << render(decoded.error());
    dead_letter_record rec;
    rec.category = category;
    rec.reason = "inventory down";
    rec.attempts = 3;
    rec.first_failure_ms = rec.last_failure_ms = 1714564800000;
    rec.consumer = who;
    rec.pattern = "ord.*";
    rec.topic = m.subject;
    rec.key = decoded->key;
    rec.idempotency_key = decoded->idempotency_key;
    rec.transport = scheme;
    rec.position = m.position;
    rec.node = "dlq-cli-node";
    rec.traceparent = dlq_cli_trace;
    rec.original = m.bytes;
    rec.original_decoded = true;
    rec.add_error(3, rec.last_failure_ms, "inventory down");
    ASSERT_FALSE(consumer.dead_letter(m.tag, rec));
    ASSERT_FALSE(consumer.ack(m.tag));
  }
}

/// `evmesh dlq list --json --db url` with `q`: the exit code, the records
/// and what went to stderr.
struct dlq_listing {
  int rc = 0;
  std::vector<dead_letter_record> records;
  std::string err;
};

inline dlq_listing list_dlq(const std::string& url,
                            const dead_letter_query& q) {
  cli::dlq_list_options opts;
  opts.db = url;
  opts.query = q;
  opts.json = true;
  std::ostringstream out, err;
  dlq_listing result;
  result.rc = cli::dlq_list(opts, out, err);
  result.err = err.str();
  std::istringstream lines{out.str()};
  for (std::string line; std::getline(lines, line);) {
    auto rec = dead_letter_from_json(line);
    EXPECT_TRUE(rec) << line;
    if (rec)
      result.records.push_back(std::move(*rec));
  }
  return result;
}

} // namespace evmesh::testing
