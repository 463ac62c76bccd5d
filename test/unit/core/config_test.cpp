#include "evmesh/config.hpp"

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <caf/atom.hpp>
#include <gtest/gtest.h>
#include <unistd.h>

#include "evmesh/error.hpp"

using namespace evmesh;
using namespace std::chrono_literals;

namespace {

errc code_of(const caf::error& err) {
  if (!err || err.category() != caf::atom("evmesh"))
    return errc::none;
  return static_cast<errc>(err.code());
}

/// The message of an evmesh error, without the code prefix.
std::string message_of(const caf::error& err) {
  const auto& ctx = err.context();
  if (ctx.size() == 1 && ctx.match_element<std::string>(0))
    return ctx.get_as<std::string>(0);
  return render(err);
}

/// Parses `toml` and returns the error message (empty when it parsed).
std::string config_error(const std::string& toml,
                         std::string_view origin = "test.toml") {
  auto cfg = parse_config(toml, origin);
  if (cfg)
    return {};
  EXPECT_EQ(code_of(cfg.error()), errc::invalid_config);
  return message_of(cfg.error());
}

bool contains(const std::string& haystack, std::string_view needle) {
  return haystack.find(needle) != std::string::npos;
}

/// A fresh directory under the system temp directory, removed at scope end.
struct temp_dir {
  std::filesystem::path path;

  temp_dir() {
    static std::atomic<int> counter{0};
    path = std::filesystem::temp_directory_path()
           / ("evmesh_config_test_" + std::to_string(getpid()) + "_"
              + std::to_string(counter++));
    std::filesystem::create_directories(path);
  }

  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }

  std::string write(const std::string& name, const std::string& text) const {
    auto file = path / name;
    std::ofstream out{file};
    out << text;
    return file.string();
  }
};

/// Runs `parse_command_line` on `args` (argv[0] added), capturing output.
struct cli_run {
  command_line result;
  std::string out;
  std::string err;
};

cli_run run_cli(std::vector<std::string> args,
                std::vector<cli_flag> extra = {}) {
  args.insert(args.begin(), "evmesh-test");
  std::vector<char*> argv;
  for (auto& arg : args)
    argv.push_back(arg.data());
  argv.push_back(nullptr);
  cli_run run;
  testing::internal::CaptureStdout();
  testing::internal::CaptureStderr();
  run.result = parse_command_line(static_cast<int>(args.size()), argv.data(),
                                  "Test service.", std::move(extra));
  run.out = testing::internal::GetCapturedStdout();
  run.err = testing::internal::GetCapturedStderr();
  return run;
}

std::string value_of(const runtime_config& cfg, std::string_view key) {
  auto x = get_config_value(cfg, key);
  EXPECT_TRUE(x) << key;
  return x ? *x : std::string{};
}

} // namespace

// -- durations ----------------------------------------------------------------

TEST(config_duration, parses_units_and_compounds) {
  struct row {
    std::string_view text;
    caf::timespan expected;
  };
  const row rows[] = {
    {"250ms", 250ms},   {"30s", 30s},   {"5m", 5min},        {"24h", 24h},
    {"1500us", 1500us}, {"0s", 0s},     {"1m30s", 90s},      {"1h2m3s", 3723s},
    {"7ns", 7ns},       {" 10s ", 10s}, {"1s500ms", 1500ms},
  };
  for (const auto& r : rows) {
    auto x = parse_duration(r.text);
    ASSERT_TRUE(x) << r.text << ": " << render(x.error());
    EXPECT_EQ(*x, r.expected) << r.text;
  }
}

TEST(config_duration, rejects_bad_text_naming_the_value) {
  for (std::string_view text :
       {"", "30", "10 s", "5x", "-5s", "1.5s", "s", "ms10", "99999999999h"}) {
    auto x = parse_duration(text);
    ASSERT_FALSE(x) << text;
    EXPECT_EQ(code_of(x.error()), errc::invalid_config) << text;
    auto msg = message_of(x.error());
    EXPECT_TRUE(contains(msg, "\"" + std::string{text} + "\"")) << msg;
  }
  auto msg = message_of(parse_duration("30").error());
  EXPECT_TRUE(contains(msg, "missing unit")) << msg;
}

TEST(config_duration, formats_what_it_parses) {
  EXPECT_EQ(format_duration(0s), "0s");
  EXPECT_EQ(format_duration(250ms), "250ms");
  EXPECT_EQ(format_duration(90s), "1m30s");
  EXPECT_EQ(format_duration(24h), "24h");
  EXPECT_EQ(format_duration(1500ms), "1500ms");
  EXPECT_EQ(format_duration(1500us), "1500us");
  for (caf::timespan x : {caf::timespan{7}, caf::timespan{3723s},
                          caf::timespan{100ms}, caf::timespan{61min}}) {
    auto back = parse_duration(format_duration(x));
    ASSERT_TRUE(back);
    EXPECT_EQ(*back, x);
  }
}

// -- the key table ------------------------------------------------------------

TEST(config_keys, defaults_render_as_documented) {
  runtime_config defaults;
  for (const auto& key : config_keys()) {
    if (key.name == "runtime.node_name")
      continue; // documented as "(hostname)", filled in by the parsers
    EXPECT_EQ(value_of(defaults, key.name), key.default_text) << key.name;
  }
}

TEST(config_keys, every_key_has_a_section_doc_and_valid_choices) {
  std::vector<std::string_view> seen;
  for (const auto& key : config_keys()) {
    EXPECT_NE(key.name.find('.'), std::string_view::npos) << key.name;
    EXPECT_FALSE(key.doc.empty()) << key.name;
    EXPECT_EQ(std::count(seen.begin(), seen.end(), key.name), 0) << key.name;
    seen.push_back(key.name);
    EXPECT_EQ(key.type == config_type::choice, !key.choices.empty())
      << key.name;
    if (key.type != config_type::choice)
      continue;
    // Every documented choice is accepted and read back unchanged.
    std::string_view rest = key.choices;
    while (!rest.empty()) {
      auto choice = rest.substr(0, rest.find('|'));
      rest.remove_prefix(std::min(rest.size(), choice.size() + 1));
      runtime_config cfg;
      auto err = set_config_value(cfg, key.name, choice);
      EXPECT_FALSE(err) << key.name << " = " << choice << ": " << render(err);
      EXPECT_EQ(value_of(cfg, key.name), choice);
    }
  }
}

TEST(config_keys, set_and_get_round_trip_and_reject_unknown_keys) {
  runtime_config cfg;
  EXPECT_FALSE(set_config_value(cfg, "retry.initial", "1m30s"));
  EXPECT_EQ(cfg.defaults.backoff.initial, 90s);
  EXPECT_FALSE(set_config_value(cfg, "tenants.known", "acme, globex"));
  EXPECT_EQ(cfg.tenants_known, (std::vector<std::string>{"acme", "globex"}));
  EXPECT_EQ(value_of(cfg, "tenants.known"), "acme,globex");
  EXPECT_FALSE(set_config_value(cfg, "tenants.enabled", "yes"));
  EXPECT_TRUE(cfg.tenants_enabled);
  EXPECT_FALSE(set_config_value(cfg, "retry.multiplier", "1.5"));
  EXPECT_EQ(value_of(cfg, "retry.multiplier"), "1.5");
  auto err = set_config_value(cfg, "retry.max_attemps", "3");
  EXPECT_EQ(code_of(err), errc::invalid_config);
  EXPECT_TRUE(contains(message_of(err), "did you mean 'retry.max_attempts'"));
  err = set_config_value(cfg, "consumer.concurrency", "0");
  EXPECT_EQ(code_of(err), errc::invalid_config);
  EXPECT_TRUE(contains(message_of(err), "consumer.concurrency = \"0\""))
    << message_of(err);
  EXPECT_FALSE(get_config_value(cfg, "nope.nope"));
}

// -- TOML -----------------------------------------------------------------------

TEST(config_toml, empty_text_yields_defaults_and_the_hostname) {
  auto cfg = parse_config("");
  ASSERT_TRUE(cfg) << render(cfg.error());
  runtime_config defaults;
  for (const auto& key : config_keys()) {
    if (key.name != "runtime.node_name") {
      EXPECT_EQ(value_of(*cfg, key.name), value_of(defaults, key.name));
    }
  }
  EXPECT_FALSE(cfg->node_name.empty());
  EXPECT_EQ(cfg->defaults.max_attempts, 5u);
  EXPECT_EQ(cfg->transport_url, "inproc://default");
  EXPECT_EQ(cfg->dedupe_policy, store_failure_policy::fail_open);
  EXPECT_FALSE(validate_config(*cfg));
}

TEST(config_toml, reads_every_key_of_a_full_file) {
  auto cfg = parse_config(R"(
[runtime]
node_name = "node-7"
stop_timeout = "20s"
log_level = "debug"
scheduler_threads = 3
idle_steal_interval = "200us"

[transport]
url = "nats://127.0.0.1:4222?stream=ORDERS&durable=orders-svc"
max_in_flight = 1000
poll_batch = 100
poll_idle = "10ms"
max_message_bytes = 65536

[dedupe]
url = "redis://127.0.0.1:6379/0"
lease = "2m"
keep = "48h"
on_unavailable = "fail_closed"

[dead_letter]
url = "sqlite:///var/lib/evmesh/dlq.db"
mask_fields = ["email", "card_number"]

[retry]
max_attempts = 3
initial = "250ms"
multiplier = 3
max = "1m"
jitter = "none"

[consumer]
ordering = "none"
concurrency = 16
timeout = "45s"
execution = "blocking"

[supervision]
restart_limit = 3
restart_window = "1m"
pause_for = "30s"

[tracing]
sink = "otlp-file://state/spans.jsonl"

[tenants]
enabled = true
known = ["acme", "globex", "initech"]
suspended = ["initech"]
fallback = "acme"

[cluster]
listen = "127.0.0.1:4500"
seeds = ["10.0.0.2:4500", "[::1]:4501"]
)",
                          "full.toml");
  ASSERT_TRUE(cfg) << render(cfg.error());
  EXPECT_EQ(cfg->node_name, "node-7");
  EXPECT_EQ(cfg->stop_timeout, 20s);
  EXPECT_EQ(cfg->log_level, "debug");
  EXPECT_EQ(cfg->scheduler_threads, 3u);
  EXPECT_EQ(cfg->idle_steal_interval, 200us);
  EXPECT_EQ(cfg->transport_url,
            "nats://127.0.0.1:4222?stream=ORDERS&durable=orders-svc");
  EXPECT_EQ(cfg->max_in_flight, 1000u);
  EXPECT_EQ(cfg->poll_batch, 100u);
  EXPECT_EQ(cfg->poll_idle, 10ms);
  EXPECT_EQ(cfg->max_message_bytes, 65536u);
  EXPECT_EQ(cfg->dedupe_url, "redis://127.0.0.1:6379/0");
  EXPECT_EQ(cfg->dedupe_lease, 2min);
  EXPECT_EQ(cfg->dedupe_keep, 48h);
  EXPECT_EQ(cfg->dedupe_policy, store_failure_policy::fail_closed);
  EXPECT_EQ(cfg->dead_letter_url, "sqlite:///var/lib/evmesh/dlq.db");
  EXPECT_EQ(cfg->mask_fields,
            (std::vector<std::string>{"email", "card_number"}));
  EXPECT_EQ(cfg->defaults.max_attempts, 3u);
  EXPECT_EQ(cfg->defaults.backoff.initial, 250ms);
  EXPECT_EQ(cfg->defaults.backoff.multiplier, 3.0);
  EXPECT_EQ(cfg->defaults.backoff.max, 1min);
  EXPECT_EQ(cfg->defaults.backoff.jitter, jitter::none);
  EXPECT_EQ(cfg->defaults.ordering, ordering::none);
  EXPECT_EQ(cfg->defaults.concurrency, 16u);
  EXPECT_EQ(cfg->defaults.timeout, 45s);
  EXPECT_EQ(cfg->defaults.execution, execution::blocking);
  EXPECT_EQ(cfg->restart_limit, 3u);
  EXPECT_EQ(cfg->restart_window, 1min);
  EXPECT_EQ(cfg->pause_for, 30s);
  EXPECT_EQ(cfg->trace_sink, "otlp-file://state/spans.jsonl");
  EXPECT_TRUE(cfg->tenants_enabled);
  EXPECT_EQ(cfg->tenants_known,
            (std::vector<std::string>{"acme", "globex", "initech"}));
  EXPECT_EQ(cfg->tenants_suspended, (std::vector<std::string>{"initech"}));
  EXPECT_EQ(cfg->tenant_fallback, "acme");
  EXPECT_EQ(cfg->cluster_listen, "127.0.0.1:4500");
  EXPECT_EQ(cfg->cluster_seeds,
            (std::vector<std::string>{"10.0.0.2:4500", "[::1]:4501"}));
  EXPECT_FALSE(validate_config(*cfg));
}

TEST(config_toml, accepts_dotted_keys_and_disabling_dedupe) {
  auto cfg = parse_config("retry.max_attempts = 2\ndedupe.url = \"none\"\n"
                          "consumer.timeout = \"5m\"\n");
  ASSERT_TRUE(cfg) << render(cfg.error());
  EXPECT_EQ(cfg->defaults.max_attempts, 2u);
  EXPECT_EQ(cfg->dedupe_url, "none");
}

TEST(config_toml, enforces_every_rule_naming_key_value_and_rule) {
  struct row {
    std::string toml;
    std::vector<std::string> expected; // substrings of the message
  };
  const std::vector<row> rows = {
    {"[retry]\nmax_attempts = 0",
     {"retry.max_attempts = 0", "test.toml:2:16", "must be >= 1"}},
    {"[retry]\nmax_attempts = -3", {"retry.max_attempts = -3", ">= 1"}},
    {"[retry]\nmax_attempts = 5000000000",
     {"retry.max_attempts", "must be <= 4294967295"}},
    {"[retry]\nmultiplier = 0.5",
     {"retry.multiplier = 0.5", "must be a number >= 1.0"}},
    {"[retry]\ninitial = \"1m\"\nmax = \"30s\"",
     {"retry.initial = 1m", "retry.max = 30s",
      "retry.initial must be <= "
      "retry.max",
      "test.toml"}},
    {"[retry]\njitter = \"half\"",
     {"retry.jitter = \"half\"", "must be one of \"none\" or \"full\""}},
    {"[consumer]\nconcurrency = 0",
     {"consumer.concurrency = 0", "must be between 1 and 100000"}},
    {"[consumer]\nordering = \"by_key\"",
     {"consumer.ordering", "\"per_key\" or \"none\""}},
    {"[consumer]\nexecution = \"threaded\"",
     {"consumer.execution", "\"cooperative\" or \"blocking\""}},
    {"[consumer]\ntimeout = \"0s\"", {"consumer.timeout = \"0s\"", "> 0"}},
    {"[transport]\npoll_batch = 0",
     {"transport.poll_batch = 0", "must be >= 1"}},
    {"[transport]\nmax_in_flight = 10\npoll_batch = 20",
     {"transport.max_in_flight = 10", "transport.poll_batch = 20",
      "one poll must fit"}},
    {"[transport]\nmax_in_flight = 0", {"transport.max_in_flight = 0"}},
    {"[transport]\nmax_message_bytes = 0", {"transport.max_message_bytes"}},
    {"[transport]\nmax_message_bytes = 4294967296",
     {"transport.max_message_bytes = 4294967296"}},
    {"[transport]\npoll_idle = \"0s\"", {"transport.poll_idle", "> 0"}},
    {"[transport]\nurl = \"localhost:4222\"",
     {"transport.url = \"localhost:4222\"", "scheme://"}},
    {"[dedupe]\nurl = \"\"", {"dedupe.url", "or \"none\""}},
    {"[dedupe]\nlease = \"10s\"",
     {"dedupe.lease = 10s", "consumer.timeout = 30s", "raise dedupe.lease"}},
    {"[dedupe]\nkeep = \"0s\"", {"dedupe.keep", "> 0"}},
    {"[dedupe]\non_unavailable = \"fail_safe\"",
     {"dedupe.on_unavailable", "\"fail_open\" or \"fail_closed\""}},
    {"[dead_letter]\nurl = \"dlq.db\"", {"dead_letter.url", "scheme://"}},
    {"[dead_letter]\nmask_fields = [\"email\", \"\"]",
     {"dead_letter.mask_fields", "empty names"}},
    {"[dead_letter]\nmask_fields = \"email\"",
     {"dead_letter.mask_fields", "array of strings"}},
    {"[runtime]\nlog_level = \"verbose\"",
     {"runtime.log_level = \"verbose\"", "\"trace\", \"debug\""}},
    {"[runtime]\nnode_name = \"my node\"", {"runtime.node_name", "whitespace"}},
    {"[transport]\nmax_in_flight = 16777217",
     {"transport.max_in_flight", "between 1 and 16777216"}},
    {"[runtime]\nidle_workers = \"spin\"",
     {"runtime.idle_workers = \"spin\"", "\"poll\" or \"sleep\""}},
    {"[runtime]\nidle_steal_interval = \"5us\"",
     {"runtime.idle_steal_interval = \"5us\"", "between 10us and 1s"}},
    {"[runtime]\nscheduler_threads = 257",
     {"runtime.scheduler_threads = 257", "between 0 and 256"}},
    {"[supervision]\nrestart_limit = 0", {"supervision.restart_limit = 0"}},
    {"[supervision]\nrestart_window = \"0s\"", {"supervision.restart_window"}},
    {"[supervision]\npause_for = \"0s\"", {"supervision.pause_for"}},
    {"[tracing]\nsink = \"otlp-file://\"",
     {"tracing.sink", "otlp-file://PATH"}},
    {"[tracing]\nsink = \"stdout\"", {"tracing.sink = \"stdout\""}},
    {"[tenants]\nknown = [\"acme\"]\nsuspended = [\"globex\"]",
     {"tenants.suspended lists 'globex'", "not in tenants.known"}},
    {"[tenants]\nknown = [\"acme\"]\nfallback = \"globex\"",
     {"tenants.fallback = 'globex'", "not in tenants.known"}},
    {"[tenants]\nsuspended = [\"acme\"]\nfallback = \"acme\"",
     {"tenants.fallback = 'acme'", "suspended"}},
    {"[tenants]\nenabled = \"yes\"",
     {"tenants.enabled = \"yes\"", "must be true or false"}},
    {"[cluster]\nlisten = \"localhost\"", {"cluster.listen", "host:port"}},
    {"[cluster]\nseeds = [\"10.0.0.1:0\"]",
     {"cluster.seeds", "\"10.0.0.1:0\""}},
    {"[cluster]\nsecret = \"short\"", {"cluster.secret", "16 characters"}},
    {"[cluster]\nrole = \"leader\"", {"cluster.role", "\"worker\""}},
    {"[cluster]\nrole = \"worker\"", {"cluster.role = worker", "seeds"}},
    {"[cluster]\nheartbeat_interval = \"2s\"\nheartbeat_timeout = \"1s\"",
     {"cluster.heartbeat_timeout = 1s", "heartbeat_interval = 2s"}},
    {"[cluster]\ntls_ca = \"ca.pem\"", {"cluster.tls_cert", "together"}},
    // Type errors.
    {"[retry]\nmax_attempts = \"5\"",
     {"retry.max_attempts = \"5\"", "must be an integer"}},
    {"[retry]\nmax_attempts = 2.5",
     {"retry.max_attempts = 2.5", "no decimal point"}},
    {"[retry]\ninitial = 100", {"retry.initial = 100", "with a unit"}},
    {"[retry]\ninitial = \"100\"",
     {"retry.initial = \"100\"", "must be a duration"}},
    {"retry = 5", {"'retry'", "must be a section", "[retry]"}},
  };
  for (const auto& r : rows) {
    auto msg = config_error(r.toml);
    ASSERT_FALSE(msg.empty()) << "accepted:\n" << r.toml;
    for (const auto& part : r.expected)
      EXPECT_TRUE(contains(msg, part))
        << "message lacks '" << part << "':\n  " << msg;
  }
}

TEST(config_toml, reports_all_problems_at_once) {
  auto msg = config_error("[retry]\nmax_attempts = 0\n[consumer]\n"
                          "concurrency = 0\n");
  EXPECT_TRUE(contains(msg, "retry.max_attempts")) << msg;
  EXPECT_TRUE(contains(msg, "consumer.concurrency")) << msg;
  EXPECT_TRUE(contains(msg, "\n")) << msg;
  // In the order of the file, not of the key names.
  msg = config_error("[transport]\npoll_batch = 0\n[consumer]\n"
                     "concurrency = 0\n");
  EXPECT_LT(msg.find("transport.poll_batch"), msg.find("consumer.concurrency"))
    << msg;
}

TEST(config_toml, suggests_the_closest_key_for_unknown_keys) {
  auto msg = config_error("[retry]\nmax_attemps = 3\n", "orders.toml");
  EXPECT_TRUE(contains(msg, "unknown key 'retry.max_attemps' in orders.toml"))
    << msg;
  EXPECT_TRUE(contains(msg, "did you mean 'retry.max_attempts'?")) << msg;
  // A key in the wrong section points to the right one.
  msg = config_error("[retry]\nconcurrency = 3\n");
  EXPECT_TRUE(contains(msg, "did you mean 'consumer.concurrency'?")) << msg;
  // Nothing close: list the section's keys instead.
  msg = config_error("[retry]\nfrobnicate = 3\n");
  EXPECT_TRUE(contains(msg, "unknown key 'retry.frobnicate'")) << msg;
  EXPECT_TRUE(contains(msg, "max_attempts")) << msg;
  // Unknown sections.
  msg = config_error("[retyr]\nmax_attempts = 3\n");
  EXPECT_TRUE(contains(msg, "unknown section [retyr]")) << msg;
  EXPECT_TRUE(contains(msg, "did you mean [retry]?")) << msg;
  msg = config_error("[kafka]\nbrokers = \"x\"\n");
  EXPECT_TRUE(contains(msg, "known sections: runtime, transport")) << msg;
}

TEST(config_toml, syntax_errors_carry_file_line_and_column) {
  auto msg = config_error("[retry]\nmax_attempts = = 3\n", "orders.toml");
  EXPECT_TRUE(contains(msg, "orders.toml:2:")) << msg;
  EXPECT_TRUE(contains(msg, "invalid TOML")) << msg;
}

TEST(config_toml, load_config_reads_files_and_explains_missing_ones) {
  temp_dir dir;
  auto path = dir.write("orders.toml", "[retry]\nmax_attempts = 9\n");
  auto cfg = load_config(path);
  ASSERT_TRUE(cfg) << render(cfg.error());
  EXPECT_EQ(cfg->defaults.max_attempts, 9u);
  auto missing = load_config((dir.path / "nope.toml").string());
  ASSERT_FALSE(missing);
  EXPECT_EQ(code_of(missing.error()), errc::invalid_config);
  EXPECT_TRUE(contains(message_of(missing.error()), "does not exist"));
  auto bad = dir.write("bad.toml", "[retry]\nmax_attemps = 9\n");
  auto err = load_config(bad);
  ASSERT_FALSE(err);
  EXPECT_TRUE(contains(message_of(err.error()), bad + ":2:1"))
    << message_of(err.error());
}

TEST(config_validate, accepts_what_evmesh_testing_builds) {
  runtime_config cfg;
  cfg.node_name = "test-node";
  cfg.transport_url = "inproc://orders";
  cfg.dedupe_url = "memory://";
  cfg.dead_letter_url = "none";
  cfg.trace_sink = "none";
  cfg.defaults.max_attempts = 3;
  cfg.defaults.backoff.initial = 10ms;
  cfg.defaults.backoff.max = 200ms;
  cfg.defaults.concurrency = 4;
  cfg.defaults.timeout = 5s;
  cfg.max_in_flight = 1024;
  cfg.poll_batch = 64;
  auto err = validate_config(cfg);
  EXPECT_FALSE(err) << render(err);
}

TEST(config_validate, checks_configs_built_in_code) {
  runtime_config cfg;
  EXPECT_FALSE(validate_config(cfg));
  cfg.defaults.max_attempts = 0;
  cfg.poll_batch = 8192;
  auto err = validate_config(cfg);
  EXPECT_EQ(code_of(err), errc::invalid_config);
  auto msg = message_of(err);
  EXPECT_TRUE(contains(msg, "retry.max_attempts = 0")) << msg;
  EXPECT_TRUE(contains(msg, "transport.max_in_flight")) << msg;
}

// -- command line ---------------------------------------------------------------

TEST(config_cli, no_arguments_yield_defaults) {
  auto run = run_cli({});
  EXPECT_FALSE(run.result.exit_now) << run.err;
  EXPECT_EQ(run.result.config.defaults.max_attempts, 5u);
  EXPECT_FALSE(run.result.config.node_name.empty());
}

TEST(config_cli, flags_override_the_file) {
  temp_dir dir;
  auto path = dir.write("svc.toml", "[retry]\nmax_attempts = 3\n"
                                    "initial = \"1s\"\n"
                                    "[consumer]\nconcurrency = 4\n");
  auto run = run_cli({"--config", path, "--retry.max_attempts", "7",
                      "--tenants.known=acme,globex"});
  ASSERT_FALSE(run.result.exit_now) << run.err;
  EXPECT_EQ(run.result.config_file, path);
  EXPECT_EQ(run.result.config.defaults.max_attempts, 7u);
  EXPECT_EQ(run.result.config.defaults.backoff.initial, 1s);
  EXPECT_EQ(run.result.config.defaults.concurrency, 4u);
  EXPECT_EQ(run.result.config.tenants_known,
            (std::vector<std::string>{"acme", "globex"}));
}

TEST(config_cli, flags_can_repair_a_cross_key_rule_of_the_file) {
  temp_dir dir;
  auto path = dir.write("svc.toml", "[retry]\ninitial = \"1m\"\n");
  auto run = run_cli({"--config", path, "--retry.max", "5m"});
  ASSERT_FALSE(run.result.exit_now) << run.err;
  EXPECT_EQ(run.result.config.defaults.backoff.max, 5min);
}

TEST(config_cli, reads_evmesh_toml_from_the_working_directory) {
  temp_dir dir;
  dir.write("evmesh.toml", "[consumer]\nconcurrency = 3\n");
  auto old = std::filesystem::current_path();
  std::filesystem::current_path(dir.path);
  auto run = run_cli({});
  std::filesystem::current_path(old);
  ASSERT_FALSE(run.result.exit_now) << run.err;
  EXPECT_EQ(run.result.config_file, "evmesh.toml");
  EXPECT_EQ(run.result.config.defaults.concurrency, 3u);
}

TEST(config_cli, help_lists_every_key_with_type_default_and_doc) {
  auto run = run_cli({"--help"}, {{"demo", "Publish demo events.", false}});
  EXPECT_TRUE(run.result.exit_now);
  EXPECT_EQ(run.result.exit_code, 0);
  EXPECT_TRUE(contains(run.out, "Test service.")) << run.out;
  EXPECT_TRUE(contains(run.out, "--config FILE")) << run.out;
  EXPECT_TRUE(contains(run.out, "--demo")) << run.out;
  EXPECT_TRUE(contains(run.out, "Publish demo events.")) << run.out;
  for (const auto& key : config_keys()) {
    auto flag = "--" + std::string{key.name} + " ";
    auto pos = run.out.find(flag);
    ASSERT_NE(pos, std::string::npos) << key.name << " missing in:\n"
                                      << run.out;
    auto entry = run.out.substr(pos, 600);
    std::string shown{key.default_text};
    if (shown.empty())
      shown = "empty";
    else if (shown.front() == '(')
      shown = shown.substr(1, shown.size() - 2);
    EXPECT_TRUE(contains(entry, "(default: " + shown + ")")) << entry;
    if (key.type == config_type::choice) {
      EXPECT_TRUE(contains(entry, key.choices)) << entry;
    }
    // The first words of the doc follow the flag.
    auto first_words = key.doc.substr(0, 20);
    EXPECT_TRUE(contains(entry, first_words)) << entry;
  }
}

TEST(config_cli, unknown_flags_exit_2_with_a_suggestion) {
  auto run = run_cli({"--retry.max_attemps", "3"});
  EXPECT_TRUE(run.result.exit_now);
  EXPECT_EQ(run.result.exit_code, 2);
  EXPECT_TRUE(contains(run.err, "unknown option '--retry.max_attemps'"))
    << run.err;
  EXPECT_TRUE(contains(run.err, "did you mean '--retry.max_attempts'?"))
    << run.err;
  run = run_cli({"--dmeo"}, {{"demo", "Demo mode.", false}});
  EXPECT_EQ(run.result.exit_code, 2);
  EXPECT_TRUE(contains(run.err, "did you mean '--demo'?")) << run.err;
  run = run_cli({"stray"});
  EXPECT_EQ(run.result.exit_code, 2);
  EXPECT_TRUE(contains(run.err, "unexpected argument 'stray'")) << run.err;
}

TEST(config_cli, bad_values_and_missing_files_exit_2) {
  auto run = run_cli({"--retry.initial", "fast"});
  EXPECT_TRUE(run.result.exit_now);
  EXPECT_EQ(run.result.exit_code, 2);
  EXPECT_TRUE(contains(run.err, "retry.initial = \"fast\" on the command line"))
    << run.err;
  run = run_cli({"--consumer.concurrency", "0"});
  EXPECT_EQ(run.result.exit_code, 2);
  run = run_cli({"--retry.max_attempts"});
  EXPECT_EQ(run.result.exit_code, 2);
  EXPECT_TRUE(contains(run.err, "option '--retry.max_attempts' needs a value"))
    << run.err;
  run = run_cli({"--config", "/nonexistent/evmesh-test.toml"});
  EXPECT_EQ(run.result.exit_code, 2);
  EXPECT_TRUE(contains(run.err, "does not exist")) << run.err;
  temp_dir dir;
  auto path = dir.write("bad.toml", "[retry]\nmax_attempts = 0\n");
  run = run_cli({"--config", path});
  EXPECT_EQ(run.result.exit_code, 2);
  EXPECT_TRUE(contains(run.err, "retry.max_attempts = 0")) << run.err;
}

TEST(config_cli, extra_flags_are_set_when_given) {
  auto run = run_cli({"--demo"}, {{"demo", "Demo mode.", false},
                                  {"dry-run", "Change nothing.", false}});
  ASSERT_FALSE(run.result.exit_now) << run.err;
  ASSERT_EQ(run.result.flags.size(), 2u);
  EXPECT_TRUE(has_flag(run.result, "demo"));
  EXPECT_FALSE(has_flag(run.result, "dry-run"));
  EXPECT_FALSE(has_flag(run.result, "unknown"));
}

// -- reference --------------------------------------------------------------------

TEST(config_reference, markdown_table_lists_every_key) {
  auto md = config_reference_markdown();
  EXPECT_TRUE(contains(md, "| key | type | default | meaning |")) << md;
  for (const auto& key : config_keys()) {
    auto row = "| `" + std::string{key.name} + "` | ";
    EXPECT_TRUE(contains(md, row)) << key.name;
  }
  EXPECT_TRUE(contains(md, "| `retry.max_attempts` | integer | `5` |")) << md;
  EXPECT_TRUE(contains(md, "`per_key` \\| `none`")) << md;
}

TEST(config_toml, reads_the_cluster_section) {
  auto cfg = parse_config(R"([cluster]
listen = "127.0.0.1:0"
seeds = ["127.0.0.1:4500"]
role = "worker"
secret = "0123456789abcdef-cluster"
heartbeat_interval = "100ms"
heartbeat_timeout = "1s"
connect_timeout = "2s"
tls_ca = "ca.pem"
tls_cert = "node.pem"
tls_key = "node.key"
)");
  ASSERT_TRUE(cfg) << render(cfg.error());
  EXPECT_TRUE(cfg->cluster_enabled());
  EXPECT_EQ(cfg->cluster_role, "worker");
  EXPECT_EQ(cfg->cluster_secret, "0123456789abcdef-cluster");
  EXPECT_EQ(cfg->cluster_heartbeat_interval, 100ms);
  EXPECT_EQ(cfg->cluster_heartbeat_timeout, 1s);
  EXPECT_EQ(cfg->cluster_connect_timeout, 2s);
  EXPECT_EQ(cfg->cluster_tls_ca, "ca.pem");
  EXPECT_EQ(cfg->cluster_tls_cert, "node.pem");
  EXPECT_EQ(cfg->cluster_tls_key, "node.key");
  EXPECT_FALSE(runtime_config{}.cluster_enabled());
}
