// raw_batch (what the source polls into): slots come back reset, keep their
// string buffers up to max_kept_bytes, and the two poll entry points of
// transport (poll into a vector, poll_into a batch) each work through the
// other.
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/error.hpp"
#include "evmesh/testing.hpp"
#include "evmesh/transport.hpp"

using namespace evmesh;

namespace {

using stub_transport = evmesh::testing::publish_transport;

/// Implements only `poll` into a vector: `n` messages tagged from `next`,
/// then `fail` as the result.
class vector_transport : public stub_transport {
public:
  caf::error poll(size_t max, std::vector<raw_message>& out) override {
    for (size_t i = 0; i < std::min(max, n); ++i) {
      auto& m = out.emplace_back();
      m.tag = next++;
      m.bytes = "body " + std::to_string(m.tag);
    }
    return fail;
  }
  size_t n = 2;
  uint64_t next = 1;
  caf::error fail;
};

/// Implements `poll_into` and answers `poll` through it.
class batch_transport : public stub_transport {
public:
  caf::error poll(size_t max, std::vector<raw_message>& out) override {
    return poll_through_batch(max, out);
  }
  caf::error poll_into(size_t max, raw_batch& out) override {
    for (size_t i = 0; i < max; ++i) {
      auto& m = out.add();
      m.tag = next++;
      m.subject = "orders";
    }
    return {};
  }
  uint64_t next = 10;
};

void fill(raw_message& m) {
  m.tag = 7;
  m.bytes.assign(200, 'b');
  m.subject = "a.subject.longer.than.sso";
  m.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  m.tracestate = "vendor=value,other=thing";
  m.key = "a key longer than the small buffer";
  m.delivery_count = 5;
  m.position = "kafka:orders/3@123456789";
}

} // namespace

TEST(RawBatch, ReusedSlotsComeBackAsDefaultMessages) {
  raw_batch b;
  fill(b.add());
  b.clear();
  ASSERT_TRUE(b.empty());
  auto& m = b.add();
  raw_message fresh;
  EXPECT_EQ(m.tag, fresh.tag);
  EXPECT_TRUE(m.bytes.empty());
  EXPECT_TRUE(m.subject.empty());
  EXPECT_TRUE(m.traceparent.empty());
  EXPECT_TRUE(m.tracestate.empty());
  EXPECT_TRUE(m.key.empty());
  EXPECT_EQ(m.delivery_count, fresh.delivery_count);
  EXPECT_TRUE(m.position.empty());
}

TEST(RawBatch, ReusedSlotsKeepTheirBuffers) {
  raw_batch b;
  auto& first = b.add();
  fill(first);
  auto* bytes = first.bytes.data();
  auto* traceparent = first.traceparent.data();
  auto* position = first.position.data();
  b.clear();
  auto& again = b.add();
  EXPECT_EQ(&again, &first);
  again.bytes.assign(150, 'c');
  again.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  again.position = "kafka:orders/4@1";
  EXPECT_EQ(again.bytes.data(), bytes);
  EXPECT_EQ(again.traceparent.data(), traceparent);
  EXPECT_EQ(again.position.data(), position);
}

TEST(RawBatch, ReleasesBuffersOverTheLimit) {
  raw_batch b;
  b.add().bytes.assign(raw_batch::max_kept_bytes + 1, 'x');
  b.add().bytes.assign(raw_batch::max_kept_bytes, 'y');
  b.clear();
  EXPECT_LT(b.add().bytes.capacity(), raw_batch::max_kept_bytes);
  EXPECT_GE(b.add().bytes.capacity(), raw_batch::max_kept_bytes);
}

TEST(RawBatch, SizeIterationAndPopBack) {
  raw_batch b;
  for (uint64_t i = 1; i <= 3; ++i)
    b.add().tag = i;
  b.pop_back();
  ASSERT_EQ(b.size(), 2u);
  std::vector<uint64_t> tags;
  for (auto& m : b)
    tags.push_back(m.tag);
  EXPECT_EQ(tags, (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(b[1].tag, 2u);
  // The popped slot is handed out again, reset.
  EXPECT_EQ(b.add().tag, 0u);
  EXPECT_EQ(b.size(), 3u);
}

TEST(RawBatch, DefaultPollIntoAppendsWhatPollReturns) {
  vector_transport t;
  raw_batch b;
  b.add().tag = 99;
  ASSERT_FALSE(t.poll_into(10, b));
  ASSERT_EQ(b.size(), 3u);
  EXPECT_EQ(b[0].tag, 99u);
  EXPECT_EQ(b[1].tag, 1u);
  EXPECT_EQ(b[2].bytes, "body 2");
}

TEST(RawBatch, DefaultPollIntoHandsOnMessagesPolledBeforeAnError) {
  vector_transport t;
  t.fail = make_error(errc::unavailable, "broker went away");
  raw_batch b;
  auto err = t.poll_into(10, b);
  EXPECT_TRUE(err);
  EXPECT_EQ(b.size(), 2u);
}

TEST(RawBatch, PollThroughBatchAppendsToTheVector) {
  batch_transport t;
  std::vector<raw_message> out(1);
  out[0].tag = 1;
  ASSERT_FALSE(t.poll(2, out));
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out[0].tag, 1u);
  EXPECT_EQ(out[1].tag, 10u);
  EXPECT_EQ(out[2].tag, 11u);
  EXPECT_EQ(out[2].subject, "orders");
}
