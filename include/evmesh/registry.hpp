#pragma once

#include <string>
#include <type_traits>
#include <vector>

#include <caf/behavior.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/expected.hpp>

#include "evmesh/context.hpp"
#include "evmesh/options.hpp"
#include "evmesh/outcome.hpp"
#include "evmesh/pattern.hpp"

namespace evmesh {

/// A function handler after adaptation: runs one attempt, returns its outcome.
using handler_fn = outcome (*)(event_context&);

/// Spawns the behavior of an actor handler. The actor receives
/// `evmesh::delivery` and answers an `evmesh::outcome`, possibly later via a
/// response promise. An actor that quits abnormally counts as a crash: the
/// attempt is counted and a fresh actor is spawned.
using actor_factory = caf::behavior (*)(caf::event_based_actor*);

/// One handler: emitted statically by `EVMESH_EVENT_PATTERN` or built by hand
/// (tests, plugins) and passed to `consumer_runtime::set_handlers`.
struct handler_descriptor {
  /// Consumer (group) name; with `pattern`, identifies a subscription.
  const char* consumer = "";
  /// Topic pattern: exact, or with `*` (one token) / `>` (the rest).
  const char* pattern = "";
  /// Function handler, or nullptr for an actor handler.
  handler_fn fn = nullptr;
  /// Actor handler, or nullptr for a function handler.
  actor_factory factory = nullptr;
  /// Per-handler overrides of the runtime's defaults.
  handler_options options;
  /// Where it was declared (for error messages).
  const char* file = "";
  int line = 0;
  /// Intrusive link of the static registry.
  const handler_descriptor* next = nullptr;
};

/// The handlers registered statically with `EVMESH_EVENT_PATTERN` /
/// `EVMESH_EVENT_ACTOR` in this program, ordered by (consumer, pattern).
std::vector<const handler_descriptor*> registered_handlers();

/// One subscription of the frozen dispatch table.
struct subscription {
  const handler_descriptor* handler = nullptr;
  /// Options resolved against the runtime's defaults.
  subscription_options options;
  /// "consumer/pattern", for logs and metrics.
  std::string name;
};

/// The immutable topic -> subscriptions table built at `start()`.
struct dispatch_table {
  std::vector<subscription> subscriptions;
  topic_matcher matcher;

  /// Appends the indexes of the subscriptions matching `topic` to `out`.
  void match(std::string_view topic, std::vector<uint32_t>& out) const {
    matcher.match(topic, out);
  }
};

/// Freezes `handlers` into a dispatch table. Fails with
/// `errc::duplicate_subscription` when a (consumer, pattern) repeats, with
/// `errc::invalid_pattern` for a bad pattern, and `errc::invalid_config` for
/// bad options or a descriptor with neither or both of `fn` and `factory`.
caf::expected<dispatch_table>
freeze_handlers(const std::vector<const handler_descriptor*>& handlers,
                const subscription_options& defaults);

namespace detail {

/// Head of the static registry; constant-initialized, so registration during
/// static initialization is order-independent.
extern const handler_descriptor* registry_head;

/// A descriptor that links itself into the static registry on construction:
/// no allocation, no lock (static initialization is single-threaded).
struct registered_descriptor : handler_descriptor {
  explicit registered_descriptor(handler_descriptor d) noexcept
    : handler_descriptor(d) {
    next = registry_head;
    registry_head = this;
  }
};

template <class F>
inline constexpr bool returns_outcome
  = std::is_convertible_v<std::invoke_result_t<F, event_context&>, outcome>;

/// Adapts a handler (`outcome f(event_context&)` or `void f(event_context&)`).
template <auto F>
outcome invoke(event_context& ctx) {
  using fn_type = decltype(F);
  if constexpr (std::is_void_v<std::invoke_result_t<fn_type, event_context&>>) {
    std::invoke(F, ctx);
    return ok();
  } else {
    static_assert(returns_outcome<fn_type>,
                  "an evmesh handler returns evmesh::outcome or void");
    return std::invoke(F, ctx);
  }
}

} // namespace detail

} // namespace evmesh

#define EVMESH_PP_CAT_I(a, b) a##b
#define EVMESH_PP_CAT(a, b) EVMESH_PP_CAT_I(a, b)

#define EVMESH_EVENT_PATTERN_I(id, consumer_type, pattern_text, handler, ...)  \
  static ::evmesh::detail::registered_descriptor EVMESH_PP_CAT(                \
    evmesh_handler_, id){::evmesh::handler_descriptor{                         \
    #consumer_type, pattern_text, &::evmesh::detail::invoke<handler>, nullptr, \
    ::evmesh::handler_options{__VA_ARGS__}, __FILE__, __LINE__, nullptr}};

/// Registers `handler` (`outcome f(event_context&)` or `void
/// f(event_context&)`) for topics matching `pattern` in consumer
/// `consumer_type`. Optional designated initializers of
/// `evmesh::handler_options` follow: `.max_attempts = 3, .ordering =
/// evmesh::ordering::none`. Collected during static initialization; frozen by
/// `consumer_runtime::start()`. Put handler sources in an OBJECT library or
/// use `evmesh_add_handlers()` so the linker does not drop them.
#define EVMESH_EVENT_PATTERN(consumer_type, pattern_text, ...)                 \
  EVMESH_EVENT_PATTERN_I(__COUNTER__, consumer_type, pattern_text, __VA_ARGS__)

#define EVMESH_EVENT_ACTOR_I(id, consumer_type, pattern_text, factory, ...)    \
  static ::evmesh::detail::registered_descriptor EVMESH_PP_CAT(                \
    evmesh_handler_, id){::evmesh::handler_descriptor{                         \
    #consumer_type, pattern_text, nullptr, factory,                            \
    ::evmesh::handler_options{__VA_ARGS__}, __FILE__, __LINE__, nullptr}};

/// Registers an actor handler: `factory` is `caf::behavior
/// (*)(caf::event_based_actor*)`; the actor receives `evmesh::delivery` and
/// answers `evmesh::outcome`. Options as for `EVMESH_EVENT_PATTERN`.
#define EVMESH_EVENT_ACTOR(consumer_type, pattern_text, ...)                   \
  EVMESH_EVENT_ACTOR_I(__COUNTER__, consumer_type, pattern_text, __VA_ARGS__)
