#include "evmesh/trace.hpp"

#include <algorithm>
#include <random>
#include <utility>

#include "evmesh/error.hpp"

namespace evmesh {

namespace {

// version "-" trace-id "-" parent-id "-" trace-flags
constexpr size_t traceparent_size = 55;
constexpr size_t trace_offset = 3;
constexpr size_t span_offset = 36;
constexpr size_t flags_offset = 53;

// Quoted inputs are cut so a hostile header cannot blow up a log line.
constexpr size_t max_quoted = 80;

int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  return -1;
}

// Decodes `2 * size` lowercase hex digits at `text[offset]` into `out`.
bool read_hex(std::string_view text, size_t offset, uint8_t* out,
              size_t size) noexcept {
  for (size_t i = 0; i < size; ++i) {
    auto hi = hex_value(text[offset + 2 * i]);
    auto lo = hex_value(text[offset + 2 * i + 1]);
    if (hi < 0 || lo < 0)
      return false;
    out[i] = static_cast<uint8_t>(hi * 16 + lo);
  }
  return true;
}

template <size_t N>
bool all_zero(const std::array<uint8_t, N>& xs) noexcept {
  return std::all_of(xs.begin(), xs.end(), [](uint8_t x) { return x == 0; });
}

caf::error invalid(std::string_view text, std::string_view rule) {
  std::string msg = "traceparent '";
  if (text.size() > max_quoted) {
    msg.append(text.substr(0, max_quoted));
    msg += "...";
  } else {
    msg.append(text);
  }
  msg += "' is invalid: ";
  msg.append(rule);
  return make_error(errc::invalid_traceparent, std::move(msg));
}

std::mt19937_64& prng() {
  thread_local std::mt19937_64 engine{[] {
    std::random_device rd;
    std::seed_seq seq{rd(), rd(), rd(), rd(), rd(), rd(), rd(), rd()};
    return std::mt19937_64{seq};
  }()};
  return engine;
}

template <size_t N>
std::array<uint8_t, N> random_id() {
  std::array<uint8_t, N> result{};
  auto& engine = prng();
  do {
    for (size_t i = 0; i < N; i += 8) {
      auto bits = engine();
      for (size_t j = 0; j < 8 && i + j < N; ++j)
        result[i + j] = static_cast<uint8_t>(bits >> (8 * j));
    }
  } while (all_zero(result));
  return result;
}

} // namespace

caf::expected<traceparent_fields> parse_traceparent(std::string_view text) {
  if (text.size() < traceparent_size)
    return invalid(text, "expected 55 characters (00-<32 hex>-<16 hex>-<2 "
                         "hex>), got "
                           + std::to_string(text.size()));
  traceparent_fields result;
  if (!read_hex(text, 0, &result.version, 1))
    return invalid(text, "version must be 2 lowercase hex digits");
  if (result.version == 0xff)
    return invalid(text, "version ff is forbidden");
  if (text[2] != '-' || text[35] != '-' || text[52] != '-')
    return invalid(text, "expected '-' at positions 2, 35 and 52");
  if (result.version == 0 && text.size() != traceparent_size)
    return invalid(text, "version 00 must be exactly 55 characters, got "
                           + std::to_string(text.size()));
  if (text.size() > traceparent_size && text[traceparent_size] != '-')
    return invalid(text, "fields after the flags of a future version must "
                         "start with '-'");
  if (!read_hex(text, trace_offset, result.trace.data(), result.trace.size()))
    return invalid(text, "trace id must be 32 lowercase hex digits");
  if (!read_hex(text, span_offset, result.parent.data(), result.parent.size()))
    return invalid(text, "parent id must be 16 lowercase hex digits");
  if (!read_hex(text, flags_offset, &result.flags, 1))
    return invalid(text, "trace flags must be 2 lowercase hex digits");
  if (all_zero(result.trace))
    return invalid(text, "all-zero trace id");
  if (all_zero(result.parent))
    return invalid(text, "all-zero parent id");
  return result;
}

std::string to_hex(const uint8_t* bytes, size_t size) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string result;
  result.resize(size * 2);
  for (size_t i = 0; i < size; ++i) {
    result[2 * i] = digits[bytes[i] >> 4];
    result[2 * i + 1] = digits[bytes[i] & 0x0F];
  }
  return result;
}

std::string format_traceparent(const trace_id& trace, const span_id& span,
                               uint8_t flags) {
  std::string result;
  result.reserve(traceparent_size);
  result += "00-";
  result += to_hex(trace.data(), trace.size());
  result += '-';
  result += to_hex(span.data(), span.size());
  result += '-';
  result += to_hex(&flags, 1);
  return result;
}

std::string trace_context::traceparent() const {
  return format_traceparent(trace, span, flags);
}

span_id new_span_id() {
  return random_id<8>();
}

trace_id new_trace_id() {
  return random_id<16>();
}

trace_context new_root_trace(std::string tracestate) {
  trace_context result;
  result.trace = new_trace_id();
  result.span = new_span_id();
  result.flags = 0x01;
  result.tracestate = std::move(tracestate);
  result.is_root = true;
  return result;
}

trace_context continue_trace(std::string_view traceparent,
                             std::string_view tracestate) {
  auto fields = parse_traceparent(traceparent);
  // W3C: a tracestate is meaningless without the traceparent it belongs to.
  if (!fields)
    return new_root_trace();
  trace_context result;
  result.trace = fields->trace;
  result.parent = fields->parent;
  result.flags = fields->flags;
  result.tracestate = std::string{tracestate};
  result.is_root = false;
  do {
    result.span = new_span_id();
  } while (result.span == result.parent);
  return result;
}

trace_context child_of(const trace_context& parent) {
  trace_context result;
  result.trace = parent.trace;
  result.parent = parent.span;
  result.flags = parent.flags;
  result.tracestate = parent.tracestate;
  result.is_root = false;
  do {
    result.span = new_span_id();
  } while (result.span == result.parent);
  return result;
}

} // namespace evmesh
