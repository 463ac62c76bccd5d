#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <caf/expected.hpp>
#include <caf/timespan.hpp>

#include "evmesh/error.hpp"

namespace evmesh {

// -- idempotency ---------------------------------------------------------------

/// Answer of `idempotency_store::try_begin`.
enum class claim_result : uint8_t {
  /// Claimed: run the handler, then `commit` or `abort`.
  fresh,
  /// Already handled successfully within the keep TTL: ack without running.
  duplicate,
  /// Another worker holds an unexpired lease: try again later (not counted).
  in_flight,
  /// The store cannot answer: apply the `fail_open` / `fail_closed` policy.
  unavailable,
};

/// What to do when the idempotency store is unavailable.
enum class store_failure_policy : uint8_t {
  /// Run the handler anyway (at-least-once wins over dedupe). Default.
  fail_open,
  /// Retry later without running the handler.
  fail_closed,
};

/// One step of `idempotency_store::finish_many`: commit or abort one key.
struct finish_op {
  enum kind_t : uint8_t {
    /// `commit(key, keep)`: the handler ran to a final outcome.
    commit,
    /// `abort(key)`: release the claim so a retry can claim again.
    abort,
  };
  /// The idempotency key (as passed to `try_begin`).
  std::string_view key;
  kind_t kind = commit;
};

/// Remembers which idempotency keys were handled. Thread-safe: lanes call it
/// concurrently. Implementations: `memory://`, `sqlite://`, `redis://`.
///
/// The batch calls `try_begin_many` and `finish_many` do what the single-key
/// calls do for every key of a batch; a store overrides them to pay one
/// round trip (or one lock, one transaction) per batch instead of one per
/// key. Their defaults loop over the single-key calls, so every store
/// supports them.
class idempotency_store {
public:
  virtual ~idempotency_store();

  /// Claims `key` for `lease` (an in-flight lease, expires if the worker dies).
  virtual claim_result try_begin(std::string_view key, caf::timespan lease) = 0;

  /// Marks `key` handled; duplicates are recognised for `keep`.
  virtual caf::error commit(std::string_view key, caf::timespan keep) = 0;

  /// Releases a claim after a failed attempt so a retry can claim again. Never
  /// removes a committed key.
  virtual caf::error abort(std::string_view key) = 0;

  /// Claims every key of `keys` for `lease`, as `try_begin` would one after
  /// the other, and writes the answer of `keys[i]` to `out[i]`. Only the
  /// first `min(keys.size(), out.size())` keys are claimed; pass spans of
  /// the same size. Answers are per key: one batch can mix `fresh`,
  /// `duplicate`, `in_flight` and `unavailable` (a store that loses its
  /// server mid-batch answers `unavailable` for the keys it has no answer
  /// for). A key that appears twice in one batch is claimed in order: the
  /// second answer is `in_flight`. Default: loops over `try_begin`.
  virtual void try_begin_many(std::span<const std::string_view> keys,
                              caf::timespan lease, std::span<claim_result> out);

  /// Runs every step of `ops` in order — `commit(key, keep)` or
  /// `abort(key)` — and writes each step's error (none on success) to
  /// `errors[i]`. Only the first `min(ops.size(), errors.size())` steps
  /// run; pass spans of the same size. A failed step does not stop the
  /// others. Returns the first error of the batch (none if every step
  /// succeeded). Default: loops over `commit` and `abort`.
  virtual caf::error finish_many(std::span<const finish_op> ops,
                                 caf::timespan keep,
                                 std::span<caf::error> errors);

  /// Makes pending writes durable (called on shutdown).
  virtual caf::error flush();

  /// Whether calls wait on the network (a remote server). The runtime then
  /// runs handler lanes on their own threads, so store round trips never
  /// block CAF's cooperative scheduler. Default: false.
  virtual bool remote() const noexcept;
};

using idempotency_store_ptr = std::shared_ptr<idempotency_store>;

// -- dead letters --------------------------------------------------------------

/// One error of a failed attempt, as kept in a dead-letter record.
struct attempt_error {
  uint32_t attempt = 0;
  /// Milliseconds since the Unix epoch.
  int64_t at_ms = 0;
  /// At most `dead_letter_limits::max_error_bytes` bytes.
  std::string message;
};

/// Bounds that keep a dead-letter record from growing with each hop.
struct dead_letter_limits {
  static constexpr size_t max_errors = 5;
  static constexpr size_t max_error_bytes = 1024;
};

/// The structured, bounded record of one dead-lettered message (DESIGN.md §4).
struct dead_letter_record {
  /// Store-assigned id (0 before it is written).
  int64_t id = 0;
  /// Why: decode_error, too_large, no_handler, tenant_rejected, permanent,
  /// malformed_payload, retries_exhausted, crash_loop.
  std::string category;
  /// The final reason (the last error's message).
  std::string reason;
  /// Handler executions made.
  uint32_t attempts = 0;
  /// Milliseconds since the Unix epoch of the first and last failure.
  int64_t first_failure_ms = 0;
  int64_t last_failure_ms = 0;
  /// The last errors, oldest first, at most `max_errors`, each truncated.
  std::vector<attempt_error> errors;
  /// Consumer and pattern of the subscription (empty before dispatch).
  std::string consumer;
  std::string pattern;
  /// Topic of the message.
  std::string topic;
  /// Ordering key and idempotency key of the message.
  std::string key;
  std::string idempotency_key;
  /// Transport URL scheme and native position ("inproc:orders#42").
  std::string transport;
  std::string position;
  /// Node that dead-lettered it.
  std::string node;
  /// traceparent of the final attempt's span.
  std::string traceparent;
  /// The original message bytes, verbatim (also when they did not decode).
  std::string original;
  /// Whether `original` decoded as an envelope.
  bool original_decoded = false;
  /// Set by `evmesh dlq replay` (milliseconds since epoch, 0 = never).
  int64_t replayed_ms = 0;

  /// Appends an error, keeping only the last `max_errors`, each truncated to
  /// `max_error_bytes` (on a UTF-8 boundary).
  void add_error(uint32_t attempt, int64_t at_ms, std::string_view message);
};

/// The record as one JSON object (the format the DLQ stores and brokers carry).
std::string to_json(const dead_letter_record& rec);

/// Parses what `to_json` wrote.
caf::expected<dead_letter_record> dead_letter_from_json(std::string_view json);

/// Filters for listing dead letters.
struct dead_letter_query {
  std::string topic;
  std::string consumer;
  std::string category;
  std::string key;
  /// Inclusive bounds on last_failure_ms (0 = unbounded).
  int64_t since_ms = 0;
  int64_t until_ms = 0;
  size_t limit = 100;
};

/// Whether `rec` passes the filters of `q` (exact topic, consumer, category
/// and key when set; inclusive bounds on `last_failure_ms`). The limit is
/// not applied. For stores that filter in memory (broker DLQs).
bool matches(const dead_letter_query& q, const dead_letter_record& rec);

/// Durable home of dead-letter records. Thread-safe.
class dead_letter_store {
public:
  virtual ~dead_letter_store();

  /// Writes `rec` durably and returns its id. Only after this returned a
  /// value may the original message be acked.
  virtual caf::expected<int64_t> write(const dead_letter_record& rec) = 0;

  /// Lists records matching `q`, newest first.
  virtual caf::expected<std::vector<dead_letter_record>>
  list(const dead_letter_query& q) = 0;

  /// Fetches one record.
  virtual caf::expected<dead_letter_record> get(int64_t id) = 0;

  /// Marks a record replayed at `at_ms`.
  virtual caf::error mark_replayed(int64_t id, int64_t at_ms) = 0;

  /// Deletes one record.
  virtual caf::error remove(int64_t id) = 0;
};

using dead_letter_store_ptr = std::shared_ptr<dead_letter_store>;

// -- factories -----------------------------------------------------------------

/// Clock used for TTLs of the memory store (virtual time in tests).
using clock_fn = std::chrono::steady_clock::time_point (*)();

/// Opens an idempotency store by URL: `memory://` (optionally `?shards=N`),
/// `sqlite://path/to/file.db`. Unknown schemes and bad paths give an
/// actionable `errc::invalid_url` / `errc::unavailable`.
caf::expected<idempotency_store_ptr>
make_idempotency_store(std::string_view url);

/// Builds an idempotency store from a full URL of its scheme.
using idempotency_store_factory
  = std::function<caf::expected<idempotency_store_ptr>(std::string_view url)>;

/// Makes `make_idempotency_store` open URLs of `scheme` (case-insensitive,
/// without "://") with `factory`, so optional stores such as `redis://` plug
/// in without a hard dependency. Registering a scheme again replaces its
/// factory; `memory` and `sqlite` are built in and cannot be replaced.
/// Thread-safe.
void register_idempotency_store(std::string scheme,
                                idempotency_store_factory factory);

/// Opens a dead-letter store by URL: `sqlite://path/to/dlq.db`, or a
/// broker's dead-letter queue whose scheme was registered (e.g. `nats://`
/// once `register_nats_transport()` ran).
caf::expected<dead_letter_store_ptr>
make_dead_letter_store(std::string_view url);

/// Builds a dead-letter store from a full URL of its scheme.
using dead_letter_store_factory
  = std::function<caf::expected<dead_letter_store_ptr>(std::string_view url)>;

/// Makes `make_dead_letter_store` open URLs of `scheme` (case-insensitive,
/// without "://") with `factory` — how broker transports expose their DLQs to
/// the operator CLI. `sqlite` is built in and cannot be replaced.
/// Thread-safe.
void register_dead_letter_store(std::string scheme,
                                dead_letter_store_factory factory);

} // namespace evmesh
