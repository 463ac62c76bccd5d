#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>
#include <caf/timespan.hpp>

#include "evmesh/options.hpp"
#include "evmesh/stores.hpp"

namespace evmesh {

/// Everything a consumer runtime is configured with, read from a TOML file
/// (`[section] key = value`) and `--section.key VALUE` flags. Every member has
/// one entry in the key table (`config_keys()`), which drives parsing, the
/// flags, `--help` and `config_reference_markdown()`.
struct runtime_config {
  // -- [runtime] --------------------------------------------------------------

  /// `runtime.node_name`: this node's name in dead-letter records, traces and
  /// cluster membership. Empty here means "the hostname"; the parse functions
  /// fill it in.
  std::string node_name;
  /// `runtime.stop_timeout`: how long `stop()` waits for in-flight handlers
  /// before nacking what is left.
  caf::timespan stop_timeout = std::chrono::seconds{10};
  /// `runtime.log_level`: trace, debug, info, warn, error or off.
  std::string log_level = "info";
  /// `runtime.idle_workers`: `sleep` (scheduler threads block as soon as they
  /// run out of work and look for work to steal every millisecond) or `poll`
  /// (CAF's default: spin, then 50 us sleeps before blocking). Applies to the
  /// actor system the runtime creates itself.
  std::string idle_workers = "sleep";
  /// `runtime.idle_steal_interval`: with `idle_workers = sleep`, how often a
  /// sleeping scheduler thread wakes to look for work another thread queued
  /// (work an actor sends to another actor stays on the sender's thread and
  /// wakes nobody). Shorter lowers the tail latency of bursts one thread
  /// picked up and costs idle CPU: on the 2-core benchmark machine, p99 at
  /// 150 k msg/s 2.6 -> 1.7 ms and idle CPU 2 -> 9 % of a core at 200 us
  /// (docs/BENCHMARKS.md, tenth session). 10 us to 1 s.
  caf::timespan idle_steal_interval = std::chrono::milliseconds{1};
  /// `runtime.scheduler_threads`: CAF scheduler threads of the actor system
  /// the runtime creates itself; 0 means one per core. CAF's own default
  /// (at least 4) put twice as many threads as cores on a 2-core machine,
  /// where they took turns and raised the p99 (docs/BENCHMARKS.md, tenth
  /// session). Blocking handlers run detached; the SQLite and Redis stores'
  /// calls from cooperative lanes do block a scheduler thread, so raise this
  /// where such a store is slow (docs/decisions.md, "Known gaps").
  size_t scheduler_threads = 0;

  // -- [transport] ------------------------------------------------------------

  /// `transport.url`: the broker to consume from (`inproc://`, `nats://`,
  /// `kafka://`, `amqp://`).
  std::string transport_url = "inproc://default";
  /// `transport.max_in_flight`: messages in flight per source; the source
  /// stops polling when full (>= poll_batch).
  size_t max_in_flight = 4096;
  /// `transport.poll_batch`: messages fetched per poll (>= 1).
  size_t poll_batch = 256;
  /// `transport.poll_idle`: pause between polls that returned nothing.
  caf::timespan poll_idle = std::chrono::milliseconds{5};
  /// `transport.max_message_bytes`: larger messages are dead-lettered
  /// unread.
  size_t max_message_bytes = 1 << 20;

  // -- [dedupe] ---------------------------------------------------------------

  /// `dedupe.url`: the idempotency store (`sqlite://`, `memory://`,
  /// `redis://`), or `none` to disable dedupe.
  std::string dedupe_url = "sqlite://state/dedupe.db";
  /// `dedupe.lease`: how long a claim on an idempotency key lasts while its
  /// handler runs (>= consumer.timeout).
  caf::timespan dedupe_lease = std::chrono::seconds{60};
  /// `dedupe.keep`: how long a handled key is remembered as a duplicate.
  caf::timespan dedupe_keep = std::chrono::hours{24};
  /// `dedupe.on_unavailable`: run anyway (`fail_open`) or retry later
  /// (`fail_closed`) when the store cannot answer.
  store_failure_policy dedupe_policy = store_failure_policy::fail_open;

  // -- [dead_letter] ----------------------------------------------------------

  /// `dead_letter.url`: where dead-letter records are written, or `none`
  /// (only the broker's own DLQ keeps them).
  std::string dead_letter_url = "sqlite://state/dlq.db";
  /// `dead_letter.mask_fields`: payload field names whose values are masked
  /// before a record is written (PII).
  std::vector<std::string> mask_fields;

  // -- [retry] and [consumer] -------------------------------------------------

  /// Subscription defaults that handler options override: `retry.*`
  /// (max_attempts, initial, multiplier, max, jitter) and `consumer.*`
  /// (ordering, concurrency, timeout, execution).
  subscription_options defaults;

  // -- [supervision] ----------------------------------------------------------

  /// `supervision.restart_limit`: lane restarts tolerated per window before
  /// the subscription pauses and health turns `degraded`; also the topic
  /// supervisor restarts tolerated per window before the runtime stops.
  uint32_t restart_limit = 10;
  /// `supervision.restart_window`: the window `restart_limit` counts in.
  caf::timespan restart_window = std::chrono::seconds{10};
  /// `supervision.pause_for`: how long a subscription pauses after a
  /// restart storm.
  caf::timespan pause_for = std::chrono::seconds{5};

  // -- [tracing] --------------------------------------------------------------

  /// `tracing.sink`: `none`, `log` or `otlp-file://PATH` (OTLP/JSON lines).
  std::string trace_sink = "log";

  // -- [tenants] --------------------------------------------------------------

  /// `tenants.enabled`: check each message's tenant before dispatch.
  bool tenants_enabled = false;
  /// `tenants.known`: the accepted tenant ids.
  std::vector<std::string> tenants_known;
  /// `tenants.suspended`: tenants whose messages are dead-lettered as
  /// `tenant_rejected`.
  std::vector<std::string> tenants_suspended;
  /// `tenants.fallback`: the tenant unknown ids resolve to; empty rejects
  /// unknown ids.
  std::string tenant_fallback;

  // -- [cluster] --------------------------------------------------------------

  /// `cluster.listen`: `host:port` this node accepts peers on; empty runs a
  /// single node.
  std::string cluster_listen;
  /// `cluster.seeds`: `host:port` of nodes to join at start.
  std::vector<std::string> cluster_seeds;
  /// `cluster.role`: `ingress` consumes from the transport and dispatches to
  /// local and remote lanes; `worker` only offers its lanes to its peers.
  std::string cluster_role = "ingress";
  /// `cluster.secret`: shared secret every node proves in the join handshake
  /// (HMAC-SHA256 challenge-response, >= 16 characters). Required whenever
  /// the cluster is enabled.
  std::string cluster_secret;
  /// `cluster.heartbeat_interval`: how often nodes send heartbeats.
  caf::timespan cluster_heartbeat_interval = std::chrono::milliseconds{500};
  /// `cluster.heartbeat_timeout`: a peer silent this long is declared dead
  /// and its in-flight attempts are re-dispatched (> heartbeat_interval).
  caf::timespan cluster_heartbeat_timeout = std::chrono::seconds{3};
  /// `cluster.connect_timeout`: bound on connecting to a seed and finishing
  /// the join handshake; a seed that does not answer is retried.
  caf::timespan cluster_connect_timeout = std::chrono::seconds{5};
  /// `cluster.tls_ca`, `cluster.tls_cert`, `cluster.tls_key`: PEM files for
  /// mutual TLS between nodes (all three or none; checked at start).
  std::string cluster_tls_ca;
  std::string cluster_tls_cert;
  std::string cluster_tls_key;

  /// Whether `[cluster]` is enabled (a listen address or seeds are set).
  bool cluster_enabled() const noexcept {
    return !cluster_listen.empty() || !cluster_seeds.empty();
  }
};

// -- durations ----------------------------------------------------------------

/// Parses a non-negative duration: an integer and a unit (`ns`, `us`, `ms`,
/// `s`, `m`, `h`), or several of them ("1m30s"). "0s" is valid; a bare
/// number is not. Errors (`errc::invalid_config`) quote the text.
caf::expected<caf::timespan> parse_duration(std::string_view text);

/// Formats `x` as the shortest text `parse_duration` reads back ("250ms",
/// "1m30s", "24h", "0s").
std::string format_duration(caf::timespan x);

// -- loading ------------------------------------------------------------------

/// Parses TOML text into a validated configuration (defaults for absent
/// keys). `origin` names the text in errors ("orders.toml:3:16: ...").
/// Unknown sections and keys, wrong types and broken rules are
/// `errc::invalid_config` errors naming key, value, rule and position, with
/// the closest known key as suggestion. Several problems are reported
/// together, one per line.
caf::expected<runtime_config>
parse_config(std::string_view toml_text, std::string_view origin = "<string>");

/// Reads and parses the TOML file at `path` (see `parse_config`). A missing
/// or unreadable file is an `errc::invalid_config` error saying so.
caf::expected<runtime_config> load_config(const std::string& path);

/// Checks the rules that involve several keys (retry.initial <= retry.max,
/// transport.max_in_flight >= transport.poll_batch, dedupe.lease >=
/// consumer.timeout, tenant lists agree) plus every single-key rule. The
/// parse functions call it; call it after building a config in code.
caf::error validate_config(const runtime_config& cfg);

// -- the key table ------------------------------------------------------------

/// Type of a configuration value.
enum class config_type : uint8_t {
  /// TOML boolean; on the command line true/false, yes/no, on/off, 1/0.
  boolean,
  /// TOML integer.
  integer,
  /// TOML float (integers accepted).
  floating,
  /// TOML string.
  string,
  /// TOML string with a unit: "250ms", "30s", "1m30s".
  duration,
  /// TOML array of strings; comma-separated on the command line.
  string_list,
  /// TOML string, one of `config_key::choices`.
  choice,
};

/// Returns the name of `x` as shown in `--help` ("duration", "string list").
const char* to_string(config_type x) noexcept;

/// Description of one configuration key: one row of the key table.
struct config_key {
  /// `section.key`, as written in TOML and as `--section.key` flag.
  std::string_view name;
  /// Type of the value.
  config_type type;
  /// The default as text ("5", "30s", "per_key", "[]").
  std::string_view default_text;
  /// What the key means, with its rule ("(>= 1)").
  std::string_view doc;
  /// For `config_type::choice`: the allowed values, separated by `|`.
  std::string_view choices;
};

/// Every configuration key, grouped by section in a fixed order.
std::span<const config_key> config_keys();

/// Sets one key from its command-line text form (`"30s"`, `"a,b"`, `"true"`),
/// checking its type and single-key rule. Unknown keys yield an error with
/// a suggestion.
caf::error set_config_value(runtime_config& cfg, std::string_view key,
                            std::string_view text);

/// The current value of `key` in `cfg`, in the text form `set_config_value`
/// accepts (lists as "a,b").
caf::expected<std::string> get_config_value(const runtime_config& cfg,
                                            std::string_view key);

/// A Markdown reference of every key: a `key | type | default | meaning`
/// table generated from the key table.
std::string config_reference_markdown();

// -- command line -------------------------------------------------------------

/// An application-defined boolean flag (`--demo`), set when given.
struct cli_flag {
  /// Flag name without dashes ("demo").
  std::string name;
  /// One line for `--help`.
  std::string doc;
  /// Whether the flag was given.
  bool value = false;
};

/// Result of `parse_command_line`.
struct command_line {
  /// The configuration: defaults < config file < `--section.key` flags.
  runtime_config config;
  /// True when the program should exit now with `exit_code` (after `--help`,
  /// or after an error that was already printed to stderr).
  bool exit_now = false;
  /// 0 after `--help`, 2 after a usage or configuration error.
  int exit_code = 0;
  /// The application's flags, as passed in, with `value` set.
  std::vector<cli_flag> flags;
  /// The configuration file that was read; empty when none was.
  std::string config_file;
};

/// Parses `argc`/`argv`: `--config FILE` (otherwise `./evmesh.toml` when it
/// exists, otherwise defaults), `--section.key VALUE` for every key of the
/// table (overriding the file), the `extra_flags`, and `-h`/`--help`, which
/// prints `program_doc` and every key with type, default and meaning to
/// stdout (exit code 0). Errors are printed to stderr with a hint (exit
/// code 2). Never throws.
command_line parse_command_line(int argc, char** argv,
                                std::string_view program_doc,
                                std::vector<cli_flag> extra_flags = {});

/// Returns whether the flag `name` is in `cl.flags` and was given.
bool has_flag(const command_line& cl, std::string_view name);

} // namespace evmesh
