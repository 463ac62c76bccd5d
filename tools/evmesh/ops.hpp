#pragma once

#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>
#include <string_view>

#include <caf/expected.hpp>

#include "evmesh/envelope.hpp"
#include "evmesh/stores.hpp"

#include "dlq.hpp"

// The commands that change things: `evmesh publish`, `evmesh dlq replay`,
// `evmesh dlq purge`. Functions write to the given streams and return the
// exit code (0 ok, 1 failure, 2 usage), so tests run them without a process.
namespace evmesh::cli {

/// Registers the broker transports built into this binary (`nats://`, and
/// `kafka://` / `amqp://` when built): their URLs then work as publish and
/// replay targets, and their dead-letter queues as `--db` stores.
/// Idempotent.
void register_broker_schemes();

/// What the commands know about the terminal (tests pass their own).
struct terminal {
  /// stdin is a terminal: confirmations may be asked.
  bool stdin_tty = false;
  /// stdout is a terminal: a progress line replaces per-record lines.
  bool stdout_tty = false;

  /// The process's real terminal (`isatty`).
  static terminal detect();
};

/// Where published or replayed envelopes go: `outbox:sqlite://PATH` (a row
/// in an outbox database, published later by its service's relay) or a
/// transport URL (`inproc://…`, and the broker schemes whose transports are
/// linked into this binary).
class sink {
public:
  virtual ~sink();

  /// Sends `env`; on success a short description ("outbox seq 42").
  virtual caf::expected<std::string> send(envelope env) = 0;
};

/// Opens the sink for `url`; errors are `errc::invalid_url` or
/// `errc::unavailable` with an actionable message.
caf::expected<std::unique_ptr<sink>> open_sink(std::string_view url);

/// Options of `evmesh publish`.
struct publish_options {
  std::string url;
  std::string topic;
  std::string key;
  std::string idempotency_key;
  /// The payload JSON text (from --data, --file or stdin).
  std::string data;
  /// Where `data` came from, for messages ("--data", "FILE", "stdin").
  std::string data_source = "--data";
};

/// Parses `data` as the payload (bad JSON => exit 2 naming the error and its
/// byte offset), stamps and sends one envelope.
int publish(const publish_options& opts, std::ostream& out, std::ostream& err);

/// A query without filters and without a limit.
inline dead_letter_query every_match() {
  dead_letter_query q;
  q.limit = 0;
  return q;
}

/// Options of `evmesh dlq replay`.
struct dlq_replay_options {
  std::string db{default_dlq_url};
  /// Filters; `limit` 0 = every match.
  dead_letter_query query = every_match();
  /// Republish to this topic instead of the original one.
  std::string to;
  /// Sink URL (`outbox:sqlite://PATH` or a transport URL).
  std::string target;
  /// Skip the confirmation.
  bool yes = false;
  /// Replay records that were replayed before, too.
  bool again = false;
  /// One JSON object per record instead of text lines.
  bool json = false;
};

/// The idempotency key of a replay of `rec` whose original envelope deduped
/// on `original_key`: `replay:<id>:<original_key>` the first time,
/// `replay:<id>@<replayed_ms>:<original_key>` for a replay of an already
/// replayed record (`--again`). Deterministic: a replay that crashed before
/// marking the record derives the same key again, so consumers dedupe it.
std::string replay_idempotency_key(const dead_letter_record& rec,
                                   std::string_view original_key);

/// The envelope a replay of `rec` publishes: the original envelope with
/// `attempt` 0, topic `to` (when not empty), a new span whose parent is the
/// record's traceparent (the final attempt's span: same trace), the
/// idempotency key of `replay_idempotency_key`, and the headers
/// `evmesh-replay-of` (record id) and `evmesh-original-idempotency-key`.
/// Fails for a record whose original did not decode.
caf::expected<envelope> replay_envelope(const dead_letter_record& rec,
                                        std::string_view to);

/// `evmesh dlq replay`: selects records, asks for confirmation unless
/// `yes`, sends each replay envelope to the target and marks the record
/// replayed after the send succeeded. Records replayed before are skipped
/// unless `again`. Exit 1 when any record failed.
int dlq_replay(const dlq_replay_options& opts, const terminal& term,
               std::istream& in, std::ostream& out, std::ostream& err);

/// Options of `evmesh dlq purge`.
struct dlq_purge_options {
  std::string db{default_dlq_url};
  dead_letter_query query = every_match();
  bool yes = false;
};

/// `evmesh dlq purge`: deletes exactly the records the filters select,
/// after confirmation (a `y`/`yes` line on stdin) unless `yes`; refuses with
/// exit 2 when stdin is not a terminal and `yes` is not set.
int dlq_purge(const dlq_purge_options& opts, const terminal& term,
              std::istream& in, std::ostream& out, std::ostream& err);

} // namespace evmesh::cli
