#pragma once

#include <string>
#include <string_view>
#include <vector>

#include <caf/expected.hpp>

#include "evmesh/stores.hpp"
#include "evmesh/transport.hpp"

namespace evmesh {

/// Registers the `nats://` transport factory (NATS JetStream through nats.c).
/// Idempotent; call it before `consumer_runtime::start()` unless the runtime
/// was built with NATS support and registers it itself.
///
/// URL:
///
///     nats://[USER:PASS@|TOKEN@]HOST[:PORT]?stream=S[&durable=D]
///            [&subjects=a.>,b.*][&filter=SUBJECT][&dlq=SUBJECT]
///            [&fetch=N][&ack_wait=30s][&max_deliver=N][&max_ack_pending=N]
///            [&create=true|false][&deliver=all|new][&connect_timeout=2s]
///            [&tls_ca=FILE][&tls_cert=FILE&tls_key=FILE]
///
/// - `stream` (required): the JetStream stream to consume from and publish
///   into. With `create=true` (default) and `subjects` given, a missing
///   stream is created (file storage, limits retention); otherwise a missing
///   stream is an `invalid_config` error at start.
/// - `durable`: the durable pull consumer (explicit ack) every process of one
///   service shares; required to consume, not to publish. Created if absent
///   (`create=true`), updated when `ack_wait`, `max_deliver` or
///   `max_ack_pending` differ from the server's.
/// - `filter`: the consumer's filter subject (default: the whole stream).
/// - `dlq`: the subject dead-letter records are published to (default
///   `STREAM.dlq`), captured by the stream `STREAM_DLQ`, created if absent.
///   It must not be captured by `stream` itself.
/// - `fetch` (default 256): the largest pull batch; `max_ack_pending`
///   (default 10000) must exceed it.
/// - `ack_wait` (default 30s): the server's redelivery timeout. The transport
///   sends `InProgress` for every message it holds unacked once a third of it
///   passed, so only a dead process lets the server redeliver.
/// - `max_deliver` (default 100): the server's delivery limit; keep it above
///   every handler's `max_attempts` so evmesh dead-letters first.
/// - `connect_timeout` (default 2s): how long start waits for the server.
/// - `tls_*`: PEM files; any of them switches TLS on.
///
/// Errors at start name the URL (credentials masked) and what to do: server
/// unreachable, authentication failed, JetStream disabled, unknown stream.
void register_nats_transport();

/// Reads the dead-letter records the broker's DLQ stream holds for the
/// configuration in `url` (oldest first, at most `max`), as written by the
/// transport's `dead_letter`. For tests and operator tools.
caf::expected<std::vector<dead_letter_record>>
nats_dead_letters(std::string_view url, size_t max = 100'000);

/// Whether `t` is a `nats://` transport whose connection is up right now
/// (false while nats.c reconnects; false for other transports).
bool nats_connected(const transport& t) noexcept;

} // namespace evmesh
