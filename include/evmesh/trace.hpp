#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include <caf/expected.hpp>

namespace evmesh {

/// A W3C trace id (16 bytes).
using trace_id = std::array<uint8_t, 16>;

/// A W3C span id (8 bytes).
using span_id = std::array<uint8_t, 8>;

/// A parsed W3C `traceparent` header.
struct traceparent_fields {
  uint8_t version = 0;
  trace_id trace{};
  span_id parent{};
  uint8_t flags = 0;
};

/// Parses `text` per W3C Trace Context level 1: `vv-<32 hex>-<16 hex>-ff`,
/// lowercase hex only, version `ff` invalid, all-zero trace or span ids
/// invalid, exact separators. Versions above 00 are accepted when the first
/// 55 characters parse and the rest starts with `-` (forward compatibility).
/// Failures yield `errc::invalid_traceparent` naming the rule broken.
caf::expected<traceparent_fields> parse_traceparent(std::string_view text);

/// Formats `00-<trace>-<span>-<flags>` in lowercase hex.
std::string format_traceparent(const trace_id& trace, const span_id& span,
                               uint8_t flags);

/// Lowercase hex of `bytes`.
std::string to_hex(const uint8_t* bytes, size_t size);

/// The span of one hop (one handler attempt, one publish).
struct trace_context {
  /// Trace id, preserved across the whole chain.
  trace_id trace{};
  /// This hop's freshly minted span id.
  span_id span{};
  /// The upstream span (all zero when this hop is the root).
  span_id parent{};
  /// Trace flags, kept from the parent (bit 0 = sampled).
  uint8_t flags = 1;
  /// W3C tracestate, carried verbatim.
  std::string tracestate;
  /// True when no (valid) parent was carried and this hop started a new trace.
  bool is_root = true;

  /// `traceparent` naming this hop's span, to forward to the next hop.
  std::string traceparent() const;
};

/// A random, non-zero span id (thread-local PRNG seeded from random_device).
span_id new_span_id();

/// A random, non-zero trace id.
trace_id new_trace_id();

/// Starts a new root trace (sampled flag set).
trace_context new_root_trace(std::string tracestate = {});

/// Continues the producer's trace: same trace id, the producer's span as the
/// parent, a fresh span id, flags kept. Invalid or empty `traceparent` yields
/// a new root with `is_root = true` whose `tracestate` is empty (W3C: a
/// tracestate is dropped with the traceparent it belongs to).
trace_context continue_trace(std::string_view traceparent,
                             std::string_view tracestate = {});

/// A new child span of `parent` (same trace, parent = parent.span).
trace_context child_of(const trace_context& parent);

} // namespace evmesh
