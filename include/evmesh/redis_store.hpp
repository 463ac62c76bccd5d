#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include <caf/expected.hpp>

#include "evmesh/stores.hpp"

namespace evmesh {

/// Where and how a `redis://` idempotency store connects. Parsed from
/// `redis://[[user]:password@]host[:port][/db][?param=value&...]` with the
/// parameters `pool`, `timeout_ms`, `connect_timeout_ms`, `prefix` and
/// `claim`.
struct redis_store_options {
  /// Host name or IP address (IPv6 written as `[::1]` in the URL).
  std::string host = "127.0.0.1";
  /// TCP port.
  uint16_t port = 6379;
  /// ACL user (Redis 6+); empty means `AUTH password` alone.
  std::string user;
  /// Password; empty means no AUTH.
  std::string password;
  /// Logical database selected on every connection.
  int db = 0;
  /// Connections kept open. A call takes an idle connection if there is
  /// one; when all are busy it joins the shortest queue and is sent with the
  /// other queued commands in that connection's next pipelined write.
  size_t pool = 8;
  /// Upper bound of one command's round trip; beyond it the call answers
  /// `unavailable` and the connection is replaced.
  std::chrono::milliseconds timeout{200};
  /// Upper bound of establishing a connection (TCP connect, AUTH, SELECT).
  std::chrono::milliseconds connect_timeout{200};
  /// Prepended to every idempotency key.
  std::string prefix = "evmesh:idem:";
  /// How a claim is sent. `automatic` (URL `claim=auto`, the default): one
  /// `SET key token NX PX lease GET` where the server says it is Redis 7 or
  /// newer (`INFO server`), the Lua claim script otherwise or when `INFO` is
  /// refused. `script` (`claim=script`): always the script, for servers or
  /// proxies that claim Redis 7 but reject `SET ... NX GET`. Both answer the
  /// same; the plain command costs the server a fraction of a script run.
  enum class claim_mode { automatic, script };
  claim_mode claim = claim_mode::automatic;

  /// The URL without the password, for messages and logs.
  std::string display_url() const;
};

/// Parses a `redis://` URL. Errors are `errc::invalid_url` and name the
/// offending part.
caf::expected<redis_store_options> parse_redis_url(std::string_view url);

/// Idempotency store on a Redis server (`redis://`): dedupes across every
/// process that shares the server. Thread-safe and pipelined: a pool of
/// connections, where commands of concurrent callers that find every
/// connection busy are batched into one write and one round trip (automatic
/// pipelining), so many lanes share round trips instead of queueing behind
/// each other.
///
/// A claim is `SET prefix+key <token> NX PX lease`, where the token is unique
/// per claim (sent with `GET`, which returns the value a claimed or committed
/// key holds, on Redis 7+; as a Lua script before); a committed key holds the
/// value `committed` with `PX keep`.
/// `abort` deletes the key only while it still holds this store's token (a
/// Lua script), so a late abort never removes another worker's newer claim
/// nor a committed key.
///
/// Failures never hang: commands and connects are bounded by their timeouts.
/// An unreachable server makes `try_begin` answer `unavailable` and `commit` /
/// `abort` return `errc::unavailable`; the next call reconnects.
class redis_idempotency_store : public idempotency_store {
public:
  /// Parses `url`, connects one connection (AUTH, SELECT) to check the
  /// settings and returns the store. Fails with `errc::invalid_url`,
  /// `errc::invalid_config` (rejected credentials or database) or
  /// `errc::unavailable` (server unreachable).
  static caf::expected<std::shared_ptr<redis_idempotency_store>>
  open(std::string_view url);

  /// Like `open(url)` with parsed options.
  static caf::expected<std::shared_ptr<redis_idempotency_store>>
  open(redis_store_options opts);

  ~redis_idempotency_store() override;

  redis_idempotency_store(const redis_idempotency_store&) = delete;
  redis_idempotency_store& operator=(const redis_idempotency_store&) = delete;

  /// Absent (or lease expired): claims `key` for `lease` with a fresh token,
  /// remembered by this instance, and answers `fresh`. Committed: `duplicate`.
  /// Claimed: `in_flight`. Server unreachable, timed out or answering an
  /// error: `unavailable`.
  claim_result try_begin(std::string_view key, caf::timespan lease) override;

  /// Marks `key` committed for `keep`, whether claimed or not (like the
  /// memory and SQLite stores: the handler did run). A non-positive `keep`
  /// forgets the key if it is committed or holds this instance's claim.
  caf::error commit(std::string_view key, caf::timespan keep) override;

  /// Deletes the key if it still holds the token of this instance's latest
  /// claim of `key`; otherwise (committed, re-claimed by someone else,
  /// expired, never claimed here) does nothing.
  caf::error abort(std::string_view key) override;

  /// `try_begin` for every key of the batch in one pipelined write and one
  /// read of the replies (one round trip, shared with other callers'
  /// commands on the same connection). Answers per key; keys the server did
  /// not answer (connection lost, timeout) are `unavailable`, and their
  /// tokens are remembered as after a failed `try_begin`.
  void try_begin_many(std::span<const std::string_view> keys,
                      caf::timespan lease,
                      std::span<claim_result> out) override;

  /// `commit` / `abort` for every step of the batch in one pipelined write
  /// and one read of the replies, executed by the server in order. Aborts
  /// of keys without a remembered token send nothing (as `abort` does).
  /// Per-step errors as from `commit` / `abort`; returns the first.
  caf::error finish_many(std::span<const finish_op> ops, caf::timespan keep,
                         std::span<caf::error> errors) override;

  /// Nothing is buffered: every call already reached the server.
  caf::error flush() override;

  /// True: every call is a network round trip.
  bool remote() const noexcept override;

  /// The options the store was opened with.
  const redis_store_options& options() const noexcept;

  /// Commands sent and round trips (pipelined writes) they took since
  /// open; `commands / round_trips` is the average pipeline depth.
  struct pipeline_stats {
    uint64_t commands = 0;
    uint64_t round_trips = 0;
  };

  /// Counters of the automatic pipelining, for diagnostics and benchmarks.
  pipeline_stats pipelining() const noexcept;

  /// Claims this instance remembers tokens of (at most the live leases it
  /// took, plus expired ones not yet swept).
  size_t pending_claims() const;

private:
  struct impl;

  explicit redis_idempotency_store(std::unique_ptr<impl> ptr);

  std::unique_ptr<impl> impl_;
};

/// Registers `redis://` with `make_idempotency_store`. Idempotent.
void register_redis_store();

} // namespace evmesh
