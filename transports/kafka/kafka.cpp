#include "evmesh/kafka.hpp"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <memory_resource>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>

#include <fcntl.h>
#include <librdkafka/rdkafka.h>
#include <spdlog/spdlog.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <unistd.h>

#include "evmesh/config.hpp"
#include "evmesh/error.hpp"
#include "evmesh/pattern.hpp"

#include "offset_table.hpp"

namespace evmesh {

namespace {

using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;

// -- URL ----------------------------------------------------------------------

struct kafka_settings {
  std::string brokers; // host:port,host:port
  std::string shown;   // kafka://brokers (no query: it may hold secrets)
  std::string group;
  std::vector<std::string> topics;         // plain names from topics=
  std::vector<std::string> topic_patterns; // wildcard entries from topics=
  std::string ledger;
  caf::timespan discover = 5s;
  caf::timespan connect_timeout = 5s;
  caf::timespan publish_timeout = 10s;
  caf::timespan revoke_wait = 2s;
  caf::timespan commit_interval = 100ms;
  size_t max_buffered = 8192;
  // Retries due this late go through `<topic>.retry`; max(): never.
  caf::timespan retry_after = 10s;
  // librdkafka properties from the URL, applied after evmesh's defaults.
  std::vector<std::pair<std::string, std::string>> props;
};

std::string percent_decode(std::string_view in) {
  std::string out;
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '%' && i + 2 < in.size()) {
      out += static_cast<char>(
        std::stoi(std::string{in.substr(i + 1, 2)}, nullptr, 16));
      i += 2;
    } else {
      out += in[i];
    }
  }
  return out;
}

caf::error url_error(std::string_view url, std::string what) {
  // The query may hold credentials (sasl.password): show the brokers only,
  // without any user info.
  auto shown = std::string{url.substr(0, url.find('?'))};
  if (auto at = shown.rfind('@'); at != std::string::npos) {
    auto scheme_end = shown.find("://");
    auto from = scheme_end == std::string::npos ? 0 : scheme_end + 3;
    if (at >= from)
      shown.replace(from, at - from, "***");
  }
  return make_error(errc::invalid_url,
                    "bad Kafka URL '" + shown + "?...': " + what
                      + " (expected kafka://host:port[,host:port]?group=G"
                        "[&topics=a,b], see docs/transports/kafka.md)");
}

bool has_wildcard(std::string_view x) {
  return x.find_first_of("*>") != std::string_view::npos;
}

bool ends_with(std::string_view x, std::string_view suffix) {
  return x.size() >= suffix.size()
         && x.substr(x.size() - suffix.size()) == suffix;
}

// Topics a pattern never consumes: evmesh's own dead-letter and retry topics
// and Kafka's internal ones.
bool excluded_topic(std::string_view t) {
  return ends_with(t, ".dlq") || ends_with(t, ".retry")
         || t.substr(0, 2) == "__";
}

int64_t to_ms(caf::timespan d) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
}

// Properties evmesh owns: overriding them would break the watermark.
constexpr std::string_view fixed_props[] = {
  "enable.auto.commit", "enable.auto.offset.store", "group.id",
  "bootstrap.servers",  "metadata.broker.list",
};

caf::expected<kafka_settings> parse_kafka_url(std::string_view url) {
  constexpr std::string_view prefix = "kafka://";
  if (url.substr(0, prefix.size()) != prefix)
    return url_error(url, "the scheme must be kafka://");
  kafka_settings s;
  auto rest = url.substr(prefix.size());
  auto q = rest.find('?');
  auto authority = rest.substr(0, q);
  if (!authority.empty() && authority.back() == '/')
    authority.remove_suffix(1);
  // SASL credentials as user info: the runtime masks them in its logs (a
  // sasl.password in the query would be shown).
  std::vector<std::pair<std::string, std::string>> sasl;
  if (auto at = authority.rfind('@'); at != std::string_view::npos) {
    auto cred = authority.substr(0, at);
    authority = authority.substr(at + 1);
    auto colon = cred.find(':');
    if (colon == std::string_view::npos || colon == 0)
      return url_error(url, "credentials must be user:password@ (SASL)");
    sasl.emplace_back("sasl.username", percent_decode(cred.substr(0, colon)));
    sasl.emplace_back("sasl.password", percent_decode(cred.substr(colon + 1)));
  }
  while (!authority.empty()) {
    auto comma = authority.find(',');
    auto host = std::string{authority.substr(0, comma)};
    authority = comma == std::string_view::npos ? std::string_view{}
                                                : authority.substr(comma + 1);
    if (host.empty())
      return url_error(url, "empty host in the broker list");
    if (host.find(':') == std::string::npos)
      host += ":9092";
    if (!s.brokers.empty())
      s.brokers += ',';
    s.brokers += host;
  }
  if (s.brokers.empty())
    return url_error(url, "no bootstrap server");
  s.shown = "kafka://" + s.brokers;
  std::string query;
  if (q != std::string_view::npos)
    query = std::string{rest.substr(q + 1)};
  std::string_view qs = query;
  while (!qs.empty()) {
    auto amp = qs.find('&');
    auto kv = qs.substr(0, amp);
    qs = amp == std::string_view::npos ? std::string_view{}
                                       : qs.substr(amp + 1);
    if (kv.empty())
      continue;
    auto eq = kv.find('=');
    auto k = std::string{kv.substr(0, eq)};
    auto v = eq == std::string_view::npos ? std::string{}
                                          : percent_decode(kv.substr(eq + 1));
    auto dur = [&](caf::timespan& out, caf::timespan min) -> caf::error {
      auto d = parse_duration(v);
      if (!d)
        return url_error(url,
                         k + "=" + v + " is not a duration (e.g. 5s, 500ms)");
      if (*d < min)
        return url_error(url, k + " must be at least " + format_duration(min));
      out = *d;
      return {};
    };
    caf::error err;
    if (k == "group") {
      if (v.empty())
        return url_error(url, "group= is empty");
      s.group = v;
    } else if (k == "topics") {
      std::string_view list = v;
      while (!list.empty()) {
        auto comma = list.find(',');
        auto t = std::string{list.substr(0, comma)};
        list = comma == std::string_view::npos ? std::string_view{}
                                               : list.substr(comma + 1);
        if (t.empty())
          continue;
        if (has_wildcard(t)) {
          if (auto perr = validate_pattern(t))
            return url_error(url, "topic pattern '" + t + "': " + render(perr));
          s.topic_patterns.push_back(std::move(t));
        } else {
          s.topics.push_back(std::move(t));
        }
      }
    } else if (k == "ledger") {
      s.ledger = v;
    } else if (k == "discover") {
      err = dur(s.discover, 100ms);
    } else if (k == "connect_timeout") {
      err = dur(s.connect_timeout, 100ms);
    } else if (k == "publish_timeout") {
      err = dur(s.publish_timeout, 100ms);
    } else if (k == "revoke_wait") {
      err = dur(s.revoke_wait, caf::timespan{0});
    } else if (k == "commit_interval") {
      err = dur(s.commit_interval, 1ms);
    } else if (k == "retry_topic_after") {
      if (v == "0" || v == "off") {
        s.retry_after = caf::timespan::max();
      } else {
        err = dur(s.retry_after, 1ms);
      }
    } else if (k == "max_buffered") {
      try {
        size_t used = 0;
        auto x = std::stoll(v, &used);
        if (used != v.size() || x < 1)
          throw std::invalid_argument{"range"};
        s.max_buffered = static_cast<size_t>(x);
      } catch (...) {
        return url_error(url,
                         "max_buffered=" + v + " is not a positive integer");
      }
    } else if (k.find('.') != std::string::npos) {
      for (auto fixed : fixed_props)
        if (k == fixed)
          return url_error(url, k
                                  + " is managed by the transport"
                                    " (use group= and the host list)");
      s.props.emplace_back(k, v);
    } else {
      return url_error(url, "unknown parameter '" + k + "'");
    }
    if (err)
      return err;
  }
  if (!sasl.empty()) {
    auto given = [&](std::string_view k) {
      return std::any_of(s.props.begin(), s.props.end(),
                         [k](auto& kv) { return kv.first == k; });
    };
    if (given("sasl.username") || given("sasl.password"))
      return url_error(url, "credentials given twice (user:password@ and "
                            "sasl.username/sasl.password)");
    // Secure defaults for credentials; the query may say otherwise.
    if (!given("sasl.mechanisms") && !given("sasl.mechanism"))
      sasl.emplace_back("sasl.mechanisms", "PLAIN");
    if (!given("security.protocol"))
      sasl.emplace_back("security.protocol", "sasl_ssl");
    s.props.insert(s.props.begin(), sasl.begin(), sasl.end());
  }
  // Reject unknown librdkafka properties and bad values now, not at subscribe.
  auto* conf = rd_kafka_conf_new();
  char errstr[512];
  for (auto& [k, v] : s.props) {
    if (rd_kafka_conf_set(conf, k.c_str(), v.c_str(), errstr, sizeof errstr)
        != RD_KAFKA_CONF_OK) {
      rd_kafka_conf_destroy(conf);
      return url_error(url, "librdkafka property " + k + ": "
                              + (k == "sasl.password" ? "(invalid)" : errstr));
    }
  }
  rd_kafka_conf_destroy(conf);
  return s;
}

// -- librdkafka helpers --------------------------------------------------------

void log_cb(const rd_kafka_t* rk, int level, const char* fac, const char* buf) {
  // Consumer-only properties given to the producer (and vice versa) are
  // expected: the URL's properties apply to both handles.
  if (std::strcmp(fac, "CONFWARN") == 0)
    return;
  auto name = rk != nullptr ? rd_kafka_name(rk) : "rdkafka";
  if (level <= 4)
    spdlog::warn("kafka: {} {}: {}", name, fac, buf);
  else if (level <= 6)
    spdlog::debug("kafka: {} {}: {}", name, fac, buf);
  else
    spdlog::trace("kafka: {} {}: {}", name, fac, buf);
}

// Connection health shared with librdkafka's callbacks.
struct health {
  std::atomic<bool> connected{true};
};

void error_cb(rd_kafka_t* rk, int err, const char* reason, void* opaque) {
  auto* h = static_cast<health*>(opaque);
  auto code = static_cast<rd_kafka_resp_err_t>(err);
  if (code == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN) {
    if (h != nullptr && h->connected.exchange(false))
      spdlog::warn("kafka: {}: all brokers are down; reconnecting",
                   rd_kafka_name(rk));
    return;
  }
  // Connection failures are already logged by librdkafka itself.
  if (code == RD_KAFKA_RESP_ERR__TRANSPORT
      || code == RD_KAFKA_RESP_ERR__RESOLVE)
    spdlog::debug("kafka: {}: {}", rd_kafka_name(rk), reason);
  else
    spdlog::warn("kafka: {}: {}: {}", rd_kafka_name(rk),
                 rd_kafka_err2name(code), reason);
}

struct conf_deleter {
  void operator()(rd_kafka_conf_t* x) const {
    rd_kafka_conf_destroy(x);
  }
};

using conf_ptr = std::unique_ptr<rd_kafka_conf_t, conf_deleter>;

caf::error set_prop(rd_kafka_conf_t* conf, const std::string& k,
                    const std::string& v) {
  char errstr[512];
  if (rd_kafka_conf_set(conf, k.c_str(), v.c_str(), errstr, sizeof errstr)
      != RD_KAFKA_CONF_OK)
    return make_error(errc::invalid_config,
                      "kafka: property " + k + "="
                        + (k.find("password") != std::string::npos
                               || k.find("secret") != std::string::npos
                             ? "***"
                             : v)
                        + ": " + errstr);
  return {};
}

// A configuration with evmesh's defaults, then the URL's properties, then the
// properties the watermark depends on.
caf::expected<conf_ptr> make_conf(const kafka_settings& s, bool consumer,
                                  const std::string& client_id, health* h) {
  conf_ptr conf{rd_kafka_conf_new()};
  std::vector<std::pair<std::string, std::string>> props{
    {"bootstrap.servers", s.brokers},
    {"client.id", client_id},
    {"reconnect.backoff.max.ms", "2000"},
  };
  if (consumer) {
    props.insert(props.end(),
                 {{"group.id", s.group},
                  {"auto.offset.reset", "earliest"},
                  {"enable.partition.eof", "false"},
                  // librdkafka 2.0 checks this per-partition bound against
                  // the one consumer queue all partitions feed, and when it
                  // is passed looks again only when the broker thread next
                  // wakes, up to 1 s later: a consumer faster than ~100 k
                  // msg/s drained 100 000 prefetched records and then sat
                  // idle. The prefetch stays bounded by
                  // queued.max.messages.kbytes (64 MiB by default).
                  {"queued.min.messages", "1000000"}});
  } else {
    props.insert(
      props.end(),
      {{"enable.idempotence", "true"},
       // publish waits for its delivery report: do not linger (concurrent
       // publishers still batch behind in-flight requests).
       {"linger.ms", "0"},
       // Unkeyed events spread over partitions (and so over the members of a
       // group) instead of sticking to one partition per burst.
       {"sticky.partitioning.linger.ms", "0"},
       // The Java client's partitioner: one key lands on the same partition
       // whichever client produced it.
       {"partitioner", "murmur2_random"},
       {"message.timeout.ms", std::to_string(to_ms(s.publish_timeout))}});
  }
  for (auto& [k, v] : props)
    if (auto err = set_prop(conf.get(), k, v))
      return err;
  for (auto& [k, v] : s.props)
    if (auto err = set_prop(conf.get(), k, v))
      return err;
  if (consumer) {
    for (auto* k : {"enable.auto.commit", "enable.auto.offset.store"})
      if (auto err = set_prop(conf.get(), k, "false"))
        return err;
  }
  rd_kafka_conf_set_log_cb(conf.get(), log_cb);
  rd_kafka_conf_set_error_cb(conf.get(), error_cb);
  rd_kafka_conf_set_opaque(conf.get(), h);
  return conf;
}

struct metadata_deleter {
  void operator()(const rd_kafka_metadata_t* x) const {
    rd_kafka_metadata_destroy(x);
  }
};

using metadata_ptr
  = std::unique_ptr<const rd_kafka_metadata_t, metadata_deleter>;

// The cluster's topic list (bounded wait).
caf::expected<metadata_ptr>
fetch_metadata(rd_kafka_t* rk, const kafka_settings& s, caf::timespan timeout) {
  const rd_kafka_metadata_t* md = nullptr;
  auto err = rd_kafka_metadata(rk, 1, nullptr, &md,
                               static_cast<int>(to_ms(timeout)));
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
    return make_error(errc::unavailable,
                      "cannot reach the Kafka bootstrap servers of " + s.shown
                        + " within " + format_duration(timeout) + ": "
                        + rd_kafka_err2str(err)
                        + " — is a broker running there? (check the "
                          "host:port list and security.protocol)");
  return metadata_ptr{md};
}

// Assigns "kafka:<topic>/<partition>@<offset>" to `out` (once per delivery:
// no temporaries; `out`'s buffer is reused).
void position_into(std::string& out, const std::string& topic,
                   int32_t partition, int64_t offset) {
  char num[48];
  auto end = std::to_chars(num, num + 20, partition).ptr;
  *end++ = '@';
  end = std::to_chars(end, num + sizeof num, offset).ptr;
  out.clear();
  out.reserve(7 + topic.size() + static_cast<size_t>(end - num));
  out.append("kafka:").append(topic).append(1, '/').append(num, end);
}

std::string position_of(const std::string& topic, int32_t partition,
                        int64_t offset) {
  std::string result;
  position_into(result, topic, partition, offset);
  return result;
}

// -- producer ------------------------------------------------------------------

// What a delivery report tells the waiting producer call.
struct delivery_wait {
  std::mutex mtx;
  std::condition_variable cv;
  bool done = false;
  rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
  int32_t partition = -1;
  int64_t offset = -1;
};

using wait_ref = std::shared_ptr<delivery_wait>;

void on_delivery(rd_kafka_t*, const rd_kafka_message_t* m, void* opaque) {
  if (auto* h = static_cast<health*>(opaque);
      h != nullptr && m->err == RD_KAFKA_RESP_ERR_NO_ERROR)
    h->connected = true;
  auto* ref = static_cast<wait_ref*>(m->_private);
  if (ref == nullptr)
    return;
  {
    std::lock_guard guard{(*ref)->mtx};
    (*ref)->done = true;
    (*ref)->err = m->err;
    (*ref)->partition = m->partition;
    (*ref)->offset = m->offset;
  }
  (*ref)->cv.notify_all();
  delete ref;
}

struct headers_deleter {
  void operator()(rd_kafka_headers_t* x) const {
    rd_kafka_headers_destroy(x);
  }
};

using headers_ptr = std::unique_ptr<rd_kafka_headers_t, headers_deleter>;

// A producer handle with its own thread serving delivery reports, so every
// `produce` can wait for its own report.
class producer {
public:
  static caf::expected<std::unique_ptr<producer>>
  make(const kafka_settings& s, const std::string& client_id, health* h) {
    auto conf = make_conf(s, false, client_id, h);
    if (!conf)
      return conf.error();
    rd_kafka_conf_set_dr_msg_cb(conf->get(), on_delivery);
    char errstr[512];
    auto* rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf->get(), errstr,
                            sizeof errstr);
    if (rk == nullptr)
      return make_error(errc::invalid_config,
                        "kafka: cannot create a producer for " + s.shown + ": "
                          + errstr);
    static_cast<void>(conf->release()); // rd_kafka_new owns it now
    auto p = std::unique_ptr<producer>{new producer(rk, s.publish_timeout)};
    p->poller_ = std::thread{[raw = p.get()] { raw->serve(); }};
    return p;
  }

  ~producer() {
    stop_ = true;
    if (poller_.joinable())
      poller_.join();
    rd_kafka_flush(rk_, 2000);
    rd_kafka_purge(rk_, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
    rd_kafka_poll(rk_, 0);
    rd_kafka_destroy(rk_);
  }

  rd_kafka_t* handle() const {
    return rk_;
  }

  /// Produces one record (to `partition`, or the partitioner's choice) and
  /// waits for its delivery report; `where` receives the record's partition
  /// and offset.
  caf::error produce(const std::string& topic, const std::string& key,
                     const std::string& value, headers_ptr headers,
                     int32_t partition = RD_KAFKA_PARTITION_UA,
                     std::pair<int32_t, int64_t>* where = nullptr) {
    auto wait = std::make_shared<delivery_wait>();
    auto* ref = new wait_ref{wait};
    auto* hdrs = headers.release();
    auto err = rd_kafka_producev(
      rk_, RD_KAFKA_V_TOPIC(topic.c_str()), RD_KAFKA_V_PARTITION(partition),
      RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
      RD_KAFKA_V_KEY(key.empty() ? nullptr : key.data(), key.size()),
      RD_KAFKA_V_VALUE(const_cast<char*>(value.data()), value.size()),
      RD_KAFKA_V_HEADERS(hdrs), RD_KAFKA_V_OPAQUE(ref), RD_KAFKA_V_END);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
      rd_kafka_headers_destroy(hdrs);
      delete ref;
      return make_error(err == RD_KAFKA_RESP_ERR__QUEUE_FULL ? errc::unavailable
                                                             : errc::io_error,
                        "kafka: cannot produce to '" + topic
                          + "': " + rd_kafka_err2str(err));
    }
    std::unique_lock lock{wait->mtx};
    // message.timeout.ms equals the timeout: the report always comes.
    if (!wait->cv.wait_for(lock, timeout_ + 2s, [&] { return wait->done; }))
      return make_error(errc::unavailable, "kafka: no delivery report for '"
                                             + topic + "' within "
                                             + format_duration(timeout_ + 2s));
    if (wait->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
      if (where != nullptr)
        *where = {wait->partition, wait->offset};
      return {};
    }
    if (wait->err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART
        || wait->err == RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC)
      return make_error(errc::invalid_config,
                        "kafka: topic '" + topic
                          + "' does not exist and the cluster does not create "
                            "topics on demand — create it");
    return make_error(errc::unavailable, "kafka: the broker did not confirm '"
                                           + topic
                                           + "': " + rd_kafka_err2str(wait->err)
                                           + " (the record may be retried)");
  }

private:
  producer(rd_kafka_t* rk, caf::timespan timeout) : rk_(rk), timeout_(timeout) {
  }

  void serve() {
    while (!stop_)
      rd_kafka_poll(rk_, 100);
  }

  rd_kafka_t* rk_;
  caf::timespan timeout_;
  std::atomic<bool> stop_{false};
  std::thread poller_;
};

headers_ptr make_headers() {
  return headers_ptr{rd_kafka_headers_new(8)};
}

void add_header(rd_kafka_headers_t* h, const char* name,
                const std::string& value) {
  if (!value.empty())
    rd_kafka_header_add(h, name, -1, value.data(),
                        static_cast<ssize_t>(value.size()));
}

// Assigns header `name` (the last of that name) to `out`, keeping its
// capacity; empty when absent.
void header_into(rd_kafka_headers_t* h, const char* name, std::string& out) {
  const void* v = nullptr;
  size_t n = 0;
  if (h != nullptr
      && rd_kafka_header_get_last(h, name, &v, &n) == RD_KAFKA_RESP_ERR_NO_ERROR
      && v != nullptr)
    out.assign(static_cast<const char*>(v), n);
  else
    out.clear();
}

std::string header_of(rd_kafka_headers_t* h, const char* name) {
  std::string result;
  header_into(h, name, result);
  return result;
}

// -- attempt ledger ------------------------------------------------------------

// Durable attempt counts per (group, topic, partition, offset) in a SQLite
// file, and which of those offsets reached their terminal action (so a
// replay after a crash skips them instead of counting them again). Rows
// below the committed watermark are pruned.
class attempt_ledger {
public:
  struct position {
    std::string topic;
    int32_t partition;
    int64_t offset;
  };

  static caf::expected<std::unique_ptr<attempt_ledger>>
  open(const std::string& path, const std::string& group) {
    sqlite3* raw = nullptr;
    auto rc = sqlite3_open_v2(path.c_str(), &raw,
                              SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE
                                | SQLITE_OPEN_FULLMUTEX,
                              nullptr);
    std::unique_ptr<attempt_ledger> l{new attempt_ledger(raw, group)};
    if (rc != SQLITE_OK)
      return l->fail("cannot open the attempt ledger '" + path + "'");
    sqlite3_busy_timeout(raw, 5000);
    const char* setup
      = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
        "CREATE TABLE IF NOT EXISTS kafka_attempts(grp TEXT NOT NULL,"
        " topic TEXT NOT NULL, part INTEGER NOT NULL, off INTEGER NOT NULL,"
        " n INTEGER NOT NULL, done INTEGER NOT NULL DEFAULT 0,"
        " PRIMARY KEY(grp, topic, part, off)) WITHOUT ROWID;";
    if (sqlite3_exec(raw, setup, nullptr, nullptr, nullptr) != SQLITE_OK)
      return l->fail("cannot prepare the attempt ledger '" + path + "'");
    const char* where = " WHERE grp = ?1 AND topic = ?2 AND part = ?3";
    auto prep = [&](std::string sql, sqlite3_stmt** out) {
      return sqlite3_prepare_v2(raw, sql.c_str(), -1, out, nullptr)
             == SQLITE_OK;
    };
    if (!prep("INSERT INTO kafka_attempts(grp, topic, part, off, n)"
              " VALUES(?1, ?2, ?3, ?4, 1) ON CONFLICT(grp, topic, part, off)"
              " DO UPDATE SET n = n + 1 RETURNING n",
              &l->bump_)
        || !prep(std::string{"SELECT n, done FROM kafka_attempts"} + where
                   + " AND off = ?4",
                 &l->get_)
        || !prep("INSERT INTO kafka_attempts(grp, topic, part, off, n, done)"
                 " VALUES(?1, ?2, ?3, ?4, 0, 1) ON CONFLICT(grp, topic, part,"
                 " off) DO UPDATE SET done = 1",
                 &l->done_)
        || !prep(std::string{"DELETE FROM kafka_attempts"} + where
                   + " AND off < ?4",
                 &l->prune_)
        || !prep(std::string{"UPDATE kafka_attempts SET n = n - 1"} + where
                   + " AND off = ?4 AND n > 0",
                 &l->unbump_))
      return l->fail("cannot prepare the attempt ledger '" + path + "'");
    l->path_ = path;
    return l;
  }

  ~attempt_ledger() {
    for (auto* x : {bump_, get_, done_, prune_, unbump_})
      sqlite3_finalize(x);
    sqlite3_close(db_);
  }

  /// Counts an attempt of each of `xs` in one transaction; returns the
  /// counts.
  caf::expected<std::vector<uint32_t>> bump(const std::vector<position>& xs) {
    std::lock_guard guard{mtx_};
    std::vector<uint32_t> result;
    result.reserve(xs.size());
    if (sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr)
        != SQLITE_OK)
      return error("cannot begin a transaction");
    for (auto& x : xs) {
      bind(bump_, x.topic, x.partition, x.offset);
      if (sqlite3_step(bump_) != SQLITE_ROW) {
        auto err = error("cannot count an attempt");
        sqlite3_reset(bump_);
        sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
        return err;
      }
      result.push_back(static_cast<uint32_t>(sqlite3_column_int64(bump_, 0)));
      sqlite3_reset(bump_);
    }
    if (sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr) != SQLITE_OK) {
      auto err = error("cannot commit attempt counts");
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
      return err;
    }
    return result;
  }

  /// Records that `xs` reached their terminal action.
  void mark_done(const std::vector<position>& xs) {
    if (xs.empty())
      return;
    std::lock_guard guard{mtx_};
    sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr);
    for (auto& x : xs) {
      bind(done_, x.topic, x.partition, x.offset);
      if (sqlite3_step(done_) != SQLITE_DONE)
        spdlog::warn("kafka: {}", render(error("cannot record a settle")));
      sqlite3_reset(done_);
    }
    if (sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr) != SQLITE_OK) {
      spdlog::warn("kafka: {}", render(error("cannot record settles")));
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    }
  }

  /// The offset's durable count (handler runs cut short by a crash, plus
  /// deliveries left unsettled by a clean close) and whether it reached its
  /// terminal action (in any process).
  std::pair<uint32_t, bool> lookup(const std::string& topic, int32_t partition,
                                   int64_t offset) {
    std::lock_guard guard{mtx_};
    bind(get_, topic, partition, offset);
    std::pair<uint32_t, bool> result{0, false};
    if (sqlite3_step(get_) == SQLITE_ROW)
      result = {static_cast<uint32_t>(sqlite3_column_int64(get_, 0)),
                sqlite3_column_int64(get_, 1) != 0};
    sqlite3_reset(get_);
    return result;
  }

  /// Takes back one count of `x` (a run counted ahead that finished).
  void unbump(const position& x) {
    std::lock_guard guard{mtx_};
    bind(unbump_, x.topic, x.partition, x.offset);
    if (sqlite3_step(unbump_) != SQLITE_DONE)
      spdlog::warn("kafka: {}", render(error("cannot take back a count")));
    sqlite3_reset(unbump_);
  }

  const std::string& path() const {
    return path_;
  }

  /// Forgets the rows of offsets below `offset` (committed).
  void prune(const std::string& topic, int32_t partition, int64_t offset) {
    std::lock_guard guard{mtx_};
    bind(prune_, topic, partition, offset);
    if (sqlite3_step(prune_) != SQLITE_DONE)
      spdlog::warn("kafka: {}", render(error("cannot prune the ledger")));
    sqlite3_reset(prune_);
  }

private:
  attempt_ledger(sqlite3* db, std::string group)
    : db_(db), group_(std::move(group)) {
  }

  void bind(sqlite3_stmt* st, const std::string& topic, int32_t partition,
            int64_t offset) {
    sqlite3_bind_text(st, 1, group_.c_str(), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, topic.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_int(st, 3, partition);
    sqlite3_bind_int64(st, 4, offset);
  }

  caf::error fail(std::string what) {
    return make_error(errc::invalid_config,
                      "kafka: " + what + ": "
                        + (db_ != nullptr ? sqlite3_errmsg(db_)
                                          : "out of memory")
                        + " — ledger= must name a writable file");
  }

  caf::error error(std::string what) {
    return make_error(errc::io_error, "kafka: attempt ledger " + path_ + ": "
                                        + what + ": " + sqlite3_errmsg(db_));
  }

  std::mutex mtx_;
  sqlite3* db_;
  sqlite3_stmt* bump_ = nullptr;
  sqlite3_stmt* get_ = nullptr;
  sqlite3_stmt* done_ = nullptr;
  sqlite3_stmt* prune_ = nullptr;
  sqlite3_stmt* unbump_ = nullptr;
  std::string group_;
  std::string path_;
};

// Handler runs under way, in a small MAP_SHARED file next to the ledger
// (`<ledger>.run-N`, N < run_files): a process that dies leaves its slots
// behind, and the next process that can lock the file adds one attempt per
// slot to the ledger. So the durable count is exactly the runs a crash cut
// short. Each live process holds an exclusive flock on its own file.
struct run_slot {
  std::atomic<uint32_t> state; // 0 free, 1 being written, 2 running
  int32_t partition;
  int64_t offset;
  char topic[256];
};

static_assert(std::atomic<uint32_t>::is_always_lock_free);

constexpr size_t run_slot_count = 1024;
constexpr int run_files = 64;
constexpr size_t run_file_bytes = sizeof(run_slot) * run_slot_count;

class run_slots {
public:
  /// Harvests the files of dead processes into `ledger` and keeps one file
  /// for this process (none if all are held: counts then go to the ledger).
  static std::unique_ptr<run_slots> open(attempt_ledger& ledger) {
    std::unique_ptr<run_slots> self{new run_slots};
    for (int i = 0; i < run_files && self->slots_ == nullptr; ++i) {
      auto fd = lock_file(ledger.path(), i);
      if (fd < 0)
        continue;
      auto* slots = map(fd);
      if (slots == nullptr) {
        ::close(fd);
        continue;
      }
      harvest(ledger, slots);
      self->fd_ = fd;
      self->slots_ = slots;
    }
    if (self->slots_ == nullptr)
      spdlog::warn("kafka: no free run file next to {} — every handler run "
                   "costs two ledger writes",
                   ledger.path());
    harvest_dead(ledger);
    return self;
  }

  /// Adds the runs of files no live process holds to the ledger.
  static void harvest_dead(attempt_ledger& ledger) {
    for (int i = 0; i < run_files; ++i) {
      auto path = file_name(ledger.path(), i);
      if (::access(path.c_str(), F_OK) != 0)
        continue;
      auto fd = lock_file(ledger.path(), i);
      if (fd < 0)
        continue;
      if (auto* slots = map(fd)) {
        harvest(ledger, slots);
        ::munmap(slots, run_file_bytes);
      }
      ::close(fd); // releases the lock
    }
  }

  ~run_slots() {
    if (slots_ != nullptr)
      ::munmap(slots_, run_file_bytes);
    if (fd_ >= 0)
      ::close(fd_);
  }

  /// Claims a slot for a run of `x`; 0 when none is free.
  uint64_t claim(const std::string& topic, int32_t partition,
                 int64_t offset) noexcept {
    if (slots_ == nullptr || topic.size() >= sizeof(run_slot::topic))
      return 0;
    auto start = hint_.fetch_add(1, std::memory_order_relaxed);
    for (size_t k = 0; k < run_slot_count; ++k) {
      auto i = (start + k) % run_slot_count;
      auto& slot = slots_[i];
      uint32_t expected = 0;
      if (!slot.state.compare_exchange_strong(expected, 1,
                                              std::memory_order_acquire))
        continue;
      slot.partition = partition;
      slot.offset = offset;
      std::memcpy(slot.topic, topic.c_str(), topic.size() + 1);
      slot.state.store(2, std::memory_order_release);
      return i + 1;
    }
    return 0;
  }

  void release(uint64_t token) noexcept {
    if (token == 0 || token > run_slot_count || slots_ == nullptr)
      return;
    slots_[token - 1].state.store(0, std::memory_order_release);
  }

private:
  run_slots() = default;

  static std::string file_name(const std::string& ledger, int i) {
    return ledger + ".run-" + std::to_string(i);
  }

  // Opens and exclusively locks run file `i`; -1 when a live process holds
  // it (or it cannot be opened).
  static int lock_file(const std::string& ledger, int i) {
    auto path = file_name(ledger, i);
    auto fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
      return -1;
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0
        || ::ftruncate(fd, static_cast<off_t>(run_file_bytes)) != 0) {
      ::close(fd);
      return -1;
    }
    return fd;
  }

  static run_slot* map(int fd) {
    auto* p = ::mmap(nullptr, run_file_bytes, PROT_READ | PROT_WRITE,
                     MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? nullptr : static_cast<run_slot*>(p);
  }

  // Counts every run left in `slots` (its process died mid-run) and frees
  // the slots.
  static void harvest(attempt_ledger& ledger, run_slot* slots) {
    std::vector<attempt_ledger::position> cut_short;
    for (size_t i = 0; i < run_slot_count; ++i) {
      auto& slot = slots[i];
      if (slot.state.load(std::memory_order_acquire) != 2)
        continue;
      slot.topic[sizeof(slot.topic) - 1] = '\0';
      cut_short.push_back({slot.topic, slot.partition, slot.offset});
    }
    if (!cut_short.empty()) {
      if (auto counted = ledger.bump(cut_short); !counted) {
        spdlog::warn("{} — the runs a crash cut short are not counted",
                     render(counted.error()));
      } else {
        spdlog::info("kafka: counted {} handler run(s) cut short by a crash",
                     cut_short.size());
      }
    }
    for (size_t i = 0; i < run_slot_count; ++i)
      slots[i].state.store(0, std::memory_order_release);
  }

  int fd_ = -1;
  run_slot* slots_ = nullptr;
  std::atomic<size_t> hint_{0};
};

// -- the transport -------------------------------------------------------------

std::atomic<uint64_t> next_tag{1};

struct partition_state;

// One fetched record, kept until its terminal action (for redelivery). A
// retry record (from `<topic>.retry`) lives at `topic`/`partition`/`offset`
// in the retry topic and stands for the original at `subject`/
// `orig_partition`/`orig_offset`.
struct entry {
  std::string topic;
  int32_t partition = 0;
  int64_t offset = 0;
  std::string subject; // the original topic
  int32_t orig_partition = 0;
  int64_t orig_offset = 0;
  std::string bytes;
  std::string key;
  std::string traceparent;
  std::string tracestate;
  uint32_t deliveries = 0; // handed out by this process
  uint32_t counted = 0;    // the ledger's count when fetched
  uint32_t attempts = 0;   // retry record: attempts before it was deferred
  uint64_t seq = 0;        // fetch order: redeliveries keep their place
  uint64_t gen = 0;        // the partition's assignment generation
  // The state of `topic`/`partition` (`parts_` never drops a node), so the
  // per-message paths need no map lookup.
  partition_state* part = nullptr;
  bool retry = false;
  bool holds_park = false; // a retry record keeping its key parked
  bool dead_lettered = false;
};

using entry_ptr = std::shared_ptr<entry>;

// The key of a parked-key group: original topic, partition and record key.
using key_id = std::tuple<std::string, int32_t, std::string>;

key_id key_of(const entry& e) {
  return {e.subject, e.orig_partition, e.key};
}

// Headers of a retry record (`<topic>.retry`): where the original lives, the
// attempts made before it was deferred, and when the next one is due (Unix
// time in milliseconds).
constexpr const char* retry_topic_header = "evmesh-original-topic";
constexpr const char* retry_partition_header = "evmesh-original-partition";
constexpr const char* retry_offset_header = "evmesh-original-offset";
constexpr const char* retry_attempts_header = "evmesh-attempts";
constexpr const char* retry_due_header = "evmesh-due";

// attempt_started tokens counted in the ledger (no free run slot).
constexpr uint64_t fallback_bit = uint64_t{1} << 63;

// How long a main partition waits for its retry partition to be read on
// assign before it is released anyway.
constexpr auto retry_catchup_bound = 30s;

// While max_buffered records wait, how often the consumer thread still polls
// librdkafka for group events (rebalances).
constexpr auto group_poll_interval = 100ms;

// How many settled entries are kept for reuse.
constexpr size_t spare_limit = 4096;

// Parked keys: a key with a record in the retry topic holds back its later
// records until that one is settled for good.
struct key_park {
  uint32_t count = 0;            // retry records pending for the key
  std::vector<entry_ptr> parked; // its later records, in fetch order
};

int64_t parse_int(const std::string& x, int64_t fallback) {
  int64_t v = 0;
  auto end = x.data() + x.size();
  if (auto [ptr, ec] = std::from_chars(x.data(), end, v);
      ec == std::errc{} && ptr == end && !x.empty())
    return v;
  return fallback;
}

using tp_key = std::pair<std::string, int32_t>;

// The life of one offset while it is above the partition's watermark.
enum class offset_state : uint8_t { queued, out, terminal };

struct offset_info {
  offset_state state = offset_state::queued;
  uint64_t tag = 0; // while out
};

// What this process knows about one partition. Invariants: every offset
// below `low` is terminal; every offset in [low, end) that `offsets` does not
// hold is terminal or no record at all (fetching is sequential); `offsets`
// may also hold offsets at or above `end` (handed out before a revoke).
struct partition_state {
  bool assigned = false;
  bool fresh = true; // the group's position is not known yet
  uint64_t gen = 0;  // incremented on every assignment
  int64_t low = -1;
  int64_t end = -1;
  kafka_detail::offset_table<offset_info> offsets;
  int64_t committed = -1; // the last commit sent (or the group's, on assign)
  // A main partition whose retry partition is still being read on assign:
  // fetched records wait in `held` until the parked keys are known.
  bool gated = false;
  clock_type::time_point gate_until{};
  std::vector<entry_ptr> held;
  // A main partition: offsets whose retry record was read (they are settled
  // by it; a replay skips them).
  std::set<int64_t> deferred;
  // A retry partition: the offset its reader must reach before the main
  // partition is released (-1: none), and records this process produced
  // (and parked for) that the reader has not read yet.
  int64_t catchup = -1;
  std::set<int64_t> expected;
  // A main partition: records parked behind their key; fetching pauses
  // while it is at max_buffered.
  size_t parked_n = 0;
  bool parked_paused = false;

  /// The group's position after an assignment is `off`: offsets below it
  /// are terminal, and what was handed out below it belongs to an older
  /// assignment (it no longer holds the watermark back).
  void start_at(int64_t off) {
    fresh = false;
    offsets.erase_below(off);
    low = std::max(low, off);
    end = std::max(end, low);
  }

  /// A record fetched but no longer held here (dropped on revoke): fetching
  /// must deliver it again before the watermark may pass it.
  void forget(int64_t off) {
    offsets.erase(off);
    if (off >= low)
      end = std::min(end, off);
  }

  /// Drops the terminal prefix; returns the offset to commit: the lowest
  /// offset not yet terminal.
  int64_t watermark() {
    while (!offsets.empty()) {
      auto off = offsets.lowest();
      if (off >= end)
        break;
      if (offsets.find(off)->state != offset_state::terminal)
        return off;
      low = off + 1;
      offsets.erase(off);
    }
    low = std::max(low, end);
    return end;
  }
};

struct tplist_deleter {
  void operator()(rd_kafka_topic_partition_list_t* x) const {
    rd_kafka_topic_partition_list_destroy(x);
  }
};

using tplist_ptr
  = std::unique_ptr<rd_kafka_topic_partition_list_t, tplist_deleter>;

class kafka_transport : public transport {
public:
  kafka_transport(kafka_settings s, std::string node,
                  std::function<clock_type::time_point()> now,
                  std::unique_ptr<health> h, std::unique_ptr<producer> p,
                  std::unique_ptr<attempt_ledger> ledger)
    : settings_(std::move(s)),
      node_(std::move(node)),
      now_(std::move(now)),
      health_(std::move(h)),
      producer_(std::move(p)),
      ledger_(std::move(ledger)) {
    if (!now_)
      now_ = [] { return clock_type::now(); };
    if (ledger_)
      slots_ = run_slots::open(*ledger_);
  }

  ~kafka_transport() override {
    close();
  }

  std::string_view scheme() const noexcept override {
    return "kafka";
  }

  transport_capabilities capabilities() const noexcept override {
    // Kafka counts no deliveries: only the ledger makes them durable.
    transport_capabilities caps{ledger_ != nullptr, true, true, true};
    caps.defer_after = settings_.retry_after;
    return caps;
  }

  bool connected() const noexcept override {
    return health_->connected;
  }

  caf::error subscribe(const std::vector<std::string>& patterns) override {
    if (subscribed_)
      return make_error(errc::invalid_state,
                        "kafka transport: subscribed twice");
    if (closed_)
      return make_error(errc::invalid_state,
                        "kafka transport: subscribe after close");
    if (settings_.group.empty())
      return make_error(errc::invalid_config,
                        "kafka: " + settings_.shown
                          + " has no group= — name the consumer group the "
                            "processes of this service share");
    if (settings_.topics.empty() && settings_.topic_patterns.empty()) {
      for (auto& x : patterns) {
        if (auto err = validate_pattern(x))
          return err;
        patterns_.push_back(x);
      }
    } else {
      patterns_ = settings_.topic_patterns;
    }
    if (!settings_.topics.empty()) {
      auto md = fetch_metadata(producer_->handle(), settings_,
                               settings_.connect_timeout);
      if (!md)
        return md.error();
      std::set<std::string> have;
      for (int i = 0; i < (*md)->topic_cnt; ++i)
        if ((*md)->topics[i].err == RD_KAFKA_RESP_ERR_NO_ERROR)
          have.insert((*md)->topics[i].topic);
      for (auto& t : settings_.topics)
        if (have.count(t) == 0)
          return make_error(errc::invalid_config,
                            "kafka: topic '" + t + "' does not exist on "
                              + settings_.shown
                              + " — create it (kafka-topics.sh --create "
                                "--topic "
                              + t + ") or fix topics=");
    }
    auto conf = make_conf(settings_, true, "evmesh-" + node_, health_.get());
    if (!conf)
      return conf.error();
    rd_kafka_conf_set_rebalance_cb(conf->get(), &kafka_transport::on_rebalance);
    rd_kafka_conf_set_offset_commit_cb(conf->get(),
                                       &kafka_transport::on_commit);
    // The callbacks find the transport through the opaque; errors keep
    // reporting health through it.
    opaque_.self = this;
    rd_kafka_conf_set_opaque(conf->get(), &opaque_);
    rd_kafka_conf_set_error_cb(conf->get(), &kafka_transport::on_error);
    char errstr[512];
    consumer_ = rd_kafka_new(RD_KAFKA_CONSUMER, conf->get(), errstr,
                             sizeof errstr);
    if (consumer_ == nullptr)
      return make_error(errc::invalid_config,
                        "kafka: cannot create the consumer of group '"
                          + settings_.group + "' on " + settings_.shown + ": "
                          + errstr);
    static_cast<void>(conf->release());
    rd_kafka_poll_set_consumer(consumer_);
    if (settings_.retry_after != caf::timespan::max()) {
      // Reads the retry partitions of the assigned main partitions (manual
      // assignment; their offsets are committed by the group's consumer).
      auto rconf = make_conf(settings_, true, "evmesh-" + node_ + "-retry",
                             health_.get());
      if (!rconf)
        return rconf.error();
      reader_ = rd_kafka_new(RD_KAFKA_CONSUMER, rconf->get(), errstr,
                             sizeof errstr);
      if (reader_ == nullptr) {
        rd_kafka_destroy(consumer_);
        consumer_ = nullptr;
        return make_error(errc::invalid_config,
                          "kafka: cannot create the retry topic reader of "
                          "group '"
                            + settings_.group + "': " + errstr);
      }
      static_cast<void>(rconf->release());
      rd_kafka_poll_set_consumer(reader_);
    }
    subscribed_ = true;
    consumer_thread_ = std::thread{[this] { consume_loop(); }};
    return {};
  }

  caf::error poll(size_t max, std::vector<raw_message>& out) override {
    return poll_through_batch(max, out);
  }

  caf::error poll_into(size_t max, raw_batch& out) override {
    if (!subscribed_)
      return make_error(errc::invalid_state,
                        "kafka transport: poll before subscribe");
    if (closed_)
      return make_error(errc::invalid_state,
                        "kafka transport: poll after close (make a new "
                        "transport to consume again)");
    auto first = out.size();
    bool refill = false;
    {
      std::lock_guard guard{mtx_};
      if (!fatal_.empty())
        return make_error(errc::unavailable, fatal_);
      promote_due(now_());
      while (out.size() - first < max && !ready_.empty()) {
        auto e = std::move(ready_.begin()->second);
        ready_.erase(ready_.begin());
        auto& p = *e->part;
        if (!p.assigned || p.gen != e->gen)
          continue; // revoked meanwhile
        if (parked(*e)) {
          // Its key went into the retry topic after it was queued.
          park_behind(std::move(e));
          continue;
        }
        auto& raw = out.add();
        raw.tag = next_tag.fetch_add(1, std::memory_order_relaxed);
        raw.bytes = e->bytes;
        raw.subject = e->subject;
        raw.traceparent = e->traceparent;
        raw.tracestate = e->tracestate;
        raw.key = e->key;
        // Attempts before a deferral, runs a crash cut short (ledger), and
        // this process's deliveries.
        raw.delivery_count = e->attempts + e->counted + ++e->deliveries;
        position_into(raw.position, e->subject, e->orig_partition,
                      e->orig_offset);
        p.offsets[e->offset] = offset_info{offset_state::out, raw.tag};
        unacked_.emplace(raw.tag, std::move(e));
      }
      waiting_ = out.size() - first < max;
      // The consumer thread stopped taking records from librdkafka at
      // max_buffered: let it go on once half of them went out.
      if (full_ && ready_.size() <= settings_.max_buffered / 2) {
        full_ = false;
        refill = true;
      }
    }
    if (refill)
      room_.notify_one();
    return {};
  }

  caf::error ack(uint64_t tag) override {
    std::unique_lock lock{mtx_};
    auto i = unacked_.find(tag);
    if (i == unacked_.end())
      return not_ours("ack", tag);
    auto e = std::move(i->second);
    unacked_.erase(i);
    mark(*e, tag);
    settled_.notify_all();
    auto wake = release_park(*e);
    recycle(std::move(e));
    lock.unlock();
    record_settled();
    if (wake)
      wake_up();
    return {};
  }

  caf::error nack(uint64_t tag, caf::timespan delay) override {
    {
      std::lock_guard guard{mtx_};
      auto i = unacked_.find(tag);
      if (i == unacked_.end())
        return not_ours("nack", tag);
      auto e = std::move(i->second);
      unacked_.erase(i);
      settled_.notify_all();
      auto& p = *e->part;
      auto* o = p.offsets.find(e->offset);
      bool ours = o != nullptr && o->tag == tag;
      if (!ours)
        return {}; // dead-lettered already: the record is in the DLQ
      if (!p.assigned || p.gen != e->gen) {
        // Revoked: the partition's owner reads it again from the watermark.
        p.forget(e->offset);
        return {};
      }
      *o = offset_info{offset_state::queued, 0};
      if (delay.count() > 0) {
        // The consumer thread wakes the source when it falls due.
        delayed_.emplace(now_() + delay, std::move(e));
        return {};
      }
      // First in fetch order: it goes out first again (or waits behind its
      // key, when the runtime hands back a deferred record's successor).
      route(std::move(e));
    }
    wake_up();
    return {};
  }

  caf::error dead_letter(uint64_t tag, const dead_letter_record& rec) override {
    entry_ptr e;
    {
      std::lock_guard guard{mtx_};
      auto i = unacked_.find(tag);
      if (i == unacked_.end())
        return not_ours("dead_letter", tag);
      e = i->second;
    }
    auto hdrs = make_headers();
    add_header(hdrs.get(), "evmesh-original-topic", e->subject);
    add_header(hdrs.get(), "evmesh-original-partition",
               std::to_string(e->orig_partition));
    add_header(hdrs.get(), "evmesh-original-offset",
               std::to_string(e->orig_offset));
    add_header(hdrs.get(), "evmesh-category", rec.category);
    add_header(hdrs.get(), "evmesh-attempts", std::to_string(rec.attempts));
    add_header(hdrs.get(), "evmesh-group", settings_.group);
    add_header(hdrs.get(), "traceparent",
               rec.traceparent.empty() ? e->traceparent : rec.traceparent);
    auto dlq = e->subject + ".dlq";
    if (auto err = producer_->produce(dlq, e->key, to_json(rec),
                                      std::move(hdrs)))
      return make_error(
        errc::unavailable,
        "kafka: the dead letter for "
          + position_of(e->subject, e->orig_partition, e->orig_offset)
          + " was not confirmed by '" + dlq
          + "' (the original stays uncommitted): " + render(err));
    bool wake = false;
    {
      std::lock_guard guard{mtx_};
      // Confirmed: the original's offset may now pass the watermark.
      if (unacked_.count(tag) != 0) {
        e->dead_lettered = true;
        mark(*e, tag);
        wake = release_park(*e);
      }
    }
    record_settled();
    if (wake)
      wake_up();
    return {};
  }

  caf::error extend(uint64_t tag) override {
    // Kafka has no per-message ack deadline; the consumer thread keeps the
    // group membership alive.
    std::lock_guard guard{mtx_};
    if (unacked_.count(tag) == 0)
      return not_ours("extend", tag);
    return {};
  }

  caf::error defer(uint64_t tag, caf::timespan delay,
                   uint32_t attempts) override {
    if (settings_.retry_after == caf::timespan::max())
      return make_error(errc::invalid_state,
                        "kafka: retry topics are off (retry_topic_after=off)");
    entry_ptr e;
    {
      std::lock_guard guard{mtx_};
      auto i = unacked_.find(tag);
      if (i == unacked_.end())
        return not_ours("defer", tag);
      e = i->second;
    }
    auto due = std::chrono::duration_cast<std::chrono::milliseconds>(
                 std::chrono::system_clock::now().time_since_epoch() + delay)
                 .count();
    auto hdrs = make_headers();
    add_header(hdrs.get(), retry_topic_header, e->subject);
    add_header(hdrs.get(), retry_partition_header,
               std::to_string(e->orig_partition));
    add_header(hdrs.get(), retry_offset_header, std::to_string(e->orig_offset));
    add_header(hdrs.get(), retry_attempts_header, std::to_string(attempts));
    add_header(hdrs.get(), retry_due_header, std::to_string(due));
    add_header(hdrs.get(), "evmesh-group", settings_.group);
    add_header(hdrs.get(), "traceparent", e->traceparent);
    add_header(hdrs.get(), "tracestate", e->tracestate);
    // Retry partition = original partition: its owner reads both.
    auto retry = e->subject + ".retry";
    std::pair<int32_t, int64_t> where{-1, -1};
    if (auto err = producer_->produce(retry, e->key, e->bytes, std::move(hdrs),
                                      e->orig_partition, &where))
      return make_error(errc::unavailable,
                        "kafka: the retry record for "
                          + position_of(e->subject, e->orig_partition,
                                        e->orig_offset)
                          + " was not confirmed by '" + retry
                          + "' (create it with at least as many partitions "
                            "as '"
                          + e->subject + "'): " + render(err));
    bool wake = false;
    {
      std::lock_guard guard{mtx_};
      tp_key rtp{retry, where.first};
      auto& rp = parts_[rtp];
      // Park the key first (unless the reader already read the record and
      // parked it), then settle the delivery: the key never looks free.
      if (!e->key.empty() && where.second >= rp.end
          && !rp.offsets.contains(where.second)) {
        rp.expected.insert(where.second);
        ++parks_[key_of(*e)].count;
      }
      if (!rp.assigned
          && parts_[tp_key{e->subject, e->orig_partition}].assigned)
        reader_add_.insert(rtp);
      if (unacked_.erase(tag) != 0) {
        mark(*e, tag);
        settled_.notify_all();
        wake = release_park(*e);
      }
    }
    record_settled();
    if (wake)
      wake_up();
    return {};
  }

  uint64_t attempt_started(uint64_t tag) noexcept override {
    if (!ledger_)
      return 0;
    try {
      attempt_ledger::position pos;
      {
        std::lock_guard guard{mtx_};
        auto i = unacked_.find(tag);
        if (i == unacked_.end())
          return 0;
        pos = {i->second->topic, i->second->partition, i->second->offset};
      }
      if (auto token
          = slots_ ? slots_->claim(pos.topic, pos.partition, pos.offset) : 0)
        return token;
      // No free slot: count ahead in the ledger, take it back when the run
      // is over.
      if (!ledger_->bump({pos}))
        return 0;
      std::lock_guard guard{fallback_mtx_};
      auto token = fallback_bit | next_fallback_++;
      fallback_.emplace(token, std::move(pos));
      return token;
    } catch (...) {
      return 0;
    }
  }

  void attempt_finished(uint64_t token) noexcept override {
    if (token == 0)
      return;
    if ((token & fallback_bit) == 0) {
      if (slots_)
        slots_->release(token);
      return;
    }
    try {
      attempt_ledger::position pos;
      {
        std::lock_guard guard{fallback_mtx_};
        auto i = fallback_.find(token);
        if (i == fallback_.end())
          return;
        pos = std::move(i->second);
        fallback_.erase(i);
      }
      ledger_->unbump(pos);
    } catch (...) {
      // Counted once too often: errs on the side of stopping a crash loop.
    }
  }

  caf::error publish(const envelope& env) override {
    if (closed_)
      return make_error(errc::invalid_state,
                        "kafka transport: publish after close");
    if (env.topic.empty())
      return make_error(errc::invalid_config,
                        "kafka: cannot publish an envelope without a topic");
    auto hdrs = make_headers();
    add_header(hdrs.get(), "traceparent", env.traceparent);
    add_header(hdrs.get(), "tracestate", env.tracestate);
    return producer_->produce(env.topic, env.key, encode_envelope(env),
                              std::move(hdrs));
  }

  void set_wakeup(std::function<void()> fn) override {
    std::lock_guard guard{mtx_};
    wakeup_ = std::move(fn);
  }

  caf::error close() override {
    if (closed_.exchange(true))
      return {};
    if (ledger_) {
      // Handed out but not settled: the group delivers them again, and this
      // delivery counts (the contract's delivery_count across consumers).
      std::vector<attempt_ledger::position> unsettled;
      {
        std::lock_guard guard{mtx_};
        for (auto& [tag, e] : unacked_) {
          auto& p = parts_[tp_key{e->topic, e->partition}];
          auto* o = p.offsets.find(e->offset);
          if (o != nullptr && o->tag == tag)
            unsettled.push_back({e->topic, e->partition, e->offset});
        }
      }
      if (!unsettled.empty())
        if (auto counted = ledger_->bump(unsettled); !counted)
          spdlog::warn("{}", render(counted.error()));
    }
    if (subscribed_) {
      {
        std::lock_guard guard{mtx_};
        stop_ = true;
        settled_.notify_all();
        room_.notify_all();
      }
      if (consumer_thread_.joinable())
        consumer_thread_.join();
      std::lock_guard guard{mtx_};
      ready_.clear();
      delayed_.clear();
      retry_wait_.clear();
      parks_.clear();
      unacked_.clear();
      wakeup_ = nullptr;
    }
    // The producer lives until the destructor: a handler may still be
    // publishing through this transport while it closes.
    return {};
  }

private:
  struct opaque {
    kafka_transport* self = nullptr;
  };

  caf::error not_ours(const char* what, uint64_t tag) const {
    return make_error(errc::invalid_state,
                      std::string{"kafka transport: "} + what + " of tag "
                        + std::to_string(tag)
                        + " which is not an unsettled delivery of this "
                          "consumer");
  }

  // Records the terminal action of `e` (delivered as `tag`). Requires mtx_.
  void mark(const entry& e, uint64_t tag) {
    if (ledger_)
      done_pending_.push_back({e.topic, e.partition, e.offset});
    auto& p = *e.part;
    auto* o = p.offsets.find(e.offset);
    if (o != nullptr && o->tag == tag)
      *o = offset_info{offset_state::terminal, 0};
    else if (o == nullptr && e.offset >= p.low && p.assigned && p.gen == e.gen)
      p.offsets[e.offset] = offset_info{offset_state::terminal, 0};
  }

  // Writes the settled offsets to the ledger right away: a crash just after
  // an ack must not count the message again when it is replayed.
  void record_settled() {
    if (!ledger_)
      return;
    std::vector<attempt_ledger::position> settled;
    {
      std::lock_guard guard{mtx_};
      settled.swap(done_pending_);
    }
    ledger_->mark_done(settled);
  }

  // -- parked keys (all require mtx_) ----------------------------------------

  // Whether `e` must wait: its key has a record in the retry topic. (The
  // runtime keeps the order of a key's records it holds: when it defers
  // one, it hands the key's successors back as nacks, which land here.)
  bool parked(const entry& e) {
    if (e.key.empty() || parks_.empty() || e.retry)
      return false;
    auto i = parks_.find(key_of(e));
    return i != parks_.end() && i->second.count > 0;
  }

  // Queues `e` behind its key, in fetch order.
  void park_behind(entry_ptr e) {
    ++e->part->parked_n;
    auto& xs = parks_[key_of(*e)].parked;
    auto pos = std::upper_bound(xs.begin(), xs.end(), e->seq,
                                [](uint64_t seq, const entry_ptr& x) {
                                  return seq < x->seq;
                                });
    xs.insert(pos, std::move(e));
  }

  // A queued record: ready, or parked behind its key.
  void route(entry_ptr e) {
    if (parked(*e))
      park_behind(std::move(e));
    else
      ready_.emplace(e->seq, std::move(e));
  }

  // Frees the key of `i` when no retry record holds it; returns whether
  // parked records became ready.
  bool settle_key(std::map<key_id, key_park>::iterator i) {
    if (i->second.count > 0)
      return false;
    auto released = !i->second.parked.empty();
    for (auto& e : i->second.parked) {
      auto& n = e->part->parked_n;
      n = n > 0 ? n - 1 : 0;
      ready_.emplace(e->seq, std::move(e));
    }
    parks_.erase(i);
    return released;
  }

  // One retry record of `k` is settled for good; returns whether its parked
  // records became ready.
  bool unpark(const key_id& k) {
    auto i = parks_.find(k);
    if (i == parks_.end())
      return false;
    if (i->second.count > 0)
      --i->second.count;
    return settle_key(i);
  }

  // `e` is settled: for a retry record, its key's park ends.
  bool release_park(entry& e) {
    if (!e.holds_park)
      return false;
    e.holds_park = false;
    return unpark(key_of(e));
  }

  // Calls the wakeup if the source waits (records became ready outside the
  // consumer thread).
  void wake_up() {
    std::function<void()> wake;
    {
      std::lock_guard guard{mtx_};
      if (waiting_ && !ready_.empty()) {
        waiting_ = false;
        wake = wakeup_;
      }
    }
    if (wake)
      wake();
  }

  // Moves delayed entries whose time came to the ready queue. Requires mtx_.
  void promote_due(clock_type::time_point now) {
    while (!delayed_.empty() && delayed_.begin()->first <= now) {
      auto e = std::move(delayed_.begin()->second);
      delayed_.erase(delayed_.begin());
      ready_.emplace(e->seq, std::move(e));
    }
  }

  // -- the consumer thread ----------------------------------------------------

  static void on_error(rd_kafka_t* rk, int err, const char* reason, void* op) {
    auto* self = static_cast<opaque*>(op)->self;
    error_cb(rk, err, reason, self->health_.get());
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
      char buf[512];
      auto code = rd_kafka_fatal_error(rk, buf, sizeof buf);
      std::lock_guard guard{self->mtx_};
      self->fatal_ = "kafka: fatal consumer error "
                     + std::string{rd_kafka_err2name(code)} + ": " + buf;
    }
  }

  static void on_rebalance(rd_kafka_t* rk, rd_kafka_resp_err_t err,
                           rd_kafka_topic_partition_list_t* parts, void* op) {
    static_cast<opaque*>(op)->self->rebalance(rk, err, parts);
  }

  static void on_commit(rd_kafka_t*, rd_kafka_resp_err_t err,
                        rd_kafka_topic_partition_list_t* offsets, void* op) {
    static_cast<opaque*>(op)->self->committed(err, offsets);
  }

  void committed(rd_kafka_resp_err_t err,
                 rd_kafka_topic_partition_list_t* offsets) {
    if (offsets == nullptr)
      return;
    std::vector<std::tuple<std::string, int32_t, int64_t>> done;
    {
      std::lock_guard guard{mtx_};
      for (int i = 0; i < offsets->cnt; ++i) {
        auto& x = offsets->elems[i];
        auto& p = parts_[tp_key{x.topic, x.partition}];
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR
            || x.err != RD_KAFKA_RESP_ERR_NO_ERROR) {
          // Retried at the next interval while we own the partition.
          if (p.committed == x.offset)
            p.committed = -1;
          continue;
        }
        done.emplace_back(x.topic, x.partition, x.offset);
      }
    }
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR
        && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
      spdlog::debug("kafka: commit failed (retried while the partition is "
                    "ours): {}",
                    rd_kafka_err2str(err));
    if (ledger_)
      for (auto& [t, part, off] : done)
        ledger_->prune(t, part, off);
  }

  // The offsets to commit now: every owned partition whose watermark moved.
  // Requires mtx_.
  tplist_ptr commit_list(const std::set<tp_key>* only = nullptr) {
    tplist_ptr list{rd_kafka_topic_partition_list_new(0)};
    for (auto& [tp, p] : parts_) {
      if (only != nullptr && only->count(tp) == 0)
        continue;
      if (p.fresh || (only == nullptr && !p.assigned))
        continue;
      auto wm = p.watermark();
      // Originals below the watermark are never fetched again here.
      p.deferred.erase(p.deferred.begin(), p.deferred.lower_bound(p.low));
      if (wm < 0 || wm <= p.committed)
        continue;
      p.committed = wm;
      rd_kafka_topic_partition_list_add(list.get(), tp.first.c_str(), tp.second)
        ->offset
        = wm;
    }
    return list;
  }

  void commit(tplist_ptr list, bool sync) {
    if (!list || list->cnt == 0)
      return;
    auto err = rd_kafka_commit(consumer_, list.get(), sync ? 0 : 1);
    if (sync)
      committed(err, list.get());
  }

  // The retry partitions that go with main partitions `tps` (`T.retry`/p for
  // `T`/p, when `T.retry` exists with partition p). Consumer thread.
  std::vector<tp_key> retry_partitions_of(const std::set<tp_key>& tps) {
    std::vector<tp_key> result;
    if (settings_.retry_after == caf::timespan::max() || reader_ == nullptr)
      return result;
    const rd_kafka_metadata_t* md = nullptr;
    if (rd_kafka_metadata(consumer_, 1, nullptr, &md, 2000)
        != RD_KAFKA_RESP_ERR_NO_ERROR) {
      spdlog::warn("kafka: group '{}': cannot list the retry topics; parked "
                   "keys of the assigned partitions are not restored",
                   settings_.group);
      return result;
    }
    metadata_ptr guard{md};
    std::map<std::string, int, std::less<>> retry_topics;
    for (int i = 0; i < md->topic_cnt; ++i)
      if (md->topics[i].err == RD_KAFKA_RESP_ERR_NO_ERROR
          && ends_with(md->topics[i].topic, ".retry"))
        retry_topics.emplace(md->topics[i].topic, md->topics[i].partition_cnt);
    for (auto& [t, part] : tps) {
      auto i = retry_topics.find(t + ".retry");
      if (i != retry_topics.end() && part < i->second)
        result.emplace_back(i->first, part);
    }
    return result;
  }

  void rebalance(rd_kafka_t* rk, rd_kafka_resp_err_t err,
                 rd_kafka_topic_partition_list_t* parts) {
    take_fetched();
    bool cooperative
      = std::strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE") == 0;
    std::set<tp_key> tps;
    for (int i = 0; i < parts->cnt; ++i)
      tps.emplace(parts->elems[i].topic, parts->elems[i].partition);
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
      // Runs a dead process on this host cut short count before anything of
      // these partitions is handed out.
      if (ledger_)
        run_slots::harvest_dead(*ledger_);
      // The retry partitions go with their main partitions: read them up to
      // their current end before main records are handed out, so the keys
      // parked before a crash or a move are parked again.
      auto retry_tps = retry_partitions_of(tps);
      // The group's committed offsets: where fetching starts, and what to
      // re-commit when our own last commit failed (the mock refuses commits
      // during a rebalance). Unknown (no commit yet, or no answer): the first
      // fetched record tells.
      tplist_ptr start{rd_kafka_topic_partition_list_copy(parts)};
      for (auto& [t, part] : retry_tps)
        rd_kafka_topic_partition_list_add(start.get(), t.c_str(), part)->offset
          = RD_KAFKA_OFFSET_INVALID;
      auto known = rd_kafka_committed(rk, start.get(), 2000)
                   == RD_KAFKA_RESP_ERR_NO_ERROR;
      // The retry partitions' ends: what must be read before release.
      std::map<tp_key, std::pair<int64_t, int64_t>> ends; // lo, hi
      for (auto& tp : retry_tps) {
        int64_t lo = 0;
        int64_t hi = 0;
        if (rd_kafka_query_watermark_offsets(reader_, tp.first.c_str(),
                                             tp.second, &lo, &hi, 2000)
            == RD_KAFKA_RESP_ERR_NO_ERROR)
          ends[tp] = {lo, hi};
        else
          ends[tp] = {0, -1}; // unknown: read until the bound
      }
      tplist_ptr reader_list{rd_kafka_topic_partition_list_new(0)};
      {
        std::lock_guard guard{mtx_};
        for (auto& tp : tps) {
          auto& p = parts_[tp];
          p.assigned = true;
          p.fresh = true;
          ++p.gen;
          p.gated = false;
          p.held.clear();
          p.deferred.clear();
          p.parked_n = 0;
          p.parked_paused = false;
        }
        for (auto& tp : retry_tps) {
          auto& p = parts_[tp];
          p.assigned = true;
          p.fresh = true;
          ++p.gen;
          p.expected.clear();
          p.catchup = -1;
        }
        std::map<tp_key, int64_t> committed;
        for (int i = 0; known && i < start->cnt; ++i) {
          auto& x = start->elems[i];
          if (x.err == RD_KAFKA_RESP_ERR_NO_ERROR && x.offset >= 0) {
            auto& p = parts_[tp_key{x.topic, x.partition}];
            p.start_at(x.offset);
            p.committed = x.offset;
            committed[tp_key{x.topic, x.partition}] = x.offset;
          }
        }
        for (auto& tp : retry_tps) {
          auto c = committed.find(tp);
          auto from = c != committed.end() ? c->second : ends[tp].first;
          auto hi = ends[tp].second;
          rd_kafka_topic_partition_list_add(reader_list.get(), tp.first.c_str(),
                                            tp.second)
            ->offset
            = c != committed.end() ? c->second : RD_KAFKA_OFFSET_BEGINNING;
          if (hi < 0 || hi > from) {
            auto& rp = parts_[tp];
            rp.catchup = hi < 0 ? std::numeric_limits<int64_t>::max() : hi;
            auto& mp = parts_[tp_key{tp.first.substr(0, tp.first.size() - 6),
                                     tp.second}];
            mp.gated = true;
            mp.gate_until = clock_type::now() + retry_catchup_bound;
          }
        }
        paused_ = false;
      }
      if (reader_list->cnt > 0)
        if (auto* e = rd_kafka_incremental_assign(reader_, reader_list.get())) {
          spdlog::warn("kafka: cannot read the retry partitions: {}",
                       rd_kafka_error_string(e));
          rd_kafka_error_destroy(e);
        }
      spdlog::info("kafka: group '{}' assigned {} partition(s) to {}{}",
                   settings_.group, tps.size(), rd_kafka_name(rk),
                   retry_tps.empty()
                     ? std::string{}
                     : " (and " + std::to_string(retry_tps.size())
                         + " retry partition(s))");
      if (cooperative) {
        if (auto* e = rd_kafka_incremental_assign(rk, parts))
          rd_kafka_error_destroy(e);
      } else {
        rd_kafka_assign(rk, parts);
      }
      return;
    }
    // Revoked (or lost): stop handing out, let handed-out messages finish
    // within revoke_wait, commit the watermark, forget what was queued. A
    // lost assignment (session timed out, generation fenced) cannot commit:
    // the group has moved on. The retry partitions go with their main ones.
    auto lost = err != RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS
                || rd_kafka_assignment_lost(rk) != 0;
    tplist_ptr list;
    tplist_ptr reader_list{rd_kafka_topic_partition_list_new(0)};
    {
      std::unique_lock lock{mtx_};
      std::set<tp_key> mains = tps;
      for (auto& [t, part] : mains) {
        tp_key rtp{t + ".retry", part};
        auto r = parts_.find(rtp);
        if (r != parts_.end() && r->second.assigned) {
          tps.insert(rtp);
          rd_kafka_topic_partition_list_add(reader_list.get(),
                                            rtp.first.c_str(), part);
        }
        reader_add_.erase(rtp);
      }
      for (auto& tp : tps) {
        auto& p = parts_[tp];
        p.assigned = false;
        std::vector<int64_t> queued;
        p.offsets.for_each([&](int64_t off, const offset_info& info) {
          if (info.state == offset_state::queued)
            queued.push_back(off);
        });
        for (auto off : queued)
          p.forget(off);
        p.gated = false;
        p.held.clear();
        p.deferred.clear();
        p.expected.clear();
        p.catchup = -1;
      }
      drop_queued(tps, mains);
      auto in_flight = [&] {
        for (auto& [tag, e] : unacked_)
          if (tps.count(tp_key{e->topic, e->partition}) != 0) {
            auto& p = parts_[tp_key{e->topic, e->partition}];
            if (p.gen == e->gen)
              return true;
          }
        return false;
      };
      if (!stop_ && !lost)
        settled_.wait_for(lock, settings_.revoke_wait,
                          [&] { return stop_ || !in_flight(); });
      if (!lost)
        list = commit_list(&tps);
    }
    // The mock cluster (and a real one mid-rebalance) may refuse this commit;
    // the new owner then starts from the last accepted watermark.
    commit(std::move(list), true);
    if (reader_ != nullptr && reader_list->cnt > 0)
      if (auto* e = rd_kafka_incremental_unassign(reader_, reader_list.get()))
        rd_kafka_error_destroy(e);
    spdlog::info("kafka: group '{}' {} {} partition(s) of {}", settings_.group,
                 lost ? "lost" : "revoked", tps.size(), rd_kafka_name(rk));
    if (cooperative) {
      if (auto* e = rd_kafka_incremental_unassign(rk, parts))
        rd_kafka_error_destroy(e);
    } else {
      rd_kafka_assign(rk, nullptr);
    }
  }

  // Forgets queued, delayed, due-later and parked entries of `tps`, and the
  // parked keys of main partitions `mains`. Requires mtx_.
  void drop_queued(const std::set<tp_key>& tps, const std::set<tp_key>& mains) {
    auto gone = [&](const entry_ptr& e) {
      return tps.count(tp_key{e->topic, e->partition}) != 0;
    };
    for (auto i = ready_.begin(); i != ready_.end();)
      i = gone(i->second) ? ready_.erase(i) : std::next(i);
    for (auto i = delayed_.begin(); i != delayed_.end();)
      i = gone(i->second) ? delayed_.erase(i) : std::next(i);
    for (auto i = retry_wait_.begin(); i != retry_wait_.end();)
      i = gone(i->second) ? retry_wait_.erase(i) : std::next(i);
    for (auto i = parks_.begin(); i != parks_.end();) {
      auto& [t, part, key] = i->first;
      i = mains.count(tp_key{t, part}) != 0 ? parks_.erase(i) : std::next(i);
    }
    for (auto& tp : mains)
      parts_[tp].parked_n = 0;
  }

  // Offset bookkeeping of a fetched record at `off` of `p`: whether it is new
  // here (to be queued). Requires mtx_.
  bool admit(partition_state& p, int64_t off) {
    if (p.fresh)
      p.start_at(off); // the group committed everything below it
    if (off < p.low)
      return false; // terminal here: a replay after a failed commit
    if (auto* i = p.offsets.find(off); i != nullptr) {
      p.end = std::max(p.end, off + 1);
      if (i->state == offset_state::out) {
        // Still being handled from before the rebalance: adopt it.
        if (auto u = unacked_.find(i->tag); u != unacked_.end())
          u->second->gen = p.gen;
      }
      return false;
    }
    if (off < p.end)
      return false; // terminal here
    p.end = off + 1;
    return true;
  }

  // An entry for fetched record `m`: a recycled one (its strings keep their
  // capacity, so a steady stream allocates nothing here) or a new one.
  // Requires mtx_.
  entry_ptr make_entry(const rd_kafka_message_t* m, const std::string& topic,
                       partition_state& p, rd_kafka_headers_t** hdrs) {
    entry_ptr e;
    if (!spare_.empty()) {
      e = std::move(spare_.back());
      spare_.pop_back();
    } else {
      e = std::make_shared<entry>();
    }
    e->topic = topic;
    e->partition = m->partition;
    e->offset = m->offset;
    e->subject = topic;
    e->orig_partition = m->partition;
    e->orig_offset = m->offset;
    if (m->payload != nullptr)
      e->bytes.assign(static_cast<const char*>(m->payload), m->len);
    else
      e->bytes.clear();
    if (m->key != nullptr)
      e->key.assign(static_cast<const char*>(m->key), m->key_len);
    else
      e->key.clear();
    if (rd_kafka_message_headers(m, hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR)
      *hdrs = nullptr;
    header_into(*hdrs, "traceparent", e->traceparent);
    header_into(*hdrs, "tracestate", e->tracestate);
    e->deliveries = 0;
    e->counted = 0;
    e->attempts = 0;
    e->seq = next_seq_++;
    e->gen = p.gen;
    e->part = &p;
    e->retry = false;
    e->holds_park = false;
    e->dead_lettered = false;
    return e;
  }

  // Keeps a settled entry nobody else refers to for make_entry (bounded).
  // Requires mtx_.
  void recycle(entry_ptr e) {
    if (e && e.use_count() == 1 && spare_.size() < spare_limit)
      spare_.push_back(std::move(e));
  }

  // Takes one fetched record of a main topic. Requires mtx_.
  void take(const rd_kafka_message_t* m, std::pair<uint32_t, bool> counted) {
    auto topic = std::string{rd_kafka_topic_name(m->rkt)};
    auto& p = parts_[tp_key{topic, m->partition}];
    if (!p.assigned || !admit(p, m->offset))
      return;
    auto off = m->offset;
    if (counted.second || p.deferred.count(off) != 0) {
      // Settled before a crash or rebalance, not yet committed (the ledger
      // remembers it), or in the retry topic now (its retry record says so).
      p.offsets[off] = offset_info{offset_state::terminal, 0};
      return;
    }
    rd_kafka_headers_t* hdrs = nullptr;
    auto e = make_entry(m, topic, p, &hdrs);
    e->counted = counted.first;
    p.offsets[off] = offset_info{offset_state::queued, 0};
    if (p.gated)
      p.held.push_back(std::move(e));
    else
      route(std::move(e));
  }

  // Takes one record of a retry partition: it parks its key and waits until
  // due. Requires mtx_.
  void take_retry(const rd_kafka_message_t* m,
                  std::pair<uint32_t, bool> counted) {
    auto topic = std::string{rd_kafka_topic_name(m->rkt)};
    tp_key rtp{topic, m->partition};
    auto& rp = parts_[rtp];
    if (!rp.assigned || !admit(rp, m->offset))
      return;
    auto off = m->offset;
    rd_kafka_headers_t* hdrs = nullptr;
    auto e = make_entry(m, topic, rp, &hdrs);
    e->retry = true;
    e->counted = counted.first;
    e->subject = header_of(hdrs, retry_topic_header);
    e->orig_partition = static_cast<int32_t>(
      parse_int(header_of(hdrs, retry_partition_header), -1));
    e->orig_offset = parse_int(header_of(hdrs, retry_offset_header), -1);
    e->attempts = static_cast<uint32_t>(std::max<int64_t>(
      parse_int(header_of(hdrs, retry_attempts_header), 0), 0));
    auto due_ms = parse_int(header_of(hdrs, retry_due_header), 0);
    auto counted_here = rp.expected.erase(off) != 0;
    if (e->subject.empty() || e->orig_partition < 0 || e->orig_offset < 0) {
      spdlog::warn("kafka: {} is not an evmesh retry record (no {} headers); "
                   "skipped",
                   position_of(rtp.first, rtp.second, off), retry_topic_header);
      rp.offsets[off] = offset_info{offset_state::terminal, 0};
      if (counted_here)
        unpark(key_of(*e));
      return;
    }
    auto& mp = parts_[tp_key{e->subject, e->orig_partition}];
    mp.deferred.insert(e->orig_offset);
    if (counted.second) {
      // Settled for good before a crash: its key is free.
      rp.offsets[off] = offset_info{offset_state::terminal, 0};
      if (counted_here)
        unpark(key_of(*e));
      return;
    }
    // A crash between producing a retry record and settling the one it
    // replaces leaves both: the newer one wins.
    for (auto i = retry_wait_.begin(); i != retry_wait_.end(); ++i) {
      auto& x = *i->second;
      if (x.subject == e->subject && x.orig_partition == e->orig_partition
          && x.orig_offset == e->orig_offset) {
        auto& xp = parts_[tp_key{x.topic, x.partition}];
        xp.offsets[x.offset] = offset_info{offset_state::terminal, 0};
        release_park(x);
        retry_wait_.erase(i);
        break;
      }
    }
    if (!e->key.empty()) {
      e->holds_park = true;
      if (!counted_here)
        ++parks_[key_of(*e)].count;
    }
    rp.offsets[off] = offset_info{offset_state::queued, 0};
    auto wall_now = std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count();
    auto due
      = now_()
        + std::chrono::milliseconds{std::max<int64_t>(due_ms - wall_now, 0)};
    retry_wait_.emplace(due, std::move(e));
  }

  // Releases main partitions whose retry partition was read far enough (or
  // waited too long), and moves due retry records to the ready queue.
  // Requires mtx_.
  void advance_retries() {
    auto now = now_();
    while (!retry_wait_.empty() && retry_wait_.begin()->first <= now) {
      auto e = std::move(retry_wait_.begin()->second);
      retry_wait_.erase(retry_wait_.begin());
      ready_.emplace(e->seq, std::move(e));
    }
    for (auto& [rtp, rp] : parts_) {
      if (rp.catchup < 0)
        continue;
      auto& mp
        = parts_[tp_key{rtp.first.substr(0, rtp.first.size() - 6), rtp.second}];
      auto timed_out = clock_type::now() >= mp.gate_until;
      if (rp.end < rp.catchup && !timed_out && rp.assigned)
        continue;
      if (timed_out && rp.end < rp.catchup)
        spdlog::warn("kafka: {}/{} was not read within {}: releasing {}/{} "
                     "without knowing all of its parked keys",
                     rtp.first, rtp.second,
                     format_duration(retry_catchup_bound),
                     rtp.first.substr(0, rtp.first.size() - 6), rtp.second);
      rp.catchup = -1;
      mp.gated = false;
      auto held = std::move(mp.held);
      mp.held.clear();
      for (auto& e : held) {
        if (mp.deferred.count(e->offset) != 0) {
          // Fetched before its retry record was read: settled by it.
          mp.offsets[e->offset] = offset_info{offset_state::terminal, 0};
          continue;
        }
        route(std::move(e));
      }
    }
  }

  // The topics to consume now (plain names and discovered pattern matches).
  std::vector<std::string> wanted_topics() {
    std::set<std::string> result(settings_.topics.begin(),
                                 settings_.topics.end());
    if (!patterns_.empty()) {
      const rd_kafka_metadata_t* md = nullptr;
      auto err = rd_kafka_metadata(consumer_, 1, nullptr, &md, 2000);
      if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        spdlog::debug("kafka: topic discovery failed: {}",
                      rd_kafka_err2str(err));
        return current_topics_; // keep what we have
      }
      metadata_ptr guard{md};
      health_->connected = true;
      for (int i = 0; i < md->topic_cnt; ++i) {
        std::string_view t = md->topics[i].topic;
        if (md->topics[i].err != RD_KAFKA_RESP_ERR_NO_ERROR
            || excluded_topic(t))
          continue;
        for (auto& x : patterns_)
          if (pattern_matches(x, t)) {
            result.emplace(t);
            break;
          }
      }
    }
    return {result.begin(), result.end()};
  }

  void resubscribe(const std::vector<std::string>& topics) {
    if (topics == current_topics_ || topics.empty())
      return;
    tplist_ptr list{
      rd_kafka_topic_partition_list_new(static_cast<int>(topics.size()))};
    for (auto& t : topics)
      rd_kafka_topic_partition_list_add(list.get(), t.c_str(),
                                        RD_KAFKA_PARTITION_UA);
    if (auto err = rd_kafka_subscribe(consumer_, list.get())) {
      spdlog::warn("kafka: cannot subscribe group '{}' to {} topic(s): {}",
                   settings_.group, topics.size(), rd_kafka_err2str(err));
      return;
    }
    spdlog::info("kafka: group '{}' consumes {} topic(s) on {}",
                 settings_.group, topics.size(), settings_.shown);
    current_topics_ = topics;
  }

  // Flow control. The consumer thread takes records from librdkafka's
  // prefetch queue until `max_buffered` wait in `ready_`, then stops taking
  // them (librdkafka stops fetching once its own queue is full,
  // queued.max.messages.kbytes) and goes on when half of them went out. While
  // full it still polls every `group_poll_interval` to serve group events;
  // only if that piles up 2 x max_buffered records is the assignment paused
  // (a pause drops librdkafka's prefetched records: they are fetched again
  // after the resume, at half of max_buffered). A partition whose records
  // parked behind their keys reach max_buffered is paused until they drop
  // below half.
  void flow_control() {
    bool pause = false;
    bool resume = false;
    tplist_ptr stop{rd_kafka_topic_partition_list_new(0)};
    tplist_ptr go{rd_kafka_topic_partition_list_new(0)};
    {
      std::lock_guard guard{mtx_};
      auto n = ready_.size();
      auto low = settings_.max_buffered / 2;
      if (n >= settings_.max_buffered)
        full_ = true;
      else if (n <= low)
        full_ = false;
      if (!paused_ && n >= 2 * settings_.max_buffered) {
        pause = true;
        paused_ = true;
      } else if (paused_ && n <= low) {
        resume = true;
        paused_ = false;
      }
      for (auto& [tp, p] : parts_) {
        if (!p.assigned)
          continue;
        if (!p.parked_paused && p.parked_n >= settings_.max_buffered) {
          p.parked_paused = true;
          rd_kafka_topic_partition_list_add(stop.get(), tp.first.c_str(),
                                            tp.second);
        } else if (p.parked_paused && p.parked_n < settings_.max_buffered / 2) {
          p.parked_paused = false;
          if (!paused_ && !resume)
            rd_kafka_topic_partition_list_add(go.get(), tp.first.c_str(),
                                              tp.second);
        }
      }
    }
    if (stop->cnt > 0)
      rd_kafka_pause_partitions(consumer_, stop.get());
    if (go->cnt > 0)
      rd_kafka_resume_partitions(consumer_, go.get());
    if (!pause && !resume)
      return;
    rd_kafka_topic_partition_list_t* raw = nullptr;
    if (rd_kafka_assignment(consumer_, &raw) != RD_KAFKA_RESP_ERR_NO_ERROR)
      return;
    tplist_ptr assignment{raw};
    if (pause) {
      rd_kafka_pause_partitions(consumer_, assignment.get());
      return;
    }
    // Resume all but the partitions held back by their parked records.
    tplist_ptr list{rd_kafka_topic_partition_list_new(0)};
    {
      std::lock_guard guard{mtx_};
      for (int i = 0; i < assignment->cnt; ++i) {
        auto& x = assignment->elems[i];
        auto p = parts_.find(tp_key{x.topic, x.partition});
        if (p == parts_.end() || !p->second.parked_paused)
          rd_kafka_topic_partition_list_add(list.get(), x.topic, x.partition);
      }
    }
    rd_kafka_resume_partitions(consumer_, list.get());
  }

  void wake_if_waiting() {
    std::function<void()> wake;
    {
      std::lock_guard guard{mtx_};
      if (waiting_ && (!ready_.empty() || due_now())) {
        waiting_ = false;
        wake = wakeup_;
      }
    }
    if (wake)
      wake();
  }

  // Whether the consumer thread may take records from librdkafka: false
  // while max_buffered records wait and the source has not taken half of
  // them by `until`.
  bool wait_for_room(clock_type::time_point until) {
    std::unique_lock lock{mtx_};
    if (!full_ || paused_)
      return true;
    room_.wait_until(lock, until, [&] { return stop_ || !full_; });
    return !full_;
  }

  // How long the consumer may block in librdkafka: at most 50 ms, less when
  // a delayed nack or a retry record falls due sooner (the wakeup for it is
  // sent after the fetch).
  int fetch_timeout_ms() {
    std::lock_guard guard{mtx_};
    auto next = clock_type::time_point::max();
    if (!delayed_.empty())
      next = delayed_.begin()->first;
    if (!retry_wait_.empty())
      next = std::min(next, retry_wait_.begin()->first);
    if (next == clock_type::time_point::max())
      return 50;
    auto now = now_();
    if (next <= now)
      return 0;
    auto ms = std::chrono::ceil<std::chrono::milliseconds>(next - now).count();
    return static_cast<int>(std::clamp<int64_t>(ms, 0, 50));
  }

  // Requires mtx_.
  bool due_now() {
    return !delayed_.empty() && delayed_.begin()->first <= now_();
  }

  // Takes what `rk` fetched (at most `limit` records), under one lock per
  // batch. Returns how many records it took.
  size_t fetch(rd_kafka_t* rk, int timeout_ms, bool retry, size_t limit) {
    fetched_retry_ = retry;
    size_t n = 0;
    for (auto* m = rd_kafka_consumer_poll(rk, timeout_ms); m != nullptr;
         m = n < limit ? rd_kafka_consumer_poll(rk, 0) : nullptr) {
      // (A rebalance callback served by that poll took the records
      // collected before it first: take_fetched.)
      if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
          spdlog::warn("kafka: group '{}': {}", settings_.group,
                       rd_kafka_message_errstr(m));
        rd_kafka_message_destroy(m);
        continue;
      }
      fetched_.push_back(m);
      ++n;
    }
    take_fetched();
    return n;
  }

  // Takes the records `fetch` collected. Consumer thread; also called at the
  // start of a rebalance callback, so records fetched before the rebalance
  // are taken before it changes the assignment.
  void take_fetched() {
    if (fetched_.empty())
      return;
    health_->connected = true;
    fetched_counts_.assign(fetched_.size(),
                           std::pair<uint32_t, bool>{0, false});
    if (ledger_)
      for (size_t i = 0; i < fetched_.size(); ++i)
        fetched_counts_[i]
          = ledger_->lookup(rd_kafka_topic_name(fetched_[i]->rkt),
                            fetched_[i]->partition, fetched_[i]->offset);
    {
      std::lock_guard guard{mtx_};
      for (size_t i = 0; i < fetched_.size(); ++i) {
        if (fetched_retry_)
          take_retry(fetched_[i], fetched_counts_[i]);
        else
          take(fetched_[i], fetched_counts_[i]);
      }
    }
    for (auto* m : fetched_)
      rd_kafka_message_destroy(m);
    fetched_.clear();
  }

  // Retry partitions that came into being (or were unknown) after their main
  // partition was assigned: read them from the group's committed offset, or
  // from the start.
  void add_retry_partitions() {
    std::set<tp_key> add;
    {
      std::lock_guard guard{mtx_};
      add.swap(reader_add_);
    }
    if (add.empty())
      return;
    tplist_ptr list{rd_kafka_topic_partition_list_new(0)};
    for (auto& [t, part] : add)
      rd_kafka_topic_partition_list_add(list.get(), t.c_str(), part)->offset
        = RD_KAFKA_OFFSET_INVALID;
    auto known = rd_kafka_committed(consumer_, list.get(), 2000)
                 == RD_KAFKA_RESP_ERR_NO_ERROR;
    {
      std::lock_guard guard{mtx_};
      for (int i = 0; i < list->cnt; ++i) {
        auto& x = list->elems[i];
        auto& p = parts_[tp_key{x.topic, x.partition}];
        auto& mp = parts_[tp_key{
          std::string{x.topic}.substr(0, std::strlen(x.topic) - 6),
          x.partition}];
        if (!mp.assigned || p.assigned) {
          x.offset = RD_KAFKA_OFFSET_INVALID; // moved on meanwhile
          continue;
        }
        p.assigned = true;
        p.fresh = true;
        ++p.gen;
        if (known && x.err == RD_KAFKA_RESP_ERR_NO_ERROR && x.offset >= 0) {
          p.start_at(x.offset);
          p.committed = x.offset;
        } else {
          x.offset = RD_KAFKA_OFFSET_BEGINNING;
        }
      }
    }
    tplist_ptr assign{rd_kafka_topic_partition_list_new(0)};
    for (int i = 0; i < list->cnt; ++i)
      if (list->elems[i].offset != RD_KAFKA_OFFSET_INVALID)
        rd_kafka_topic_partition_list_add(assign.get(), list->elems[i].topic,
                                          list->elems[i].partition)
          ->offset
          = list->elems[i].offset;
    if (assign->cnt > 0)
      if (auto* e = rd_kafka_incremental_assign(reader_, assign.get())) {
        spdlog::warn("kafka: cannot read the retry partitions: {}",
                     rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
      }
  }

  void consume_loop() {
    auto next_discovery = clock_type::now();
    auto next_commit = clock_type::now();
    auto next_probe = clock_type::now();
    auto next_group_poll = clock_type::now();
    for (;;) {
      {
        std::lock_guard guard{mtx_};
        if (stop_)
          break;
      }
      auto now = clock_type::now();
      if (now >= next_discovery) {
        resubscribe(wanted_topics());
        next_discovery = now + (patterns_.empty() ? 24h : settings_.discover);
      }
      if (now >= next_commit) {
        tplist_ptr list;
        std::vector<attempt_ledger::position> settled;
        {
          std::lock_guard guard{mtx_};
          list = commit_list();
          settled.swap(done_pending_);
        }
        if (ledger_)
          ledger_->mark_done(settled);
        commit(std::move(list), false);
        next_commit = now + settings_.commit_interval;
      }
      flow_control();
      if (wait_for_room(std::min(next_commit, next_group_poll))
          || clock_type::now() >= next_group_poll) {
        fetch(consumer_, fetch_timeout_ms(), false, 500);
        next_group_poll = clock_type::now() + group_poll_interval;
      }
      if (reader_ != nullptr) {
        fetch(reader_, 0, true, 500);
        add_retry_partitions();
        std::lock_guard guard{mtx_};
        advance_retries();
      }
      wake_if_waiting();
      if (!health_->connected && now >= next_probe) {
        // Idle while reconnecting: a cheap metadata request tells when the
        // brokers are back.
        const rd_kafka_metadata_t* md = nullptr;
        if (rd_kafka_metadata(consumer_, 0, nullptr, &md, 500)
            == RD_KAFKA_RESP_ERR_NO_ERROR)
          health_->connected = true;
        if (md != nullptr)
          rd_kafka_metadata_destroy(md);
        next_probe = now + 1s;
      }
    }
    // Final commit of what is terminal; unsettled messages stay uncommitted
    // and go to the group's next owner.
    tplist_ptr list;
    std::vector<attempt_ledger::position> settled;
    {
      std::lock_guard guard{mtx_};
      list = commit_list();
      settled.swap(done_pending_);
    }
    if (ledger_)
      ledger_->mark_done(settled);
    commit(std::move(list), true);
    // The group consumer first: its revoke callback still uses the reader.
    rd_kafka_consumer_close(consumer_);
    rd_kafka_destroy(consumer_);
    consumer_ = nullptr;
    if (reader_ != nullptr) {
      rd_kafka_consumer_close(reader_);
      rd_kafka_destroy(reader_);
      reader_ = nullptr;
    }
  }

  kafka_settings settings_;
  std::string node_;
  std::function<clock_type::time_point()> now_;
  std::unique_ptr<health> health_;
  std::unique_ptr<producer> producer_;
  std::unique_ptr<attempt_ledger> ledger_;
  std::unique_ptr<run_slots> slots_;
  std::mutex fallback_mtx_; // guards the two below
  std::unordered_map<uint64_t, attempt_ledger::position> fallback_;
  uint64_t next_fallback_ = 1;
  opaque opaque_;
  rd_kafka_t* consumer_ = nullptr;
  rd_kafka_t* reader_ = nullptr; // the retry partitions
  std::thread consumer_thread_;
  // Consumer thread: records `fetch` collected and not yet taken.
  std::vector<rd_kafka_message_t*> fetched_;
  std::vector<std::pair<uint32_t, bool>> fetched_counts_;
  bool fetched_retry_ = false;
  std::vector<std::string> patterns_;
  std::vector<std::string> current_topics_; // consumer thread only
  bool subscribed_ = false;
  std::atomic<bool> closed_{false};

  std::mutex mtx_; // guards everything below
  std::condition_variable settled_;
  std::map<tp_key, partition_state> parts_;
  // Nodes of ready_ and unacked_ (one each per record handed out): a pool
  // under mtx_, so the consumer thread and the source's worker threads stop
  // passing a malloc'd node each per record between them. Chunks of at most
  // 256 nodes. Declared before both maps: it outlives them.
  std::pmr::unsynchronized_pool_resource nodes_{std::pmr::pool_options{256, 0}};
  std::pmr::map<uint64_t, entry_ptr> ready_{&nodes_}; // by fetch order
  std::multimap<clock_type::time_point, entry_ptr> delayed_;
  // Retry records waiting until due, and the keys they park.
  std::multimap<clock_type::time_point, entry_ptr> retry_wait_;
  std::map<key_id, key_park> parks_;
  std::set<tp_key> reader_add_; // retry partitions to start reading
  std::pmr::unordered_map<uint64_t, entry_ptr> unacked_{&nodes_};
  // Settled entries for make_entry to reuse.
  std::vector<entry_ptr> spare_;
  // With a ledger: settled offsets not yet recorded in it.
  std::vector<attempt_ledger::position> done_pending_;
  uint64_t next_seq_ = 1;
  bool waiting_ = false;
  bool paused_ = false;
  // The consumer thread stopped taking records at max_buffered; `poll`
  // clears it (and notifies `room_`) when half of them went out.
  bool full_ = false;
  std::condition_variable room_;
  bool stop_ = false;
  std::string fatal_;
  std::function<void()> wakeup_;
};

struct opened {
  kafka_settings settings;
  std::unique_ptr<health> h;
  std::unique_ptr<producer> p;
};

// Validated settings and a producer that reached the bootstrap servers.
caf::expected<opened> open(std::string_view url, const std::string& node) {
  auto settings = parse_kafka_url(url);
  if (!settings)
    return settings.error();
  auto h = std::make_unique<health>();
  auto p = producer::make(*settings, "evmesh-" + node, h.get());
  if (!p)
    return p.error();
  // A bounded metadata request: unreachable servers fail here, clearly.
  const rd_kafka_metadata_t* md = nullptr;
  auto err
    = rd_kafka_metadata((*p)->handle(), 0, nullptr, &md,
                        static_cast<int>(to_ms(settings->connect_timeout)));
  metadata_ptr guard{md};
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
    return make_error(errc::unavailable,
                      "cannot reach the Kafka bootstrap servers "
                        + settings->shown + " within "
                        + format_duration(settings->connect_timeout) + ": "
                        + rd_kafka_err2str(err)
                        + " — is a broker running there? (check the "
                          "host:port list, security.protocol and "
                          "connect_timeout=)");
  return opened{std::move(*settings), std::move(h), std::move(*p)};
}

// -- dead-letter topics as a store ---------------------------------------------

// Header of a marker record: the offset (in the same partition) of the dead
// letter it settles (replayed or purged). Markers have an empty value.
constexpr const char* dlq_done_header = "evmesh-dlq-done";

// A dead letter no marker names, with where it lives.
struct dlq_entry {
  std::string topic;
  int32_t partition = 0;
  int64_t offset = 0;
  int64_t timestamp = 0;
  dead_letter_record rec;
};

using dlq_parts = std::vector<std::pair<std::string, int32_t>>;

// The partitions of the `.dlq` topics `wanted` selects (only topics that
// exist).
template <class Pred>
caf::expected<dlq_parts> dlq_partitions(const opened& o, Pred wanted) {
  auto md = fetch_metadata(o.p->handle(), o.settings,
                           o.settings.connect_timeout);
  if (!md)
    return md.error();
  dlq_parts parts;
  for (int i = 0; i < (*md)->topic_cnt; ++i) {
    auto& t = (*md)->topics[i];
    std::string_view name = t.topic;
    if (t.err != RD_KAFKA_RESP_ERR_NO_ERROR || !ends_with(name, ".dlq")
        || !wanted(name))
      continue;
    for (int j = 0; j < t.partition_cnt; ++j)
      parts.emplace_back(t.topic, t.partitions[j].id);
  }
  return parts;
}

// Reads `parts` from their low to their high watermark with a group-less
// consumer (bounded in time) and returns the dead letters no marker names,
// by partition, oldest first.
caf::expected<std::vector<dlq_entry>> read_dlq(const kafka_settings& s,
                                               const dlq_parts& parts) {
  std::vector<dlq_entry> result;
  if (parts.empty())
    return result;
  auto reader = s;
  reader.group = "evmesh-dlq-reader";
  auto h = std::make_unique<health>();
  auto conf = make_conf(reader, true, "evmesh-dlq-reader", h.get());
  if (!conf)
    return conf.error();
  char errstr[512];
  auto* rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf->get(), errstr,
                          sizeof errstr);
  if (rk == nullptr)
    return make_error(errc::invalid_config,
                      std::string{"kafka: cannot create the DLQ reader: "}
                        + errstr);
  static_cast<void>(conf->release());
  std::unique_ptr<rd_kafka_t, void (*)(rd_kafka_t*)> guard{rk,
                                                           rd_kafka_destroy};
  tplist_ptr list{rd_kafka_topic_partition_list_new(0)};
  std::map<tp_key, int64_t> remaining; // partition -> high watermark
  auto deadline = clock_type::now() + s.connect_timeout + 10s;
  for (auto& [t, part] : parts) {
    int64_t lo = 0;
    int64_t hi = 0;
    auto err = rd_kafka_query_watermark_offsets(
      rk, t.c_str(), part, &lo, &hi,
      static_cast<int>(to_ms(s.connect_timeout)));
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
      return make_error(errc::unavailable, "kafka: cannot read the offsets of "
                                             + t + "/" + std::to_string(part)
                                             + ": " + rd_kafka_err2str(err));
    if (hi <= lo)
      continue;
    rd_kafka_topic_partition_list_add(list.get(), t.c_str(), part)->offset = lo;
    remaining.emplace(tp_key{t, part}, hi);
  }
  if (remaining.empty())
    return result;
  std::map<tp_key, std::vector<dlq_entry>> by_part;
  std::map<tp_key, std::set<int64_t>> done;
  rd_kafka_poll_set_consumer(rk);
  if (auto err = rd_kafka_assign(rk, list.get()))
    return make_error(errc::io_error,
                      std::string{"kafka: cannot read the DLQ: "}
                        + rd_kafka_err2str(err));
  while (!remaining.empty() && clock_type::now() < deadline) {
    auto* m = rd_kafka_consumer_poll(rk, 100);
    if (m == nullptr)
      continue;
    std::unique_ptr<rd_kafka_message_t, void (*)(rd_kafka_message_t*)> msg{
      m, rd_kafka_message_destroy};
    if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR)
      continue;
    tp_key tp{rd_kafka_topic_name(m->rkt), m->partition};
    auto r = remaining.find(tp);
    if (r == remaining.end())
      continue;
    if (m->offset + 1 >= r->second)
      remaining.erase(r);
    rd_kafka_headers_t* hdrs = nullptr;
    if (rd_kafka_message_headers(m, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR)
      hdrs = nullptr;
    if (auto named = header_of(hdrs, dlq_done_header); !named.empty()) {
      int64_t offset = -1;
      auto end = named.data() + named.size();
      if (auto [ptr, ec] = std::from_chars(named.data(), end, offset);
          ec == std::errc{} && ptr == end)
        done[tp].insert(offset);
      continue; // a marker (one naming no offset settles nothing)
    }
    std::string_view body{static_cast<const char*>(m->payload), m->len};
    auto rec = dead_letter_from_json(body);
    if (!rec)
      return make_error(errc::decode_error,
                        "kafka: " + position_of(tp.first, tp.second, m->offset)
                          + " is not a dead-letter record: "
                          + render(rec.error()));
    by_part[tp].push_back(dlq_entry{tp.first, tp.second, m->offset,
                                    rd_kafka_message_timestamp(m, nullptr),
                                    std::move(*rec)});
  }
  rd_kafka_consumer_close(rk);
  if (!remaining.empty())
    return make_error(errc::unavailable, "kafka: reading the DLQ topics of "
                                           + s.shown
                                           + " did not finish in time");
  for (auto& [tp, entries] : by_part) {
    auto& named = done[tp];
    for (auto& e : entries)
      if (named.count(e.offset) == 0)
        result.push_back(std::move(e));
  }
  return result;
}

// Record ids: (i << 56) | (partition << 40) | offset, where i is the
// position of the record's topic in `topics=` (0 for the first).
constexpr int64_t id_offset_bits = 40;
constexpr int64_t id_topic_shift = 56;

caf::expected<int64_t> make_dlq_id(size_t topic_index, int32_t partition,
                                   int64_t offset) {
  if (topic_index >= 127 || partition < 0 || partition >= (1 << 16)
      || offset < 0 || offset >= (int64_t{1} << id_offset_bits))
    return make_error(errc::invalid_config,
                      "kafka: a dead letter at partition "
                        + std::to_string(partition) + ", offset "
                        + std::to_string(offset)
                        + " has no record id (ids hold at most 127 topics, "
                          "65536 partitions and 2^40 offsets)");
  return (static_cast<int64_t>(topic_index) << id_topic_shift)
         | (static_cast<int64_t>(partition) << id_offset_bits) | offset;
}

// The `.dlq` topics of a URL's `topics=` as a `dead_letter_store`. Kafka
// cannot delete one record, so `remove` and `mark_replayed` produce a marker
// record (empty value, header `evmesh-dlq-done: OFFSET`) into the same
// partition; readers skip markers and the records they name.
class kafka_dead_letter_store : public dead_letter_store {
public:
  explicit kafka_dead_letter_store(opened o) : o_(std::move(o)) {
    for (auto& t : o_.settings.topics)
      dlqs_.push_back(t + ".dlq");
  }

  caf::expected<int64_t> write(const dead_letter_record& rec) override {
    auto dlq = rec.topic + ".dlq";
    auto idx = index_of(dlq);
    if (!idx)
      return make_error(errc::invalid_config,
                        "kafka: cannot write a dead letter of topic '"
                          + rec.topic + "': it is not in topics= of "
                          + o_.settings.shown);
    auto hdrs = make_headers();
    add_header(hdrs.get(), "evmesh-original-topic", rec.topic);
    add_header(hdrs.get(), "evmesh-category", rec.category);
    add_header(hdrs.get(), "evmesh-attempts", std::to_string(rec.attempts));
    add_header(hdrs.get(), "traceparent", rec.traceparent);
    std::pair<int32_t, int64_t> where{-1, -1};
    if (auto err = o_.p->produce(dlq, rec.key, to_json(rec), std::move(hdrs),
                                 RD_KAFKA_PARTITION_UA, &where))
      return make_error(errc::unavailable,
                        "kafka: writing a dead letter to '" + dlq
                          + "' was not confirmed: " + render(err));
    return make_dlq_id(*idx, where.first, where.second);
  }

  caf::expected<std::vector<dead_letter_record>>
  list(const dead_letter_query& q) override {
    auto parts = dlq_partitions(o_, [this](std::string_view name) {
      return index_of(name).has_value();
    });
    if (!parts)
      return parts.error();
    auto entries = read_dlq(o_.settings, *parts);
    if (!entries)
      return entries.error();
    std::vector<std::pair<int64_t, dead_letter_record>> found;
    for (auto& e : *entries) {
      if (!matches(q, e.rec))
        continue;
      auto id = make_dlq_id(*index_of(e.topic), e.partition, e.offset);
      if (!id)
        return id.error();
      e.rec.id = *id;
      found.emplace_back(e.timestamp, std::move(e.rec));
    }
    // Newest first: broker timestamps, then ids.
    std::sort(found.begin(), found.end(), [](auto& x, auto& y) {
      return std::tie(x.first, x.second.id) > std::tie(y.first, y.second.id);
    });
    std::vector<dead_letter_record> result;
    for (auto& f : found) {
      if (q.limit != 0 && result.size() >= q.limit)
        break;
      result.push_back(std::move(f.second));
    }
    return result;
  }

  caf::expected<dead_letter_record> get(int64_t id) override {
    auto where = locate(id);
    if (!where)
      return where.error();
    auto entries = read_dlq(o_.settings, {{where->topic, where->partition}});
    if (!entries)
      return entries.error();
    for (auto& e : *entries)
      if (e.offset == where->offset) {
        e.rec.id = id;
        return std::move(e.rec);
      }
    return not_found(id, *where);
  }

  caf::error mark_replayed(int64_t id, int64_t at_ms) override {
    return settle(id, "replayed", at_ms);
  }

  caf::error remove(int64_t id) override {
    return settle(id, "purged", 0);
  }

private:
  struct position {
    std::string topic;
    int32_t partition = 0;
    int64_t offset = 0;
  };

  std::optional<size_t> index_of(std::string_view dlq) const {
    for (size_t i = 0; i < dlqs_.size(); ++i)
      if (dlqs_[i] == dlq)
        return i;
    return std::nullopt;
  }

  caf::error not_found(int64_t id, const position& where) const {
    return make_error(
      errc::not_found,
      "no dead letter #" + std::to_string(id) + " ("
        + position_of(where.topic, where.partition, where.offset) + ") in "
        + o_.settings.shown + " (replayed, purged, or never written)");
  }

  caf::expected<position> locate(int64_t id) const {
    auto idx = id < 0 ? dlqs_.size()
                      : static_cast<size_t>(id >> id_topic_shift);
    if (idx >= dlqs_.size())
      return make_error(errc::not_found, "no dead letter #" + std::to_string(id)
                                           + " in " + o_.settings.shown
                                           + " (not an id of its topics=)");
    return position{dlqs_[idx],
                    static_cast<int32_t>((id >> id_offset_bits) & 0xffff),
                    id & ((int64_t{1} << id_offset_bits) - 1)};
  }

  // Produces the marker that settles `id`, once the broker confirmed it.
  caf::error settle(int64_t id, const char* why, int64_t at_ms) {
    auto where = locate(id);
    if (!where)
      return where.error();
    int64_t lo = 0;
    int64_t hi = 0;
    auto err = rd_kafka_query_watermark_offsets(
      o_.p->handle(), where->topic.c_str(), where->partition, &lo, &hi,
      static_cast<int>(to_ms(o_.settings.connect_timeout)));
    if (err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART
        || err == RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION
        || err == RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC
        || (err == RD_KAFKA_RESP_ERR_NO_ERROR
            && (where->offset < lo || where->offset >= hi)))
      return not_found(id, *where);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
      return make_error(errc::unavailable, "kafka: cannot read the offsets of "
                                             + where->topic + "/"
                                             + std::to_string(where->partition)
                                             + ": " + rd_kafka_err2str(err));
    auto hdrs = make_headers();
    add_header(hdrs.get(), dlq_done_header, std::to_string(where->offset));
    add_header(hdrs.get(), "evmesh-dlq-done-reason", why);
    if (at_ms != 0)
      add_header(hdrs.get(), "evmesh-dlq-done-at", std::to_string(at_ms));
    if (auto e = o_.p->produce(where->topic, {}, {}, std::move(hdrs),
                               where->partition))
      return make_error(errc::unavailable,
                        "kafka: the marker settling dead letter #"
                          + std::to_string(id) + " was not confirmed by '"
                          + where->topic + "': " + render(e));
    return {};
  }

  opened o_;
  std::vector<std::string> dlqs_;
};

} // namespace

void register_kafka_transport() {
  register_dead_letter_store(
    "kafka", [](std::string_view url) -> caf::expected<dead_letter_store_ptr> {
      auto o = open(url, "dlq-store");
      if (!o)
        return o.error();
      if (o->settings.topics.empty() || !o->settings.topic_patterns.empty())
        return make_error(errc::invalid_url,
                          "kafka: a dead-letter store URL needs topics= with "
                          "plain topic names (no patterns): their '.dlq' "
                          "topics are read, e.g. "
                            + o->settings.shown + "?topics=orders,payments");
      return dead_letter_store_ptr{
        std::make_shared<kafka_dead_letter_store>(std::move(*o))};
    });
  register_transport(
    "kafka",
    [](std::string_view url,
       const transport_environment& env) -> caf::expected<transport_ptr> {
      auto o = open(url, env.node.empty() ? "node" : env.node);
      if (!o)
        return o.error();
      std::unique_ptr<attempt_ledger> ledger;
      if (!o->settings.ledger.empty()) {
        if (o->settings.group.empty())
          return make_error(errc::invalid_config,
                            "kafka: ledger= needs group= (counts are kept "
                            "per consumer group)");
        auto l = attempt_ledger::open(o->settings.ledger, o->settings.group);
        if (!l)
          return l.error();
        ledger = std::move(*l);
      }
      return transport_ptr{std::make_shared<kafka_transport>(
        std::move(o->settings), env.node.empty() ? "node" : env.node, env.now,
        std::move(o->h), std::move(o->p), std::move(ledger))};
    });
}

caf::expected<std::vector<dead_letter_record>>
kafka_dead_letters(std::string_view url, size_t max) {
  auto o = open(url, "dlq-reader");
  if (!o)
    return o.error();
  auto& s = o->settings;
  std::set<std::string, std::less<>> plain;
  for (auto& t : s.topics)
    plain.insert(t + ".dlq");
  auto parts = dlq_partitions(*o, [&](std::string_view name) {
    if (s.topics.empty() && s.topic_patterns.empty())
      return true;
    auto base = name.substr(0, name.size() - 4);
    bool wanted = plain.count(name) != 0;
    for (auto& x : s.topic_patterns)
      wanted = wanted || pattern_matches(x, base);
    return wanted;
  });
  if (!parts)
    return parts.error();
  auto entries = read_dlq(s, *parts);
  if (!entries)
    return entries.error();
  std::vector<dead_letter_record> result;
  for (auto& e : *entries)
    if (result.size() < max)
      result.push_back(std::move(e.rec));
  return result;
}

} // namespace evmesh
