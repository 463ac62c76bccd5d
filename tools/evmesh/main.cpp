// evmesh: the operator CLI of evmesh consumer services.
//
//   evmesh dlq list [--db URL | --config FILE] [filters] [--limit N] [--json]
//   evmesh dlq show ID [--db URL | --config FILE] [--json]
//   evmesh config reference
//   evmesh config check FILE
//
// Exit codes: 0 ok, 1 the command failed, 2 usage or configuration error.

#include <algorithm>
#include <charconv>
#include <exception>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <CLI/CLI.hpp>

#include "evmesh/config.hpp"
#include "evmesh/error.hpp"

#include "dlq.hpp"
#include "text.hpp"

using namespace evmesh;
using namespace evmesh::cli;

namespace {

struct command_group {
  std::string_view name;
  std::vector<std::string_view> commands;
};

const std::vector<command_group> command_groups = {
  {"dlq", {"list", "show"}},
  {"config", {"reference", "check"}},
};

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j)
    row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min(
        {row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

std::optional<std::string_view>
closest(std::string_view word, const std::vector<std::string_view>& options) {
  std::optional<std::string_view> best;
  size_t best_distance = 3; // more edits than this is not a typo
  for (auto x : options) {
    auto d = edit_distance(word, x);
    if (d < best_distance) {
      best_distance = d;
      best = x;
    }
  }
  return best;
}

std::string usage_line() {
  std::string out;
  for (const auto& g : command_groups) {
    out += out.empty() ? "" : ", ";
    out += g.name;
    out += ' ';
    for (size_t i = 0; i < g.commands.size(); ++i) {
      out += i == 0 ? "" : "|";
      out += g.commands[i];
    }
  }
  return out;
}

/// Catches unknown commands before CLI11 so the message can suggest the
/// intended one. Returns an exit code when the arguments are unusable.
std::optional<int> check_commands(int argc, char** argv) {
  auto fail = [](const std::string& msg) {
    std::cerr << "evmesh: " << msg << "\nRun 'evmesh --help' for usage.\n";
    return exit_usage;
  };
  if (argc < 2)
    return fail("missing command — commands: " + usage_line());
  std::string_view first = argv[1];
  if (first.starts_with("-"))
    return std::nullopt; // --help and friends: CLI11 answers
  std::vector<std::string_view> names;
  for (const auto& g : command_groups)
    names.push_back(g.name);
  const command_group* group = nullptr;
  for (const auto& g : command_groups)
    if (g.name == first)
      group = &g;
  if (group == nullptr) {
    std::string msg = "unknown command '" + std::string{first} + "'";
    if (auto hint = closest(first, names))
      msg += " — did you mean '" + std::string{*hint} + "'?";
    else
      msg += " — commands: " + usage_line();
    return fail(msg);
  }
  auto group_name = std::string{group->name};
  std::string choices;
  for (auto c : group->commands)
    choices += (choices.empty() ? "" : ", ") + std::string{c};
  if (argc < 3)
    return fail("'evmesh " + group_name + "' needs a command: " + choices);
  std::string_view second = argv[2];
  if (second.starts_with("-"))
    return std::nullopt;
  for (auto c : group->commands)
    if (c == second)
      return std::nullopt;
  std::string msg = "unknown command '" + group_name + " " + std::string{second}
                    + "'";
  if (auto hint = closest(second, group->commands))
    msg += " — did you mean '" + group_name + " " + std::string{*hint} + "'?";
  else
    msg += " — '" + group_name + "' takes: " + choices;
  return fail(msg);
}

/// Where `dlq` commands read: `--db`, else `dead_letter.url` of `--config`.
struct store_choice {
  std::string db{default_dlq_url};
  std::string config_file;
};

void add_store_options(CLI::App* cmd, store_choice& choice) {
  auto db = cmd
              ->add_option("--db", choice.db,
                           "Dead-letter store URL (sqlite://PATH)")
              ->type_name("URL")
              ->capture_default_str();
  cmd
    ->add_option("--config", choice.config_file,
                 "Read the store URL (dead_letter.url) from the service's "
                 "TOML file instead")
    ->type_name("FILE")
    ->excludes(db);
}

/// The store URL to read, or an exit code after printing why not.
std::optional<std::string> resolve_store(const store_choice& choice,
                                         int& exit_code) {
  if (choice.config_file.empty())
    return choice.db;
  auto cfg = load_config(choice.config_file);
  if (!cfg) {
    std::cerr << "evmesh: " << message_of(cfg.error()) << '\n';
    exit_code = exit_usage;
    return std::nullopt;
  }
  if (cfg->dead_letter_url == "none") {
    std::cerr << "evmesh: " << choice.config_file
              << " sets dead_letter.url = \"none\": this service keeps dead "
                 "letters only in its broker's DLQ — inspect them there\n";
    exit_code = exit_failure;
    return std::nullopt;
  }
  return cfg->dead_letter_url;
}

/// " — did you mean '--limit'?" for the first unknown `--option` of the
/// innermost subcommand given, or "".
std::string unknown_option_hint(CLI::App& app, int argc, char** argv) {
  auto cmd = &app;
  while (!cmd->get_subcommands().empty())
    cmd = cmd->get_subcommands().front();
  std::vector<std::string> names;
  for (const auto* opt : cmd->get_options())
    for (const auto& name : opt->get_lnames())
      names.push_back("--" + name);
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (!arg.starts_with("--"))
      continue;
    arg = arg.substr(0, arg.find('='));
    if (std::find(names.begin(), names.end(), arg) != names.end())
      continue;
    std::vector<std::string_view> candidates{names.begin(), names.end()};
    if (auto hint = closest(arg, candidates))
      return " — did you mean '" + std::string{*hint} + "'?";
    return {};
  }
  return {};
}

int run(int argc, char** argv) {
  if (auto code = check_commands(argc, argv))
    return *code;
  CLI::App app{"evmesh — operator tool for evmesh consumer services.",
               "evmesh"};
  app.require_subcommand(1);
  app.footer("Exit codes: 0 ok, 1 the command failed, 2 usage error.\n"
             "Run 'evmesh COMMAND SUBCOMMAND --help' for its options.");
  // -- dlq
  auto dlq = app.add_subcommand("dlq", "Inspect dead letters.");
  dlq->require_subcommand(1);
  store_choice list_store;
  dlq_list_options list_opts;
  std::string since_text;
  std::string until_text;
  auto list = dlq->add_subcommand(
    "list", "List dead letters, newest (by last failure) first.");
  add_store_options(list, list_store);
  list->add_option("--topic", list_opts.query.topic, "Only this topic");
  list->add_option("--consumer", list_opts.query.consumer,
                   "Only this consumer");
  list->add_option("--category", list_opts.query.category,
                   "Only this category (decode_error, no_handler, "
                   "tenant_rejected, permanent, malformed_payload, "
                   "retries_exhausted, crash_loop)");
  list->add_option("--key", list_opts.query.key, "Only this ordering key");
  list
    ->add_option("--since", since_text,
                 "Last failure at or after TIME: RFC 3339 "
                 "(2024-05-01T12:00:00Z), epoch milliseconds, or a "
                 "duration before now (2h)")
    ->type_name("TIME");
  list
    ->add_option("--until", until_text,
                 "Last failure at or before TIME (same forms as --since)")
    ->type_name("TIME");
  list
    ->add_option("--limit", list_opts.query.limit,
                 "Most records to show; 0 shows all")
    ->capture_default_str();
  list->add_flag("--json", list_opts.json,
                 "One JSON record per line instead of a table");
  store_choice show_store;
  dlq_show_options show_opts;
  auto show = dlq->add_subcommand("show", "Show one dead letter in full.");
  std::string id_text;
  show->add_option("id", id_text, "Record id, as `evmesh dlq list` shows")
    ->required()
    ->type_name("ID");
  add_store_options(show, show_store);
  show->add_flag("--json", show_opts.json,
                 "The record as one JSON line instead of the readable form");
  // -- config
  auto config = app.add_subcommand("config",
                                   "Configuration reference and checks.");
  config->require_subcommand(1);
  auto reference = config->add_subcommand(
    "reference", "Print every configuration key as a Markdown table.");
  std::string check_file;
  auto check = config->add_subcommand(
    "check", "Validate a TOML configuration file: prints ok or every problem.");
  check->add_option("file", check_file, "The TOML file")
    ->required()
    ->type_name("FILE");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ExtrasError& e) {
    std::cerr << "evmesh: " << e.what() << unknown_option_hint(app, argc, argv)
              << "\nRun 'evmesh --help' (or 'evmesh COMMAND SUBCOMMAND "
                 "--help') for usage.\n";
    return exit_usage;
  } catch (const CLI::ParseError& e) {
    std::cerr << "evmesh: " << e.what()
              << "\nRun 'evmesh --help' (or 'evmesh COMMAND SUBCOMMAND "
                 "--help') for usage.\n";
    return exit_usage;
  }
  if (reference->parsed()) {
    std::cout << config_reference_markdown();
    return 0;
  }
  if (check->parsed()) {
    auto cfg = load_config(check_file);
    if (!cfg) {
      std::cerr << message_of(cfg.error()) << '\n';
      return exit_usage;
    }
    std::cout << "ok\n";
    return 0;
  }
  int exit_code = 0;
  if (list->parsed()) {
    auto db = resolve_store(list_store, exit_code);
    if (!db)
      return exit_code;
    list_opts.db = *db;
    auto now = now_ms();
    for (auto [text, dst, name] :
         {std::tuple{&since_text, &list_opts.query.since_ms, "--since"},
          std::tuple{&until_text, &list_opts.query.until_ms, "--until"}}) {
      if (text->empty())
        continue;
      auto ms = parse_time_ms(*text, now);
      if (!ms) {
        std::cerr << "evmesh: " << name << ": " << message_of(ms.error())
                  << '\n';
        return exit_usage;
      }
      *dst = *ms;
    }
    return dlq_list(list_opts, std::cout, std::cerr);
  }
  if (show->parsed()) {
    auto db = resolve_store(show_store, exit_code);
    if (!db)
      return exit_code;
    show_opts.db = *db;
    auto [ptr, ec] = std::from_chars(
      id_text.data(), id_text.data() + id_text.size(), show_opts.id);
    if (ec != std::errc{} || ptr != id_text.data() + id_text.size()
        || show_opts.id <= 0) {
      std::cerr << "evmesh: invalid id '" << id_text
                << "': expected a positive integer, as `evmesh dlq list` "
                   "shows\n";
      return exit_usage;
    }
    return dlq_show(show_opts, std::cout, std::cerr);
  }
  std::cerr << "evmesh: no command given — commands: " << usage_line() << '\n';
  return exit_usage;
}

} // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& ex) {
    std::cerr << "evmesh: unexpected error: " << ex.what() << '\n';
    return exit_failure;
  }
}
