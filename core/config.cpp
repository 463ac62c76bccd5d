#include "evmesh/config.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <variant>

#include <CLI/CLI.hpp>
#include <toml++/toml.h>
#include <unistd.h>

#include "evmesh/error.hpp"

namespace evmesh {

namespace {

// -- small text helpers ------------------------------------------------------
std::string_view trim(std::string_view x) {
  auto is_space = [](char c) {
    return std::isspace(static_cast<unsigned char>(c)) != 0;
  };
  while (!x.empty() && is_space(x.front()))
    x.remove_prefix(1);
  while (!x.empty() && is_space(x.back()))
    x.remove_suffix(1);
  return x;
}

std::string in_quotes(std::string_view x) {
  std::string result;
  result.reserve(x.size() + 2);
  result += '"';
  result += x;
  result += '"';
  return result;
}

std::string join(const std::vector<std::string>& xs, std::string_view sep) {
  std::string result;
  for (const auto& x : xs) {
    if (!result.empty())
      result += sep;
    result += x;
  }
  return result;
}

std::vector<std::string_view> split(std::string_view x, char sep) {
  std::vector<std::string_view> result;
  for (;;) {
    auto pos = x.find(sep);
    result.push_back(x.substr(0, pos));
    if (pos == std::string_view::npos)
      return result;
    x.remove_prefix(pos + 1);
  }
}

/// Optimal string alignment distance (Levenshtein plus transpositions).
size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::vector<size_t>> d(a.size() + 1,
                                     std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i)
    d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j)
    d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j]
        = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

/// The candidate closest to `name`, if it is close enough to be a typo.
std::optional<std::string> closest(std::string_view name,
                                   const std::vector<std::string>& candidates) {
  std::optional<std::string> best;
  size_t best_distance = std::numeric_limits<size_t>::max();
  for (const auto& candidate : candidates) {
    auto distance = edit_distance(name, candidate);
    if (distance < best_distance) {
      best_distance = distance;
      best = candidate;
    }
  }
  auto limit = std::max<size_t>(2, name.size() / 3);
  if (best_distance > limit)
    return std::nullopt;
  return best;
}

// -- durations ---------------------------------------------------------------
constexpr std::string_view duration_hint
  = "write an integer with a unit, e.g. \"250ms\", \"30s\", \"5m\", "
    "\"1m30s\" (units: ns, us, ms, s, m, h)";

std::optional<caf::timespan> parse_duration_impl(std::string_view text,
                                                 std::string& why) {
  auto input = trim(text);
  auto bad = [&](std::string reason) {
    why = "invalid duration " + in_quotes(text) + ": " + std::move(reason)
          + " — " + std::string{duration_hint};
    return std::nullopt;
  };
  if (input.empty())
    return bad("it is empty");
  int64_t total = 0;
  while (!input.empty()) {
    if (input.front() == '-')
      return bad("negative durations are not allowed");
    if (!std::isdigit(static_cast<unsigned char>(input.front())))
      return bad("expected a number at " + in_quotes(input));
    int64_t count = 0;
    auto [ptr, ec] = std::from_chars(input.data(), input.data() + input.size(),
                                     count);
    if (ec != std::errc{})
      return bad("the number is too large");
    auto digits = static_cast<size_t>(ptr - input.data());
    auto number = input.substr(0, digits);
    input.remove_prefix(digits);
    if (!input.empty() && (input.front() == '.' || input.front() == ','))
      return bad("fractions are not supported (use a smaller unit)");
    size_t unit_len = 0;
    while (unit_len < input.size()
           && std::isalpha(static_cast<unsigned char>(input[unit_len])))
      ++unit_len;
    auto unit = input.substr(0, unit_len);
    input.remove_prefix(unit_len);
    int64_t scale = 0;
    if (unit == "ns")
      scale = 1;
    else if (unit == "us")
      scale = 1'000;
    else if (unit == "ms")
      scale = 1'000'000;
    else if (unit == "s")
      scale = 1'000'000'000;
    else if (unit == "m")
      scale = 60'000'000'000;
    else if (unit == "h")
      scale = 3'600'000'000'000;
    else if (unit.empty())
      return bad("missing unit after " + std::string{number});
    else
      return bad("unknown unit " + in_quotes(unit));
    int64_t part = 0;
    if (__builtin_mul_overflow(count, scale, &part)
        || __builtin_add_overflow(total, part, &total))
      return bad("it is too large");
  }
  return caf::timespan{total};
}

// -- values and the key table ------------------------------------------------
/// A typed value, converted from TOML or command-line text per key type.
using value = std::variant<bool, int64_t, double, std::string,
                           std::vector<std::string>, caf::timespan>;

/// Stores `x` into the config; returns the violated rule or "".
using apply_fn = std::string (*)(runtime_config&, const value&);

/// Reads the key's current value from the config.
using get_fn = value (*)(const runtime_config&);

struct key_entry {
  config_key key;
  apply_fn apply;
  get_fn get;
};

std::string to_text(const value& x) {
  struct visitor {
    std::string operator()(bool y) const {
      return y ? "true" : "false";
    }
    std::string operator()(int64_t y) const {
      return std::to_string(y);
    }
    std::string operator()(double y) const {
      char buf[64];
      auto res = std::to_chars(buf, buf + sizeof(buf), y);
      std::string str{buf, res.ptr};
      if (str.find_first_of(".eEn") == std::string::npos)
        str += ".0";
      return str;
    }
    std::string operator()(const std::string& y) const {
      return y;
    }
    std::string operator()(const std::vector<std::string>& y) const {
      return join(y, ",");
    }
    std::string operator()(caf::timespan y) const {
      return format_duration(y);
    }
  };
  return std::visit(visitor{}, x);
}

bool in_choices(std::string_view x, std::string_view choices) {
  for (auto choice : split(choices, '|'))
    if (choice == x)
      return true;
  return false;
}

std::string choices_rule(std::string_view choices) {
  std::string result = "must be one of ";
  auto xs = split(choices, '|');
  for (size_t i = 0; i < xs.size(); ++i) {
    if (i > 0)
      result += i + 1 == xs.size() ? " or " : ", ";
    result += in_quotes(xs[i]);
  }
  return result;
}

template <class T>
std::string set_int(T& dst, const value& x, int64_t min,
                    int64_t max = std::numeric_limits<int64_t>::max()) {
  constexpr auto type_max = std::numeric_limits<T>::max();
  bool bounded = max != std::numeric_limits<int64_t>::max();
  if (static_cast<uint64_t>(type_max)
      < static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    max = std::min(max, static_cast<int64_t>(type_max));
  auto y = std::get<int64_t>(x);
  if (y >= min && y <= max) {
    dst = static_cast<T>(y);
    return {};
  }
  if (bounded)
    return "must be between " + std::to_string(min) + " and "
           + std::to_string(max);
  if (y < min)
    return "must be >= " + std::to_string(min);
  return "must be <= " + std::to_string(max);
}

std::string set_duration(caf::timespan& dst, const value& x, bool allow_zero) {
  auto y = std::get<caf::timespan>(x);
  if (!allow_zero && y.count() == 0)
    return "must be > 0";
  dst = y;
  return {};
}

std::string set_choice(std::string& dst, const value& x,
                       std::string_view choices) {
  const auto& y = std::get<std::string>(x);
  if (!in_choices(y, choices))
    return choices_rule(choices);
  dst = y;
  return {};
}

template <class E>
struct named {
  std::string_view name;
  E value;
};

constexpr named<store_failure_policy> policy_names[] = {
  {"fail_open", store_failure_policy::fail_open},
  {"fail_closed", store_failure_policy::fail_closed},
};

constexpr named<jitter> jitter_names[] = {
  {"none", jitter::none},
  {"full", jitter::full},
};

constexpr named<ordering> ordering_names[] = {
  {"per_key", ordering::per_key},
  {"none", ordering::none},
};

constexpr named<execution> execution_names[] = {
  {"cooperative", execution::cooperative},
  {"blocking", execution::blocking},
};

template <class E, size_t N>
std::string set_enum(E& dst, const value& x, const named<E> (&names)[N]) {
  const auto& y = std::get<std::string>(x);
  std::string all;
  for (const auto& n : names) {
    if (n.name == y) {
      dst = n.value;
      return {};
    }
    all += all.empty() ? "" : "|";
    all += n.name;
  }
  return choices_rule(all);
}

template <class E, size_t N>
value get_enum(E x, const named<E> (&names)[N]) {
  for (const auto& n : names)
    if (n.value == x)
      return std::string{n.name};
  return std::string{"?"};
}

/// A URL with a scheme (`sqlite://state/dlq.db`), or `none` if allowed.
std::string set_url(std::string& dst, const value& x, bool allow_none) {
  const auto& y = std::get<std::string>(x);
  auto ok = [&] {
    if (allow_none && y == "none")
      return true;
    auto pos = y.find("://");
    if (pos == std::string::npos || pos == 0)
      return false;
    if (!std::islower(static_cast<unsigned char>(y[0])))
      return false;
    return std::all_of(y.begin(), y.begin() + static_cast<ptrdiff_t>(pos),
                       [](char c) {
                         return std::islower(static_cast<unsigned char>(c))
                                || std::isdigit(static_cast<unsigned char>(c))
                                || c == '+' || c == '-' || c == '.';
                       });
  }();
  if (!ok)
    return allow_none ? "must be a URL like \"scheme://...\" or \"none\""
                      : "must be a URL like \"scheme://...\"";
  dst = y;
  return {};
}

std::string set_names(std::vector<std::string>& dst, const value& x) {
  const auto& y = std::get<std::vector<std::string>>(x);
  for (const auto& name : y)
    if (trim(name).empty())
      return "must not contain empty names";
  dst = y;
  return {};
}

/// `host:port` (IPv6 hosts in brackets); port 0 only if allowed.
bool is_host_port(std::string_view x, bool allow_port_zero) {
  auto pos = x.rfind(':');
  if (pos == std::string_view::npos || pos == 0 || pos + 1 == x.size())
    return false;
  auto host = x.substr(0, pos);
  auto port = x.substr(pos + 1);
  if (host.find_first_of(" /") != std::string_view::npos)
    return false;
  if (host.find(':') != std::string_view::npos
      && !(host.front() == '[' && host.back() == ']'))
    return false;
  unsigned num = 0;
  auto [ptr, ec] = std::from_chars(port.data(), port.data() + port.size(), num);
  if (ec != std::errc{} || ptr != port.data() + port.size() || num > 65535)
    return false;
  return allow_port_zero || num > 0;
}

value get_size(size_t x) {
  return static_cast<int64_t>(
    std::min<size_t>(x, std::numeric_limits<int64_t>::max()));
}

using rc = runtime_config;

// The one key table. Order: sections as in the reference, keys within.
constexpr key_entry entries[] = {
  // -- [runtime]
  {{"runtime.node_name", config_type::string, "(hostname)",
    "Name of this node in dead-letter records, traces and cluster "
    "membership. Defaults to the hostname.",
    ""},
   [](rc& c, const value& x) -> std::string {
     const auto& y = std::get<std::string>(x);
     if (y.find_first_of(" \t\r\n") != std::string::npos)
       return "must not contain whitespace";
     c.node_name = y;
     return {};
   },
   [](const rc& c) -> value { return c.node_name; }},
  {{"runtime.stop_timeout", config_type::duration, "10s",
    "How long stop() waits for in-flight handlers before nacking the rest "
    "for redelivery.",
    ""},
   [](rc& c, const value& x) { return set_duration(c.stop_timeout, x, true); },
   [](const rc& c) -> value { return c.stop_timeout; }},
  {{"runtime.log_level", config_type::choice, "info", "Log verbosity.",
    "trace|debug|info|warn|error|off"},
   [](rc& c, const value& x) {
     return set_choice(c.log_level, x, "trace|debug|info|warn|error|off");
   },
   [](const rc& c) -> value { return c.log_level; }},
  {{"runtime.idle_workers", config_type::choice, "sleep",
    "What CAF's scheduler threads do when they run out of work: sleep "
    "(block at once, look for work to steal every 1 ms) or poll (CAF's "
    "default: spin, then 50 us sleeps for a while). sleep leaves the CPU "
    "to the broker client and a co-located broker.",
    "poll|sleep"},
   [](rc& c, const value& x) {
     return set_choice(c.idle_workers, x, "poll|sleep");
   },
   [](const rc& c) -> value { return c.idle_workers; }},
  {{"runtime.idle_steal_interval", config_type::duration, "1ms",
    "With idle_workers = sleep: how often a sleeping scheduler thread looks "
    "for work another thread queued. Shorter lowers the tail latency of "
    "bursts and costs idle CPU (10us to 1s).",
    ""},
   [](rc& c, const value& x) -> std::string {
     auto y = std::get<caf::timespan>(x);
     if (y < std::chrono::microseconds{10} || y > std::chrono::seconds{1})
       return "must be between 10us and 1s";
     c.idle_steal_interval = y;
     return {};
   },
   [](const rc& c) -> value { return c.idle_steal_interval; }},
  {{"runtime.scheduler_threads", config_type::integer, "0",
    "CAF scheduler threads of the actor system the runtime creates: 0 for "
    "one per core (CAF's own default is at least 4). Blocking handlers run "
    "on threads of their own; raise it when SQLite or Redis dedupe calls, "
    "which block a scheduler thread, are slow (0 to 256).",
    ""},
   [](rc& c, const value& x) {
     return set_int(c.scheduler_threads, x, 0, 256);
   },
   [](const rc& c) { return get_size(c.scheduler_threads); }},
  // -- [transport]
  {{"transport.url", config_type::string, "inproc://default",
    "Broker to consume from: an inproc://, nats://, kafka:// or amqp:// "
    "URL.",
    ""},
   [](rc& c, const value& x) { return set_url(c.transport_url, x, false); },
   [](const rc& c) -> value { return c.transport_url; }},
  {{"transport.max_in_flight", config_type::integer, "4096",
    "Messages in flight per source; the source stops polling while it is "
    "full (>= transport.poll_batch, <= 16777216).",
    ""},
   [](rc& c, const value& x) {
     return set_int(c.max_in_flight, x, 1, int64_t{1} << 24);
   },
   [](const rc& c) { return get_size(c.max_in_flight); }},
  {{"transport.poll_batch", config_type::integer, "256",
    "Messages fetched per poll (>= 1).", ""},
   [](rc& c, const value& x) { return set_int(c.poll_batch, x, 1); },
   [](const rc& c) { return get_size(c.poll_batch); }},
  {{"transport.poll_idle", config_type::duration, "5ms",
    "Pause after a poll that came back short (> 0). Transports that wake "
    "the source when messages arrive (all built-in ones) are re-polled only "
    "every 20 x poll_idle, as a safety net.",
    ""},
   [](rc& c, const value& x) { return set_duration(c.poll_idle, x, false); },
   [](const rc& c) -> value { return c.poll_idle; }},
  {{"transport.max_message_bytes", config_type::integer, "1048576",
    "Messages larger than this are dead-lettered without being decoded "
    "(1 to 4294967295).",
    ""},
   [](rc& c, const value& x) {
     return set_int(c.max_message_bytes, x, 1, int64_t{0xFFFF'FFFF});
   },
   [](const rc& c) { return get_size(c.max_message_bytes); }},
  // -- [dedupe]
  {{"dedupe.url", config_type::string, "sqlite://state/dedupe.db",
    "Idempotency store: sqlite://PATH, memory:// or redis://HOST:PORT/DB; "
    "none disables dedupe.",
    ""},
   [](rc& c, const value& x) { return set_url(c.dedupe_url, x, true); },
   [](const rc& c) -> value { return c.dedupe_url; }},
  {{"dedupe.lease", config_type::duration, "1m",
    "How long a claim on a message's idempotency key lasts while its handler "
    "runs (> 0, >= consumer.timeout).",
    ""},
   [](rc& c, const value& x) { return set_duration(c.dedupe_lease, x, false); },
   [](const rc& c) -> value { return c.dedupe_lease; }},
  {{"dedupe.keep", config_type::duration, "24h",
    "How long a handled key is remembered, so redeliveries are acked as "
    "duplicates (> 0).",
    ""},
   [](rc& c, const value& x) { return set_duration(c.dedupe_keep, x, false); },
   [](const rc& c) -> value { return c.dedupe_keep; }},
  {{"dedupe.on_unavailable", config_type::choice, "fail_open",
    "When the store cannot answer: fail_open runs the handler anyway, "
    "fail_closed retries the message later.",
    "fail_open|fail_closed"},
   [](rc& c, const value& x) {
     return set_enum(c.dedupe_policy, x, policy_names);
   },
   [](const rc& c) { return get_enum(c.dedupe_policy, policy_names); }},
  // -- [dead_letter]
  {{"dead_letter.url", config_type::string, "sqlite://state/dlq.db",
    "Dead-letter store: sqlite://PATH, or none to keep dead letters only in "
    "the broker's own DLQ (where it has one, as the in-process broker does).",
    ""},
   [](rc& c, const value& x) { return set_url(c.dead_letter_url, x, true); },
   [](const rc& c) -> value { return c.dead_letter_url; }},
  {{"dead_letter.mask_fields", config_type::string_list, "",
    "Payload fields whose values are masked before a dead-letter record is "
    "written (PII).",
    ""},
   [](rc& c, const value& x) { return set_names(c.mask_fields, x); },
   [](const rc& c) -> value { return c.mask_fields; }},
  // -- [retry]
  {{"retry.max_attempts", config_type::integer, "5",
    "Handler executions before a message is dead-lettered as "
    "retries_exhausted (>= 1).",
    ""},
   [](rc& c, const value& x) { return set_int(c.defaults.max_attempts, x, 1); },
   [](const rc& c) -> value { return int64_t{c.defaults.max_attempts}; }},
  {{"retry.initial", config_type::duration, "100ms",
    "Backoff before the second attempt (<= retry.max).", ""},
   [](rc& c, const value& x) {
     return set_duration(c.defaults.backoff.initial, x, true);
   },
   [](const rc& c) -> value { return c.defaults.backoff.initial; }},
  {{"retry.multiplier", config_type::floating, "2.0",
    "Growth of the backoff per attempt (>= 1.0).", ""},
   [](rc& c, const value& x) -> std::string {
     auto y = std::get<double>(x);
     if (!std::isfinite(y) || y < 1.0)
       return "must be a number >= 1.0";
     c.defaults.backoff.multiplier = y;
     return {};
   },
   [](const rc& c) -> value { return c.defaults.backoff.multiplier; }},
  {{"retry.max", config_type::duration, "30s",
    "Cap on the backoff between two attempts.", ""},
   [](rc& c, const value& x) {
     return set_duration(c.defaults.backoff.max, x, true);
   },
   [](const rc& c) -> value { return c.defaults.backoff.max; }},
  {{"retry.jitter", config_type::choice, "full",
    "none: exact exponential delays; full: uniform in [0, delay] (AWS full "
    "jitter), so retries of many messages do not arrive in waves.",
    "none|full"},
   [](rc& c, const value& x) {
     return set_enum(c.defaults.backoff.jitter, x, jitter_names);
   },
   [](const rc& c) {
     return get_enum(c.defaults.backoff.jitter, jitter_names);
   }},
  // -- [consumer]
  {{"consumer.ordering", config_type::choice, "per_key",
    "per_key: messages with the same key run in order and a failure parks "
    "only its key; none: no ordering, maximum parallelism.",
    "per_key|none"},
   [](rc& c, const value& x) {
     return set_enum(c.defaults.ordering, x, ordering_names);
   },
   [](const rc& c) { return get_enum(c.defaults.ordering, ordering_names); }},
  {{"consumer.concurrency", config_type::integer, "8",
    "Messages one subscription runs at once: its handler lanes (1 to "
    "100000).",
    ""},
   [](rc& c, const value& x) {
     return set_int(c.defaults.concurrency, x, 1, 100'000);
   },
   [](const rc& c) -> value { return int64_t{c.defaults.concurrency}; }},
  {{"consumer.timeout", config_type::duration, "30s",
    "A handler running longer is abandoned and the attempt counts as failed "
    "(> 0).",
    ""},
   [](rc& c, const value& x) {
     return set_duration(c.defaults.timeout, x, false);
   },
   [](const rc& c) -> value { return c.defaults.timeout; }},
  {{"consumer.execution", config_type::choice, "cooperative",
    "cooperative: handlers run on CAF's scheduler (non-blocking code only); "
    "blocking: lanes get their own threads (database or HTTP calls).",
    "cooperative|blocking"},
   [](rc& c, const value& x) {
     return set_enum(c.defaults.execution, x, execution_names);
   },
   [](const rc& c) { return get_enum(c.defaults.execution, execution_names); }},
  // -- [supervision]
  {{"supervision.restart_limit", config_type::integer, "10",
    "Lane restarts per restart_window before the subscription pauses and "
    "health turns degraded; also topic supervisor restarts per window before "
    "the runtime stops (>= 1).",
    ""},
   [](rc& c, const value& x) { return set_int(c.restart_limit, x, 1); },
   [](const rc& c) -> value { return int64_t{c.restart_limit}; }},
  {{"supervision.restart_window", config_type::duration, "10s",
    "Window that supervision.restart_limit counts restarts in (> 0).", ""},
   [](rc& c, const value& x) {
     return set_duration(c.restart_window, x, false);
   },
   [](const rc& c) -> value { return c.restart_window; }},
  {{"supervision.pause_for", config_type::duration, "5s",
    "How long a subscription stays paused after a restart storm (> 0).", ""},
   [](rc& c, const value& x) { return set_duration(c.pause_for, x, false); },
   [](const rc& c) -> value { return c.pause_for; }},
  // -- [tracing]
  {{"tracing.sink", config_type::string, "log",
    "Where spans go: none, log (log lines) or otlp-file://PATH (OTLP/JSON "
    "lines appended to PATH).",
    ""},
   [](rc& c, const value& x) -> std::string {
     const auto& y = std::get<std::string>(x);
     constexpr std::string_view otlp = "otlp-file://";
     if (y != "none" && y != "log"
         && !(y.starts_with(otlp) && y.size() > otlp.size()))
       return "must be \"none\", \"log\" or \"otlp-file://PATH\"";
     c.trace_sink = y;
     return {};
   },
   [](const rc& c) -> value { return c.trace_sink; }},
  // -- [tenants]
  {{"tenants.enabled", config_type::boolean, "false",
    "Check each message's tenant before dispatch; suspended and unknown "
    "tenants are dead-lettered as tenant_rejected.",
    ""},
   [](rc& c, const value& x) -> std::string {
     c.tenants_enabled = std::get<bool>(x);
     return {};
   },
   [](const rc& c) -> value { return c.tenants_enabled; }},
  {{"tenants.known", config_type::string_list, "", "The accepted tenant ids.",
    ""},
   [](rc& c, const value& x) { return set_names(c.tenants_known, x); },
   [](const rc& c) -> value { return c.tenants_known; }},
  {{"tenants.suspended", config_type::string_list, "",
    "Tenants whose messages are rejected (each must be in tenants.known when "
    "that is set).",
    ""},
   [](rc& c, const value& x) { return set_names(c.tenants_suspended, x); },
   [](const rc& c) -> value { return c.tenants_suspended; }},
  {{"tenants.fallback", config_type::string, "",
    "Tenant that unknown ids resolve to; empty rejects unknown ids.", ""},
   [](rc& c, const value& x) -> std::string {
     c.tenant_fallback = std::get<std::string>(x);
     return {};
   },
   [](const rc& c) -> value { return c.tenant_fallback; }},
  // -- [cluster]
  {{"cluster.listen", config_type::string, "",
    "host:port this node accepts cluster peers on (port 0 picks a free "
    "one); empty runs a single node.",
    ""},
   [](rc& c, const value& x) -> std::string {
     const auto& y = std::get<std::string>(x);
     if (!y.empty() && !is_host_port(y, true))
       return "must be empty or \"host:port\" (port 0 to 65535)";
     c.cluster_listen = y;
     return {};
   },
   [](const rc& c) -> value { return c.cluster_listen; }},
  {{"cluster.seeds", config_type::string_list, "",
    "host:port of cluster nodes to join at start.", ""},
   [](rc& c, const value& x) -> std::string {
     for (const auto& seed : std::get<std::vector<std::string>>(x))
       if (!is_host_port(seed, false))
         return "must list \"host:port\" entries (port 1 to 65535), not "
                + in_quotes(seed);
     c.cluster_seeds = std::get<std::vector<std::string>>(x);
     return {};
   },
   [](const rc& c) -> value { return c.cluster_seeds; }},
  {{"cluster.role", config_type::choice, "ingress",
    "ingress: consume from the transport and dispatch to local and remote "
    "lanes; worker: only offer this node's handler lanes to its peers.",
    "ingress|worker"},
   [](rc& c, const value& x) {
     return set_choice(c.cluster_role, x, "ingress|worker");
   },
   [](const rc& c) -> value { return c.cluster_role; }},
  {{"cluster.secret", config_type::string, "",
    "Shared secret every node proves in the join handshake (HMAC-SHA256 "
    "challenge-response; >= 16 characters; required with [cluster]).",
    ""},
   [](rc& c, const value& x) -> std::string {
     const auto& y = std::get<std::string>(x);
     if (!y.empty() && y.size() < 16)
       return "must be at least 16 characters long (use a random string)";
     c.cluster_secret = y;
     return {};
   },
   [](const rc& c) -> value { return c.cluster_secret; }},
  {{"cluster.heartbeat_interval", config_type::duration, "500ms",
    "How often nodes send each other heartbeats (> 0).", ""},
   [](rc& c, const value& x) {
     return set_duration(c.cluster_heartbeat_interval, x, false);
   },
   [](const rc& c) -> value { return c.cluster_heartbeat_interval; }},
  {{"cluster.heartbeat_timeout", config_type::duration, "3s",
    "A peer silent this long is declared dead and its in-flight attempts are "
    "re-dispatched (> cluster.heartbeat_interval).",
    ""},
   [](rc& c, const value& x) {
     return set_duration(c.cluster_heartbeat_timeout, x, false);
   },
   [](const rc& c) -> value { return c.cluster_heartbeat_timeout; }},
  {{"cluster.connect_timeout", config_type::duration, "5s",
    "Bound on connecting to a seed and completing the join handshake; "
    "unanswered seeds are retried (> 0).",
    ""},
   [](rc& c, const value& x) {
     return set_duration(c.cluster_connect_timeout, x, false);
   },
   [](const rc& c) -> value { return c.cluster_connect_timeout; }},
  {{"cluster.tls_ca", config_type::string, "",
    "PEM file of the CA that signs every node's certificate (mutual TLS; "
    "use a CA dedicated to the cluster).",
    ""},
   [](rc& c, const value& x) -> std::string {
     c.cluster_tls_ca = std::get<std::string>(x);
     return {};
   },
   [](const rc& c) -> value { return c.cluster_tls_ca; }},
  {{"cluster.tls_cert", config_type::string, "",
    "PEM file of this node's certificate.", ""},
   [](rc& c, const value& x) -> std::string {
     c.cluster_tls_cert = std::get<std::string>(x);
     return {};
   },
   [](const rc& c) -> value { return c.cluster_tls_cert; }},
  {{"cluster.tls_key", config_type::string, "",
    "PEM file of this node's private key.", ""},
   [](rc& c, const value& x) -> std::string {
     c.cluster_tls_key = std::get<std::string>(x);
     return {};
   },
   [](const rc& c) -> value { return c.cluster_tls_key; }},
};

std::string_view section_of(std::string_view name) {
  return name.substr(0, name.find('.'));
}

std::string_view key_part_of(std::string_view name) {
  auto pos = name.find('.');
  return pos == std::string_view::npos ? name : name.substr(pos + 1);
}

const key_entry* find_entry(std::string_view name) {
  for (const auto& e : entries)
    if (e.key.name == name)
      return &e;
  return nullptr;
}

std::vector<std::string> section_names() {
  std::vector<std::string> result;
  for (const auto& e : entries) {
    auto s = std::string{section_of(e.key.name)};
    if (std::find(result.begin(), result.end(), s) == result.end())
      result.push_back(std::move(s));
  }
  return result;
}

std::vector<std::string> key_names() {
  std::vector<std::string> result;
  for (const auto& e : entries)
    result.emplace_back(e.key.name);
  return result;
}

/// The suggestion for an unknown `section.key`: the same key in another
/// section, else the closest full name.
std::optional<std::string> suggest_key(std::string_view name) {
  auto part = key_part_of(name);
  for (const auto& e : entries)
    if (key_part_of(e.key.name) == part && part != name)
      return std::string{e.key.name};
  return closest(name, key_names());
}

std::string unknown_key_message(std::string_view name, std::string_view where) {
  std::string msg = "unknown key '";
  msg += name;
  msg += "' ";
  msg += where;
  if (auto hint = suggest_key(name)) {
    msg += " — did you mean '" + *hint + "'?";
  } else {
    msg += " — known keys of [";
    auto section = section_of(name);
    std::vector<std::string> same;
    for (const auto& e : entries)
      if (section_of(e.key.name) == section)
        same.emplace_back(key_part_of(e.key.name));
    msg += section;
    msg += "]: " + join(same, ", ");
    msg += " (`evmesh config reference` lists every key)";
  }
  return msg;
}

std::string value_message(std::string_view key, std::string_view shown,
                          std::string_view where, std::string_view rule) {
  std::string msg{key};
  msg += " = ";
  msg += shown;
  if (!where.empty()) {
    msg += ' ';
    msg += where;
  }
  msg += ": ";
  msg += rule;
  return msg;
}

// -- conversions -------------------------------------------------------------
std::optional<value> from_text(const key_entry& e, std::string_view text,
                               std::string& why) {
  switch (e.key.type) {
    case config_type::boolean: {
      std::string lower;
      for (auto c : trim(text))
        lower += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      if (lower == "true" || lower == "yes" || lower == "on" || lower == "1")
        return value{true};
      if (lower == "false" || lower == "no" || lower == "off" || lower == "0")
        return value{false};
      why = "must be true or false";
      return std::nullopt;
    }
    case config_type::integer: {
      auto t = trim(text);
      int64_t x = 0;
      auto [ptr, ec] = std::from_chars(t.data(), t.data() + t.size(), x);
      if (t.empty() || ec != std::errc{} || ptr != t.data() + t.size()) {
        why = ec == std::errc::result_out_of_range ? "is out of range"
                                                   : "must be an integer";
        return std::nullopt;
      }
      return value{x};
    }
    case config_type::floating: {
      auto t = trim(text);
      double x = 0;
      auto [ptr, ec] = std::from_chars(t.data(), t.data() + t.size(), x);
      if (t.empty() || ec != std::errc{} || ptr != t.data() + t.size()) {
        why = "must be a number";
        return std::nullopt;
      }
      return value{x};
    }
    case config_type::string:
      return value{std::string{text}};
    case config_type::duration: {
      std::string reason;
      if (auto x = parse_duration_impl(text, reason))
        return value{*x};
      why = "must be a duration — " + std::string{duration_hint};
      return std::nullopt;
    }
    case config_type::string_list: {
      std::vector<std::string> xs;
      if (!trim(text).empty())
        for (auto part : split(text, ','))
          xs.emplace_back(trim(part));
      return value{std::move(xs)};
    }
    case config_type::choice: {
      auto t = trim(text);
      if (!in_choices(t, e.key.choices)) {
        why = choices_rule(e.key.choices);
        return std::nullopt;
      }
      return value{std::string{t}};
    }
  }
  why = "has an unsupported type";
  return std::nullopt;
}

std::optional<value> from_toml(const key_entry& e, const toml::node& node,
                               std::string& why) {
  switch (e.key.type) {
    case config_type::boolean:
      if (auto x = node.as_boolean())
        return value{x->get()};
      why = "must be true or false (a TOML boolean, without quotes)";
      return std::nullopt;
    case config_type::integer:
      if (auto x = node.as_integer())
        return value{x->get()};
      why = node.is_floating_point() ? "must be an integer (no decimal point)"
                                     : "must be an integer (without quotes)";
      return std::nullopt;
    case config_type::floating:
      if (auto x = node.as_floating_point())
        return value{x->get()};
      if (auto x = node.as_integer())
        return value{static_cast<double>(x->get())};
      why = "must be a number (without quotes)";
      return std::nullopt;
    case config_type::string:
      if (auto x = node.as_string())
        return value{x->get()};
      why = "must be a string (in quotes)";
      return std::nullopt;
    case config_type::duration:
      if (auto x = node.as_string()) {
        std::string reason;
        if (auto y = parse_duration_impl(x->get(), reason))
          return value{*y};
        why = "must be a duration — " + std::string{duration_hint};
        return std::nullopt;
      }
      why = "must be a duration string with a unit, e.g. \"30s\" or "
            "\"250ms\"";
      return std::nullopt;
    case config_type::string_list:
      if (auto arr = node.as_array()) {
        std::vector<std::string> xs;
        for (const auto& item : *arr) {
          auto str = item.as_string();
          if (!str) {
            why = "must be an array of strings, e.g. [\"a\", \"b\"]";
            return std::nullopt;
          }
          xs.push_back(str->get());
        }
        return value{std::move(xs)};
      }
      why = "must be an array of strings, e.g. [\"a\", \"b\"]";
      return std::nullopt;
    case config_type::choice:
      if (auto x = node.as_string()) {
        if (in_choices(x->get(), e.key.choices))
          return value{x->get()};
        why = choices_rule(e.key.choices);
        return std::nullopt;
      }
      why = choices_rule(e.key.choices) + " (a string, in quotes)";
      return std::nullopt;
  }
  why = "has an unsupported type";
  return std::nullopt;
}

/// The value as the user wrote it, roughly: strings in double quotes.
std::string describe(const toml::node& node) {
  std::string str;
  if (auto x = node.as_string()) {
    str = in_quotes(x->get());
  } else if (auto arr = node.as_array()) {
    str = "[";
    for (size_t i = 0; i < arr->size(); ++i) {
      str += i == 0 ? "" : ", ";
      str += describe(*arr->get(i));
    }
    str += "]";
  } else {
    std::ostringstream out;
    out << toml::node_view<const toml::node>{node};
    str = out.str();
  }
  if (str.size() > 80)
    str = str.substr(0, 77) + "...";
  return str;
}

std::string where_in(std::string_view origin, const toml::source_region& src) {
  std::string result = "in ";
  result += origin;
  if (src.begin.line > 0) {
    result += ':' + std::to_string(src.begin.line) + ':'
              + std::to_string(src.begin.column);
  }
  return result;
}

// -- loading -----------------------------------------------------------------
/// Applies the TOML text on top of `cfg`; collects problems in `errors`.
void apply_toml(runtime_config& cfg, std::string_view text,
                std::string_view origin, std::vector<std::string>& errors) {
  toml::table root;
  try {
    root = toml::parse(text, origin);
  } catch (const toml::parse_error& err) {
    const auto& src = err.source();
    std::string msg{origin};
    if (src.begin.line > 0)
      msg += ':' + std::to_string(src.begin.line) + ':'
             + std::to_string(src.begin.column);
    msg += ": invalid TOML: ";
    msg += err.description();
    errors.push_back(std::move(msg));
    return;
  }
  // Problems in the order of the file (the table iterates by name).
  std::vector<std::pair<toml::source_position, std::string>> found;
  auto report = [&found](const toml::source_region& src, std::string msg) {
    found.emplace_back(src.begin, std::move(msg));
  };
  auto sections = section_names();
  for (const auto& [section_key, section_node] : root) {
    auto section = section_key.str();
    auto section_where = where_in(origin, section_key.source());
    bool known = std::find(sections.begin(), sections.end(), section)
                 != sections.end();
    auto tbl = section_node.as_table();
    if (!tbl) {
      if (known) {
        report(section_key.source(),
               "'" + std::string{section} + "' " + section_where
                 + " must be a section: write [" + std::string{section}
                 + "] and put its keys below it");
      } else {
        report(section_key.source(),
               unknown_key_message(section, section_where));
      }
      continue;
    }
    if (!known) {
      std::string msg = "unknown section [" + std::string{section} + "] "
                        + section_where;
      if (auto hint = closest(section, sections))
        msg += " — did you mean [" + *hint + "]?";
      else
        msg += " — known sections: " + join(sections, ", ");
      report(section_key.source(), std::move(msg));
      continue;
    }
    for (const auto& [key, node] : *tbl) {
      auto name = std::string{section} + "." + std::string{key.str()};
      auto where = where_in(origin, node.source());
      auto entry = find_entry(name);
      if (!entry) {
        report(key.source(),
               unknown_key_message(name, where_in(origin, key.source())));
        continue;
      }
      std::string why;
      auto x = from_toml(*entry, node, why);
      if (!x) {
        report(node.source(), value_message(name, describe(node), where, why));
        continue;
      }
      if (auto rule = entry->apply(cfg, *x); !rule.empty())
        report(node.source(), value_message(name, describe(node), where, rule));
    }
  }
  std::stable_sort(found.begin(), found.end(),
                   [](auto& x, auto& y) { return x.first < y.first; });
  for (auto& [pos, msg] : found)
    errors.push_back(std::move(msg));
}

std::string hostname() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == '\0')
    return "localhost";
  return buf;
}

/// Checks the rules that involve several keys.
void check_cross(const runtime_config& cfg, std::string_view where,
                 std::vector<std::string>& errors) {
  auto add = [&](std::string msg) {
    if (!where.empty()) {
      msg += " (";
      msg += where;
      msg += ')';
    }
    errors.push_back(std::move(msg));
  };
  const auto& backoff = cfg.defaults.backoff;
  if (backoff.initial > backoff.max)
    add("retry.initial = " + format_duration(backoff.initial)
        + " is above retry.max = " + format_duration(backoff.max)
        + ": retry.initial must be <= retry.max");
  if (cfg.max_in_flight < cfg.poll_batch)
    add("transport.max_in_flight = " + std::to_string(cfg.max_in_flight)
        + " is below transport.poll_batch = " + std::to_string(cfg.poll_batch)
        + ": one poll must fit in flight; raise max_in_flight or lower "
          "poll_batch");
  if (cfg.dedupe_url != "none" && cfg.dedupe_lease < cfg.defaults.timeout)
    add("dedupe.lease = " + format_duration(cfg.dedupe_lease)
        + " is below consumer.timeout = "
        + format_duration(cfg.defaults.timeout)
        + ": a lease that expires while the handler still runs lets a second "
          "worker run the same message; raise dedupe.lease");
  if (cfg.cluster_heartbeat_timeout <= cfg.cluster_heartbeat_interval)
    add("cluster.heartbeat_timeout = "
        + format_duration(cfg.cluster_heartbeat_timeout)
        + " is not above cluster.heartbeat_interval = "
        + format_duration(cfg.cluster_heartbeat_interval)
        + ": a peer would be declared dead between two heartbeats; use a "
          "timeout of several intervals");
  {
    int tls = (cfg.cluster_tls_ca.empty() ? 0 : 1)
              + (cfg.cluster_tls_cert.empty() ? 0 : 1)
              + (cfg.cluster_tls_key.empty() ? 0 : 1);
    if (tls != 0 && tls != 3)
      add("cluster.tls_ca, cluster.tls_cert and cluster.tls_key must be set "
          "together (mutual TLS needs the CA, this node's certificate and "
          "its key)");
  }
  if (cfg.cluster_role == "worker" && !cfg.cluster_enabled())
    add("cluster.role = worker needs cluster.seeds or cluster.listen: a "
        "worker without peers would never run anything");
  auto contains = [](const std::vector<std::string>& xs, const std::string& x) {
    return std::find(xs.begin(), xs.end(), x) != xs.end();
  };
  if (!cfg.tenants_known.empty()) {
    for (const auto& id : cfg.tenants_suspended)
      if (!contains(cfg.tenants_known, id))
        add("tenants.suspended lists '" + id
            + "', which is not in tenants.known: add it there or fix the "
              "spelling");
    if (!cfg.tenant_fallback.empty()
        && !contains(cfg.tenants_known, cfg.tenant_fallback))
      add("tenants.fallback = '" + cfg.tenant_fallback
          + "' is not in tenants.known: unknown ids would resolve to another "
            "unknown id");
  }
  if (!cfg.tenant_fallback.empty()
      && contains(cfg.tenants_suspended, cfg.tenant_fallback))
    add("tenants.fallback = '" + cfg.tenant_fallback
        + "' is suspended: unknown ids would all be rejected; pick an active "
          "tenant or clear tenants.fallback");
}

/// Single-key rules of every key plus the cross-key rules.
std::vector<std::string> check_all(const runtime_config& cfg,
                                   std::string_view where) {
  std::vector<std::string> errors;
  runtime_config scratch;
  for (const auto& e : entries) {
    auto x = e.get(cfg);
    if (auto rule = e.apply(scratch, x); !rule.empty())
      errors.push_back(value_message(e.key.name, to_text(x), "", rule));
  }
  check_cross(cfg, where, errors);
  return errors;
}

caf::error to_error(const std::vector<std::string>& errors) {
  if (errors.size() == 1)
    return make_error(errc::invalid_config, errors.front());
  return make_error(errc::invalid_config, join(errors, "\n"));
}

std::optional<std::string> read_file(const std::string& path,
                                     std::string& why) {
  std::error_code ec;
  auto status = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(status)) {
    why = "config file '" + path
          + "' does not exist — check the path, or start from "
            "`evmesh config reference` which lists every key";
    return std::nullopt;
  }
  if (std::filesystem::is_directory(status)) {
    why = "config file '" + path + "' is a directory — pass a .toml file";
    return std::nullopt;
  }
  std::ifstream in{path, std::ios::binary};
  if (!in) {
    why = "cannot read config file '" + path + "': " + std::strerror(errno)
          + " — check its permissions";
    return std::nullopt;
  }
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) {
    why = "cannot read config file '" + path + "': read error";
    return std::nullopt;
  }
  return buf.str();
}

// -- command line ------------------------------------------------------------
std::string type_label(const config_key& key) {
  switch (key.type) {
    case config_type::boolean:
      return "<true|false>";
    case config_type::integer:
      return "<integer>";
    case config_type::floating:
      return "<number>";
    case config_type::string:
      return "<string>";
    case config_type::duration:
      return "<duration>";
    case config_type::string_list:
      return "<list,...>";
    case config_type::choice:
      return "<" + std::string{key.choices} + ">";
  }
  return "<value>";
}

/// The default as `--help` shows it: "(hostname)" becomes "hostname".
std::string shown_default(std::string_view default_text) {
  if (default_text.empty())
    return "empty";
  if (default_text.front() == '(' && default_text.back() == ')')
    return std::string{default_text.substr(1, default_text.size() - 2)};
  return std::string{default_text};
}

void wrap(std::string& out, std::string_view text, size_t indent,
          size_t width = 79) {
  size_t col = indent;
  out.append(indent, ' ');
  bool first = true;
  for (auto word : split(text, ' ')) {
    if (word.empty())
      continue;
    if (!first && col + 1 + word.size() > width) {
      out += '\n';
      out.append(indent, ' ');
      col = indent;
      first = true;
    }
    if (!first) {
      out += ' ';
      ++col;
    }
    out += word;
    col += word.size();
    first = false;
  }
  out += '\n';
}

std::string help_text(std::string_view prog, std::string_view program_doc,
                      const std::vector<cli_flag>& flags) {
  std::string out;
  if (!program_doc.empty()) {
    out += program_doc;
    out += "\n\n";
  }
  out += "Usage: ";
  out += prog;
  out += " [--config FILE] [--section.key VALUE ...]";
  for (const auto& f : flags)
    out += " [--" + f.name + "]";
  out += "\n\nOptions:\n";
  auto option = [&](std::string_view name, std::string_view doc) {
    out += "  ";
    out += name;
    out += '\n';
    wrap(out, doc, 6);
  };
  option("-h, --help", "Print this help and exit.");
  option("--config FILE",
         "TOML configuration file. Without it ./evmesh.toml is read when it "
         "exists, else the defaults apply. Flags override the file.");
  for (const auto& f : flags)
    option("--" + f.name, f.doc);
  out += "\nConfiguration keys: `key = value` under `[section]` in the TOML "
         "file, or\n--section.key VALUE on the command line. Durations take "
         "units (\"250ms\",\n\"30s\", \"1m30s\"); lists are "
         "comma-separated on the command line.\n";
  std::string_view section;
  for (const auto& key : config_keys()) {
    if (section_of(key.name) != section) {
      section = section_of(key.name);
      out += "\n[";
      out += section;
      out += "]\n";
    }
    out += "  --";
    out += key.name;
    out += ' ';
    out += type_label(key);
    out += "  (default: " + shown_default(key.default_text) + ")\n";
    wrap(out, key.doc, 6);
  }
  return out;
}

std::string program_name(int argc, char** argv) {
  if (argc > 0 && argv != nullptr && argv[0] != nullptr && argv[0][0] != '\0')
    return std::filesystem::path{argv[0]}.filename().string();
  return "evmesh";
}

void fail(command_line& result, std::string_view prog,
          const std::vector<std::string>& errors, bool config_error) {
  if (errors.size() == 1) {
    std::cerr << prog << ": " << errors.front() << '\n';
  } else {
    std::cerr << prog << ": " << errors.size()
              << (config_error ? " configuration errors:\n" : " errors:\n");
    for (const auto& e : errors)
      std::cerr << "  - " << e << '\n';
  }
  std::cerr << "Run '" << prog << " --help' for every option and key.\n";
  result.exit_now = true;
  result.exit_code = 2;
}

void parse_command_line_impl(command_line& result, int argc, char** argv,
                             std::string_view program_doc) {
  auto prog = program_name(argc, argv);
  CLI::App app{std::string{program_doc}, prog};
  app.allow_extras();
  std::string config_path;
  auto config_opt = app.add_option("--config", config_path,
                                   "TOML configuration file");
  auto keys = config_keys();
  std::vector<std::string> texts(keys.size());
  std::vector<CLI::Option*> options;
  for (size_t i = 0; i < keys.size(); ++i) {
    auto opt = app.add_option("--" + std::string{keys[i].name}, texts[i],
                              std::string{keys[i].doc});
    opt->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    options.push_back(opt);
  }
  for (auto& f : result.flags) {
    auto name = std::string{trim(f.name)};
    while (!name.empty() && name.front() == '-')
      name.erase(0, 1);
    f.name = name;
    app.add_flag("--" + name, f.value, f.doc);
  }
  try {
    std::vector<std::string> args;
    for (int i = argc - 1; i > 0; --i)
      args.emplace_back(argv[i]);
    app.parse(args);
  } catch (const CLI::CallForHelp&) {
    std::cout << help_text(prog, program_doc, result.flags) << std::flush;
    result.exit_now = true;
    result.exit_code = 0;
    return;
  } catch (const CLI::ArgumentMismatch& err) {
    // "--retry.initial: 1 required TEXT missing": name the expected value.
    std::string what = err.what();
    auto name = what.substr(0, what.find(':'));
    std::string msg = "option '" + name + "' needs a value";
    for (const auto& key : keys) {
      if (name != "--" + std::string{key.name})
        continue;
      msg += ": " + type_label(key);
      if (!key.default_text.empty() && key.default_text.front() != '(')
        msg += ", e.g. " + name + " " + std::string{key.default_text};
    }
    if (name == "--config")
      msg += ": the TOML file to read";
    fail(result, prog, {msg}, false);
    return;
  } catch (const CLI::ParseError& err) {
    fail(result, prog, {err.what()}, false);
    return;
  }
  if (auto rest = app.remaining(); !rest.empty()) {
    const auto& arg = rest.front();
    std::string msg;
    if (arg.starts_with("-")) {
      auto name = arg.substr(0, arg.find('='));
      msg = "unknown option '" + name + "'";
      std::vector<std::string> candidates{"--config", "--help"};
      for (const auto& key : keys)
        candidates.push_back("--" + std::string{key.name});
      for (const auto& f : result.flags)
        candidates.push_back("--" + f.name);
      auto bare = name;
      while (!bare.empty() && bare.front() == '-')
        bare.erase(0, 1);
      std::optional<std::string> hint;
      if (auto key_hint = suggest_key(bare);
          key_hint && bare.find('.') != std::string::npos)
        hint = "--" + *key_hint;
      else
        hint = closest(name, candidates);
      if (hint)
        msg += " — did you mean '" + *hint + "'?";
    } else {
      msg = "unexpected argument '" + arg
            + "' — options take the form --section.key VALUE";
    }
    fail(result, prog, {msg}, false);
    return;
  }
  std::vector<std::string> errors;
  auto& cfg = result.config;
  if (config_opt->count() > 0 || std::filesystem::exists("evmesh.toml")) {
    auto path = config_opt->count() > 0 ? config_path
                                        : std::string{"evmesh.toml"};
    std::string why;
    auto text = read_file(path, why);
    if (!text) {
      fail(result, prog, {why}, true);
      return;
    }
    apply_toml(cfg, *text, path, errors);
    result.config_file = path;
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    if (options[i]->count() == 0)
      continue;
    auto entry = find_entry(keys[i].name);
    std::string why;
    auto x = from_text(*entry, texts[i], why);
    if (!x) {
      errors.push_back(value_message(keys[i].name, in_quotes(texts[i]),
                                     "on the command line", why));
      continue;
    }
    if (auto rule = entry->apply(cfg, *x); !rule.empty())
      errors.push_back(value_message(keys[i].name, in_quotes(texts[i]),
                                     "on the command line", rule));
  }
  if (errors.empty()) {
    if (cfg.node_name.empty())
      cfg.node_name = hostname();
    std::string where;
    if (!result.config_file.empty())
      where = "in " + result.config_file;
    bool any_flag = std::any_of(options.begin(), options.end(),
                                [](auto* opt) { return opt->count() > 0; });
    if (any_flag)
      where += where.empty() ? "on the command line"
                             : " and on the command line";
    check_cross(cfg, where, errors);
  }
  if (!errors.empty())
    fail(result, prog, errors, true);
}

} // namespace

// -- public API --------------------------------------------------------------

caf::expected<caf::timespan> parse_duration(std::string_view text) {
  std::string why;
  if (auto x = parse_duration_impl(text, why))
    return *x;
  return make_error(errc::invalid_config, std::move(why));
}

std::string format_duration(caf::timespan x) {
  auto ns = x.count();
  if (ns == 0)
    return "0s";
  std::string result;
  if (ns < 0) {
    result += '-';
    ns = ns == std::numeric_limits<int64_t>::min()
           ? std::numeric_limits<int64_t>::max()
           : -ns;
  }
  constexpr int64_t s = 1'000'000'000;
  if (ns % s == 0) {
    auto secs = ns / s;
    if (auto h = secs / 3600; h > 0)
      result += std::to_string(h) + "h";
    if (auto m = secs / 60 % 60; m > 0)
      result += std::to_string(m) + "m";
    if (auto rest = secs % 60; rest > 0)
      result += std::to_string(rest) + "s";
    return result;
  }
  if (ns % 1'000'000 == 0)
    return result + std::to_string(ns / 1'000'000) + "ms";
  if (ns % 1'000 == 0)
    return result + std::to_string(ns / 1'000) + "us";
  return result + std::to_string(ns) + "ns";
}

caf::expected<runtime_config> parse_config(std::string_view toml_text,
                                           std::string_view origin) {
  runtime_config cfg;
  std::vector<std::string> errors;
  try {
    apply_toml(cfg, toml_text, origin, errors);
  } catch (const std::exception& ex) {
    errors.push_back(std::string{origin} + ": cannot parse: " + ex.what());
  }
  if (errors.empty()) {
    if (cfg.node_name.empty())
      cfg.node_name = hostname();
    check_cross(cfg, "in " + std::string{origin}, errors);
  }
  if (!errors.empty())
    return to_error(errors);
  return cfg;
}

caf::expected<runtime_config> load_config(const std::string& path) {
  std::string why;
  auto text = read_file(path, why);
  if (!text)
    return make_error(errc::invalid_config, std::move(why));
  return parse_config(*text, path);
}

caf::error validate_config(const runtime_config& cfg) {
  auto errors = check_all(cfg, "");
  if (!errors.empty())
    return to_error(errors);
  return caf::none;
}

const char* to_string(config_type x) noexcept {
  switch (x) {
    case config_type::boolean:
      return "bool";
    case config_type::integer:
      return "integer";
    case config_type::floating:
      return "float";
    case config_type::string:
      return "string";
    case config_type::duration:
      return "duration";
    case config_type::string_list:
      return "string list";
    case config_type::choice:
      return "choice";
  }
  return "?";
}

std::span<const config_key> config_keys() {
  static const std::vector<config_key> keys = [] {
    std::vector<config_key> result;
    for (const auto& e : entries)
      result.push_back(e.key);
    return result;
  }();
  return keys;
}

caf::error set_config_value(runtime_config& cfg, std::string_view key,
                            std::string_view text) {
  auto entry = find_entry(key);
  if (!entry)
    return make_error(errc::invalid_config, unknown_key_message(key, "given"));
  std::string why;
  auto x = from_text(*entry, text, why);
  if (!x)
    return make_error(errc::invalid_config,
                      value_message(key, in_quotes(text), "", why));
  if (auto rule = entry->apply(cfg, *x); !rule.empty())
    return make_error(errc::invalid_config,
                      value_message(key, in_quotes(text), "", rule));
  return caf::none;
}

caf::expected<std::string> get_config_value(const runtime_config& cfg,
                                            std::string_view key) {
  auto entry = find_entry(key);
  if (!entry)
    return make_error(errc::invalid_config, unknown_key_message(key, "given"));
  return to_text(entry->get(cfg));
}

std::string config_reference_markdown() {
  auto cell = [](std::string_view text) {
    std::string result;
    for (auto c : text) {
      if (c == '|')
        result += "\\|";
      else
        result += c;
    }
    return result;
  };
  std::string out;
  out += "# evmesh configuration reference\n\n"
         "Generated from the key table in `core/config.cpp` by `evmesh config "
         "reference`; do not edit by hand.\n\n"
         "Set a key in the TOML file as `[section]` then `key = value`, or on "
         "the command line as `--section.key VALUE`. Flags override the file, "
         "the file overrides the defaults; without `--config`, "
         "`./evmesh.toml` is read when it exists. Durations are strings with "
         "units: `\"250ms\"`, `\"30s\"`, `\"5m\"`, `\"1m30s\"` (`ns`, `us`, "
         "`ms`, `s`, `m`, `h`). Unknown keys are errors.\n\n"
         "| key | type | default | meaning |\n"
         "|---|---|---|---|\n";
  for (const auto& key : config_keys()) {
    out += "| `";
    out += key.name;
    out += "` | ";
    if (key.type == config_type::choice) {
      auto choices = split(key.choices, '|');
      for (size_t i = 0; i < choices.size(); ++i) {
        out += i == 0 ? "" : " \\| ";
        out += "`" + std::string{choices[i]} + "`";
      }
    } else {
      out += to_string(key.type);
    }
    out += " | ";
    if (key.default_text.empty())
      out += "(empty)";
    else if (key.default_text.front() == '(')
      out += cell(key.default_text);
    else
      out += "`" + cell(key.default_text) + "`";
    out += " | ";
    out += cell(key.doc);
    out += " |\n";
  }
  return out;
}

command_line parse_command_line(int argc, char** argv,
                                std::string_view program_doc,
                                std::vector<cli_flag> extra_flags) {
  command_line result;
  result.flags = std::move(extra_flags);
  try {
    parse_command_line_impl(result, argc, argv, program_doc);
  } catch (const std::exception& ex) {
    result.exit_now = true;
    result.exit_code = 2;
    try {
      std::cerr << program_name(argc, argv)
                << ": cannot parse the command line: " << ex.what() << '\n';
    } catch (...) {
      // Nothing left to report with.
    }
  } catch (...) {
    result.exit_now = true;
    result.exit_code = 2;
  }
  return result;
}

bool has_flag(const command_line& cl, std::string_view name) {
  for (const auto& f : cl.flags)
    if (f.name == name)
      return f.value;
  return false;
}

} // namespace evmesh
