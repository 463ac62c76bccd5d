// The amqp:// transport's delivery assembler (transports/amqp/
// delivery_assembler.hpp) on hand-made frames: no broker. A frame out of
// sequence is refused with a description (the transport then drops the
// connection and the broker delivers again); the retained copy a retry
// publishes decodes back to the delivery's properties.
#include <string>
#include <string_view>

#include <gtest/gtest.h>

#include "delivery_assembler.hpp"

namespace {

using evmesh::internal::delivery_assembler;
using evmesh::internal::retained_delivery;

amqp_bytes_t bytes(std::string_view s) {
  return {s.size(), const_cast<char*>(s.data())};
}

std::string str(amqp_bytes_t b) {
  return {static_cast<const char*>(b.bytes), b.len};
}

// Properties with a string header and an x-death array, as RabbitMQ sends
// them after a dead-lettering.
struct sample_properties {
  amqp_table_entry_t death_entries[1];
  amqp_field_value_t deaths[1];
  amqp_table_entry_t headers[2];
  amqp_basic_properties_t p{};

  sample_properties() {
    death_entries[0].key = amqp_cstring_bytes("count");
    death_entries[0].value.kind = AMQP_FIELD_KIND_I64;
    death_entries[0].value.value.i64 = 3;
    deaths[0].kind = AMQP_FIELD_KIND_TABLE;
    deaths[0].value.table = {1, death_entries};
    headers[0].key = amqp_cstring_bytes("evmesh-key");
    headers[0].value.kind = AMQP_FIELD_KIND_UTF8;
    headers[0].value.value.bytes = amqp_cstring_bytes("k1");
    headers[1].key = amqp_cstring_bytes("x-death");
    headers[1].value.kind = AMQP_FIELD_KIND_ARRAY;
    headers[1].value.value.array = {1, deaths};
    p._flags = AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_HEADERS_FLAG
               | AMQP_BASIC_DELIVERY_MODE_FLAG;
    p.message_id = amqp_cstring_bytes("m-42");
    p.delivery_mode = 2;
    p.headers = {2, headers};
  }
};

TEST(amqp_delivery_assembler,
     builds_a_delivery_from_its_header_and_body_frames) {
  sample_properties sp;
  delivery_assembler a;
  EXPECT_EQ(a.deliver(7, true, bytes("orders.created")), "");
  EXPECT_TRUE(a.active());
  EXPECT_EQ(a.delivery_tag(), 7u);
  EXPECT_TRUE(a.redelivered());
  EXPECT_EQ(a.routing_key(), "orders.created");
  EXPECT_EQ(a.header(sp.p, 11), "");
  EXPECT_FALSE(a.complete());
  EXPECT_EQ(a.body(bytes("hello ")), "");
  EXPECT_FALSE(a.complete());
  EXPECT_EQ(a.body(bytes("world")), "");
  ASSERT_TRUE(a.complete());
  auto [body, copy] = a.take();
  EXPECT_FALSE(a.active());
  EXPECT_EQ(body, "hello world");
  EXPECT_EQ(copy.routing_key(), "orders.created");
  EXPECT_EQ(str(copy.body()), "hello world");
  // The retained properties decode back to what arrived.
  amqp_pool_t pool;
  init_amqp_pool(&pool, 4096);
  void* decoded = nullptr;
  ASSERT_EQ(amqp_decode_properties(AMQP_BASIC_CLASS, &pool, copy.properties(),
                                   &decoded),
            AMQP_STATUS_OK);
  auto* p = static_cast<amqp_basic_properties_t*>(decoded);
  EXPECT_EQ(p->_flags, sp.p._flags);
  EXPECT_EQ(str(p->message_id), "m-42");
  EXPECT_EQ(p->delivery_mode, 2);
  ASSERT_EQ(p->headers.num_entries, 2);
  EXPECT_EQ(str(p->headers.entries[0].key), "evmesh-key");
  EXPECT_EQ(str(p->headers.entries[0].value.value.bytes), "k1");
  auto& deaths = p->headers.entries[1].value;
  ASSERT_EQ(deaths.kind, AMQP_FIELD_KIND_ARRAY);
  ASSERT_EQ(deaths.value.array.num_entries, 1);
  auto& death = deaths.value.array.entries[0].value.table;
  ASSERT_EQ(death.num_entries, 1);
  EXPECT_EQ(death.entries[0].value.value.i64, 3);
  empty_amqp_pool(&pool);
}

TEST(amqp_delivery_assembler, completes_an_empty_body_at_its_header) {
  amqp_basic_properties_t p{};
  delivery_assembler a;
  EXPECT_EQ(a.deliver(1, false, bytes("t")), "");
  EXPECT_EQ(a.header(p, 0), "");
  ASSERT_TRUE(a.complete());
  auto [body, copy] = a.take();
  EXPECT_EQ(body, "");
  EXPECT_EQ(copy.routing_key(), "t");
  EXPECT_EQ(copy.body().len, 0u);
}

TEST(amqp_delivery_assembler, reuses_the_spare_buffer_it_is_given) {
  amqp_basic_properties_t p{};
  retained_delivery spare;
  spare.data.reserve(8192);
  auto* storage = spare.data.data();
  delivery_assembler a;
  EXPECT_EQ(a.deliver(1, false, bytes("t"), std::move(spare)), "");
  EXPECT_EQ(a.header(p, 3), "");
  EXPECT_EQ(a.body(bytes("abc")), "");
  auto [body, copy] = a.take();
  EXPECT_EQ(copy.data.data(), storage);
  EXPECT_EQ(str(copy.body()), "abc");
}

TEST(amqp_delivery_assembler, refuses_frames_out_of_sequence) {
  amqp_basic_properties_t p{};
  delivery_assembler a;
  EXPECT_NE(a.header(p, 1), "");
  EXPECT_NE(a.body(bytes("x")), "");
  EXPECT_EQ(a.deliver(5, false, bytes("t")), "");
  EXPECT_NE(a.body(bytes("x")), "") << "a body before the header";
  auto err = a.deliver(6, false, bytes("t"));
  EXPECT_NE(err.find("before the content of delivery 5"), std::string::npos)
    << err;
  EXPECT_EQ(a.header(p, 2), "");
  EXPECT_NE(a.header(p, 2), "") << "a second header";
  // After reset (the connection is gone) the next delivery starts cleanly.
  a.reset();
  EXPECT_FALSE(a.active());
  EXPECT_EQ(a.deliver(1, false, bytes("t")), "");
  EXPECT_EQ(a.header(p, 1), "");
  EXPECT_EQ(a.body(bytes("y")), "");
  EXPECT_TRUE(a.complete());
}

TEST(amqp_delivery_assembler, refuses_a_body_longer_than_announced) {
  amqp_basic_properties_t p{};
  delivery_assembler a;
  EXPECT_EQ(a.deliver(9, false, bytes("t")), "");
  EXPECT_EQ(a.header(p, 4), "");
  EXPECT_EQ(a.body(bytes("abc")), "");
  auto err = a.body(bytes("de"));
  EXPECT_NE(err.find("exceed the announced 4 bytes"), std::string::npos) << err;
  EXPECT_FALSE(a.complete());
}

TEST(amqp_delivery_assembler, refuses_properties_larger_than_the_frame_size) {
  sample_properties sp;
  delivery_assembler a{16};
  EXPECT_EQ(a.deliver(3, false, bytes("t")), "");
  auto err = a.header(sp.p, 1);
  EXPECT_NE(err.find("do not re-encode within 16 bytes"), std::string::npos)
    << err;
  EXPECT_FALSE(a.complete());
  EXPECT_NE(a.body(bytes("x")), "") << "no header was taken";
}

} // namespace
