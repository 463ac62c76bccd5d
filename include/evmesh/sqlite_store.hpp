#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <caf/expected.hpp>

#include "evmesh/stores.hpp"

namespace evmesh {

/// Idempotency store in a SQLite file (`sqlite://PATH`): dedupes across
/// restarts and across processes that share the file. TTLs are wall-clock
/// milliseconds since the Unix epoch, so they survive a restart.
///
/// One connection per instance (WAL mode, `synchronous=NORMAL`,
/// `busy_timeout=5000`), prepared statements reused under a mutex; safe to
/// call from several threads. Claims are atomic in the database: of several
/// instances or processes racing for one key, exactly one gets `fresh`.
/// Expired rows are deleted in bounded batches every few hundred operations.
/// Leases carry no owner (see `memory_idempotency_store` for what a late
/// `abort` implies).
class sqlite_idempotency_store : public idempotency_store {
public:
  /// Source of wall-clock time; tests pass a virtual clock.
  using wall_clock = std::function<std::chrono::system_clock::time_point()>;

  /// Operations between two bounded deletions of expired rows.
  static constexpr size_t purge_interval = 256;

  /// Rows one purge deletes at most.
  static constexpr size_t purge_batch = 512;

  /// Opens (creating it and its parent directories if needed) the database
  /// at `path`. Fails with `errc::unavailable` and a message naming the path
  /// and what to check when the file cannot be opened or initialised.
  static caf::expected<std::shared_ptr<sqlite_idempotency_store>>
  open(const std::string& path);

  /// Like `open(path)`, measuring TTLs with `clock` instead of
  /// `std::chrono::system_clock::now` (an empty `clock` means the latter).
  static caf::expected<std::shared_ptr<sqlite_idempotency_store>>
  open(const std::string& path, wall_clock clock);

  ~sqlite_idempotency_store() override;

  sqlite_idempotency_store(const sqlite_idempotency_store&) = delete;
  sqlite_idempotency_store& operator=(const sqlite_idempotency_store&) = delete;

  /// Absent or expired: claims `key` for `lease` and answers `fresh`.
  /// Committed: `duplicate`. Claimed by an unexpired lease: `in_flight`.
  /// A database failure answers `unavailable` (and is logged).
  claim_result try_begin(std::string_view key, caf::timespan lease) override;

  /// Upserts `key` as committed for `keep` (a non-positive `keep` deletes
  /// it). Database failures give a retryable `errc::io_error`.
  caf::error commit(std::string_view key, caf::timespan keep) override;

  /// Deletes `key` only while it is in flight. Database failures give a
  /// retryable `errc::io_error`.
  caf::error abort(std::string_view key) override;

  /// `commit` / `abort` for every step in one transaction (one WAL commit
  /// for the batch). A failed step does not stop the others; if the
  /// transaction itself cannot begin or commit, every step reports that
  /// error and nothing of the batch is written.
  caf::error finish_many(std::span<const finish_op> ops, caf::timespan keep,
                         std::span<caf::error> errors) override;

  /// Checkpoints the write-ahead log, syncing it to disk.
  caf::error flush() override;

  /// Number of rows, including expired ones not yet purged (for tests).
  caf::expected<size_t> size();

  /// Deletes every expired row now; returns how many were deleted.
  caf::expected<size_t> purge_expired();

  /// The path the store was opened with.
  const std::string& path() const noexcept;

private:
  struct state;

  explicit sqlite_idempotency_store(std::unique_ptr<state> st);

  std::unique_ptr<state> state_;
};

/// Dead-letter store in a SQLite file (`sqlite://PATH`). Every record is kept
/// as its `to_json` text next to indexed columns (category, consumer,
/// pattern, topic, key, last_failure_ms, replayed_ms) that `list` filters on.
///
/// One connection per instance (WAL mode, `synchronous=FULL` so that a
/// written record survives power loss before the original is acked,
/// `busy_timeout=5000`), prepared statements reused under a mutex; safe to
/// call from several threads and from several processes sharing the file.
class sqlite_dead_letter_store : public dead_letter_store {
public:
  /// Opens (creating it and its parent directories if needed) the database
  /// at `path`. Fails with `errc::unavailable` and a message naming the path
  /// and what to check when the file cannot be opened or initialised.
  static caf::expected<std::shared_ptr<sqlite_dead_letter_store>>
  open(const std::string& path);

  ~sqlite_dead_letter_store() override;

  sqlite_dead_letter_store(const sqlite_dead_letter_store&) = delete;
  sqlite_dead_letter_store& operator=(const sqlite_dead_letter_store&) = delete;

  /// Inserts `rec` (its `id` is ignored) and returns the new id.
  caf::expected<int64_t> write(const dead_letter_record& rec) override;

  /// Records whose topic, consumer, category and key equal the non-empty
  /// fields of `q` and whose last_failure_ms lies within [since_ms, until_ms]
  /// (0 = unbounded), newest (largest last_failure_ms, then id) first, at most
  /// `q.limit` of them (0 = no limit).
  caf::expected<std::vector<dead_letter_record>>
  list(const dead_letter_query& q) override;

  /// The record `id` (with `id` and `replayed_ms` from the table), or
  /// `errc::not_found`.
  caf::expected<dead_letter_record> get(int64_t id) override;

  /// Sets `replayed_ms` of record `id`, or fails with `errc::not_found`.
  caf::error mark_replayed(int64_t id, int64_t at_ms) override;

  /// Deletes record `id`, or fails with `errc::not_found`.
  caf::error remove(int64_t id) override;

  /// The path the store was opened with.
  const std::string& path() const noexcept;

private:
  struct state;

  explicit sqlite_dead_letter_store(std::unique_ptr<state> st);

  std::unique_ptr<state> state_;
};

} // namespace evmesh
