#include "evmesh/tracing.hpp"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <boost/json.hpp>
#include <spdlog/spdlog.h>

#include "evmesh/error.hpp"

namespace evmesh {

span_sink::~span_sink() = default;

void span_sink::flush() noexcept {
  // nop
}

tenant_registry::~tenant_registry() = default;

namespace {

std::string hex(const span_id& x) {
  return to_hex(x.data(), x.size());
}

bool is_zero(const span_id& x) {
  return std::all_of(x.begin(), x.end(), [](uint8_t b) { return b == 0; });
}

class log_span_sink : public span_sink {
public:
  void record(const span_record& s) noexcept override {
    try {
      auto level = s.status == "ok" || s.status == "duplicate"
                     ? spdlog::level::debug
                     : spdlog::level::info;
      spdlog::log(level,
                  "span {} trace={} span={} parent={} attempt={} status={} "
                  "duration_us={}{}{}",
                  s.name, to_hex(s.context.trace.data(), 16),
                  hex(s.context.span), hex(s.context.parent), s.attempt,
                  s.status, (s.end_ns - s.start_ns) / 1000,
                  s.detail.empty() ? "" : " detail=", s.detail);
    } catch (...) {
      // Logging must never take a handler down.
    }
  }
};

class otlp_file_span_sink : public span_sink {
public:
  explicit otlp_file_span_sink(std::ofstream out, std::string path)
    : out_(std::move(out)), path_(std::move(path)) {
  }

  void record(const span_record& s) noexcept override {
    try {
      auto line = to_otlp_json(s, "evmesh");
      std::lock_guard guard{mtx_};
      out_ << line << '\n';
    } catch (...) {
      // A full disk must not take a handler down; flush() reports nothing.
    }
  }

  void flush() noexcept override {
    std::lock_guard guard{mtx_};
    out_.flush();
  }

  ~otlp_file_span_sink() override {
    flush();
  }

private:
  std::mutex mtx_;
  std::ofstream out_;
  std::string path_;
};

class static_tenant_registry : public tenant_registry {
public:
  static_tenant_registry(std::vector<std::string> known,
                         std::vector<std::string> suspended,
                         std::string fallback)
    : known_(std::move(known)),
      suspended_(std::move(suspended)),
      fallback_(std::move(fallback)) {
    std::sort(known_.begin(), known_.end());
    std::sort(suspended_.begin(), suspended_.end());
  }

  tenant_resolution resolve(std::string_view tenant) const override {
    if (tenant.empty())
      return {true, {}, {}};
    auto has = [&](const std::vector<std::string>& xs) {
      return std::binary_search(xs.begin(), xs.end(), tenant, std::less<>{});
    };
    if (has(suspended_))
      return {false, {}, "tenant '" + std::string{tenant} + "' is suspended"};
    if (has(known_))
      return {true, std::string{tenant}, {}};
    if (!fallback_.empty() && !has(suspended_))
      return {true, fallback_, {}};
    return {false,
            {},
            "tenant '" + std::string{tenant}
              + "' is unknown and no fallback tenant is configured"};
  }

private:
  std::vector<std::string> known_;
  std::vector<std::string> suspended_;
  std::string fallback_;
};

} // namespace

std::string to_otlp_json(const span_record& s, std::string_view service) {
  namespace json = boost::json;
  json::object span;
  span["traceId"] = to_hex(s.context.trace.data(), 16);
  span["spanId"] = hex(s.context.span);
  if (!is_zero(s.context.parent))
    span["parentSpanId"] = hex(s.context.parent);
  if (!s.context.tracestate.empty())
    span["traceState"] = s.context.tracestate;
  span["flags"] = s.context.flags;
  span["name"] = s.name;
  span["kind"] = 5; // SPAN_KIND_CONSUMER
  span["startTimeUnixNano"] = std::to_string(s.start_ns);
  span["endTimeUnixNano"] = std::to_string(s.end_ns);
  json::array attrs;
  auto add = [&](std::string_view key, json::value val) {
    json::object kv;
    kv["key"] = key;
    json::object v;
    if (val.is_string())
      v["stringValue"] = val;
    else
      v["intValue"] = json::serialize(val);
    kv["value"] = std::move(v);
    attrs.push_back(std::move(kv));
  };
  add("messaging.system", "evmesh");
  add("messaging.destination.name", json::string{s.topic});
  add("messaging.consumer.group.name", json::string{s.consumer});
  add("evmesh.pattern", json::string{s.pattern});
  add("evmesh.attempt", static_cast<int64_t>(s.attempt));
  add("evmesh.status", json::string{s.status});
  if (!s.detail.empty())
    add("evmesh.detail", json::string{s.detail});
  span["attributes"] = std::move(attrs);
  if (!is_zero(s.link)) {
    json::object link;
    link["traceId"] = to_hex(s.context.trace.data(), 16);
    link["spanId"] = hex(s.link);
    span["links"] = json::array{std::move(link)};
  }
  json::object status;
  status["code"] = (s.status == "ok" || s.status == "duplicate"
                    || s.status == "discard")
                     ? 1
                     : 2;
  if (!s.detail.empty())
    status["message"] = s.detail;
  span["status"] = std::move(status);
  json::object scope;
  scope["scope"] = json::object{{"name", "evmesh"}};
  scope["spans"] = json::array{std::move(span)};
  json::object resource;
  resource["resource"] = json::object{
    {"attributes", json::array{json::object{
                     {"key", "service.name"},
                     {"value", json::object{{"stringValue", service}}}}}}};
  resource["scopeSpans"] = json::array{std::move(scope)};
  json::object doc;
  doc["resourceSpans"] = json::array{std::move(resource)};
  return json::serialize(doc);
}

span_sink_ptr make_log_span_sink() {
  return std::make_shared<log_span_sink>();
}

caf::expected<span_sink_ptr> make_otlp_file_span_sink(const std::string& path) {
  std::error_code ec;
  auto parent = std::filesystem::path{path}.parent_path();
  if (!parent.empty())
    std::filesystem::create_directories(parent, ec);
  std::ofstream out{path, std::ios::app};
  if (!out)
    return make_error(errc::unavailable,
                      "cannot open span file '" + path
                        + "' for appending — check the directory exists and "
                          "is writable (tracing.sink)");
  return span_sink_ptr{
    std::make_shared<otlp_file_span_sink>(std::move(out), path)};
}

caf::expected<span_sink_ptr> make_span_sink(std::string_view spec) {
  if (spec.empty() || spec == "none")
    return span_sink_ptr{};
  if (spec == "log")
    return make_log_span_sink();
  constexpr std::string_view prefix = "otlp-file://";
  if (spec.substr(0, prefix.size()) == prefix && spec.size() > prefix.size())
    return make_otlp_file_span_sink(std::string{spec.substr(prefix.size())});
  return make_error(errc::invalid_config,
                    "tracing.sink = '" + std::string{spec}
                      + "': expected none, log or otlp-file://PATH");
}

std::shared_ptr<tenant_registry>
make_static_tenant_registry(std::vector<std::string> known,
                            std::vector<std::string> suspended,
                            std::string fallback) {
  return std::make_shared<static_tenant_registry>(
    std::move(known), std::move(suspended), std::move(fallback));
}

} // namespace evmesh
