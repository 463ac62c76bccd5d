// evmesh: the operator CLI of evmesh consumer services.
//
//   evmesh dlq list [--db URL | --config FILE] [filters] [--limit N] [--json]
//   evmesh dlq show ID [--db URL | --config FILE] [--json]
//   evmesh dlq replay [--db URL | --config FILE] [filters] [--to TOPIC]
//                     --target URL [--again] [--yes] [--json]
//   evmesh dlq purge [--db URL | --config FILE] [filters] [--yes]
//   evmesh publish URL --topic T [--key K] [--idempotency-key I]
//                  [--data JSON | --file F]   (else the payload is stdin)
//   evmesh config reference
//   evmesh config check FILE
//   evmesh cluster status --seed HOST:PORT [--config FILE] [--secret S]
//
// Exit codes: 0 ok, 1 the command failed, 2 usage or configuration error.

#include <algorithm>
#include <charconv>
#include <exception>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <CLI/CLI.hpp>

#include "evmesh/config.hpp"
#include "evmesh/error.hpp"
#ifdef EVMESH_CLI_HAS_CLUSTER
#  include <spdlog/spdlog.h>

#  include "evmesh/cluster.hpp"
#endif

#include "dlq.hpp"
#include "ops.hpp"
#include "text.hpp"

using namespace evmesh;
using namespace evmesh::cli;

namespace {

struct command_group {
  std::string_view name;
  std::vector<std::string_view> commands;
};

const std::vector<command_group> command_groups = {
  {"publish", {}},
  {"dlq", {"list", "show", "replay", "purge"}},
  {"config", {"reference", "check"}},
#ifdef EVMESH_CLI_HAS_CLUSTER
  {"cluster", {"status"}},
#endif
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
    if (!g.commands.empty())
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
  if (group->commands.empty())
    return std::nullopt; // a command without subcommands
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
                           "Dead-letter store URL: sqlite://PATH, or a "
                           "broker's DLQ (nats://H:P?stream=S, "
                           "kafka://B?topics=T, amqp://U:P@H/V?queue=Q)")
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
                 "letters only in its broker's DLQ — inspect them with --db "
                 "and the broker URL (nats://, kafka://, amqp://)\n";
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

/// The filters `dlq list`, `dlq replay` and `dlq purge` share.
struct filter_options {
  std::string since_text;
  std::string until_text;
};

void add_filter_options(CLI::App* cmd, dead_letter_query& q,
                        filter_options& f) {
  cmd->add_option("--topic", q.topic, "Only this topic");
  cmd->add_option("--consumer", q.consumer, "Only this consumer");
  cmd->add_option("--category", q.category,
                  "Only this category (decode_error, no_handler, "
                  "tenant_rejected, permanent, malformed_payload, "
                  "retries_exhausted, crash_loop)");
  cmd->add_option("--key", q.key, "Only this ordering key");
  cmd
    ->add_option("--since", f.since_text,
                 "Last failure at or after TIME: RFC 3339 "
                 "(2024-05-01T12:00:00Z), epoch milliseconds, or a "
                 "duration before now (2h)")
    ->type_name("TIME");
  cmd
    ->add_option("--until", f.until_text,
                 "Last failure at or before TIME (same forms as --since)")
    ->type_name("TIME");
}

/// Converts --since/--until into `q`; an exit code on a bad time.
std::optional<int> apply_times(const filter_options& f, dead_letter_query& q) {
  auto now = now_ms();
  for (auto [text, dst, name] :
       {std::tuple{&f.since_text, &q.since_ms, "--since"},
        std::tuple{&f.until_text, &q.until_ms, "--until"}}) {
    if (text->empty())
      continue;
    auto ms = parse_time_ms(*text, now);
    if (!ms) {
      std::cerr << "evmesh: " << name << ": " << message_of(ms.error()) << '\n';
      return exit_usage;
    }
    *dst = *ms;
  }
  return std::nullopt;
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
  filter_options list_filters;
  auto list = dlq->add_subcommand(
    "list", "List dead letters, newest (by last failure) first.");
  add_store_options(list, list_store);
  add_filter_options(list, list_opts.query, list_filters);
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
  store_choice replay_store;
  dlq_replay_options replay_opts;
  filter_options replay_filters;
  auto replay = dlq->add_subcommand(
    "replay",
    "Republish the original envelopes of the selected dead letters (attempt "
    "0, the dead letter's span as trace parent, idempotency key "
    "replay:ID:ORIGINAL_KEY) and mark them replayed. Records replayed "
    "before are skipped unless --again.");
  add_store_options(replay, replay_store);
  add_filter_options(replay, replay_opts.query, replay_filters);
  replay
    ->add_option("--limit", replay_opts.query.limit,
                 "Most records to replay (newest first); 0 = all selected")
    ->capture_default_str();
  replay->add_option("--to", replay_opts.to,
                     "Publish to this topic instead of the original one");
  replay
    ->add_option("--target", replay_opts.target,
                 "Where to publish: outbox:sqlite://PATH (the service's "
                 "outbox; its relay publishes) or a transport URL")
    ->type_name("URL");
  replay->add_flag("--again", replay_opts.again,
                   "Also replay records that were replayed before");
  replay->add_flag("--yes,-y", replay_opts.yes, "Do not ask for confirmation");
  replay->add_flag("--json", replay_opts.json,
                   "One JSON result per record instead of text lines");
  store_choice purge_store;
  dlq_purge_options purge_opts;
  filter_options purge_filters;
  auto purge = dlq->add_subcommand(
    "purge", "Delete the dead letters the filters select (all without "
             "filters), after confirmation.");
  add_store_options(purge, purge_store);
  add_filter_options(purge, purge_opts.query, purge_filters);
  purge
    ->add_option("--limit", purge_opts.query.limit,
                 "Most records to delete (newest first); 0 = all selected")
    ->capture_default_str();
  purge->add_flag("--yes,-y", purge_opts.yes, "Do not ask for confirmation");
  // -- publish
  publish_options pub_opts;
  std::string pub_file;
  auto pub = app.add_subcommand(
    "publish", "Publish one event: into a service's outbox database "
               "(outbox:sqlite://PATH) or through a transport URL.");
  pub
    ->add_option("url", pub_opts.url,
                 "outbox:sqlite://PATH, or a transport URL (inproc:// reaches "
                 "only this process; broker URLs need their transports)")
    ->required()
    ->type_name("URL");
  pub->add_option("--topic", pub_opts.topic, "Topic of the event")->required();
  pub->add_option("--key", pub_opts.key, "Ordering key");
  pub->add_option("--idempotency-key", pub_opts.idempotency_key,
                  "Idempotency key (default: the generated event id)");
  auto data_opt = pub->add_option("--data", pub_opts.data,
                                  "The payload as JSON text");
  pub->add_option("--file", pub_file, "Read the payload JSON from FILE")
    ->type_name("FILE")
    ->excludes(data_opt);
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
#ifdef EVMESH_CLI_HAS_CLUSTER
  // -- cluster
  auto cluster = app.add_subcommand("cluster", "Cluster membership.");
  cluster->require_subcommand(1);
  std::string status_seed;
  std::string status_config;
  std::string status_secret;
  auto status = cluster->add_subcommand(
    "status", "Join a node as an observer (no lanes) and print its cluster "
              "status as JSON: peers, lanes, in flight, last heartbeat.");
  status->add_option("--seed", status_seed, "The node to ask")
    ->required()
    ->type_name("HOST:PORT");
  status
    ->add_option("--config", status_config,
                 "TOML file with the cluster's [cluster] secret and TLS "
                 "files")
    ->type_name("FILE");
  status
    ->add_option("--secret", status_secret,
                 "The cluster's shared secret (overrides --config)")
    ->type_name("SECRET");
#endif
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
#ifdef EVMESH_CLI_HAS_CLUSTER
  if (status->parsed()) {
    runtime_config cfg;
    if (!status_config.empty()) {
      auto loaded = load_config(status_config);
      if (!loaded) {
        std::cerr << message_of(loaded.error()) << '\n';
        return exit_usage;
      }
      cfg = std::move(*loaded);
    }
    if (!status_secret.empty())
      if (auto err = set_config_value(cfg, "cluster.secret", status_secret)) {
        std::cerr << "evmesh: --secret: " << message_of(err) << '\n';
        return exit_usage;
      }
    // stdout carries the JSON only; failures are reported below.
    spdlog::set_level(spdlog::level::off);
    auto json = query_cluster_status(cfg, status_seed);
    if (!json) {
      std::cerr << "evmesh: cluster status: " << message_of(json.error())
                << '\n';
      auto& err = json.error();
      return err.category() == caf::atom("evmesh")
                 && err.code() == static_cast<uint8_t>(errc::invalid_config)
               ? exit_usage
               : exit_failure;
    }
    std::cout << *json << '\n';
    return 0;
  }
#endif
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
    if (auto code = apply_times(list_filters, list_opts.query))
      return *code;
    return dlq_list(list_opts, std::cout, std::cerr);
  }
  if (replay->parsed()) {
    auto db = resolve_store(replay_store, exit_code);
    if (!db)
      return exit_code;
    replay_opts.db = *db;
    if (auto code = apply_times(replay_filters, replay_opts.query))
      return *code;
    return dlq_replay(replay_opts, terminal::detect(), std::cin, std::cout,
                      std::cerr);
  }
  if (purge->parsed()) {
    auto db = resolve_store(purge_store, exit_code);
    if (!db)
      return exit_code;
    purge_opts.db = *db;
    if (auto code = apply_times(purge_filters, purge_opts.query))
      return *code;
    return dlq_purge(purge_opts, terminal::detect(), std::cin, std::cout,
                     std::cerr);
  }
  if (pub->parsed()) {
    if (!pub_file.empty() || pub->count("--data") == 0) {
      std::ifstream file;
      if (!pub_file.empty()) {
        file.open(pub_file, std::ios::binary);
        if (!file) {
          std::cerr << "evmesh: cannot read --file " << pub_file
                    << ": no such file or not readable\n";
          return exit_usage;
        }
        pub_opts.data_source = pub_file;
      } else {
        pub_opts.data_source = "stdin";
      }
      std::istream& src = pub_file.empty() ? std::cin : file;
      pub_opts.data.assign(std::istreambuf_iterator<char>{src},
                           std::istreambuf_iterator<char>{});
    }
    return publish(pub_opts, std::cout, std::cerr);
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
    register_broker_schemes();
    return run(argc, argv);
  } catch (const std::exception& ex) {
    std::cerr << "evmesh: unexpected error: " << ex.what() << '\n';
    return exit_failure;
  }
}
