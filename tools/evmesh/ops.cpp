#include "ops.hpp"

#include <chrono>
#include <cstdio>
#include <istream>
#include <ostream>
#include <vector>

#include <boost/json/serialize.hpp>
#include <boost/json/stream_parser.hpp>
#include <unistd.h>

#include "evmesh/error.hpp"
#include "evmesh/inproc.hpp"
#include "evmesh/outbox.hpp"
#include "evmesh/trace.hpp"
#include "evmesh/transport.hpp"
#ifdef EVMESH_CLI_HAS_NATS
#  include "evmesh/nats.hpp"
#endif
#ifdef EVMESH_CLI_HAS_KAFKA
#  include "evmesh/kafka.hpp"
#endif
#ifdef EVMESH_CLI_HAS_AMQP
#  include "evmesh/amqp.hpp"
#endif

#include "text.hpp"

namespace evmesh::cli {

void register_broker_schemes() {
#ifdef EVMESH_CLI_HAS_NATS
  register_nats_transport();
#endif
#ifdef EVMESH_CLI_HAS_KAFKA
  register_kafka_transport();
#endif
#ifdef EVMESH_CLI_HAS_AMQP
  register_amqp_transport();
#endif
}

terminal terminal::detect() {
  return {isatty(STDIN_FILENO) == 1, isatty(STDOUT_FILENO) == 1};
}

sink::~sink() = default;

namespace {

constexpr std::string_view outbox_prefix = "outbox:";

class outbox_sink : public sink {
public:
  explicit outbox_sink(outbox::store_ptr st) : st_(std::move(st)) {
  }
  caf::expected<std::string> send(envelope env) override {
    auto seq = st_->enqueue(std::move(env));
    if (!seq)
      return seq.error();
    return "outbox seq " + std::to_string(*seq);
  }

private:
  outbox::store_ptr st_;
};

class transport_sink : public sink {
public:
  explicit transport_sink(transport_ptr t) : t_(std::move(t)) {
  }
  ~transport_sink() override {
    t_->close();
  }
  caf::expected<std::string> send(envelope env) override {
    outbox::stamp(env);
    if (auto err = t_->publish(env))
      return err;
    return "published " + env.id;
  }

private:
  transport_ptr t_;
};

/// Asks `question` unless `yes`; an exit code when the answer is not yes.
std::optional<int> confirm(bool yes, const terminal& term,
                           const std::string& question, std::istream& in,
                           std::ostream& out, std::ostream& err) {
  if (yes)
    return std::nullopt;
  if (!term.stdin_tty) {
    err << "evmesh: refusing to " << question
        << " without confirmation: stdin is not a terminal — pass --yes\n";
    return exit_usage;
  }
  out << question << "? [y/N] " << std::flush;
  std::string line;
  std::getline(in, line);
  auto answer = one_line(line);
  for (auto& c : answer)
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  while (!answer.empty() && answer.back() == ' ')
    answer.pop_back();
  while (!answer.empty() && answer.front() == ' ')
    answer.erase(0, 1);
  if (answer == "y" || answer == "yes")
    return std::nullopt;
  err << "aborted: nothing changed\n";
  return exit_failure;
}

/// A progress line ("replay [#####     ] 500/1000  812.3/s  ETA 1s") on a
/// terminal; nothing otherwise (the commands print one line per record).
class progress {
public:
  progress(std::ostream& out, bool tty, std::string what, size_t total)
    : out_(out),
      tty_(tty),
      what_(std::move(what)),
      total_(total),
      start_(std::chrono::steady_clock::now()) {
  }

  void update(size_t done) {
    if (!tty_)
      return;
    auto now = std::chrono::steady_clock::now();
    if (done != total_ && now - last_ < std::chrono::milliseconds{100})
      return;
    last_ = now;
    auto secs = std::chrono::duration<double>(now - start_).count();
    auto rate = secs > 0 ? static_cast<double>(done) / secs : 0.0;
    constexpr size_t width = 30;
    auto filled = total_ == 0 ? width : done * width / total_;
    std::string bar(filled, '#');
    bar.append(width - filled, ' ');
    char buf[160];
    auto left = static_cast<double>(total_ - done);
    std::snprintf(buf, sizeof(buf), "\r%s [%s] %zu/%zu  %.1f/s  ETA %.0fs ",
                  what_.c_str(), bar.c_str(), done, total_, rate,
                  rate > 0 ? left / rate : 0.0);
    out_ << buf << std::flush;
    if (done == total_)
      out_ << '\n';
  }

private:
  std::ostream& out_;
  bool tty_;
  std::string what_;
  size_t total_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_{};
};

caf::expected<std::vector<dead_letter_record>>
select_records(const std::string& db, const dead_letter_query& q,
               std::ostream& err, dead_letter_store_ptr& store) {
  auto st = open_existing_store(db);
  if (!st) {
    err << "evmesh: " << message_of(st.error()) << '\n';
    return st.error();
  }
  store = *st;
  auto records = store->list(q);
  if (!records)
    err << "evmesh: cannot list dead letters in " << db << ": "
        << message_of(records.error()) << '\n';
  return records;
}

} // namespace

caf::expected<std::unique_ptr<sink>> open_sink(std::string_view url) {
  if (url.starts_with(outbox_prefix)) {
    auto st = outbox::store::open_url(url.substr(outbox_prefix.size()));
    if (!st)
      return st.error();
    return std::unique_ptr<sink>{new outbox_sink(std::move(*st))};
  }
  register_inproc_transport();
  transport_environment env;
  env.now = [] { return std::chrono::steady_clock::now(); };
  env.node = "evmesh-cli";
  auto t = make_transport(url, env);
  if (!t)
    return t.error();
  return std::unique_ptr<sink>{new transport_sink(std::move(*t))};
}

int publish(const publish_options& opts, std::ostream& out, std::ostream& err) {
  boost::json::stream_parser parser;
  boost::system::error_code ec;
  auto used = parser.write(opts.data.data(), opts.data.size(), ec);
  if (!ec)
    parser.finish(ec);
  if (ec) {
    err << "evmesh: the payload from " << opts.data_source
        << " is not valid JSON: " << ec.message() << " (at byte " << used
        << ")\n";
    return exit_usage;
  }
  envelope env;
  env.topic = opts.topic;
  env.key = opts.key;
  env.idempotency_key = opts.idempotency_key;
  env.payload = parser.release();
  auto dst = open_sink(opts.url);
  if (!dst) {
    err << "evmesh: cannot publish to " << opts.url << ": "
        << message_of(dst.error()) << '\n';
    return exit_failure;
  }
  auto res = (*dst)->send(std::move(env));
  if (!res) {
    err << "evmesh: publishing to " << opts.url
        << " failed: " << message_of(res.error()) << '\n';
    return exit_failure;
  }
  out << opts.topic << ": " << *res << '\n';
  return 0;
}

std::string replay_idempotency_key(const dead_letter_record& rec,
                                   std::string_view original_key) {
  std::string key = "replay:" + std::to_string(rec.id);
  if (rec.replayed_ms != 0)
    key += "@" + std::to_string(rec.replayed_ms);
  key += ':';
  key += original_key;
  return key;
}

caf::expected<envelope> replay_envelope(const dead_letter_record& rec,
                                        std::string_view to) {
  if (!rec.original_decoded)
    return make_error(errc::decode_error,
                      "dead letter " + std::to_string(rec.id)
                        + " holds a message that did not decode as an "
                          "envelope; it cannot be replayed — inspect it with "
                          "`evmesh dlq show "
                        + std::to_string(rec.id) + "`");
  auto env = decode_envelope(rec.original);
  if (!env)
    return env.error();
  auto original_key = dedupe_key(*env);
  env->attempt = 0;
  if (!to.empty())
    env->topic = std::string{to};
  else if (env->topic.empty())
    env->topic = rec.topic;
  auto parent = parse_traceparent(rec.traceparent) ? rec.traceparent
                                                   : env->traceparent;
  auto span = continue_trace(parent, env->tracestate);
  env->traceparent = span.traceparent();
  env->tracestate = span.tracestate;
  env->idempotency_key = replay_idempotency_key(rec, original_key);
  env->headers["evmesh-replay-of"] = std::to_string(rec.id);
  env->headers["evmesh-original-idempotency-key"] = original_key;
  return env;
}

int dlq_replay(const dlq_replay_options& opts, const terminal& term,
               std::istream& in, std::ostream& out, std::ostream& err) {
  if (opts.target.empty()) {
    err << "evmesh: dlq replay needs --target: outbox:sqlite://PATH (the "
           "service's outbox database) or a transport URL\n";
    return exit_usage;
  }
  dead_letter_store_ptr store;
  auto records = select_records(opts.db, opts.query, err, store);
  if (!records)
    return exit_failure;
  std::vector<dead_letter_record> todo;
  size_t skipped = 0;
  for (auto& rec : *records) {
    if (rec.replayed_ms != 0 && !opts.again)
      ++skipped;
    else
      todo.push_back(std::move(rec));
  }
  if (todo.empty()) {
    err << "nothing to replay: " << records->size()
        << " record(s) match the filters, " << skipped
        << " of them already replayed (--again replays those)\n";
    return 0;
  }
  auto question = "replay " + std::to_string(todo.size())
                  + " dead letter(s) from " + opts.db + " to " + opts.target;
  if (auto code = confirm(opts.yes, term, question, in, out, err))
    return *code;
  auto dst = open_sink(opts.target);
  if (!dst) {
    err << "evmesh: cannot open " << opts.target << ": "
        << message_of(dst.error()) << '\n';
    return exit_failure;
  }
  progress bar{out, term.stdout_tty && !opts.json, "replay", todo.size()};
  size_t replayed = 0;
  size_t failed = 0;
  for (size_t i = 0; i < todo.size(); ++i) {
    const auto& rec = todo[i];
    auto env = replay_envelope(rec, opts.to);
    caf::expected<std::string> res
      = env ? (*dst)->send(*env) : caf::expected<std::string>{env.error()};
    caf::error mark_err;
    if (res)
      mark_err = store->mark_replayed(rec.id, now_ms());
    auto ok = res && !mark_err;
    if (ok)
      ++replayed;
    else
      ++failed;
    std::string why = !res ? message_of(res.error())
                           : (mark_err ? "sent, but marking it replayed "
                                         "failed: "
                                           + message_of(mark_err)
                                       : std::string{});
    if (opts.json) {
      boost::json::object line;
      line["id"] = rec.id;
      line["status"] = ok ? "replayed" : "failed";
      line["topic"] = env ? env->topic : rec.topic;
      line["idempotency_key"] = env ? env->idempotency_key : std::string{};
      line["result"] = res ? *res : why;
      out << boost::json::serialize(line) << '\n';
    } else if (!ok) {
      err << "evmesh: dead letter " << rec.id << ": " << why << '\n';
    } else if (!term.stdout_tty) {
      out << "replayed " << rec.id << " -> " << env->topic << " as "
          << env->idempotency_key << " (" << *res << ")\n";
    }
    bar.update(i + 1);
  }
  err << "replayed " << replayed << ", skipped " << skipped
      << " already replayed, failed " << failed << '\n';
  return failed == 0 ? 0 : exit_failure;
}

int dlq_purge(const dlq_purge_options& opts, const terminal& term,
              std::istream& in, std::ostream& out, std::ostream& err) {
  dead_letter_store_ptr store;
  auto records = select_records(opts.db, opts.query, err, store);
  if (!records)
    return exit_failure;
  if (records->empty()) {
    err << "nothing to purge: no dead letters in " << opts.db
        << " match the filters\n";
    return 0;
  }
  auto question = "delete " + std::to_string(records->size())
                  + " dead letter(s) from " + opts.db;
  if (auto code = confirm(opts.yes, term, question, in, out, err))
    return *code;
  progress bar{out, term.stdout_tty, "purge", records->size()};
  size_t deleted = 0;
  size_t failed = 0;
  for (size_t i = 0; i < records->size(); ++i) {
    auto id = (*records)[i].id;
    if (auto e = store->remove(id)) {
      ++failed;
      err << "evmesh: cannot delete dead letter " << id << ": " << message_of(e)
          << '\n';
    } else {
      ++deleted;
      if (!term.stdout_tty)
        out << "deleted " << id << '\n';
    }
    bar.update(i + 1);
  }
  err << "deleted " << deleted << ", failed " << failed << '\n';
  return failed == 0 ? 0 : exit_failure;
}

} // namespace evmesh::cli
