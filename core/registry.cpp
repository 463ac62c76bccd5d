#include "evmesh/registry.hpp"

#include <algorithm>
#include <cstring>
#include <map>

#include "evmesh/error.hpp"

namespace evmesh {

namespace detail {

constinit const handler_descriptor* registry_head = nullptr;

} // namespace detail

std::vector<const handler_descriptor*> registered_handlers() {
  std::vector<const handler_descriptor*> result;
  for (auto ptr = detail::registry_head; ptr != nullptr; ptr = ptr->next)
    result.push_back(ptr);
  std::stable_sort(result.begin(), result.end(), [](auto x, auto y) {
    auto c = std::strcmp(x->consumer, y->consumer);
    return c != 0 ? c < 0 : std::strcmp(x->pattern, y->pattern) < 0;
  });
  return result;
}

namespace {

std::string where(const handler_descriptor& d) {
  if (d.file == nullptr || *d.file == '\0')
    return "<unknown>";
  return std::string{d.file} + ":" + std::to_string(d.line);
}

caf::error check_options(const handler_descriptor& d,
                         const subscription_options& opts) {
  auto fail = [&](std::string what) {
    return make_error(errc::invalid_config,
                      "handler for consumer '" + std::string{d.consumer}
                        + "' pattern '" + d.pattern + "' (" + where(d)
                        + "): " + what);
  };
  if (opts.max_attempts < 1)
    return fail("max_attempts must be >= 1");
  if (opts.concurrency < 1)
    return fail("concurrency must be >= 1");
  if (opts.timeout.count() <= 0)
    return fail("timeout must be > 0");
  if (opts.backoff.multiplier < 1.0)
    return fail("backoff multiplier must be >= 1.0");
  if (opts.backoff.initial.count() < 0
      || opts.backoff.max < opts.backoff.initial)
    return fail("backoff initial must be >= 0 and <= max");
  return {};
}

} // namespace

caf::expected<dispatch_table>
freeze_handlers(const std::vector<const handler_descriptor*>& handlers,
                const subscription_options& defaults) {
  dispatch_table result;
  std::map<std::pair<std::string, std::string>, const handler_descriptor*> seen;
  std::vector<std::pair<std::string, uint32_t>> patterns;
  for (auto ptr : handlers) {
    auto& d = *ptr;
    if (d.consumer == nullptr || *d.consumer == '\0')
      return make_error(errc::invalid_config,
                        "handler at " + where(d) + " has no consumer name");
    if ((d.fn == nullptr) == (d.factory == nullptr))
      return make_error(errc::invalid_config,
                        "handler for consumer '" + std::string{d.consumer}
                          + "' pattern '" + d.pattern + "' (" + where(d)
                          + ") must have exactly one of a function or an "
                            "actor factory");
    if (auto err = validate_pattern(d.pattern))
      return make_error(errc::invalid_pattern,
                        "handler for consumer '" + std::string{d.consumer}
                          + "' (" + where(d) + "): " + render(err));
    auto [i, added] = seen.emplace(
      std::make_pair(std::string{d.consumer}, std::string{d.pattern}), ptr);
    if (!added)
      return make_error(errc::duplicate_subscription,
                        "consumer '" + std::string{d.consumer}
                          + "' registers pattern '" + d.pattern + "' twice ("
                          + where(*i->second) + " and " + where(d)
                          + "); each (consumer, pattern) is one subscription "
                            "— remove one handler or give it another consumer");
    subscription sub;
    sub.handler = ptr;
    sub.options = resolve(defaults, d.options);
    if (auto err = check_options(d, sub.options))
      return err;
    sub.name = std::string{d.consumer} + "/" + d.pattern;
    patterns.emplace_back(d.pattern,
                          static_cast<uint32_t>(result.subscriptions.size()));
    result.subscriptions.push_back(std::move(sub));
  }
  auto matcher = topic_matcher::make(patterns);
  if (!matcher)
    return matcher.error();
  result.matcher = std::move(*matcher);
  return result;
}

} // namespace evmesh
