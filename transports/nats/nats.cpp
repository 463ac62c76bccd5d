#include "evmesh/nats.hpp"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

#include <nats/nats.h>
#include <spdlog/spdlog.h>

#include "evmesh/config.hpp"
#include "evmesh/error.hpp"
#include "evmesh/pattern.hpp"

namespace evmesh {

namespace {

/// Frees what a fetch returned: the messages still held (the first `n`
/// entries; taken ones are null) and the array itself.
void release_list(natsMsgList& list, int n) {
  for (int i = 0; i < n; ++i)
    if (list.Msgs[i] != nullptr)
      natsMsg_Destroy(list.Msgs[i]);
  free(list.Msgs);
  list.Msgs = nullptr;
}

using clock_type = std::chrono::steady_clock;

// -- URL ----------------------------------------------------------------------

struct nats_settings {
  std::string server; // nats://host:port, no credentials
  std::string shown;  // the URL for messages, password masked
  std::string user;
  std::string password;
  std::string token;
  std::string stream;
  std::string durable;
  std::vector<std::string> subjects;
  std::string filter;
  std::string dlq;
  std::string dlq_stream;
  int fetch = 256;
  caf::timespan ack_wait = std::chrono::seconds{30};
  int64_t max_deliver = 100;
  int64_t max_ack_pending = 10'000;
  bool create = true;
  bool deliver_new = false;
  caf::timespan connect_timeout = std::chrono::seconds{2};
  std::string tls_ca;
  std::string tls_cert;
  std::string tls_key;
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
  return make_error(errc::invalid_url,
                    "bad NATS URL '" + std::string{url} + "': " + what
                      + " (expected nats://[user:pass@]host:port?stream=S"
                        "&durable=D[&subjects=a.>,b.*], see "
                        "docs/transports/nats.md)");
}

caf::expected<int64_t> to_int(std::string_view url, std::string_view key,
                              std::string_view v, int64_t min) {
  int64_t x = 0;
  try {
    size_t used = 0;
    x = std::stoll(std::string{v}, &used);
    if (used != v.size())
      throw std::invalid_argument{"trailing"};
  } catch (...) {
    return url_error(url, std::string{key} + "=" + std::string{v}
                            + " is not an integer");
  }
  if (x < min)
    return url_error(url,
                     std::string{key} + " must be >= " + std::to_string(min));
  return x;
}

caf::expected<nats_settings> parse_nats_url(std::string_view url) {
  constexpr std::string_view prefix = "nats://";
  if (url.substr(0, prefix.size()) != prefix)
    return url_error(url, "the scheme must be nats://");
  nats_settings s;
  auto rest = url.substr(prefix.size());
  auto q = rest.find('?');
  auto authority = rest.substr(0, q);
  if (!authority.empty() && authority.back() == '/')
    authority.remove_suffix(1);
  std::string masked_auth;
  if (auto at = authority.rfind('@'); at != std::string_view::npos) {
    auto cred = authority.substr(0, at);
    authority = authority.substr(at + 1);
    if (auto colon = cred.find(':'); colon != std::string_view::npos) {
      s.user = percent_decode(cred.substr(0, colon));
      s.password = percent_decode(cred.substr(colon + 1));
      masked_auth = s.user + ":***@";
    } else {
      s.token = percent_decode(cred);
      masked_auth = "***@";
    }
  }
  if (authority.empty())
    return url_error(url, "no host");
  std::string host{authority};
  if (host.find(':') == std::string::npos)
    host += ":4222";
  s.server = "nats://" + host;
  std::string query;
  if (q != std::string_view::npos) {
    query = std::string{rest.substr(q + 1)};
  }
  s.shown = "nats://" + masked_auth + host;
  std::string_view qs = query;
  while (!qs.empty()) {
    auto amp = qs.find('&');
    auto kv = qs.substr(0, amp);
    qs = amp == std::string_view::npos ? std::string_view{}
                                       : qs.substr(amp + 1);
    if (kv.empty())
      continue;
    auto eq = kv.find('=');
    auto k = kv.substr(0, eq);
    auto v = eq == std::string_view::npos ? std::string{}
                                          : percent_decode(kv.substr(eq + 1));
    auto dur = [&](caf::timespan& out) -> caf::error {
      auto d = parse_duration(v);
      if (!d)
        return url_error(url, std::string{k} + "=" + v
                                + " is not a duration (e.g. 30s, 500ms)");
      out = *d;
      return {};
    };
    if (k == "stream") {
      s.stream = v;
    } else if (k == "durable") {
      s.durable = v;
    } else if (k == "subjects") {
      std::string_view list = v;
      while (!list.empty()) {
        auto comma = list.find(',');
        auto subj = list.substr(0, comma);
        if (!subj.empty()) {
          if (auto err = validate_pattern(subj))
            return url_error(url, "subject '" + std::string{subj}
                                    + "': " + render(err));
          s.subjects.emplace_back(subj);
        }
        list = comma == std::string_view::npos ? std::string_view{}
                                               : list.substr(comma + 1);
      }
    } else if (k == "filter") {
      s.filter = v;
    } else if (k == "dlq") {
      s.dlq = v;
    } else if (k == "fetch") {
      auto x = to_int(url, k, v, 1);
      if (!x)
        return x.error();
      s.fetch = static_cast<int>(std::min<int64_t>(*x, 100'000));
    } else if (k == "ack_wait") {
      if (auto err = dur(s.ack_wait))
        return err;
      if (s.ack_wait < std::chrono::seconds{1})
        return url_error(url, "ack_wait must be at least 1s");
    } else if (k == "max_deliver") {
      auto x = to_int(url, k, v, 2);
      if (!x)
        return x.error();
      s.max_deliver = *x;
    } else if (k == "max_ack_pending") {
      auto x = to_int(url, k, v, 1);
      if (!x)
        return x.error();
      s.max_ack_pending = *x;
    } else if (k == "create") {
      if (v != "true" && v != "false")
        return url_error(url, "create must be true or false");
      s.create = v == "true";
    } else if (k == "deliver") {
      if (v != "all" && v != "new")
        return url_error(url, "deliver must be all or new");
      s.deliver_new = v == "new";
    } else if (k == "connect_timeout") {
      if (auto err = dur(s.connect_timeout))
        return err;
    } else if (k == "tls_ca") {
      s.tls_ca = v;
    } else if (k == "tls_cert") {
      s.tls_cert = v;
    } else if (k == "tls_key") {
      s.tls_key = v;
    } else {
      return url_error(url, "unknown parameter '" + std::string{k} + "'");
    }
  }
  if (s.stream.empty())
    return url_error(url, "stream= is required");
  if (s.stream.find_first_of(".*> ") != std::string::npos)
    return url_error(url, "stream names cannot contain '.', '*', '>' or ' '");
  if (s.durable.find_first_of(".*> ") != std::string::npos)
    return url_error(url, "durable names cannot contain '.', '*', '>' or ' '");
  if (s.tls_cert.empty() != s.tls_key.empty())
    return url_error(url, "tls_cert and tls_key go together");
  if (s.max_ack_pending <= s.fetch)
    return url_error(
      url, "max_ack_pending (" + std::to_string(s.max_ack_pending)
             + ") must exceed fetch (" + std::to_string(s.fetch) + ")");
  if (s.dlq.empty())
    s.dlq = s.stream + ".dlq";
  s.dlq_stream = s.stream + "_DLQ";
  for (auto& subj : s.subjects)
    if (pattern_matches(subj, s.dlq))
      return url_error(url, "the DLQ subject '" + s.dlq
                              + "' is captured by the stream's own subject '"
                              + subj + "'; choose another dlq=");
  return s;
}

// -- nats.c helpers ------------------------------------------------------------

std::string last_error(natsStatus st) {
  natsStatus ignored = NATS_OK;
  const char* text = nats_GetLastError(&ignored);
  std::string result = natsStatus_GetText(st);
  if (text != nullptr && *text != '\0'
      && result.find(text) == std::string::npos)
    result += std::string{" ("} + text + ")";
  return result;
}

int64_t to_ms(caf::timespan d) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
}

struct nats_deleter {
  void operator()(natsOptions* x) const {
    natsOptions_Destroy(x);
  }
  void operator()(natsConnection* x) const {
    natsConnection_Destroy(x);
  }
  void operator()(jsCtx* x) const {
    jsCtx_Destroy(x);
  }
  void operator()(natsSubscription* x) const {
    natsSubscription_Destroy(x);
  }
  void operator()(natsMsg* x) const {
    natsMsg_Destroy(x);
  }
  void operator()(jsStreamInfo* x) const {
    jsStreamInfo_Destroy(x);
  }
  void operator()(jsConsumerInfo* x) const {
    jsConsumerInfo_Destroy(x);
  }
  void operator()(jsMsgMetaData* x) const {
    jsMsgMetaData_Destroy(x);
  }
  void operator()(jsPubAck* x) const {
    jsPubAck_Destroy(x);
  }
};

template <class T>
using nats_ptr = std::unique_ptr<T, nats_deleter>;

// Connection state shared with nats.c's callback thread. Callbacks may run
// after the connection object is gone, so they hold the state through a
// heap-allocated shared_ptr that the closed callback (always the last one)
// deletes.
struct conn_state {
  std::atomic<bool> connected{false};
  std::atomic<bool> closing{false};
  std::string shown;
};

using state_ref = std::shared_ptr<conn_state>;

void on_disconnected(natsConnection*, void* closure) {
  auto& st = **static_cast<state_ref*>(closure);
  if (st.connected.exchange(false) && !st.closing)
    spdlog::warn("nats: lost the connection to {}; reconnecting (unacked "
                 "messages come back from the server)",
                 st.shown);
}

void on_reconnected(natsConnection*, void* closure) {
  auto& st = **static_cast<state_ref*>(closure);
  st.connected = true;
  spdlog::info("nats: reconnected to {}", st.shown);
}

void on_closed(natsConnection*, void* closure) {
  delete static_cast<state_ref*>(closure);
}

// Owns the connection and the JetStream context. Shared by the transport and
// its fetcher thread.
struct connection {
  state_ref state = std::make_shared<conn_state>();
  nats_ptr<natsConnection> nc;
  nats_ptr<jsCtx> js;

  ~connection() {
    js.reset();
    if (nc) {
      state->closing = true;
      natsConnection_FlushTimeout(nc.get(), 1000);
      natsConnection_Close(nc.get());
    }
    nc.reset();
  }
};

caf::expected<std::unique_ptr<connection>> connect(const nats_settings& s,
                                                   const std::string& name) {
  natsOptions* raw_opts = nullptr;
  if (auto st = natsOptions_Create(&raw_opts); st != NATS_OK)
    return make_error(errc::io_error, "nats: " + last_error(st));
  nats_ptr<natsOptions> opts{raw_opts};
  auto conn = std::make_unique<connection>();
  conn->state->shown = s.shown;
  auto st = natsOptions_SetURL(opts.get(), s.server.c_str());
  if (st == NATS_OK && !s.user.empty())
    st = natsOptions_SetUserInfo(opts.get(), s.user.c_str(),
                                 s.password.c_str());
  if (st == NATS_OK && !s.token.empty())
    st = natsOptions_SetToken(opts.get(), s.token.c_str());
  if (st == NATS_OK)
    st = natsOptions_SetName(opts.get(), name.c_str());
  if (st == NATS_OK)
    st = natsOptions_SetTimeout(opts.get(), to_ms(s.connect_timeout));
  // Reconnect forever with backoff: a consumer outlives broker restarts.
  if (st == NATS_OK)
    st = natsOptions_SetMaxReconnect(opts.get(), -1);
  if (st == NATS_OK)
    st = natsOptions_SetReconnectWait(opts.get(), 250);
  if (st == NATS_OK)
    st = natsOptions_SetReconnectJitter(opts.get(), 100, 1000);
  auto* closure = new state_ref{conn->state};
  if (st == NATS_OK)
    st = natsOptions_SetDisconnectedCB(opts.get(), on_disconnected, closure);
  if (st == NATS_OK)
    st = natsOptions_SetReconnectedCB(opts.get(), on_reconnected, closure);
  if (st == NATS_OK)
    st = natsOptions_SetClosedCB(opts.get(), on_closed, closure);
  auto tls = !s.tls_ca.empty() || !s.tls_cert.empty();
  if (st == NATS_OK && tls)
    st = natsOptions_SetSecure(opts.get(), true);
  if (st == NATS_OK && !s.tls_ca.empty())
    st = natsOptions_LoadCATrustedCertificates(opts.get(), s.tls_ca.c_str());
  if (st == NATS_OK && !s.tls_cert.empty())
    st = natsOptions_LoadCertificatesChain(opts.get(), s.tls_cert.c_str(),
                                           s.tls_key.c_str());
  if (st != NATS_OK) {
    delete closure;
    return make_error(errc::invalid_config, "nats: cannot use the options of "
                                              + s.shown + ": "
                                              + last_error(st));
  }
  natsConnection* nc = nullptr;
  st = natsConnection_Connect(&nc, opts.get());
  if (st != NATS_OK) {
    delete closure; // no connection, no callbacks
    auto why = last_error(st);
    if (st == NATS_NO_SERVER || st == NATS_TIMEOUT)
      return make_error(errc::unavailable,
                        "cannot connect to " + s.shown + ": " + why
                          + " (connection refused or no answer within "
                          + format_duration(s.connect_timeout)
                          + ") — is nats-server running there?");
    if (st == NATS_CONNECTION_AUTH_FAILED || st == NATS_NOT_PERMITTED
        || why.find("uthoriz") != std::string::npos)
      return make_error(errc::invalid_config,
                        "cannot connect to " + s.shown
                          + ": authentication failed (" + why
                          + ") — check user:pass@ or token@ in the URL");
    if (st == NATS_SSL_ERROR || st == NATS_SECURE_CONNECTION_REQUIRED
        || st == NATS_SECURE_CONNECTION_WANTED)
      return make_error(errc::invalid_config,
                        "cannot connect to " + s.shown + ": TLS: " + why
                          + " — check tls_ca/tls_cert/tls_key and the "
                            "server's TLS settings");
    // A server that verifies client certificates closes the connection
    // right after the TLS handshake when ours is missing or not signed by
    // its CA; nats.c then only sees the missing PONG.
    if (tls && st == NATS_PROTOCOL_ERROR)
      return make_error(errc::invalid_config,
                        "cannot connect to " + s.shown + ": " + why
                          + " — the server closed the connection after the "
                            "TLS handshake: it likely requires a client "
                            "certificate (tls_cert + tls_key) signed by a CA "
                            "it trusts; see the server's log");
    return make_error(errc::unavailable,
                      "cannot connect to " + s.shown + ": " + why);
  }
  conn->nc.reset(nc);
  conn->state->connected = true;
  jsOptions jo;
  jsOptions_Init(&jo);
  jo.Wait = 5000;
  jsCtx* js = nullptr;
  if (st = natsConnection_JetStream(&js, nc, &jo); st != NATS_OK)
    return make_error(errc::io_error,
                      "nats: no JetStream context: " + last_error(st));
  conn->js.reset(js);
  return conn;
}

// Makes sure `name` exists, creating it with `subjects` when allowed.
caf::error ensure_stream(connection& c, const nats_settings& s,
                         const std::string& name,
                         const std::vector<std::string>& subjects, bool dlq) {
  jsStreamInfo* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  auto st = js_GetStreamInfo(&raw, c.js.get(), name.c_str(), nullptr, &jerr);
  nats_ptr<jsStreamInfo> info{raw};
  if (st == NATS_OK)
    return {};
  if (st == NATS_NO_RESPONDERS || st == NATS_TIMEOUT)
    return make_error(errc::invalid_config,
                      "nats: JetStream does not answer on " + s.shown + " ("
                        + last_error(st)
                        + ") — start nats-server with -js (JetStream "
                          "enabled)");
  if (st != NATS_NOT_FOUND)
    return make_error(errc::io_error, "nats: cannot look up stream '" + name
                                        + "' on " + s.shown + ": "
                                        + last_error(st));
  if (!s.create)
    return make_error(errc::invalid_config,
                      "nats: stream '" + name + "' does not exist on " + s.shown
                        + " and create=false — create it (nats stream add "
                        + name + " --subjects ...) or drop create=false");
  if (subjects.empty())
    return make_error(errc::invalid_config,
                      "nats: stream '" + name + "' does not exist on " + s.shown
                        + " — pass subjects=a.>,b.* in the URL to create it");
  std::vector<const char*> subj;
  for (auto& x : subjects)
    subj.push_back(x.c_str());
  jsStreamConfig cfg;
  jsStreamConfig_Init(&cfg);
  cfg.Name = name.c_str();
  cfg.Subjects = subj.data();
  cfg.SubjectsLen = static_cast<int>(subj.size());
  cfg.Storage = js_FileStorage;
  st = js_AddStream(&raw, c.js.get(), &cfg, nullptr, &jerr);
  info.reset(raw);
  if (st == NATS_OK)
    return {};
  // Another process created it meanwhile, or (for the DLQ) another stream
  // already captures the subject: both are fine.
  if (jerr == JSStreamNameExistErr
      || (dlq && jerr == JSStreamSubjectOverlapErr))
    return {};
  return make_error(errc::invalid_config, "nats: cannot create stream '" + name
                                            + "' on " + s.shown + ": "
                                            + last_error(st));
}

// -- the transport -------------------------------------------------------------

std::atomic<uint64_t> next_tag{1};

struct held_message {
  nats_ptr<natsMsg> msg;
  clock_type::time_point touched; // last delivery or InProgress
  bool dead_lettered = false;
};

/// Settled messages, freed together (see nats_transport::retire).
using spent_batch = std::vector<nats_ptr<natsMsg>>;

/// How many settled messages are freed together.
constexpr size_t spent_group = 128;

class nats_transport;

const nats_transport* as_nats(const transport& t) noexcept;

class nats_transport : public transport {
public:
  nats_transport(nats_settings s, std::unique_ptr<connection> conn)
    : settings_(std::move(s)), conn_(std::move(conn)) {
  }

  ~nats_transport() override {
    close();
  }

  std::string_view scheme() const noexcept override {
    return "nats";
  }

  transport_capabilities capabilities() const noexcept override {
    return {true, true, true, true};
  }

  bool connected() const noexcept override {
    return conn_->state->connected;
  }

  caf::error subscribe(const std::vector<std::string>&) override {
    // The durable consumes the whole stream (or `filter`): the runtime
    // dead-letters topics nothing matches as no_handler, like inproc.
    if (subscribed_)
      return make_error(errc::invalid_state,
                        "nats transport: subscribed twice");
    if (settings_.durable.empty())
      return make_error(errc::invalid_config,
                        "nats: " + settings_.shown
                          + " has no durable= — name the durable consumer "
                            "the processes of this service share");
    if (auto err = ensure_consumer())
      return err;
    jsOptions jo;
    jsOptions_Init(&jo);
    jsSubOptions so;
    jsSubOptions_Init(&so);
    so.Stream = settings_.stream.c_str();
    so.Consumer = settings_.durable.c_str();
    natsSubscription* sub = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    auto st = js_PullSubscribe(&sub, conn_->js.get(), settings_.filter.c_str(),
                               settings_.durable.c_str(), &jo, &so, &jerr);
    if (st != NATS_OK)
      return make_error(errc::io_error, "nats: cannot bind to consumer '"
                                          + settings_.durable + "' of stream '"
                                          + settings_.stream
                                          + "': " + last_error(st));
    sub_.reset(sub);
    subscribed_ = true;
    fetcher_ = std::thread{[this] { fetch_loop(); }};
    return {};
  }

  caf::error poll(size_t max, std::vector<raw_message>& out) override {
    return poll_through_batch(max, out);
  }

  caf::error poll_into(size_t max, raw_batch& out) override {
    if (!subscribed_)
      return make_error(errc::invalid_state,
                        "nats transport: poll before subscribe");
    if (closed_)
      return make_error(errc::invalid_state,
                        "nats transport: poll after close (make a new "
                        "transport to consume again)");
    spent_batch doomed; // freed after the lock is released
    std::lock_guard guard{mtx_};
    doomed.swap(spent_);
    size_t n = 0;
    while (n < max && !queue_.empty()) {
      auto& [msg, meta] = queue_.front();
      auto& raw = out.add();
      raw.tag = next_tag++;
      auto* m = msg.get();
      raw.subject = natsMsg_GetSubject(m);
      if (auto len = natsMsg_GetDataLength(m); len > 0)
        raw.bytes.assign(natsMsg_GetData(m), static_cast<size_t>(len));
      header_into(m, "traceparent", raw.traceparent);
      header_into(m, "tracestate", raw.tracestate);
      header_into(m, "Evmesh-Key", raw.key);
      raw.delivery_count = static_cast<uint32_t>(meta.first);
      char seq[20];
      auto seq_end = std::to_chars(seq, seq + sizeof seq, meta.second).ptr;
      raw.position.append("nats:").append(settings_.stream).append(1, '#');
      raw.position.append(seq, seq_end);
      unacked_.emplace(raw.tag,
                       held_message{std::move(msg), clock_type::now(), false});
      queue_.pop_front();
      ++n;
    }
    // Keep up to one poll's worth fetched ahead (demand-driven: a member
    // that stops polling stops taking messages from its group).
    want_ = max;
    waiting_ = n < max;
    cv_.notify_all();
    return {};
  }

  caf::error ack(uint64_t tag) override {
    spent_batch doomed; // freed after the lock is released
    std::lock_guard guard{mtx_};
    auto i = unacked_.find(tag);
    if (i == unacked_.end())
      return not_ours("ack", tag);
    // After a dead letter the message is terminated: the server stops
    // tracking it and emits a MSG_TERMINATED advisory for monitoring.
    auto* m = i->second.msg.get();
    auto st = i->second.dead_lettered ? natsMsg_Term(m, nullptr)
                                      : natsMsg_Ack(m, nullptr);
    retire(i, doomed);
    if (st != NATS_OK)
      return make_error(errc::io_error, "nats: ack failed (the server will "
                                        "redeliver after ack_wait): "
                                          + last_error(st));
    return {};
  }

  caf::error nack(uint64_t tag, caf::timespan delay) override {
    spent_batch doomed; // freed after the lock is released
    std::lock_guard guard{mtx_};
    auto i = unacked_.find(tag);
    if (i == unacked_.end())
      return not_ours("nack", tag);
    auto* m = i->second.msg.get();
    auto ms = std::chrono::ceil<std::chrono::milliseconds>(delay).count();
    auto st = ms > 0 ? natsMsg_NakWithDelay(m, ms, nullptr)
                     : natsMsg_Nak(m, nullptr);
    retire(i, doomed);
    if (st != NATS_OK)
      return make_error(errc::io_error, "nats: nak failed (the server will "
                                        "redeliver after ack_wait): "
                                          + last_error(st));
    return {};
  }

  caf::error dead_letter(uint64_t tag, const dead_letter_record& rec) override {
    std::string msg_id;
    {
      std::lock_guard guard{mtx_};
      auto i = unacked_.find(tag);
      if (i == unacked_.end())
        return not_ours("dead_letter", tag);
      jsMsgMetaData* raw_meta = nullptr;
      if (natsMsg_GetMetaData(&raw_meta, i->second.msg.get()) == NATS_OK) {
        nats_ptr<jsMsgMetaData> meta{raw_meta};
        // Unique per delivery and subscription: a retried publish of the same
        // record is dropped by the DLQ stream's duplicate window.
        msg_id = settings_.stream + ":" + std::to_string(meta->Sequence.Stream)
                 + ":" + std::to_string(meta->NumDelivered) + ":" + rec.consumer
                 + ":" + rec.pattern;
      }
    }
    auto body = to_json(rec);
    natsMsg* raw = nullptr;
    auto st = natsMsg_Create(&raw, settings_.dlq.c_str(), nullptr, body.data(),
                             static_cast<int>(body.size()));
    if (st != NATS_OK)
      return make_error(errc::io_error, "nats: " + last_error(st));
    nats_ptr<natsMsg> out{raw};
    natsMsgHeader_Set(raw, "Evmesh-Category", rec.category.c_str());
    natsMsgHeader_Set(raw, "Evmesh-Consumer", rec.consumer.c_str());
    natsMsgHeader_Set(raw, "Evmesh-Durable", settings_.durable.c_str());
    natsMsgHeader_Set(raw, "Evmesh-Topic", rec.topic.c_str());
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MaxWait = 2000;
    if (!msg_id.empty())
      po.MsgId = msg_id.c_str();
    jsPubAck* ack = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    st = js_PublishMsg(&ack, conn_->js.get(), raw, &po, &jerr);
    jsPubAck_Destroy(ack);
    if (st != NATS_OK)
      return make_error(errc::unavailable,
                        "nats: publishing the dead letter to '" + settings_.dlq
                          + "' was not confirmed: " + last_error(st));
    std::lock_guard guard{mtx_};
    if (auto i = unacked_.find(tag); i != unacked_.end())
      i->second.dead_lettered = true;
    return {};
  }

  caf::error extend(uint64_t tag) override {
    std::lock_guard guard{mtx_};
    auto i = unacked_.find(tag);
    if (i == unacked_.end())
      return not_ours("extend", tag);
    i->second.touched = clock_type::now();
    if (auto st = natsMsg_InProgress(i->second.msg.get(), nullptr);
        st != NATS_OK)
      return make_error(errc::io_error,
                        "nats: in-progress failed: " + last_error(st));
    return {};
  }

  caf::error publish(const envelope& env) override {
    auto body = encode_envelope(env);
    natsMsg* raw = nullptr;
    auto st = natsMsg_Create(&raw, env.topic.c_str(), nullptr, body.data(),
                             static_cast<int>(body.size()));
    if (st != NATS_OK)
      return make_error(errc::io_error, "nats: cannot publish to '" + env.topic
                                          + "': " + last_error(st));
    nats_ptr<natsMsg> msg{raw};
    if (!env.traceparent.empty())
      natsMsgHeader_Set(raw, "traceparent", env.traceparent.c_str());
    if (!env.tracestate.empty())
      natsMsgHeader_Set(raw, "tracestate", env.tracestate.c_str());
    if (!env.key.empty())
      natsMsgHeader_Set(raw, "Evmesh-Key", env.key.c_str());
    jsPubAck* ack = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    st = js_PublishMsg(&ack, conn_->js.get(), raw, nullptr, &jerr);
    jsPubAck_Destroy(ack);
    if (st == NATS_NO_RESPONDERS)
      return make_error(errc::invalid_config,
                        "nats: no stream captures subject '" + env.topic
                          + "' on " + settings_.shown
                          + " — add it to the stream's subjects");
    if (st != NATS_OK)
      return make_error(errc::unavailable,
                        "nats: publish to '" + env.topic
                          + "' was not confirmed: " + last_error(st));
    return {};
  }

  void set_wakeup(std::function<void()> fn) override {
    std::lock_guard guard{mtx_};
    wakeup_ = std::move(fn);
  }

  caf::error close() override {
    if (closed_)
      return {};
    closed_ = true;
    if (!subscribed_)
      return {};
    {
      std::lock_guard guard{mtx_};
      stop_ = true;
      cv_.notify_all();
    }
    // Unsubscribing first drops our pending pull requests on the server, so
    // the naks below cannot be redelivered to this member.
    natsSubscription_Unsubscribe(sub_.get());
    if (fetcher_.joinable())
      fetcher_.join();
    auto* nc = conn_->nc.get();
    natsConnection_FlushTimeout(nc, 1000);
    std::unordered_map<uint64_t, held_message> unacked;
    std::deque<fetched> queued;
    spent_batch spent;
    {
      std::lock_guard guard{mtx_};
      unacked.swap(unacked_);
      queued.swap(queue_);
      spent.swap(spent_);
      wakeup_ = nullptr;
    }
    spent.clear();
    for (auto& [tag, held] : unacked)
      natsMsg_Nak(held.msg.get(), nullptr);
    for (auto& item : queued)
      natsMsg_Nak(item.first.get(), nullptr);
    natsConnection_FlushTimeout(nc, 1000);
    unacked.clear();
    queued.clear();
    sub_.reset();
    return {};
  }

private:
  // A fetched message and its (delivery count, stream sequence).
  using fetched = std::pair<nats_ptr<natsMsg>, std::pair<uint64_t, uint64_t>>;

  // Assigns header `key` to `out` (empty when absent), reusing its buffer.
  static void header_into(natsMsg* m, const char* key, std::string& out) {
    const char* v = nullptr;
    if (natsMsgHeader_Get(m, key, &v) == NATS_OK && v != nullptr)
      out.assign(v);
    else
      out.clear();
  }

  caf::error not_ours(const char* what, uint64_t tag) const {
    return make_error(errc::invalid_state,
                      std::string{"nats transport: "} + what + " of tag "
                        + std::to_string(tag)
                        + " which is not an unacked delivery of this "
                          "consumer");
  }

  caf::error ensure_consumer() {
    jsConsumerConfig cfg;
    jsConsumerConfig_Init(&cfg);
    cfg.Durable = settings_.durable.c_str();
    cfg.AckPolicy = js_AckExplicit;
    cfg.AckWait = settings_.ack_wait.count();
    cfg.MaxDeliver = settings_.max_deliver;
    cfg.MaxAckPending = settings_.max_ack_pending;
    cfg.DeliverPolicy = settings_.deliver_new ? js_DeliverNew : js_DeliverAll;
    if (!settings_.filter.empty())
      cfg.FilterSubject = settings_.filter.c_str();
    jsConsumerInfo* raw = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    auto* js = conn_->js.get();
    auto st = js_GetConsumerInfo(&raw, js, settings_.stream.c_str(),
                                 settings_.durable.c_str(), nullptr, &jerr);
    nats_ptr<jsConsumerInfo> info{raw};
    if (st == NATS_NOT_FOUND) {
      if (!settings_.create)
        return make_error(errc::invalid_config,
                          "nats: consumer '" + settings_.durable
                            + "' of stream '" + settings_.stream
                            + "' does not exist and create=false");
      st = js_AddConsumer(&raw, js, settings_.stream.c_str(), &cfg, nullptr,
                          &jerr);
      info.reset(raw);
      if (st != NATS_OK && jerr != JSConsumerNameExistErr)
        return make_error(errc::invalid_config,
                          "nats: cannot create consumer '" + settings_.durable
                            + "' on stream '" + settings_.stream
                            + "': " + last_error(st));
      return {};
    }
    if (st != NATS_OK)
      return make_error(errc::io_error, "nats: cannot look up consumer '"
                                          + settings_.durable
                                          + "': " + last_error(st));
    auto* have = info->Config;
    if (have->AckWait == cfg.AckWait && have->MaxDeliver == cfg.MaxDeliver
        && have->MaxAckPending == cfg.MaxAckPending)
      return {};
    // Keep the durable's start position; update what evmesh relies on.
    cfg.DeliverPolicy = have->DeliverPolicy;
    cfg.OptStartSeq = have->OptStartSeq;
    cfg.OptStartTime = have->OptStartTime;
    cfg.FilterSubject = have->FilterSubject;
    st = js_UpdateConsumer(&raw, js, settings_.stream.c_str(), &cfg, nullptr,
                           &jerr);
    nats_ptr<jsConsumerInfo> updated{raw};
    if (st != NATS_OK)
      return make_error(errc::invalid_config,
                        "nats: consumer '" + settings_.durable
                          + "' exists with other settings and cannot be "
                            "updated: "
                          + last_error(st));
    spdlog::info("nats: updated consumer '{}' (ack_wait, max_deliver, "
                 "max_ack_pending)",
                 settings_.durable);
    return {};
  }

  // The fetcher thread: nats.c calls block, so they never run on the caller
  // of poll. It keeps at most the last poll's `max` messages queued.
  void fetch_loop() {
    bool flowing = false; // the last fetch brought messages
    auto wait_ms = 500;
    auto last_extend = clock_type::now();
    for (;;) {
      int batch = 0;
      {
        std::unique_lock lock{mtx_};
        cv_.wait_for(lock, std::chrono::milliseconds{wait_ms},
                     [this] { return stop_ || queue_.size() < want_; });
        if (stop_)
          return;
        if (queue_.size() < want_)
          batch = static_cast<int>(std::min<size_t>(
            want_ - queue_.size(), static_cast<size_t>(settings_.fetch)));
      }
      if (clock_type::now() - last_extend > settings_.ack_wait / 3) {
        extend_held();
        last_extend = clock_type::now();
      }
      if (batch == 0)
        continue;
      natsMsgList list{nullptr, 0};
      natsStatus st;
      if (flowing && batch > 1) {
        // Take what is there now, without waiting for a full batch.
        jsFetchRequest req;
        jsFetchRequest_Init(&req);
        req.Batch = batch;
        req.NoWait = true;
        req.Expires = std::chrono::nanoseconds{std::chrono::seconds{1}}.count();
        st = natsSubscription_FetchRequest(&list, sub_.get(), &req);
      } else {
        // Idle: wait for one message (a longer batch would wait for the
        // whole expiry once the first message arrived).
        st = natsSubscription_Fetch(&list, sub_.get(), 1, wait_ms, nullptr);
      }
      // Never trust Count beyond the batch we asked for: under ASan a fetch
      // across a server restart reported one entry more than its array held.
      int n_msgs = std::min(list.Count, std::max(batch, 1));
      if (stop_) {
        for (int i = 0; i < n_msgs; ++i)
          natsMsg_Nak(list.Msgs[i], nullptr);
        release_list(list, n_msgs);
        return;
      }
      if (st != NATS_OK || n_msgs == 0) {
        flowing = false;
        release_list(list, n_msgs);
        if (st != NATS_TIMEOUT && st != NATS_NOT_FOUND && st != NATS_OK) {
          // Disconnected or similar: nats.c reconnects; do not spin.
          std::unique_lock lock{mtx_};
          cv_.wait_for(lock, std::chrono::milliseconds{100},
                       [this] { return stop_; });
        }
        continue;
      }
      flowing = true;
      std::vector<fetched> got;
      got.reserve(static_cast<size_t>(n_msgs));
      for (int i = 0; i < n_msgs; ++i) {
        nats_ptr<natsMsg> m{list.Msgs[i]};
        list.Msgs[i] = nullptr;
        uint64_t count = 1;
        uint64_t seq = 0;
        jsMsgMetaData* raw_meta = nullptr;
        if (natsMsg_GetMetaData(&raw_meta, m.get()) == NATS_OK) {
          nats_ptr<jsMsgMetaData> meta{raw_meta};
          count = meta->NumDelivered;
          seq = meta->Sequence.Stream;
        }
        got.emplace_back(std::move(m), std::make_pair(count, seq));
      }
      release_list(list, n_msgs);
      std::function<void()> wake;
      {
        std::lock_guard guard{mtx_};
        for (auto& x : got)
          queue_.push_back(std::move(x));
        if (waiting_) {
          waiting_ = false;
          wake = wakeup_;
        }
      }
      if (wake)
        wake();
    }
  }

  // Forgets a settled message. nats.c frees messages on its garbage
  // collector thread and wakes that thread whenever its list was empty, so
  // freeing them one per ack costs a futex wake-up (and a context switch)
  // per message. They are freed in groups instead: `doomed` takes the
  // pending group once it holds `spent_group` messages (or at the next
  // poll), and the caller frees it after releasing `mtx_`.
  void retire(std::unordered_map<uint64_t, held_message>::iterator i,
              spent_batch& doomed) {
    spent_.push_back(std::move(i->second.msg));
    unacked_.erase(i);
    if (spent_.size() >= spent_group)
      doomed.swap(spent_);
  }

  // Sends InProgress for every message this member holds, so the server
  // redelivers only when the process is gone (DESIGN.md §4: in-process
  // retries and long handlers keep their message).
  void extend_held() {
    std::lock_guard guard{mtx_};
    auto now = clock_type::now();
    for (auto& [tag, held] : unacked_) {
      if (now - held.touched > settings_.ack_wait / 3) {
        natsMsg_InProgress(held.msg.get(), nullptr);
        held.touched = now;
      }
    }
    for (auto& item : queue_)
      natsMsg_InProgress(item.first.get(), nullptr);
  }

  nats_settings settings_;
  std::unique_ptr<connection> conn_;
  nats_ptr<natsSubscription> sub_;
  std::thread fetcher_;
  bool subscribed_ = false;
  bool closed_ = false;

  std::mutex mtx_; // guards everything below
  std::condition_variable cv_;
  std::deque<fetched> queue_;
  std::unordered_map<uint64_t, held_message> unacked_;
  spent_batch spent_; // settled messages waiting to be freed
  size_t want_ = 0;
  bool waiting_ = false;
  bool stop_ = false;
  std::function<void()> wakeup_;

  friend const nats_transport* as_nats(const transport& t) noexcept;
};

const nats_transport* as_nats(const transport& t) noexcept {
  return dynamic_cast<const nats_transport*>(&t);
}

// Validated settings, the connection and both streams: what every factory
// call and the DLQ reader need.
caf::expected<std::pair<nats_settings, std::unique_ptr<connection>>>
open(std::string_view url, const std::string& node) {
  auto settings = parse_nats_url(url);
  if (!settings)
    return settings.error();
  auto conn = connect(*settings, "evmesh:" + (node.empty() ? "node" : node));
  if (!conn)
    return conn.error();
  if (auto err = ensure_stream(**conn, *settings, settings->stream,
                               settings->subjects, false))
    return err;
  if (auto err = ensure_stream(**conn, *settings, settings->dlq_stream,
                               {settings->dlq}, true))
    return err;
  return std::make_pair(std::move(*settings), std::move(*conn));
}

/// The DLQ stream of one configuration as a `dead_letter_store`: record ids
/// are the stream sequences; `mark_replayed` and `remove` delete the message
/// (a JetStream message cannot be changed), so a replayed record leaves the
/// DLQ once its republish was confirmed and a second replay finds nothing.
class nats_dead_letter_store : public dead_letter_store {
public:
  nats_dead_letter_store(nats_settings s, std::unique_ptr<connection> conn)
    : s_(std::move(s)), conn_(std::move(conn)) {
  }

  caf::expected<int64_t> write(const dead_letter_record& rec) override {
    auto body = to_json(rec);
    natsMsg* raw = nullptr;
    auto st = natsMsg_Create(&raw, s_.dlq.c_str(), nullptr, body.data(),
                             static_cast<int>(body.size()));
    if (st != NATS_OK)
      return make_error(errc::io_error, "nats: " + last_error(st));
    nats_ptr<natsMsg> msg{raw};
    natsMsgHeader_Set(raw, "Evmesh-Category", rec.category.c_str());
    natsMsgHeader_Set(raw, "Evmesh-Consumer", rec.consumer.c_str());
    natsMsgHeader_Set(raw, "Evmesh-Topic", rec.topic.c_str());
    jsPubAck* ack = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    st = js_PublishMsg(&ack, conn_->js.get(), raw, nullptr, &jerr);
    nats_ptr<jsPubAck> guard{ack};
    if (st != NATS_OK || ack == nullptr)
      return make_error(errc::unavailable,
                        "nats: writing a dead letter to '" + s_.dlq
                          + "' was not confirmed: " + last_error(st));
    return static_cast<int64_t>(ack->Sequence);
  }

  caf::expected<std::vector<dead_letter_record>>
  list(const dead_letter_query& q) override {
    jsStreamInfo* raw = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    auto st = js_GetStreamInfo(&raw, conn_->js.get(), s_.dlq_stream.c_str(),
                               nullptr, &jerr);
    nats_ptr<jsStreamInfo> info{raw};
    if (st != NATS_OK)
      return make_error(errc::io_error, "nats: cannot read stream '"
                                          + s_.dlq_stream
                                          + "': " + last_error(st));
    std::vector<dead_letter_record> result;
    auto first = info->State.FirstSeq;
    for (auto seq = info->State.LastSeq; seq != 0 && seq >= first; --seq) {
      if (q.limit != 0 && result.size() >= q.limit)
        break;
      auto rec = get(static_cast<int64_t>(seq));
      if (!rec) {
        if (code_of(rec.error()) == errc::not_found)
          continue; // deleted (replayed or purged)
        return std::move(rec.error());
      }
      if (matches(q, *rec))
        result.push_back(std::move(*rec));
    }
    return result;
  }

  caf::expected<dead_letter_record> get(int64_t id) override {
    natsMsg* m = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    auto st = js_GetMsg(&m, conn_->js.get(), s_.dlq_stream.c_str(),
                        static_cast<uint64_t>(id), nullptr, &jerr);
    nats_ptr<natsMsg> msg{m};
    if (st == NATS_NOT_FOUND)
      return make_error(errc::not_found, "no dead letter #" + std::to_string(id)
                                           + " in stream " + s_.dlq_stream);
    if (st != NATS_OK)
      return make_error(errc::io_error, "nats: cannot read " + s_.dlq_stream
                                          + "#" + std::to_string(id) + ": "
                                          + last_error(st));
    std::string_view body{natsMsg_GetData(m),
                          static_cast<size_t>(natsMsg_GetDataLength(m))};
    auto rec = dead_letter_from_json(body);
    if (!rec)
      return make_error(errc::decode_error, "nats: " + s_.dlq_stream + "#"
                                              + std::to_string(id)
                                              + " is not a dead-letter record: "
                                              + render(rec.error()));
    rec->id = id;
    return rec;
  }

  caf::error mark_replayed(int64_t id, int64_t) override {
    return remove(id);
  }

  caf::error remove(int64_t id) override {
    jsErrCode jerr = static_cast<jsErrCode>(0);
    auto st = js_DeleteMsg(conn_->js.get(), s_.dlq_stream.c_str(),
                           static_cast<uint64_t>(id), nullptr, &jerr);
    if (st == NATS_NOT_FOUND)
      return make_error(errc::not_found, "no dead letter #" + std::to_string(id)
                                           + " in stream " + s_.dlq_stream);
    if (st != NATS_OK)
      return make_error(errc::io_error, "nats: cannot delete " + s_.dlq_stream
                                          + "#" + std::to_string(id) + ": "
                                          + last_error(st));
    return {};
  }

private:
  static errc code_of(const caf::error& err) {
    if (err.category() != caf::atom("evmesh"))
      return errc::none;
    return static_cast<errc>(err.code());
  }

  nats_settings s_;
  std::unique_ptr<connection> conn_;
};

} // namespace

void register_nats_transport() {
  register_dead_letter_store(
    "nats", [](std::string_view url) -> caf::expected<dead_letter_store_ptr> {
      auto opened = open(url, "dlq-store");
      if (!opened)
        return opened.error();
      return dead_letter_store_ptr{std::make_shared<nats_dead_letter_store>(
        std::move(opened->first), std::move(opened->second))};
    });
  register_transport("nats",
                     [](std::string_view url, const transport_environment& env)
                       -> caf::expected<transport_ptr> {
                       auto opened = open(url, env.node);
                       if (!opened)
                         return opened.error();
                       return transport_ptr{std::make_shared<nats_transport>(
                         std::move(opened->first), std::move(opened->second))};
                     });
}

caf::expected<std::vector<dead_letter_record>>
nats_dead_letters(std::string_view url, size_t max) {
  auto opened = open(url, "dlq-reader");
  if (!opened)
    return opened.error();
  nats_dead_letter_store store{std::move(opened->first),
                               std::move(opened->second)};
  dead_letter_query q;
  q.limit = 0;
  auto records = store.list(q);
  if (!records)
    return records;
  // Oldest first, at most `max`.
  std::reverse(records->begin(), records->end());
  if (records->size() > max)
    records->resize(max);
  return records;
}

bool nats_connected(const transport& t) noexcept {
  auto* n = as_nats(t);
  return n != nullptr && n->connected();
}

} // namespace evmesh
