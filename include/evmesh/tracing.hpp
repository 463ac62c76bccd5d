#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include <caf/expected.hpp>

#include "evmesh/trace.hpp"

namespace evmesh {

/// One finished span: a handler attempt (or a publish).
struct span_record {
  /// Trace, this span, its parent, flags, tracestate.
  trace_context context;
  /// The previous attempt's span of the same message (all zero on attempt 1).
  span_id link{};
  /// "consume order.confirmed". The string views of a span record point into
  /// the runtime's own buffers and are valid only during `span_sink::record`:
  /// a sink that keeps a span copies what it needs (the hot path makes no
  /// allocation per span for sinks that don't).
  std::string_view name;
  std::string_view consumer;
  std::string_view pattern;
  std::string_view topic;
  uint32_t attempt = 0;
  /// Start and end in nanoseconds since the Unix epoch.
  int64_t start_ns = 0;
  int64_t end_ns = 0;
  /// "ok", "retry", "dead_letter", "discard", "duplicate", "error".
  std::string_view status;
  /// Reason for a non-ok status.
  std::string_view detail;
};

/// Receives finished spans. Thread-safe: lanes call it concurrently.
class span_sink {
public:
  virtual ~span_sink();

  /// Records one finished span. Must not throw.
  virtual void record(const span_record& span) noexcept = 0;

  /// Makes buffered spans durable.
  virtual void flush() noexcept;
};

using span_sink_ptr = std::shared_ptr<span_sink>;

/// Writes each span as one log line (spdlog, level debug for ok, info else).
span_sink_ptr make_log_span_sink();

/// Appends each span as one OTLP/JSON line (`{"resourceSpans":[...]}`) to
/// `path`, creating parent directories. Errors name the path.
caf::expected<span_sink_ptr> make_otlp_file_span_sink(const std::string& path);

/// Opens a sink by config value: "none" (nullptr), "log", "otlp-file://PATH".
caf::expected<span_sink_ptr> make_span_sink(std::string_view spec);

/// Renders one span as an OTLP/JSON `resourceSpans` document on one line.
std::string to_otlp_json(const span_record& span, std::string_view service);

// -- tenants -------------------------------------------------------------------

/// Result of resolving an envelope's tenant id.
struct tenant_resolution {
  /// False: the message must not reach a handler (dead letter
  /// `tenant_rejected`).
  bool accepted = true;
  /// The tenant the handler sees (the fallback for unknown ids).
  std::string tenant;
  /// Why a tenant was rejected ("tenant 'acme' is suspended").
  std::string reason;
};

/// Validates tenant ids. Found in the container, it switches tenant checks on.
class tenant_registry {
public:
  virtual ~tenant_registry();

  /// Resolves `tenant` (possibly empty). Thread-safe.
  virtual tenant_resolution resolve(std::string_view tenant) const = 0;
};

/// A registry from lists: `known` ids are accepted, `suspended` ones rejected
/// (never falling back), unknown ones resolve to `fallback` or are rejected
/// when it is empty. An empty tenant id is accepted as is.
std::shared_ptr<tenant_registry>
make_static_tenant_registry(std::vector<std::string> known,
                            std::vector<std::string> suspended,
                            std::string fallback);

} // namespace evmesh
