#include <algorithm>
#include <cctype>
#include <charconv>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>

#include "evmesh/memory_store.hpp"
#include "evmesh/sqlite_store.hpp"
#include "evmesh/stores.hpp"

namespace evmesh {

namespace {

constexpr size_t max_shards = 4096;

/// Splits "scheme://rest" into its lower-cased scheme and rest.
bool split_url(std::string_view url, std::string& scheme,
               std::string_view& rest) {
  auto pos = url.find("://");
  if (pos == std::string_view::npos || pos == 0)
    return false;
  scheme.assign(url.substr(0, pos));
  std::transform(scheme.begin(), scheme.end(), scheme.begin(),
                 [](unsigned char c) {
                   return static_cast<char>(std::tolower(c));
                 });
  rest = url.substr(pos + 3);
  return true;
}

caf::error bad_url(std::string_view kind, std::string_view url,
                   std::string_view problem, std::string_view expected) {
  std::string msg;
  msg += problem;
  msg += ' ';
  msg += kind;
  msg += " URL '";
  msg += url;
  msg += "': expected ";
  msg += expected;
  return make_error(errc::invalid_url, std::move(msg));
}

constexpr std::string_view idempotency_kind = "idempotency store";
constexpr std::string_view idempotency_expected
  = "memory://, sqlite://PATH or redis://HOST:PORT/DB";
constexpr std::string_view dead_letter_kind = "dead-letter store";
constexpr std::string_view dead_letter_expected = "sqlite://PATH";

/// The file path of "sqlite://PATH": `sqlite:///abs/x.db` is absolute,
/// `sqlite://state/x.db` relative to the working directory.
caf::expected<std::string> sqlite_path(std::string_view kind,
                                       std::string_view url,
                                       std::string_view rest) {
  constexpr std::string_view expected
    = "sqlite://PATH (sqlite://relative/to/cwd.db or sqlite:///absolute.db)";
  if (rest.empty())
    return bad_url(kind, url, "missing file path in", expected);
  if (rest.find('?') != std::string_view::npos)
    return bad_url(kind, url, "sqlite:// takes no parameters in", expected);
  return std::string{rest};
}

caf::expected<idempotency_store_ptr> make_memory_store(std::string_view url,
                                                       std::string_view rest) {
  constexpr std::string_view expected = "memory:// or memory://?shards=N "
                                        "with N from 1 to 4096";
  size_t shards = 16;
  if (!rest.empty()) {
    if (rest.front() != '?')
      return bad_url(idempotency_kind, url, "unexpected host or path in",
                     expected);
    rest.remove_prefix(1);
    while (!rest.empty()) {
      auto amp = rest.find('&');
      auto param = rest.substr(0, amp);
      rest = amp == std::string_view::npos ? std::string_view{}
                                           : rest.substr(amp + 1);
      if (param.empty())
        continue;
      auto eq = param.find('=');
      auto name = param.substr(0, eq);
      auto value = eq == std::string_view::npos ? std::string_view{}
                                                : param.substr(eq + 1);
      if (name != "shards")
        return bad_url(idempotency_kind, url,
                       "unknown parameter '" + std::string{name} + "' in",
                       expected);
      auto first = value.data();
      auto last = value.data() + value.size();
      auto [ptr, ec] = std::from_chars(first, last, shards);
      if (value.empty() || ec != std::errc{} || ptr != last || shards == 0
          || shards > max_shards)
        return bad_url(idempotency_kind, url,
                       "invalid shards value '" + std::string{value} + "' in",
                       expected);
    }
  }
  return std::make_shared<memory_idempotency_store>(shards);
}

/// Factories of optional idempotency stores, by lower-case scheme.
struct idempotency_registry {
  std::mutex mtx;
  std::map<std::string, idempotency_store_factory, std::less<>> factories;

  static idempotency_registry& instance() {
    static idempotency_registry registry;
    return registry;
  }

  idempotency_store_factory find(std::string_view scheme) {
    std::lock_guard<std::mutex> guard{mtx};
    if (auto it = factories.find(scheme); it != factories.end())
      return it->second;
    return {};
  }
};

} // namespace

void register_idempotency_store(std::string scheme,
                                idempotency_store_factory factory) {
  std::transform(scheme.begin(), scheme.end(), scheme.begin(),
                 [](unsigned char c) {
                   return static_cast<char>(std::tolower(c));
                 });
  auto& registry = idempotency_registry::instance();
  std::lock_guard<std::mutex> guard{registry.mtx};
  registry.factories.insert_or_assign(std::move(scheme), std::move(factory));
}

caf::expected<idempotency_store_ptr>
make_idempotency_store(std::string_view url) {
  std::string scheme;
  std::string_view rest;
  if (!split_url(url, scheme, rest))
    return bad_url(idempotency_kind, url, "malformed", idempotency_expected);
  if (scheme == "memory")
    return make_memory_store(url, rest);
  if (scheme == "sqlite") {
    auto path = sqlite_path(idempotency_kind, url, rest);
    if (!path)
      return std::move(path.error());
    auto store = sqlite_idempotency_store::open(*path);
    if (!store)
      return std::move(store.error());
    return idempotency_store_ptr{std::move(*store)};
  }
  // Outside the registry's lock: a factory may connect to a server.
  if (auto factory = idempotency_registry::instance().find(scheme))
    return factory(url);
  if (scheme == "redis")
    return make_error(errc::invalid_url,
                      "idempotency store URL '" + std::string{url}
                        + "': redis:// is not built into this binary — build"
                          " with libhiredis-dev installed (target"
                          " evmesh_redis) and call"
                          " evmesh::register_redis_store(), or use memory://"
                          " or sqlite://PATH");
  return bad_url(idempotency_kind, url, "unknown", idempotency_expected);
}

namespace {

/// Factories of broker dead-letter stores, by lower-case scheme.
struct dead_letter_registry {
  std::mutex mtx;
  std::map<std::string, dead_letter_store_factory, std::less<>> factories;

  static dead_letter_registry& instance() {
    static dead_letter_registry registry;
    return registry;
  }

  dead_letter_store_factory find(std::string_view scheme) {
    std::lock_guard<std::mutex> guard{mtx};
    if (auto it = factories.find(scheme); it != factories.end())
      return it->second;
    return {};
  }

  std::string schemes() {
    std::lock_guard<std::mutex> guard{mtx};
    std::string out{dead_letter_expected};
    for (auto& kv : factories)
      out += ", " + kv.first + "://...";
    return out;
  }
};

} // namespace

void register_dead_letter_store(std::string scheme,
                                dead_letter_store_factory factory) {
  std::transform(scheme.begin(), scheme.end(), scheme.begin(),
                 [](unsigned char c) {
                   return static_cast<char>(std::tolower(c));
                 });
  if (scheme == "sqlite")
    return;
  auto& registry = dead_letter_registry::instance();
  std::lock_guard<std::mutex> guard{registry.mtx};
  registry.factories.insert_or_assign(std::move(scheme), std::move(factory));
}

caf::expected<dead_letter_store_ptr>
make_dead_letter_store(std::string_view url) {
  std::string scheme;
  std::string_view rest;
  if (!split_url(url, scheme, rest))
    return bad_url(dead_letter_kind, url, "malformed",
                   dead_letter_registry::instance().schemes());
  if (scheme != "sqlite") {
    // Outside the registry's lock: a factory may connect to a broker.
    if (auto factory = dead_letter_registry::instance().find(scheme))
      return factory(url);
    return bad_url(dead_letter_kind, url, "unknown",
                   dead_letter_registry::instance().schemes());
  }
  auto path = sqlite_path(dead_letter_kind, url, rest);
  if (!path)
    return std::move(path.error());
  auto store = sqlite_dead_letter_store::open(*path);
  if (!store)
    return std::move(store.error());
  return dead_letter_store_ptr{std::move(*store)};
}

} // namespace evmesh
