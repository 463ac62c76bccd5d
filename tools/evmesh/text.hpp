#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <caf/expected.hpp>

// Text helpers of the evmesh CLI: times, JSON, tables.
namespace evmesh::cli {

/// Formats milliseconds since the Unix epoch as RFC 3339 in UTC with
/// milliseconds ("2024-05-01T12:00:00.123Z"); 0 renders as "-".
std::string format_time_ms(int64_t ms);

/// Parses a point in time for `--since` / `--until`: RFC 3339
/// ("2024-05-01T12:00:00Z", "2024-05-01T14:00:00.5+02:00", "2024-05-01"),
/// milliseconds since the epoch ("1714564800000"), or a duration meaning
/// "that long before `now_ms`" ("90m", "1h30m", "168h"). Errors
/// (`errc::invalid_config`) say which forms are accepted.
caf::expected<int64_t> parse_time_ms(std::string_view text, int64_t now_ms);

/// Milliseconds since the Unix epoch, now.
int64_t now_ms();

/// `json` re-indented with two spaces per level, keys in their original
/// order; `std::nullopt` when `json` is not valid JSON.
std::optional<std::string> pretty_json(std::string_view json);

/// `text` on one line: control characters become spaces, runs of spaces
/// collapse, invalid UTF-8 bytes become `?`.
std::string one_line(std::string_view text);

/// The first `max_chars` code points of `text`, with "…" as the last one
/// when it was cut.
std::string truncate_text(std::string_view text, size_t max_chars);

/// `text` with control characters (but newlines and tabs) and invalid UTF-8
/// bytes escaped as `\xNN`, safe to print to a terminal.
std::string printable(std::string_view text);

/// Number of code points of UTF-8 `text` (its width in a terminal, roughly).
size_t display_width(std::string_view text);

/// A left-aligned text table with a header row; columns are as wide as
/// their widest cell. The last column is not padded.
std::string render_table(const std::vector<std::string>& header,
                         const std::vector<std::vector<std::string>>& rows);

} // namespace evmesh::cli
