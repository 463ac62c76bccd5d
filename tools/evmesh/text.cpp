#include "text.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <ctime>

#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "evmesh/config.hpp"
#include "evmesh/error.hpp"

namespace evmesh::cli {

namespace {

/// Length of the UTF-8 sequence starting at `text[i]`, 0 if invalid.
size_t utf8_length(std::string_view text, size_t i) {
  auto c = static_cast<unsigned char>(text[i]);
  size_t len = c < 0x80           ? 1
               : (c >> 5) == 0x6  ? 2
               : (c >> 4) == 0xE  ? 3
               : (c >> 3) == 0x1E ? 4
                                  : 0;
  if (len == 0 || i + len > text.size())
    return 0;
  for (size_t k = 1; k < len; ++k)
    if ((static_cast<unsigned char>(text[i + k]) & 0xC0) != 0x80)
      return 0;
  return len;
}

bool parse_digits(std::string_view text, size_t pos, size_t count, int& out) {
  if (pos + count > text.size())
    return false;
  auto first = text.data() + pos;
  auto [ptr, ec] = std::from_chars(first, first + count, out);
  return ec == std::errc{} && ptr == first + count;
}

/// RFC 3339 (or a bare date) to milliseconds since the epoch.
std::optional<int64_t> parse_rfc3339(std::string_view text) {
  int year = 0, month = 0, day = 0, hour = 0, minute = 0, second = 0;
  if (!parse_digits(text, 0, 4, year) || text.size() < 10 || text[4] != '-'
      || !parse_digits(text, 5, 2, month) || text[7] != '-'
      || !parse_digits(text, 8, 2, day))
    return std::nullopt;
  int64_t millis = 0;
  int64_t offset_s = 0;
  if (text.size() > 10) {
    if (text[10] != 'T' && text[10] != 't' && text[10] != ' ')
      return std::nullopt;
    if (text.size() < 19 || !parse_digits(text, 11, 2, hour) || text[13] != ':'
        || !parse_digits(text, 14, 2, minute) || text[16] != ':'
        || !parse_digits(text, 17, 2, second))
      return std::nullopt;
    size_t pos = 19;
    if (pos < text.size() && text[pos] == '.') {
      ++pos;
      int64_t scale = 100;
      size_t start = pos;
      while (pos < text.size()
             && std::isdigit(static_cast<unsigned char>(text[pos]))) {
        millis += (text[pos] - '0') * scale;
        scale /= 10;
        ++pos;
      }
      if (pos == start)
        return std::nullopt;
    }
    if (pos >= text.size())
      return std::nullopt; // RFC 3339 requires Z or an offset
    if (text[pos] == 'Z' || text[pos] == 'z') {
      ++pos;
    } else if (text[pos] == '+' || text[pos] == '-') {
      int oh = 0, om = 0;
      if (!parse_digits(text, pos + 1, 2, oh) || pos + 3 >= text.size()
          || text[pos + 3] != ':' || !parse_digits(text, pos + 4, 2, om))
        return std::nullopt;
      offset_s = (oh * 3600 + om * 60) * (text[pos] == '-' ? -1 : 1);
      pos += 6;
    } else {
      return std::nullopt;
    }
    if (pos != text.size())
      return std::nullopt;
  }
  if (month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59
      || second > 60)
    return std::nullopt;
  std::tm tm{};
  tm.tm_year = year - 1900;
  tm.tm_mon = month - 1;
  tm.tm_mday = day;
  tm.tm_hour = hour;
  tm.tm_min = minute;
  tm.tm_sec = second;
  auto secs = static_cast<int64_t>(timegm(&tm));
  return (secs - offset_s) * 1000 + millis;
}

void pretty(std::string& out, const boost::json::value& x, size_t depth) {
  auto indent = [&](size_t n) { out.append(2 * n, ' '); };
  if (x.is_object()) {
    const auto& obj = x.get_object();
    if (obj.empty()) {
      out += "{}";
      return;
    }
    out += "{\n";
    size_t i = 0;
    for (const auto& [key, val] : obj) {
      indent(depth + 1);
      out += boost::json::serialize(boost::json::string_view{key});
      out += ": ";
      pretty(out, val, depth + 1);
      out += ++i < obj.size() ? ",\n" : "\n";
    }
    indent(depth);
    out += '}';
  } else if (x.is_array()) {
    const auto& arr = x.get_array();
    if (arr.empty()) {
      out += "[]";
      return;
    }
    out += "[\n";
    for (size_t i = 0; i < arr.size(); ++i) {
      indent(depth + 1);
      pretty(out, arr[i], depth + 1);
      out += i + 1 < arr.size() ? ",\n" : "\n";
    }
    indent(depth);
    out += ']';
  } else {
    out += boost::json::serialize(x);
  }
}

} // namespace

std::string format_time_ms(int64_t ms) {
  if (ms == 0)
    return "-";
  auto secs = static_cast<std::time_t>(ms >= 0 ? ms / 1000 : (ms - 999) / 1000);
  auto rest = static_cast<int>(ms - static_cast<int64_t>(secs) * 1000);
  std::tm tm{};
  if (gmtime_r(&secs, &tm) == nullptr)
    return std::to_string(ms) + "ms";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
                tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                tm.tm_min, tm.tm_sec, rest);
  return buf;
}

int64_t now_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch())
    .count();
}

caf::expected<int64_t> parse_time_ms(std::string_view text, int64_t now) {
  if (!text.empty() && std::all_of(text.begin(), text.end(), [](char c) {
        return std::isdigit(static_cast<unsigned char>(c));
      })) {
    int64_t ms = 0;
    auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(),
                                     ms);
    if (ec == std::errc{} && ptr == text.data() + text.size())
      return ms;
  }
  if (auto ms = parse_rfc3339(text))
    return *ms;
  if (!text.empty() && std::isdigit(static_cast<unsigned char>(text[0]))
      && text.find_first_of("-:") == std::string_view::npos) {
    if (auto ago = parse_duration(text)) {
      using namespace std::chrono;
      return now - duration_cast<milliseconds>(*ago).count();
    }
  }
  return make_error(errc::invalid_config,
                    "invalid time '" + std::string{text}
                      + "': expected RFC 3339 (2024-05-01T12:00:00Z or "
                        "2024-05-01), milliseconds since the epoch, or a "
                        "duration before now (30m, 2h, 1h30m)");
}

std::optional<std::string> pretty_json(std::string_view json) {
  boost::json::error_code ec;
  auto x = boost::json::parse(json, ec);
  if (ec)
    return std::nullopt;
  std::string out;
  pretty(out, x, 0);
  return out;
}

std::string one_line(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  bool space = false;
  for (size_t i = 0; i < text.size();) {
    auto len = utf8_length(text, i);
    if (len == 0) {
      out += '?';
      space = false;
      ++i;
      continue;
    }
    auto c = static_cast<unsigned char>(text[i]);
    if (len == 1 && (c < 0x20 || c == 0x7F || c == ' ')) {
      if (!space && !out.empty())
        out += ' ';
      space = true;
    } else {
      out.append(text.substr(i, len));
      space = false;
    }
    i += len;
  }
  while (!out.empty() && out.back() == ' ')
    out.pop_back();
  return out;
}

std::string truncate_text(std::string_view text, size_t max_chars) {
  if (display_width(text) <= max_chars)
    return std::string{text};
  std::string out;
  size_t chars = 0;
  for (size_t i = 0; i < text.size() && chars + 1 < max_chars;) {
    auto len = std::max<size_t>(1, utf8_length(text, i));
    out.append(text.substr(i, len));
    i += len;
    ++chars;
  }
  out += "…";
  return out;
}

std::string printable(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    auto len = utf8_length(text, i);
    auto c = static_cast<unsigned char>(text[i]);
    if (len == 0
        || (len == 1 && (c < 0x20 || c == 0x7F) && c != '\n' && c != '\t')) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
      ++i;
      continue;
    }
    out.append(text.substr(i, len));
    i += len;
  }
  return out;
}

size_t display_width(std::string_view text) {
  size_t n = 0;
  for (size_t i = 0; i < text.size();) {
    i += std::max<size_t>(1, utf8_length(text, i));
    ++n;
  }
  return n;
}

std::string render_table(const std::vector<std::string>& header,
                         const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths(header.size(), 0);
  auto measure = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size() && i < widths.size(); ++i)
      widths[i] = std::max(widths[i], display_width(row[i]));
  };
  measure(header);
  for (const auto& row : rows)
    measure(row);
  std::string out;
  auto emit = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size() && i < widths.size(); ++i) {
      out += row[i];
      if (i + 1 < row.size())
        out.append(widths[i] - display_width(row[i]) + 2, ' ');
    }
    out += '\n';
  };
  emit(header);
  for (const auto& row : rows)
    emit(row);
  return out;
}

} // namespace evmesh::cli
