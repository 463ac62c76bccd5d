#include "dlq.hpp"

#include <filesystem>
#include <ostream>
#include <vector>

#include <caf/atom.hpp>

#include "evmesh/error.hpp"

#include "text.hpp"

namespace evmesh::cli {

namespace {

constexpr std::string_view sqlite_prefix = "sqlite://";

/// Cell text: one line, at most `max` characters.
std::string cell(std::string_view text, size_t max) {
  auto line = one_line(text);
  if (line.empty())
    return "-";
  return truncate_text(line, max);
}

std::string indented(std::string_view text, size_t indent);

/// "  name:   value", continuation lines aligned under the value.
void field(std::string& out, std::string_view name, std::string_view value) {
  constexpr size_t value_column = 20;
  std::string head = "  ";
  head += name;
  head += ':';
  head.append(head.size() < value_column ? value_column - head.size() : 1, ' ');
  out += head;
  if (value.empty())
    out += '-';
  else
    out += indented(value, value_column).substr(value_column);
  out += '\n';
}

std::string indented(std::string_view text, size_t indent) {
  std::string out;
  out.append(indent, ' ');
  for (auto c : text) {
    out += c;
    if (c == '\n')
      out.append(indent, ' ');
  }
  return out;
}

} // namespace

std::string message_of(const caf::error& err) {
  const auto& ctx = err.context();
  if (ctx.size() == 1 && ctx.match_element<std::string>(0))
    return ctx.get_as<std::string>(0);
  return render(err);
}

caf::expected<dead_letter_store_ptr> open_existing_store(std::string_view url) {
  if (url.starts_with(sqlite_prefix)) {
    auto path = std::string{url.substr(sqlite_prefix.size())};
    std::error_code ec;
    if (!path.empty() && path.find('?') == std::string::npos
        && !std::filesystem::exists(path, ec))
      return make_error(errc::not_found,
                        "no dead-letter store at " + path
                          + " — has the service run here? Pass --db "
                            "sqlite://PATH (or --config with the service's "
                            "TOML file) to read another store");
  }
  return make_dead_letter_store(url);
}

int dlq_list(const dlq_list_options& opts, std::ostream& out,
             std::ostream& err) {
  auto store = open_existing_store(opts.db);
  if (!store) {
    err << "evmesh: " << message_of(store.error()) << '\n';
    return exit_failure;
  }
  auto records = (*store)->list(opts.query);
  if (!records) {
    err << "evmesh: cannot list dead letters in " << opts.db << ": "
        << message_of(records.error()) << '\n';
    return exit_failure;
  }
  if (opts.json) {
    for (const auto& rec : *records)
      out << to_json(rec) << '\n';
    return 0;
  }
  if (records->empty()) {
    err << "no dead letters in " << opts.db << " match the filters\n";
    return 0;
  }
  std::vector<std::vector<std::string>> rows;
  for (const auto& rec : *records)
    rows.push_back({std::to_string(rec.id), format_time_ms(rec.last_failure_ms),
                    cell(rec.category, 24), cell(rec.consumer, 32),
                    cell(rec.topic, 40), cell(rec.key, 32),
                    std::to_string(rec.attempts), cell(rec.reason, 60)});
  out << render_table({"ID", "TIME", "CATEGORY", "CONSUMER", "TOPIC", "KEY",
                       "ATTEMPTS", "REASON"},
                      rows);
  if (opts.query.limit != 0 && records->size() == opts.query.limit)
    err << "(showing the newest " << opts.query.limit
        << "; raise --limit, or --limit 0 for all)\n";
  return 0;
}

std::string describe_record(const dead_letter_record& rec) {
  std::string out = "dead letter " + std::to_string(rec.id) + "\n";
  field(out, "category", rec.category);
  field(out, "reason", printable(rec.reason));
  field(out, "attempts", std::to_string(rec.attempts));
  field(out, "first failure", format_time_ms(rec.first_failure_ms));
  field(out, "last failure", format_time_ms(rec.last_failure_ms));
  field(out, "consumer", printable(rec.consumer));
  field(out, "pattern", printable(rec.pattern));
  field(out, "topic", printable(rec.topic));
  field(out, "key", printable(rec.key));
  field(out, "idempotency key", printable(rec.idempotency_key));
  field(out, "transport", printable(rec.transport));
  field(out, "position", printable(rec.position));
  field(out, "node", printable(rec.node));
  field(out, "traceparent", printable(rec.traceparent));
  field(out, "replayed",
        rec.replayed_ms == 0 ? "never" : format_time_ms(rec.replayed_ms));
  out += "\nerrors (oldest first):\n";
  if (rec.errors.empty())
    out += "  (none recorded)\n";
  for (const auto& e : rec.errors) {
    out += "  attempt " + std::to_string(e.attempt) + " at "
           + format_time_ms(e.at_ms) + ":\n";
    out += indented(printable(e.message), 4);
    out += '\n';
  }
  auto pretty = pretty_json(rec.original);
  out += '\n';
  if (rec.original.empty()) {
    out += "original message: (empty)\n";
  } else if (pretty) {
    out += rec.original_decoded ? "original envelope:\n"
                                : "original message (JSON, but not a valid "
                                  "envelope):\n";
    out += indented(*pretty, 2);
    out += '\n';
  } else {
    out += "original message (" + std::to_string(rec.original.size())
           + " bytes, not JSON; shown verbatim, \\xNN = raw byte):\n";
    out += indented(printable(rec.original), 2);
    out += '\n';
  }
  return out;
}

int dlq_show(const dlq_show_options& opts, std::ostream& out,
             std::ostream& err) {
  auto store = open_existing_store(opts.db);
  if (!store) {
    err << "evmesh: " << message_of(store.error()) << '\n';
    return exit_failure;
  }
  auto rec = (*store)->get(opts.id);
  if (!rec) {
    const auto& e = rec.error();
    if (e.category() == caf::atom("evmesh")
        && e.code() == static_cast<uint8_t>(errc::not_found))
      err << "evmesh: no dead letter with id " << opts.id << " in " << opts.db
          << " — `evmesh dlq list` shows the ids\n";
    else
      err << "evmesh: cannot read dead letter " << opts.id << " from "
          << opts.db << ": " << message_of(rec.error()) << '\n';
    return exit_failure;
  }
  if (opts.json)
    out << to_json(*rec) << '\n';
  else
    out << describe_record(*rec);
  return 0;
}

} // namespace evmesh::cli
