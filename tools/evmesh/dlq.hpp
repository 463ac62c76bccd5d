#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>
#include <string_view>

#include <caf/expected.hpp>

#include "evmesh/stores.hpp"

// The `evmesh dlq ...` commands, as functions that write to the given
// streams and return the process exit code (0 ok, 1 failure, 2 usage).
namespace evmesh::cli {

/// Exit code of a command that ran and failed (missing store, unknown id).
constexpr int exit_failure = 1;

/// Exit code of a command that was called wrongly.
constexpr int exit_usage = 2;

/// The store `dlq` commands read when neither `--db` nor `--config` is given.
constexpr std::string_view default_dlq_url = "sqlite://state/dlq.db";

/// Options of `evmesh dlq list`.
struct dlq_list_options {
  /// Store URL.
  std::string db{default_dlq_url};
  /// Filters and limit.
  dead_letter_query query;
  /// One `to_json` record per line instead of a table.
  bool json = false;
};

/// Options of `evmesh dlq show`.
struct dlq_show_options {
  /// Store URL.
  std::string db{default_dlq_url};
  /// Record id.
  int64_t id = 0;
  /// The record as one `to_json` line instead of the human-readable form.
  bool json = false;
};

/// Opens the dead-letter store at `url` for reading. Unlike
/// `make_dead_letter_store`, a `sqlite://` file that does not exist is an
/// `errc::not_found` error ("no dead-letter store at PATH — has the service
/// run here?") instead of a new, empty database.
caf::expected<dead_letter_store_ptr> open_existing_store(std::string_view url);

/// Lists records newest first: a table (id, time, category, consumer, topic,
/// key, attempts, reason) or JSON lines.
int dlq_list(const dlq_list_options& opts, std::ostream& out,
             std::ostream& err);

/// Prints one record in full: every field, the error history and the
/// original envelope (pretty-printed when it is JSON).
int dlq_show(const dlq_show_options& opts, std::ostream& out,
             std::ostream& err);

/// The human-readable form `dlq show` prints.
std::string describe_record(const dead_letter_record& rec);

/// The message of `err` for people, without the error-code prefix.
std::string message_of(const caf::error& err);

} // namespace evmesh::cli
