#pragma once

#include <string>
#include <string_view>
#include <vector>

#include <caf/expected.hpp>

#include "evmesh/stores.hpp"
#include "evmesh/transport.hpp"

namespace evmesh {

/// Registers the `amqp://` transport factory (RabbitMQ through rabbitmq-c).
/// Idempotent; call it before `consumer_runtime::start()` unless the runtime
/// was built with AMQP support and registers it itself.
///
/// URL:
///
///     amqp://[USER:PASS@]HOST[:PORT][/VHOST]?queue=Q[&prefetch=N]
///            [&exchange=E][&routing_key=K][&format=native|nestjs]
///            [&create=true|false][&queue_type=classic|quorum]
///            [&persistent=true|false][&confirm_timeout=5s]
///            [&connect_timeout=2s][&heartbeat=10s]
///
/// - `USER:PASS` default to guest:guest, `PORT` to 5672, `VHOST` to `/`
///   (write `%2F` for `/` in the path, or leave the path empty).
/// - `queue`: the work queue every process of one service shares (competing
///   consumers); required to consume, not to publish. At `subscribe` the
///   transport declares the topology: the queue (only when it does not exist
///   yet and `create=true`, the default; an existing queue is used as it is),
///   its retry queue `Q.retry` and its dead-letter queue `Q.dlq`, and binds
///   the queue to `exchange` with the subscription patterns (`order.*`,
///   `order.>` → `order.#`).
/// - `prefetch` (default 256): `basic.qos`, the most unacked messages the
///   broker hands this process.
/// - `exchange` (default `evmesh`, a durable topic exchange declared at
///   start): where `publish` sends, with the topic as routing key. An empty
///   `exchange=` publishes through the default exchange, with `routing_key`
///   (or the topic) naming the destination queue, as NestJS's ClientRMQ does.
/// - `routing_key`: a fixed routing key for every publish (instead of the
///   topic).
/// - `format` (default `native`): `nestjs` publishes `{"pattern": topic,
///   "data": payload, ...}` so a NestJS `@EventPattern` handler receives it.
/// - `queue_type` (default `classic`): the type of a queue the transport
///   creates. Quorum queues count deliveries (`x-delivery-count`) across
///   crashes; classic queues only flag redeliveries.
/// - `persistent` (default true): delivery mode 2 on publishes.
/// - `confirm_timeout` (default 5s): how long `publish` and `dead_letter`
///   wait for the broker's publisher confirm.
/// - `connect_timeout` (default 2s), `heartbeat` (default 10s).
///
/// Retries with a delay go through `Q.retry` (per-message TTL; its
/// dead-letter exchange routes expired messages back to `Q`); dead letters go
/// to `Q.dlq` with the record as JSON body. Both are published with publisher
/// confirms; the original is acked only after the broker confirmed. The
/// connection and channels recover on their own (`connected()` is false
/// meanwhile); unacked messages return to the queue. docs/transports/amqp.md
/// has the details.
///
/// Errors at start name the URL (password masked) and what to do: broker
/// unreachable, authentication failed, unknown vhost, missing queue.
///
/// Also registers `amqp://…?queue=Q` as a dead-letter store
/// (`make_dead_letter_store`, `evmesh dlq --db`) on `Q.dlq`: record ids are a
/// 53-bit FNV-1a hash of the message body; `remove` and `mark_replayed` ack
/// the record out of the queue.
void register_amqp_transport();

/// Reads the dead-letter records in the queue `Q.dlq` of the configuration in
/// `url` (oldest first, at most `max`) without removing them, as written by
/// the transport's `dead_letter`. For tests and operator tools.
caf::expected<std::vector<dead_letter_record>>
amqp_dead_letters(std::string_view url, size_t max = 100'000);

} // namespace evmesh
