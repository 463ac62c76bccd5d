#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/atom.hpp>
#include <caf/error.hpp>
#include <caf/expected.hpp>
#include <caf/timespan.hpp>

#include "evmesh/envelope.hpp"
#include "evmesh/trace.hpp"
#include "evmesh/transport.hpp"

struct sqlite3;

/// The producing half of evmesh: a transactional outbox in the application's
/// own SQLite database, and the relay actor that publishes its rows.
///
/// The application writes its business rows and `outbox::enqueue`s the
/// events they imply in one SQLite transaction, on one connection: either
/// both commit or neither does. The relay later reads committed rows in
/// order and publishes them; a row is marked published only after the
/// transport returned without error, so a crash in between publishes it
/// again (at-least-once) — consumers dedupe on its `idempotency_key`.
namespace evmesh::outbox {

/// Name of the outbox table.
constexpr std::string_view table_name = "evmesh_outbox";

/// Row states: `pending` (to publish), `published`, `parked` (failed
/// `max_attempts` times; waits for an operator).
constexpr std::string_view state_pending = "pending";
constexpr std::string_view state_published = "published";
constexpr std::string_view state_parked = "parked";

/// Creates `evmesh_outbox(seq INTEGER PRIMARY KEY AUTOINCREMENT, key, topic,
/// envelope_json, state, attempts, last_error, next_attempt_ms,
/// published_ms)` and its indexes if missing. Idempotent; may run inside the
/// caller's transaction.
caf::error ensure_schema(sqlite3* db);

/// Stamps the fields the outbox guarantees, in place: `id` (a random UUID
/// v4) when empty, `idempotency_key` (= `id`) when empty, `traceparent` when
/// empty (`current`'s span when given, else a new root span), `produced_at`
/// (RFC 3339, UTC, now) when empty.
void stamp(envelope& env, const trace_context* current = nullptr);

/// Stamps `env` and inserts it as a pending row on `db` — inside whatever
/// transaction the caller has open on that connection (the business write's),
/// so a rollback drops the event with the write. Does not begin or commit.
/// Returns the row's `seq`; the stamped envelope is written to `*stamped`
/// when given. Requires `ensure_schema` to have run on the database.
caf::expected<int64_t> enqueue(sqlite3* db, envelope env,
                               const trace_context* current = nullptr,
                               envelope* stamped = nullptr);

/// One row as the relay and tools read it.
struct row {
  int64_t seq = 0;
  std::string key;
  std::string topic;
  std::string envelope_json;
  std::string state;
  uint32_t attempts = 0;
  std::string last_error;
  int64_t next_attempt_ms = 0;
  int64_t published_ms = 0;
};

/// Row counts by state.
struct counts {
  uint64_t pending = 0;
  uint64_t published = 0;
  uint64_t parked = 0;
};

/// An outbox database opened by path, with its own connection (WAL,
/// `synchronous=NORMAL` — a mark lost to power failure only republishes a
/// row, which consumers dedupe — `busy_timeout=5000`): what the relay and the
/// CLI use. Thread-safe (calls are serialised by a mutex). Applications enqueue
/// on their own connection instead (`enqueue(sqlite3*, ...)`), or through
/// `enqueue` here when the outbox has no business rows next to it.
class store {
public:
  /// Opens (creating file, parent directories and schema if needed) the
  /// database at `path`. Fails with `errc::unavailable` naming the path.
  static caf::expected<std::shared_ptr<store>> open(const std::string& path);

  /// Opens `outbox:sqlite://PATH` (or `sqlite://PATH`); other URLs give
  /// `errc::invalid_url`.
  static caf::expected<std::shared_ptr<store>> open_url(std::string_view url);

  ~store();
  store(const store&) = delete;
  store& operator=(const store&) = delete;

  /// The connection (for callers that want their own transactions on it).
  sqlite3* handle() const noexcept;

  /// The path the store was opened with.
  const std::string& path() const noexcept;

  /// Enqueues one envelope in its own transaction.
  caf::expected<int64_t> enqueue(envelope env,
                                 const trace_context* current = nullptr,
                                 envelope* stamped = nullptr);

  /// Up to `limit` pending rows, in `seq` order, that may be published at
  /// `now_ms`: due (`next_attempt_ms <= now_ms`) and not behind a row of the
  /// same non-empty key that waits for a retry — or is parked, when
  /// `parked_blocks_key`. Rows without a key have no ordering constraint.
  caf::expected<std::vector<row>> ready(int64_t now_ms, size_t limit,
                                        bool parked_blocks_key);

  /// Marks `seq` published at `at_ms`.
  caf::error mark_published(int64_t seq, int64_t at_ms);

  /// Records a failed publish: `attempts`, the error, when to try again.
  caf::error mark_failed(int64_t seq, uint32_t attempts, std::string_view error,
                         int64_t next_attempt_ms);

  /// Parks `seq` after `attempts` failures, with its last error.
  caf::error park(int64_t seq, uint32_t attempts, std::string_view error);

  /// Makes parked rows pending again with a fresh attempt count (all of
  /// them when `seq` is 0); returns how many.
  caf::expected<size_t> unpark(int64_t seq = 0);

  /// Row counts by state.
  caf::expected<counts> count();

  /// Every row with `seq > after`, in order, at most `limit` (tests, tools).
  caf::expected<std::vector<row>> rows(int64_t after = 0, size_t limit = 0);

private:
  struct impl;
  explicit store(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

using store_ptr = std::shared_ptr<store>;

/// Capped doubling backoff of the relay: `initial * 2^(attempts-1)`, at
/// most `max` (`attempts` >= 1 failed publishes so far).
caf::timespan relay_backoff(uint32_t attempts, caf::timespan initial,
                            caf::timespan max);

// -- relay -----------------------------------------------------------------------

/// Options of the relay actor.
struct relay_options {
  /// Rows read and published per batch.
  size_t batch = 256;
  /// Pause between polls when the outbox had nothing ready.
  caf::timespan poll_interval = std::chrono::milliseconds{200};
  /// Backoff after the first failure of a row; doubles per failure.
  caf::timespan backoff_initial = std::chrono::milliseconds{100};
  /// Backoff cap.
  caf::timespan backoff_max = std::chrono::seconds{30};
  /// Failed publishes after which a row is parked (>= 1).
  uint32_t max_attempts = 10;
  /// Whether a parked row holds back the later rows of its key (keeps
  /// per-key order; an operator unparks or deletes it). When false, later
  /// rows of the key flow past it.
  bool parked_blocks_key = true;
  /// Spawn detached (own thread): SQLite and a blocking transport then
  /// never stall CAF's cooperative scheduler. Tests on the deterministic
  /// test coordinator set this to false.
  bool detached = true;
};

/// Counters of one relay, updated by the actor, readable from any thread.
struct relay_stats {
  std::atomic<uint64_t> published{0};
  std::atomic<uint64_t> failures{0};
  std::atomic<uint64_t> parked{0};
  std::atomic<uint64_t> batches{0};
  /// Store errors (reading or marking rows).
  std::atomic<uint64_t> store_errors{0};
  /// Set when the actor quit after a stop request.
  std::atomic<bool> stopped{false};
};

/// Send this to the relay to stop it: the batch in progress (if any) has
/// finished by the time the actor handles a message, so it quits at once
/// without starting another; rows not yet published stay pending. Replies
/// with the number of rows published in total.
using relay_stop_atom = caf::atom_constant<caf::atom("obstop")>;

/// Send this to make the relay poll now instead of at its next tick (e.g.
/// right after a commit). No reply.
using relay_wake_atom = caf::atom_constant<caf::atom("obwake")>;

/// Spawns the relay: reads ready rows of `db` in `seq` order, publishes each
/// through `out` (`transport::publish`), marks it published after `publish`
/// returned without error; on failure it records the error and retries after
/// `relay_backoff`, parking the row after `max_attempts` failures. Later rows
/// of a waiting row's key wait with it (per-key order); other keys flow. The
/// relay is not linked to anything: monitor or link it to supervise it.
caf::actor spawn_relay(caf::actor_system& sys, store_ptr db, transport_ptr out,
                       relay_options opts = {},
                       std::shared_ptr<relay_stats> stats = nullptr);

} // namespace evmesh::outbox
