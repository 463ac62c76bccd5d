// order_service: an evmesh consumer of order events (handlers.cpp). Without
// flags it consumes until Ctrl-C; with --demo it publishes a scripted burst
// into its in-process broker and reports what the runtime did with each
// message.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <boost/json.hpp>
#include <evmesh/consumer.hpp>

#include "audit_log.hpp"
#include "inventory.hpp"

using namespace std::chrono_literals;
using order_service::audit_log;
using order_service::inventory_service;

namespace {

// -- the demo script ----------------------------------------------------------

/// The producer's span for the traced event (the W3C specification's example).
constexpr const char* producer_traceparent
  = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
constexpr const char* producer_trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";

/// The order whose reservation fails twice before it succeeds.
constexpr const char* flaky_order = "o-1005";

/// The order whose event carries `producer_traceparent`.
constexpr const char* traced_order = "o-1008";

/// What the runtime must report once the script settled. Four subscriptions
/// see the script: order_events/order.confirmed, order_events/order.cancelled,
/// order_events/order.fraud_check and order_audit/order.* (fan-out: every
/// order.* message runs in two subscriptions).
struct expectations {
  /// 26 messages published, each delivered once (retries run in-process).
  uint64_t received = 26;
  /// order_events: 12 confirmed + 6 cancelled; order_audit: 15 confirmed +
  /// 6 cancelled + 1 fraud check.
  uint64_t handled = 40;
  /// 2 re-sent messages, skipped in both of their subscriptions.
  uint64_t duplicates = 4;
  /// o-1005 fails twice; the fraud check fails 3 times, the last one
  /// dead-letters instead of retrying.
  uint64_t retried = 4;
  /// One record per category below.
  uint64_t dead_lettered = 5;
  /// o-1013 has no items.
  uint64_t discarded = 1;
  std::map<std::string, int> dead_letters{
    {"decode_error", 1}, {"malformed_payload", 1}, {"no_handler", 1},
    {"permanent", 1},    {"retries_exhausted", 1},
  };
  std::map<std::string, int> audit{
    {"order.cancelled", 6},
    {"order.confirmed", 15},
    {"order.fraud_check", 1},
  };
};

/// State the hooks share: set in `configure`, read in `run`.
struct demo_state {
  std::shared_ptr<inventory_service> inventory;
  std::shared_ptr<audit_log> audit;
  /// Where spans go, for people.
  std::string spans;
};

/// Builds and publishes the script's envelopes. Ids and idempotency keys
/// carry the run id, so a second run in the same directory is not mistaken for
/// a replay of the first (the dedupe store under ./state/ remembers keys).
class script_publisher {
public:
  script_publisher(evmesh::inproc_broker& broker, std::string run_id)
    : broker_(broker), run_id_(std::move(run_id)) {
  }

  evmesh::envelope make(std::string topic, const std::string& key,
                        const std::string& order_id,
                        boost::json::value payload) {
    evmesh::envelope env;
    env.id = run_id_ + "-" + std::to_string(++seq_);
    env.topic = std::move(topic);
    env.key = key;
    env.idempotency_key = "demo:" + run_id_ + ":" + env.topic + ":" + order_id;
    env.payload = std::move(payload);
    return env;
  }

  evmesh::envelope confirmed(const std::string& customer,
                             const std::string& order_id,
                             const std::string& sku, boost::json::value qty) {
    return make("order.confirmed", customer, order_id,
                boost::json::object{{"order_id", order_id},
                                    {"sku", sku},
                                    {"quantity", std::move(qty)}});
  }

  evmesh::envelope cancelled(const std::string& customer,
                             const std::string& order_id) {
    return make("order.cancelled", customer, order_id,
                boost::json::object{{"order_id", order_id},
                                    {"reason", "customer request"}});
  }

  void send(const evmesh::envelope& env) {
    broker_.publish(env);
    ++published_;
  }

  void send_raw(std::string subject, std::string bytes) {
    broker_.publish_raw(std::move(subject), std::move(bytes));
    ++published_;
  }

  size_t published() const noexcept {
    return published_;
  }

private:
  evmesh::inproc_broker& broker_;
  std::string run_id_;
  int seq_ = 0;
  size_t published_ = 0;
};

/// Publishes the script; returns the id of the traced event.
std::string publish_script(script_publisher& out) {
  const char* customers[] = {"c-ada", "c-bob", "c-cyd", "c-dan"};
  const char* skus[] = {"SKU-MUG", "SKU-CAP", "SKU-TEE"};
  std::string traced_id;
  std::vector<evmesh::envelope> confirmed;
  // 12 good orders; the key is the customer, so each customer's events run in
  // order while the others keep flowing.
  for (int i = 1; i <= 12; ++i) {
    auto order_id = "o-" + std::to_string(1000 + i);
    auto env = out.confirmed(customers[i % 4], order_id, skus[i % 3],
                             i % 4 + 1);
    if (order_id == traced_order) {
      env.traceparent = producer_traceparent;
      traced_id = env.id;
    }
    out.send(env);
    confirmed.push_back(std::move(env));
  }
  // Three orders that cannot be reserved.
  out.send(out.confirmed("c-ada", "o-1013", "SKU-MUG", 0));       // discard
  out.send(out.confirmed("c-bob", "o-1014", "SKU-UNICORN", 1));   // permanent
  out.send(out.confirmed("c-cyd", "o-1015", "SKU-TEE", "three")); // malformed
  // Six cancellations.
  std::vector<evmesh::envelope> cancelled;
  for (int i : {2, 4, 6, 9, 11, 12}) {
    auto order_id = "o-" + std::to_string(1000 + i);
    cancelled.push_back(out.cancelled(customers[i % 4], order_id));
    out.send(cancelled.back());
  }
  // At-least-once delivery in action: the same events arrive twice.
  out.send(confirmed[2]); // o-1003
  out.send(cancelled[3]); // o-1009
  // A fraud check whose downstream service is down for good.
  out.send(out.make("order.fraud_check", "c-bob", "o-1010",
                    boost::json::object{{"order_id", "o-1010"}}));
  // Bytes that are not an envelope, and a topic nobody subscribes to.
  out.send_raw("order.confirmed", "order o-1016 confirmed, 2 mugs (not JSON)");
  out.send(out.make("invoice.paid", "c-ada", "inv-77",
                    boost::json::object{{"invoice_id", "inv-77"},
                                        {"amount_cents", 4200}}));
  return traced_id;
}

void print_script_overview(size_t published) {
  std::cout << "Publishing " << published << " events:\n"
            << "  15 order.confirmed   o-1001..o-1015 over 4 customers "
               "(key = customer id)\n"
            << "                       " << flaky_order
            << ": inventory times out twice, succeeds on the 3rd attempt\n"
            << "                       " << traced_order
            << ": carries traceparent " << producer_traceparent << '\n'
            << "                       o-1013: no items (discarded), o-1014: "
               "unknown SKU (permanent),\n"
            << "                       o-1015: quantity \"three\" (malformed "
               "payload)\n"
            << "   6 order.cancelled   releases the reserved stock\n"
            << "   2 duplicates        o-1003 confirmed and o-1009 cancelled "
               "sent again, same idempotency key\n"
            << "   1 order.fraud_check the fraud service is down: 3 attempts, "
               "then dead-lettered\n"
            << "   1 raw bytes         not JSON at all\n"
            << "   1 invoice.paid      no handler subscribes to it\n\n";
}

// -- reporting ------------------------------------------------------------------

std::string pad(std::string s, size_t width) {
  if (s.size() < width)
    s.append(width - s.size(), ' ');
  return s;
}

std::string lpad(const std::string& s, size_t width) {
  return s.size() < width ? std::string(width - s.size(), ' ') + s : s;
}

/// Name and group of an `inproc://NAME[?group=G]` URL.
std::optional<std::pair<std::string, std::string>>
inproc_address(const std::string& url) {
  constexpr std::string_view prefix = "inproc://";
  if (!url.starts_with(prefix))
    return std::nullopt;
  auto rest = url.substr(prefix.size());
  auto q = rest.find('?');
  auto name = rest.substr(0, q);
  std::string group = "default";
  if (q != std::string::npos) {
    auto query = rest.substr(q + 1);
    if (auto pos = query.find("group="); pos != std::string::npos)
      group = query.substr(pos + 6, query.find('&', pos) - pos - 6);
  }
  return std::make_pair(name.empty() ? std::string{"default"} : name, group);
}

/// "sqlite://state/dlq.db" -> "/abs/state/dlq.db", or "" for other URLs.
std::string sqlite_file(const std::string& url) {
  constexpr std::string_view prefix = "sqlite://";
  if (!url.starts_with(prefix))
    return {};
  std::error_code ec;
  auto path = std::filesystem::absolute(url.substr(prefix.size()), ec);
  return ec ? url.substr(prefix.size()) : path.string();
}

/// The dead letters written since `since_ms`, by category: from the store at
/// `dead_letter.url`, or from the broker's DLQ when that is `none`.
caf::expected<std::map<std::string, int>>
dead_letters_by_category(const evmesh::runtime_config& cfg,
                         evmesh::inproc_broker& broker,
                         const std::string& group, int64_t since_ms) {
  std::map<std::string, int> result;
  if (cfg.dead_letter_url == "none") {
    for (auto& json : broker.dead_letters(group))
      if (auto rec = evmesh::dead_letter_from_json(json);
          rec && rec->last_failure_ms >= since_ms)
        ++result[rec->category];
    return result;
  }
  auto store = evmesh::make_dead_letter_store(cfg.dead_letter_url);
  if (!store)
    return store.error();
  evmesh::dead_letter_query query;
  query.since_ms = since_ms;
  query.limit = 10000;
  auto records = (*store)->list(query);
  if (!records)
    return records.error();
  for (auto& rec : *records)
    ++result[rec.category];
  return result;
}

int64_t now_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch())
    .count();
}

/// Compares one counter, prints a table row, and clears `ok` on a mismatch.
void row(const std::string& name, const std::string& meaning, uint64_t actual,
         uint64_t expected, bool& ok) {
  bool match = actual == expected;
  ok = ok && match;
  std::cout << "  " << pad(name, 15) << lpad(std::to_string(actual), 4) << "   "
            << meaning
            << (match ? "" : "  <- expected " + std::to_string(expected))
            << '\n';
}

// -- the hooks ------------------------------------------------------------------

caf::error configure(demo_state& st, evmesh::container_builder& services,
                     const evmesh::command_line& cl) {
  st.inventory = std::make_shared<inventory_service>(std::map<std::string, int>{
    {"SKU-MUG", 100}, {"SKU-CAP", 100}, {"SKU-TEE", 100}});
  st.audit = std::make_shared<audit_log>();
  services.add(st.inventory).add(st.audit);
  st.spans = cl.config.trace_sink;
  if (!evmesh::has_flag(cl, "demo"))
    return {};
  st.inventory->fail_next(flaky_order, 2);
  // The default sink logs every span; a demo is easier to read with the
  // spans in a file. An explicit --tracing.sink other than `log` wins.
  if (cl.config.trace_sink == "log") {
    const std::string path = "state/spans.jsonl";
    auto sink = evmesh::make_otlp_file_span_sink(path);
    if (!sink)
      return sink.error();
    services.add<evmesh::span_sink>(*sink);
    st.spans = "otlp-file://" + path;
  }
  return {};
}

int run_demo(demo_state& st, evmesh::consumer_runtime& rt) {
  const auto& cfg = rt.config();
  auto address = inproc_address(cfg.transport_url);
  if (!address) {
    std::cerr << "order_service: --demo publishes into the in-process broker, "
                 "but transport.url is '"
              << cfg.transport_url
              << "' — run the demo with the default (inproc://default)\n";
    return 2;
  }
  auto& [broker_name, group] = *address;
  auto broker = evmesh::inproc_broker::get(broker_name);
  auto run_id = [] {
    std::ostringstream os;
    os << std::hex << now_ms();
    return os.str();
  }();
  std::cout << "\n== evmesh order_service demo (run " << run_id << ") ==\n"
            << "  transport     " << cfg.transport_url << '\n'
            << "  dedupe        " << cfg.dedupe_url << '\n'
            << "  dead letters  " << cfg.dead_letter_url << '\n'
            << "  spans         " << st.spans << "\n\n"
            << "Subscriptions:\n";
  for (auto& sub : rt.table().subscriptions)
    std::cout << "  " << pad(sub.name, 32) << " max_attempts "
              << sub.options.max_attempts << ", ordering "
              << (sub.options.ordering == evmesh::ordering::none ? "none"
                                                                 : "per_key")
              << '\n';
  std::cout << '\n';
  auto before = broker->stats(group);
  auto since = now_ms();
  auto started = std::chrono::steady_clock::now();
  script_publisher out{*broker, run_id};
  auto traced_id = publish_script(out);
  print_script_overview(out.published());
  std::cout << "Waiting until every message reached its terminal action..."
            << std::endl;
  // Real time: retries back off for a few hundred milliseconds at most.
  auto deadline = started + 20s;
  auto settled = [&] {
    auto s = broker->stats(group);
    return s.pending == 0 && s.unacked == 0
           && s.acked - before.acked >= out.published()
           && rt.stats().in_flight == 0;
  };
  while (!settled() && std::chrono::steady_clock::now() < deadline
         && !evmesh::stop_requested() && !rt.stopped())
    std::this_thread::sleep_for(20ms);
  auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(
    std::chrono::steady_clock::now() - started);
  bool ok = settled();
  auto b = broker->stats(group);
  if (ok) {
    std::cout << "  settled in " << elapsed.count()
              << " ms: " << b.acked - before.acked << " of " << out.published()
              << " messages acked, none pending\n\n";
  } else {
    std::cout << "  NOT settled after " << elapsed.count()
              << " ms: " << b.acked - before.acked << " of " << out.published()
              << " acked, " << b.pending << " pending, " << b.unacked
              << " unacked, " << rt.stats().in_flight
              << " in flight in the runtime\n\n";
  }
  expectations want;
  auto s = rt.stats();
  std::cout << "Runtime counters (" << want.received << " messages, "
            << "4 subscriptions):\n";
  row("received", "deliveries taken from the broker", s.received, want.received,
      ok);
  row("handled", "handler attempts that returned ok", s.handled, want.handled,
      ok);
  row("duplicates", "skipped: idempotency key already handled", s.duplicates,
      want.duplicates, ok);
  row("retried", "failed attempts scheduled again (backoff)", s.retried,
      want.retried, ok);
  row("dead-lettered", "records written to the dead-letter queue",
      s.dead_lettered, want.dead_lettered, ok);
  row("discarded", "deliberately ignored by a handler", s.discarded,
      want.discarded, ok);
  if (b.protocol_violations != before.protocol_violations) {
    ok = false;
    std::cout << "  broker protocol violations: "
              << b.protocol_violations - before.protocol_violations
              << " (a delivery got two terminal actions)\n";
  }
  std::cout << '\n';
  // Dead letters of this run, read back from where the runtime wrote them.
  auto where = cfg.dead_letter_url == "none"
                 ? std::string{"the broker's DLQ (dead_letter.url = none)"}
                 : cfg.dead_letter_url;
  std::cout << "Dead letters of this run, read back from " << where << ":\n";
  auto by_category = dead_letters_by_category(cfg, *broker, group, since);
  if (!by_category) {
    ok = false;
    std::cout << "  cannot read them: " << evmesh::render(by_category.error())
              << '\n';
  } else {
    const std::map<std::string, std::string> explain{
      {"decode_error", "the raw bytes: not an envelope, kept verbatim"},
      {"malformed_payload", "o-1015: quantity \"three\" is not an int"},
      {"no_handler", "invoice.paid: nobody subscribes"},
      {"permanent", "o-1014: unknown SKU, no point retrying"},
      {"retries_exhausted", "order.fraud_check: 3 attempts failed"},
    };
    auto categories = want.dead_letters;
    for (auto& [category, n] : *by_category)
      categories.try_emplace(category, 0);
    for (auto& [category, expected] : categories) {
      auto i = by_category->find(category);
      int actual = i == by_category->end() ? 0 : i->second;
      auto e = explain.find(category);
      std::cout << "  " << pad(category, 18) << lpad(std::to_string(actual), 2)
                << "   " << (e == explain.end() ? "" : e->second)
                << (actual == expected
                      ? ""
                      : "  <- expected " + std::to_string(expected))
                << '\n';
      ok = ok && actual == expected;
    }
    if (auto file = sqlite_file(cfg.dead_letter_url); !file.empty())
      std::cout << "  (SQLite file: " << file << ")\n";
  }
  std::cout << '\n';
  // Trace continuity: the handler ran as a child of the producer's span.
  auto seen = st.audit->trace_of(traced_id);
  bool same_trace = seen == producer_trace_id;
  ok = ok && same_trace;
  std::cout << "Tracing:\n"
            << "  " << traced_order << " was published with trace "
            << producer_trace_id << '\n'
            << "  its handler ran in trace          "
            << (seen.empty() ? std::string{"(never ran)"} : seen)
            << (same_trace ? "  -> same trace, continued" : "  <- DIFFERENT")
            << '\n'
            << "  spans: " << st.spans;
  if (st.spans.starts_with("otlp-file://"))
    std::cout << "  (grep " << producer_trace_id << ')';
  std::cout << "\n\n";
  // The second consumer saw every order event once.
  std::cout << "Audit consumer (order_audit on order.*, a second subscription "
               "to the same events):\n  ";
  auto counts = st.audit->counts();
  const char* sep = "";
  for (auto& [topic, n] : counts) {
    std::cout << sep << topic << ' ' << n;
    sep = ", ";
  }
  std::cout << '\n';
  if (counts != want.audit) {
    ok = false;
    std::cout << "  <- expected order.cancelled 6, order.confirmed 15, "
                 "order.fraud_check 1\n";
  }
  std::cout << "\nInspect the dead letters:\n"
            << "  evmesh dlq list --db " << cfg.dead_letter_url << '\n'
            << "  evmesh dlq show ID --db " << cfg.dead_letter_url << "\n\n";
  if (evmesh::stop_requested())
    std::cout << "demo interrupted\n";
  else
    std::cout << (ok ? "demo OK" : "demo FAILED: see the marked lines above")
              << '\n';
  std::cout << std::flush;
  return ok ? 0 : 1;
}

evmesh::app_hooks make_hooks() {
  auto st = std::make_shared<demo_state>();
  evmesh::app_hooks hooks;
  hooks.description
    = "order_service: reserves stock for confirmed orders and releases it for "
      "cancelled ones (an evmesh example).\nRun with --demo to publish a "
      "scripted burst of events and see retries, duplicates and dead letters.";
  hooks.flags.push_back(
    {"demo", "publish a scripted burst of order events, report, and exit",
     false});
  hooks.configure = [st](evmesh::container_builder& services,
                         const evmesh::command_line& cl) {
    return configure(*st, services, cl);
  };
  hooks.run = [st](evmesh::consumer_runtime& rt,
                   const evmesh::command_line& cl) -> int {
    if (evmesh::has_flag(cl, "demo"))
      return run_demo(*st, rt);
    // Not a demo: consume until Ctrl-C, like EVMESH_MAIN() without hooks.
    const auto& url = rt.config().transport_url;
    std::cout << "order_service consuming from " << url
              << "; press Ctrl-C to stop\n";
    if (url.starts_with("inproc://"))
      std::cout << "(an in-process broker: only this process can publish to "
                   "it. Try --demo, or point --transport.url at a broker.)\n";
    std::cout << std::flush;
    return evmesh::wait_for_stop(rt);
  };
  return hooks;
}

} // namespace

EVMESH_MAIN(make_hooks())
