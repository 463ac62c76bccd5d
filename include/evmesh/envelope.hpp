#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <boost/json/object.hpp>
#include <boost/json/value.hpp>
#include <caf/expected.hpp>

namespace evmesh {

/// Which wire shape an envelope was decoded from.
enum class wire_format : uint8_t {
  /// evmesh's own envelope (compatible with outbox rows).
  native,
  /// CloudEvents 1.0 structured JSON (`specversion`, `type` -> topic, `data`).
  cloudevents,
  /// NestJS microservice event (`{"pattern": ..., "data": ...}`).
  nestjs,
};

/// One event as it travels between services. Field names on the wire are the
/// member names; unknown fields of the input are kept in `extra` and written
/// back on encode, so a hop never drops what it does not understand.
struct envelope {
  /// Producer-assigned id of the event (outbox row id or UUID); may be empty.
  std::string id;
  /// Routing key the handlers match against (`order.confirmed`).
  std::string topic;
  /// The event body: any JSON value.
  boost::json::value payload;
  /// Consumers dedupe on this; falls back to `id` when empty (see
  /// `dedupe_key`).
  std::string idempotency_key;
  /// Tenant id, validated against the tenant registry when one is configured.
  std::string tenant;
  /// W3C traceparent of the producer's span, empty when none was carried.
  std::string traceparent;
  /// W3C tracestate, carried verbatim.
  std::string tracestate;
  /// Ordering key: messages with the same key run in order (per_key ordering).
  std::string key;
  /// Free-form string headers.
  std::map<std::string, std::string> headers;
  /// RFC 3339 production time, as given.
  std::string produced_at;
  /// Attempt number the producer (or a replay) stamped; 0 when absent.
  uint32_t attempt = 0;
  /// MIME type of the payload; empty means application/json.
  std::string content_type;
  /// Fields of the input this version does not know, preserved for encoding.
  boost::json::object extra;
  /// The shape the envelope was decoded from (not written on encode).
  wire_format format = wire_format::native;
};

/// Immutable, shared envelope as carried in actor messages.
using envelope_ptr = std::shared_ptr<const envelope>;

/// What a transport knows about a message beyond its bytes; fills gaps in the
/// envelope (a missing `topic`, a `traceparent` carried in broker headers).
struct transport_metadata {
  /// The broker subject/topic/routing key the message arrived on.
  std::string_view subject;
  /// `traceparent` from the broker's message headers, if any.
  std::string_view traceparent;
  /// `tracestate` from the broker's message headers, if any.
  std::string_view tracestate;
  /// Broker message key (Kafka key), used when the envelope has no `key`.
  std::string_view key;
};

/// Decodes `bytes` as a native envelope, CloudEvents 1.0 structured JSON or a
/// NestJS event. Never throws: malformed input yields `errc::decode_error`
/// with a message naming the problem (and its byte offset for bad JSON).
/// Envelope fields win over `meta`; `meta` only fills empty fields.
/// The decoded `payload` lives in a storage of its own (one block for a small
/// payload; reference-counted and safe to share between threads): moving the
/// envelope keeps it, while assigning the payload to a value of the default
/// storage copies it.
caf::expected<envelope> decode_envelope(std::string_view bytes,
                                        const transport_metadata& meta = {});

/// Encodes `env` as native envelope JSON. `topic` and `payload` are always
/// written, other fields only when non-empty (`attempt` when non-zero).
/// `extra` fields follow; one named like a known field (or `specversion`,
/// which would make it a CloudEvent) is skipped.
std::string encode_envelope(const envelope& env);

/// The current UTC time in RFC 3339 with milliseconds
/// ("2026-11-27T13:00:00.123Z"), as stamped into `produced_at`.
std::string rfc3339_now();

/// Key the idempotency store dedupes on: `idempotency_key`, else `id`, else
/// `"h:"` + 16 lowercase hex digits of the 64-bit FNV-1a hash of `topic`, a
/// NUL byte and the serialized `payload` (payload key order matters).
std::string dedupe_key(const envelope& env);

} // namespace evmesh
