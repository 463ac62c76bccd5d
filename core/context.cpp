#include "evmesh/context.hpp"

#include <chrono>
#include <ctime>

#include "evmesh/error.hpp"

namespace evmesh {

publisher::~publisher() = default;

std::string rfc3339_now() {
  auto now = std::chrono::system_clock::now();
  auto secs = std::chrono::system_clock::to_time_t(now);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
              now.time_since_epoch())
              .count()
            % 1000;
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[32];
  auto n = std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
  std::snprintf(buf + n, sizeof(buf) - n, ".%03dZ", static_cast<int>(ms));
  return buf;
}

caf::error event_context::publish(envelope env) const {
  if (out_ == nullptr)
    return make_error(errc::invalid_state,
                      "event_context::publish: the runtime has no publisher");
  if (env.traceparent.empty()) {
    env.traceparent = trace_.traceparent();
    if (env.tracestate.empty())
      env.tracestate = trace_.tracestate;
  }
  if (env.id.empty())
    env.id = to_hex(new_trace_id().data(), 16);
  if (env.produced_at.empty())
    env.produced_at = rfc3339_now();
  if (env.tenant.empty())
    env.tenant = tenant_;
  return out_->publish(std::move(env));
}

} // namespace evmesh
