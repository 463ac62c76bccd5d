#include "evmesh/transport.hpp"

#include <algorithm>
#include <cctype>
#include <map>
#include <mutex>

#include "evmesh/error.hpp"

namespace evmesh {

namespace {

// Empties `s`, keeping its buffer unless it is over `max` bytes.
void reset_string(std::string& s, size_t max) noexcept {
  if (s.capacity() > max)
    std::string{}.swap(s);
  else
    s.clear();
}

} // namespace

raw_message& raw_batch::add() {
  static const raw_message fresh{};
  if (size_ == slots_.size()) {
    slots_.emplace_back();
    return slots_[size_++];
  }
  auto& m = slots_[size_++];
  m.tag = fresh.tag;
  m.delivery_count = fresh.delivery_count;
  for (auto* s : {&m.bytes, &m.subject, &m.traceparent, &m.tracestate, &m.key,
                  &m.position})
    reset_string(*s, max_kept_bytes);
  return m;
}

transport::~transport() = default;

caf::error transport::poll_into(size_t max, raw_batch& out) {
  // Whatever `poll` appended is handed on, also with an error.
  std::vector<raw_message> got;
  auto err = poll(max, got);
  for (auto& m : got)
    out.add() = std::move(m);
  return err;
}

caf::error transport::poll_through_batch(size_t max,
                                         std::vector<raw_message>& out) {
  raw_batch batch;
  auto err = poll_into(max, batch);
  out.reserve(out.size() + batch.size());
  for (auto& m : batch)
    out.push_back(std::move(m));
  return err;
}

bool transport::connected() const noexcept {
  return true;
}

caf::error transport::defer(uint64_t, caf::timespan, uint32_t) {
  return make_error(errc::invalid_state,
                    std::string{scheme()}
                      + ": this transport cannot defer a retry to the broker");
}

uint64_t transport::attempt_started(uint64_t) noexcept {
  return 0;
}

void transport::attempt_finished(uint64_t) noexcept {
  // Nothing to do for brokers that count deliveries themselves.
}

void transport::set_wakeup(std::function<void()>) {
  // Transports without push notifications are polled on a timer.
}

namespace {

struct factory_table {
  std::mutex mtx;
  std::map<std::string, transport_factory, std::less<>> factories;
};

factory_table& factories() {
  static factory_table table;
  return table;
}

} // namespace

void register_transport(std::string scheme, transport_factory factory) {
  auto& t = factories();
  std::lock_guard guard{t.mtx};
  t.factories[std::move(scheme)] = std::move(factory);
}

std::string redact_url(std::string_view url) {
  std::string out{url};
  auto start = out.find("://");
  if (start == std::string::npos)
    return out;
  start += 3;
  auto query = out.find('?', start);
  auto at = out.find('@', start);
  auto slash = out.find('/', start);
  auto authority_end = std::min(slash, query);
  if (at != std::string::npos && at < authority_end) {
    auto colon = out.find(':', start);
    if (colon != std::string::npos && colon < at)
      out.replace(colon + 1, at - colon - 1, "***");
    else
      out.replace(start, at - start, "***");
  }
  query = out.find('?', start);
  if (query == std::string::npos)
    return out;
  auto secret = [](std::string name) {
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) {
      return static_cast<char>(std::tolower(c));
    });
    for (const char* word : {"password", "secret", "token", "credential"})
      if (name.find(word) != std::string::npos)
        return true;
    return false;
  };
  auto pos = query + 1;
  while (pos < out.size()) {
    auto amp = out.find('&', pos);
    auto end = amp == std::string::npos ? out.size() : amp;
    auto eq = out.find('=', pos);
    if (eq != std::string::npos && eq < end
        && secret(out.substr(pos, eq - pos))) {
      out.replace(eq + 1, end - eq - 1, "***");
      end = eq + 4;
    }
    pos = end + 1;
  }
  return out;
}

caf::expected<transport_ptr> make_transport(std::string_view url,
                                            const transport_environment& env) {
  auto sep = url.find("://");
  if (sep == std::string_view::npos || sep == 0)
    return make_error(errc::invalid_url,
                      "transport URL '" + std::string{url}
                        + "' has no scheme (expected e.g. inproc://default)");
  auto scheme = url.substr(0, sep);
  transport_factory factory;
  std::string known;
  {
    auto& t = factories();
    std::lock_guard guard{t.mtx};
    if (auto i = t.factories.find(scheme); i != t.factories.end())
      factory = i->second;
    for (auto& [name, f] : t.factories)
      known += (known.empty() ? "" : ", ") + name + "://";
  }
  if (!factory)
    return make_error(errc::invalid_url,
                      "no transport for scheme '" + std::string{scheme}
                        + "' in '" + std::string{url}
                        + "'; this binary supports: "
                        + (known.empty() ? std::string{"(none)"} : known));
  return factory(url, env);
}

} // namespace evmesh
