#include "evmesh/transport.hpp"

#include <map>
#include <mutex>

#include "evmesh/error.hpp"

namespace evmesh {

transport::~transport() = default;

bool transport::connected() const noexcept {
  return true;
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
