#pragma once

#include <string>
#include <string_view>
#include <vector>

#include <caf/expected.hpp>

#include "evmesh/stores.hpp"
#include "evmesh/transport.hpp"

namespace evmesh {

/// Registers the `kafka://` transport factory (Apache Kafka through
/// librdkafka). Idempotent; call it before `consumer_runtime::start()` unless
/// the runtime was built with Kafka support and registers it itself.
///
/// URL:
///
///     kafka://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]?group=G
///             [&topics=a,b.*]
///             [&ledger=PATH][&discover=5s][&connect_timeout=5s]
///             [&publish_timeout=10s][&revoke_wait=2s][&commit_interval=100ms]
///             [&max_buffered=8192][&retry_topic_after=10s]
///             [&LIBRDKAFKA.PROPERTY=VALUE...]
///
/// - Hosts are the bootstrap servers (port 9092 when omitted).
///   `USER:PASSWORD@` are SASL credentials (PLAIN over `sasl_ssl` unless the
///   query sets `sasl.mechanisms` / `security.protocol`); error messages never
///   show them.
/// - `group` (required to consume, not to publish): the consumer group every
///   process of one service shares. Offsets are managed by the transport (a
///   per-partition commit watermark); auto-commit is always off.
/// - `topics`: the topics to consume, comma-separated. Plain names must exist
///   at `subscribe` (an unknown topic is an `invalid_config` error); entries
///   with `*`/`>` are NATS-style patterns. Without `topics` the subscriptions'
///   own patterns are used. Patterns are matched against the cluster's topic
///   list every `discover` interval; topics ending in `.dlq` or `.retry` are
///   never consumed by a pattern.
/// - `ledger`: a SQLite file of attempt counts per (group, topic, partition,
///   offset) and of settled offsets (skipped when replayed after a crash).
///   Counted are the handler runs a crash cut short — `attempt_started`
///   writes the run into a slot of a MAP_SHARED file next to the ledger
///   (`PATH.run-N`), `attempt_finished` clears it, and the next process that
///   can lock a dead process's file adds its slots to the ledger — plus the
///   deliveries a clean `close()` left unsettled. With it,
///   `raw_message::delivery_count` survives crashes and rebalances and
///   `capabilities().delivery_count` is true (crash_loop works); without it
///   the count is per process.
/// - `connect_timeout`: how long the factory waits for the bootstrap servers'
///   metadata before failing with `unavailable`.
/// - `publish_timeout`: how long `publish` and `dead_letter` wait for the
///   broker's delivery report (also librdkafka's `message.timeout.ms`).
/// - `revoke_wait`: on a revoke, how long the consumer waits for handed-out
///   messages of the revoked partitions to be settled before it commits the
///   watermark and lets the rebalance go on.
/// - `commit_interval`: how often an advanced watermark is committed.
/// - `max_buffered`: records taken from librdkafka's prefetch queue ahead of
///   the runtime; at this many the consumer thread stops taking records
///   until half of them went out (librdkafka's own queue then stops
///   fetching); the assignment is paused only at twice this many (records
///   parked behind their key pause their partition at this many).
/// - `retry_topic_after` (`capabilities().defer_after`): retries due this far
///   away or later are deferred to `<topic>.retry` (same partition number;
///   headers `evmesh-original-topic`, `-partition`, `-offset`,
///   `evmesh-attempts`, `evmesh-due`), broker-confirmed before `defer`
///   returns; the member owning `<topic>`/p reads `<topic>.retry`/p and hands
///   a retry record out when due, with `delivery_count = attempts + 1`. A key
///   with a record in retry parks its later records (not handed out, not
///   committed) until that record is settled for good; parked keys are
///   rebuilt from the retry partition on every assignment; the key's records
///   the runtime holds come back as nacks after the deferral and are parked
///   too. `0` or `off`: retries stay in memory.
/// - Any other key containing a dot is a librdkafka configuration property
///   applied to the consumer and producer (e.g. `session.timeout.ms=6000`,
///   `security.protocol=ssl`); an unknown property or bad value is an
///   `invalid_url` error. `enable.auto.commit` and
///   `enable.auto.offset.store` cannot be overridden.
///
/// Messages: the Kafka value is `encode_envelope(env)`, the Kafka key is the
/// envelope's key, headers `traceparent` and `tracestate` carry the trace.
/// Dead letters go to `<topic>.dlq` (value: the record as JSON; headers
/// `evmesh-original-topic`, `-partition`, `-offset`, `evmesh-category`,
/// `evmesh-attempts`), confirmed by the broker before `dead_letter` returns.
///
/// Also registers `kafka://` as a dead-letter store (`make_dead_letter_store`,
/// `evmesh dlq --db`): the `.dlq` topics of the plain names in `topics=`.
/// Record ids are `(i << 56) | (partition << 40) | offset`, `i` being the
/// topic's position in `topics=`. `remove` and `mark_replayed` produce a
/// marker record into the same partition (empty value, header
/// `evmesh-dlq-done: OFFSET`); readers skip markers and the records they name.
/// See docs/transports/kafka.md.
void register_kafka_transport();

/// Reads the dead-letter records in the `.dlq` topics for the configuration
/// in `url`: `<topic>.dlq` for each plain name in `topics=`, else every topic
/// ending in `.dlq` (matching a `topics=` pattern, if any). Oldest first per
/// partition, at most `max`; records settled by a marker (replayed or purged)
/// and the markers themselves are skipped. For tests and operator tools.
caf::expected<std::vector<dead_letter_record>>
kafka_dead_letters(std::string_view url, size_t max = 100'000);

} // namespace evmesh
