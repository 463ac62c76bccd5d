#include "evmesh/redis_store.hpp"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <csignal>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <random>
#include <semaphore>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <spdlog/spdlog.h>
#include <sys/time.h>

namespace evmesh {

namespace {

using steady = std::chrono::steady_clock;

constexpr std::string_view committed_marker = "committed";
constexpr size_t max_pool = 256;
constexpr int64_t max_timeout_ms = 60'000;
// About a century: Redis rejects expiry times that overflow its clock.
constexpr int64_t max_ttl_ms = int64_t{100} * 365 * 24 * 3600 * 1000;
// After a failed connect a connection waits this long before it tries
// again, so an outage costs each call one refused attempt at most per
// interval instead of one connect timeout each.
constexpr auto reconnect_pause = std::chrono::milliseconds{100};
// Remembered claims are swept for expired leases every this many claims.
constexpr size_t sweep_interval = 1024;

// KEYS[1] = key, ARGV = token, lease ms, committed marker.
// 1 = claimed, 2 = committed, 3 = claimed by someone else.
constexpr std::string_view claim_script = R"lua(
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[3] then
  return 2
end
return 3
)lua";

// KEYS[1] = key, ARGV = token. Deletes only our own claim.
constexpr std::string_view release_script = R"lua(
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
)lua";

// KEYS[1] = key, ARGV = token, committed marker. Forgets a commit or our own
// claim, never another worker's claim.
constexpr std::string_view forget_script = R"lua(
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or v == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
)lua";

caf::error bad_url(std::string_view url, std::string_view problem) {
  std::string msg = "invalid redis URL '";
  msg += url;
  msg += "': ";
  msg += problem;
  msg += " — expected redis://[[user]:password@]host[:port][/db]"
         "[?pool=N&timeout_ms=T&connect_timeout_ms=T&prefix=P"
         "&claim=auto|script]";
  return make_error(errc::invalid_url, std::move(msg));
}

template <class T>
bool parse_number(std::string_view str, T& out, T min, T max) {
  T value{};
  auto last = str.data() + str.size();
  auto [ptr, ec] = std::from_chars(str.data(), last, value);
  if (str.empty() || ec != std::errc{} || ptr != last || value < min
      || value > max)
    return false;
  out = value;
  return true;
}

bool percent_decode(std::string_view in, std::string& out) {
  out.clear();
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '%') {
      out += in[i];
      continue;
    }
    unsigned value = 0;
    if (i + 2 >= in.size())
      return false;
    auto [ptr, ec] = std::from_chars(in.data() + i + 1, in.data() + i + 3,
                                     value, 16);
    if (ec != std::errc{} || ptr != in.data() + i + 3)
      return false;
    out += static_cast<char>(value);
    i += 2;
  }
  return true;
}

/// Milliseconds of a TTL for PX: rounded up, at least 1, at most a century.
int64_t ttl_ms(caf::timespan ttl) {
  if (ttl.count() <= 0)
    return 1;
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(ttl).count();
  return std::clamp<int64_t>(ms, 1, max_ttl_ms);
}

/// `now + ttl` on the steady clock, saturating.
steady::time_point local_deadline(steady::time_point now, caf::timespan ttl) {
  auto d = std::chrono::duration_cast<steady::duration>(
    std::chrono::milliseconds{ttl_ms(ttl)});
  if (now.time_since_epoch() > steady::duration::max() - d)
    return steady::time_point::max();
  return now + d;
}

timeval to_timeval(std::chrono::milliseconds ms) {
  timeval tv{};
  tv.tv_sec = static_cast<decltype(tv.tv_sec)>(ms.count() / 1000);
  tv.tv_usec = static_cast<decltype(tv.tv_usec)>((ms.count() % 1000) * 1000);
  return tv;
}

/// Writing to a socket the server closed raises SIGPIPE, which would end the
/// process; hiredis writes without MSG_NOSIGNAL. Blocks SIGPIPE for the
/// calling thread during a command and swallows one raised meanwhile.
class sigpipe_guard {
public:
  sigpipe_guard() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    sigset_t pending;
    sigemptyset(&pending);
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
  }

  sigpipe_guard(const sigpipe_guard&) = delete;
  sigpipe_guard& operator=(const sigpipe_guard&) = delete;

  ~sigpipe_guard() {
    if (!was_pending_) {
      sigset_t pending;
      sigemptyset(&pending);
      sigpending(&pending);
      if (sigismember(&pending, SIGPIPE) == 1) {
        timespec zero{};
        sigtimedwait(&pipe_, nullptr, &zero);
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }

private:
  sigset_t pipe_;
  sigset_t old_;
  bool was_pending_ = false;
};

struct reply_deleter {
  void operator()(redisReply* ptr) const noexcept {
    freeReplyObject(ptr);
  }
};

using reply_ptr = std::unique_ptr<redisReply, reply_deleter>;

struct context_deleter {
  void operator()(redisContext* ptr) const noexcept {
    redisFree(ptr);
  }
};

using context_ptr = std::unique_ptr<redisContext, context_deleter>;

std::string_view reply_text(const redisReply& r) {
  if (r.str == nullptr)
    return {};
  return {r.str, r.len};
}

bool starts_with(std::string_view str, std::string_view prefix) {
  return str.substr(0, prefix.size()) == prefix;
}

/// The major version in an `INFO server` reply (`redis_version:7.0.15`),
/// 0 when absent or unreadable.
int redis_major_version(std::string_view info) {
  constexpr std::string_view field = "redis_version:";
  auto at = info.find(field);
  if (at == std::string_view::npos)
    return 0;
  auto digits = info.substr(at + field.size());
  int major = 0;
  auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(),
                                   major);
  return ec == std::errc{} && ptr != digits.data() ? major : 0;
}

/// Why `ctx` failed, in words: hiredis reports a read timeout as EAGAIN.
std::string io_failure(const redisContext& ctx,
                       std::chrono::milliseconds timeout) {
  if (ctx.err == REDIS_ERR_IO
      && std::string_view{ctx.errstr} == std::strerror(EAGAIN))
    return "no reply within " + std::to_string(timeout.count()) + " ms";
  if (ctx.err == REDIS_ERR_EOF)
    return "the server closed the connection";
  return ctx.errstr;
}

/// Sends one command on `ctx`. Returns the reply, or nullptr after an I/O
/// error or timeout (then `ctx->errstr` says why and `ctx` is unusable).
reply_ptr send_command(redisContext* ctx,
                       std::initializer_list<std::string_view> args) {
  constexpr size_t max_args = 8;
  const char* argv[max_args];
  size_t argvlen[max_args];
  size_t argc = 0;
  if (args.size() > max_args)
    return nullptr; // not reached: the commands above take at most 7
  for (auto arg : args) {
    argv[argc] = arg.data();
    argvlen[argc] = arg.size();
    ++argc;
  }
  sigpipe_guard guard;
  auto raw = redisCommandArgv(ctx, static_cast<int>(argc), argv, argvlen);
  return reply_ptr{static_cast<redisReply*>(raw)};
}

/// A reply that is an error, as an actionable message.
std::string describe_reply_error(std::string_view text) {
  std::string msg{text};
  if (starts_with(text, "NOAUTH"))
    msg += " — the server requires a password: redis://:PASSWORD@host:port";
  else if (starts_with(text, "WRONGPASS")
           || text.find("password") != std::string_view::npos)
    msg += " — check the user and password in the URL";
  else if (text.find("DB index") != std::string_view::npos)
    msg += " — use a database number the server has (see its `databases` "
           "setting)";
  else if (starts_with(text, "READONLY"))
    msg += " — the URL points at a replica; use the primary";
  else if (starts_with(text, "OOM"))
    msg += " — the server reached maxmemory; raise it or use an eviction "
           "policy that spares evmesh:idem: keys";
  return msg;
}

struct waiter;

/// One command waiting in a connection's pipeline queue, with its arguments
/// (views of strings the caller keeps alive until the command is done). The
/// caller owns it and waits on its `waiter` until every one of its commands
/// is done.
struct pending_command {
  static constexpr size_t max_args = 8;
  const char* argv[max_args] = {};
  size_t argvlen[max_args] = {};
  int argc = 0;
  /// Source of the script an EVALSHA runs (empty for plain commands), for
  /// the EVAL fallback after NOSCRIPT.
  std::string_view script;
  reply_ptr reply;
  std::string failure; // set instead of `reply` when the connection failed
  waiter* owner = nullptr;

  void set(std::initializer_list<std::string_view> args) {
    argc = 0;
    for (auto arg : args) {
      if (static_cast<size_t>(argc) == max_args)
        break; // not reached: the commands of this file take at most 7
      argv[argc] = arg.data();
      argvlen[argc] = arg.size();
      ++argc;
    }
  }
};

/// One caller with one or more queued commands (all on one connection).
/// Woken exactly once per wait: either when every command of it is done or
/// when it is to write next (`writer` says which; set before the release).
struct waiter {
  std::binary_semaphore wake{0};
  /// Commands not done yet; only the connection's current writer changes it.
  size_t remaining = 0;
  bool writer = false;
};

/// One pooled connection with automatic pipelining: callers queue their
/// commands; whoever finds the connection idle becomes the writer, sends
/// every queued command in one write, reads the replies in order and hands
/// them out, then passes the writer role to the oldest queued caller (each
/// waiting caller is woken exactly once, never a herd). Concurrent callers
/// therefore share round trips instead of queueing behind each other. `ctx`
/// is null while disconnected and only touched by the current writer.
struct connection {
  std::mutex mtx;
  std::deque<pending_command*> queue;
  bool writing = false;
  context_ptr ctx;
  steady::time_point retry_after{};
  std::string wbuf; // the writer's RESP buffer, reused across batches
};

// A write buffer that grew beyond this is not kept for the next batch.
constexpr size_t max_kept_buffer = size_t{1} << 20;

/// Appends `cmd` in the Redis protocol (an array of bulk strings).
void append_resp(std::string& out, const pending_command& cmd) {
  char num[24];
  auto header = [&](char kind, size_t n) {
    out += kind;
    auto [end, ec] = std::to_chars(num, num + sizeof num, n);
    out.append(num, end);
    out += "\r\n";
  };
  header('*', static_cast<size_t>(cmd.argc));
  for (int i = 0; i < cmd.argc; ++i) {
    header('$', cmd.argvlen[i]);
    out.append(cmd.argv[i], cmd.argvlen[i]);
    out += "\r\n";
  }
}

// Commands sent in one pipelined write at most.
constexpr size_t max_pipeline = 512;

struct claim {
  std::string token;
  steady::time_point expires_at;
};

struct string_hash {
  using is_transparent = void;
  size_t operator()(std::string_view str) const noexcept {
    return std::hash<std::string_view>{}(str);
  }
};

} // namespace

// -- URL -------------------------------------------------------------------------

std::string redis_store_options::display_url() const {
  std::string out = "redis://";
  if (!password.empty()) {
    out += user;
    out += ":***@";
  }
  if (host.find(':') != std::string::npos) {
    out += '[';
    out += host;
    out += ']';
  } else {
    out += host;
  }
  out += ':';
  out += std::to_string(port);
  out += '/';
  out += std::to_string(db);
  return out;
}

caf::expected<redis_store_options> parse_redis_url(std::string_view url) {
  redis_store_options opts;
  auto sep = url.find("://");
  if (sep == std::string_view::npos)
    return bad_url(url, "missing scheme");
  std::string scheme{url.substr(0, sep)};
  std::transform(scheme.begin(), scheme.end(), scheme.begin(),
                 [](unsigned char c) {
                   return static_cast<char>(std::tolower(c));
                 });
  if (scheme != "redis")
    return bad_url(url, "the scheme must be redis://");
  auto rest = url.substr(sep + 3);
  std::string_view query;
  if (auto q = rest.find('?'); q != std::string_view::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  auto authority = rest.substr(0, rest.find('/'));
  auto path = rest.substr(authority.size());
  if (auto at = authority.rfind('@'); at != std::string_view::npos) {
    auto userinfo = authority.substr(0, at);
    authority = authority.substr(at + 1);
    auto colon = userinfo.find(':');
    if (colon == std::string_view::npos)
      return bad_url(url, "credentials need a ':' (write redis://:PASSWORD@host"
                          " or redis://USER:PASSWORD@host)");
    if (!percent_decode(userinfo.substr(0, colon), opts.user)
        || !percent_decode(userinfo.substr(colon + 1), opts.password))
      return bad_url(url, "bad percent-encoding in the credentials");
  }
  std::string_view host = authority;
  std::string_view port;
  if (starts_with(authority, "[")) {
    auto close = authority.find(']');
    if (close == std::string_view::npos)
      return bad_url(url, "unterminated '[' in the host");
    host = authority.substr(1, close - 1);
    auto after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':')
        return bad_url(url, "unexpected text after ']'");
      port = after.substr(1);
      if (port.empty())
        return bad_url(url, "empty port");
    }
  } else if (auto colon = authority.find(':');
             colon != std::string_view::npos) {
    host = authority.substr(0, colon);
    port = authority.substr(colon + 1);
    if (port.empty())
      return bad_url(url, "empty port");
  }
  if (!host.empty())
    opts.host.assign(host);
  if (!port.empty()
      && !parse_number<uint16_t>(port, opts.port, uint16_t{1}, uint16_t{65535}))
    return bad_url(url, "invalid port '" + std::string{port} + "'");
  if (path.size() > 1) {
    auto db = path.substr(1);
    if (!parse_number<int>(db, opts.db, 0, 1'000'000))
      return bad_url(url, "invalid database number '" + std::string{db}
                            + "' (the path is /DB, a number)");
  }
  while (!query.empty()) {
    auto amp = query.find('&');
    auto param = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view{}
                                          : query.substr(amp + 1);
    if (param.empty())
      continue;
    auto eq = param.find('=');
    auto name = param.substr(0, eq);
    auto value = eq == std::string_view::npos ? std::string_view{}
                                              : param.substr(eq + 1);
    auto invalid = [&](std::string_view range) {
      return bad_url(url, "invalid " + std::string{name} + " value '"
                            + std::string{value} + "' (" + std::string{range}
                            + ")");
    };
    int64_t ms = 0;
    if (name == "pool") {
      if (!parse_number<size_t>(value, opts.pool, 1, max_pool))
        return invalid("1 to 256");
    } else if (name == "timeout_ms") {
      if (!parse_number<int64_t>(value, ms, 1, max_timeout_ms))
        return invalid("1 to 60000");
      opts.timeout = std::chrono::milliseconds{ms};
    } else if (name == "connect_timeout_ms") {
      if (!parse_number<int64_t>(value, ms, 1, max_timeout_ms))
        return invalid("1 to 60000");
      opts.connect_timeout = std::chrono::milliseconds{ms};
    } else if (name == "prefix") {
      if (!percent_decode(value, opts.prefix))
        return invalid("bad percent-encoding");
    } else if (name == "claim") {
      if (value == "auto")
        opts.claim = redis_store_options::claim_mode::automatic;
      else if (value == "script")
        opts.claim = redis_store_options::claim_mode::script;
      else
        return invalid("auto or script");
    } else {
      return bad_url(url, "unknown parameter '" + std::string{name} + "'");
    }
  }
  return opts;
}

// -- store -------------------------------------------------------------------------

struct redis_idempotency_store::impl {
  redis_store_options opts;
  std::string shown_url;
  std::unique_ptr<connection[]> pool;
  std::atomic<size_t> next{0};
  std::atomic<bool> healthy{true};
  std::atomic<uint64_t> commands{0};
  std::atomic<uint64_t> round_trips{0};
  std::string claim_sha;
  // Claims are one `SET ... NX GET` (Redis 7+) instead of the claim script.
  bool set_claims = false;
  std::string release_sha;
  std::string forget_sha;
  // Tokens of this instance's live claims, by key, for `abort`.
  mutable std::mutex claims_mtx;
  std::unordered_map<std::string, claim, string_hash, std::equal_to<>> claims;
  size_t claims_since_sweep = 0;
  std::string token_prefix;
  std::atomic<uint64_t> token_counter{0};

  explicit impl(redis_store_options options)
    : opts(std::move(options)),
      shown_url(opts.display_url()),
      pool(std::make_unique<connection[]>(opts.pool)) {
    std::random_device rd;
    std::mt19937_64 gen{(uint64_t{rd()} << 32) ^ rd()};
    char buf[17];
    auto [ptr, ec] = std::to_chars(buf, buf + 16, gen(), 16);
    token_prefix = "claim:";
    token_prefix.append(buf, ptr);
    token_prefix += ':';
  }

  std::string make_token() {
    auto n = token_counter.fetch_add(1, std::memory_order_relaxed);
    char buf[17];
    auto [ptr, ec] = std::to_chars(buf, buf + 16, n, 16);
    std::string token = token_prefix;
    token.append(buf, ptr);
    return token;
  }

  /// Connects, authenticates and selects the database.
  caf::expected<context_ptr> connect() const {
    auto tv = to_timeval(opts.connect_timeout);
    context_ptr ctx{redisConnectWithTimeout(opts.host.c_str(), opts.port, tv)};
    if (!ctx)
      return make_error(errc::unavailable, "cannot allocate a Redis context");
    if (ctx->err != 0)
      return make_error(errc::unavailable,
                        "cannot connect to " + shown_url + ": " + ctx->errstr
                          + " — is redis-server running and reachable?");
    redisSetTimeout(ctx.get(), tv);
    redisEnableKeepAlive(ctx.get());
    auto run = [&](std::initializer_list<std::string_view> args,
                   std::string_view what) -> caf::error {
      auto reply = send_command(ctx.get(), args);
      if (!reply)
        return make_error(errc::unavailable,
                          "cannot " + std::string{what} + " on " + shown_url
                            + ": " + io_failure(*ctx, opts.connect_timeout)
                            + " — is redis-server running and reachable?");
      if (reply->type == REDIS_REPLY_ERROR)
        return make_error(errc::invalid_config,
                          std::string{"Redis at "} + shown_url + " refused to "
                            + std::string{what} + ": "
                            + describe_reply_error(reply_text(*reply)));
      return caf::error{};
    };
    if (!opts.password.empty()) {
      auto err = opts.user.empty()
                   ? run({"AUTH", opts.password}, "authenticate")
                   : run({"AUTH", opts.user, opts.password}, "authenticate");
      if (err)
        return err;
    }
    // PING also surfaces NOAUTH when the server wants a password we lack.
    if (auto err = run({"PING"}, "get an answer to PING"))
      return err;
    if (opts.db != 0) {
      auto db = std::to_string(opts.db);
      if (auto err = run({"SELECT", db}, "select database " + db))
        return err;
    }
    redisSetTimeout(ctx.get(), to_timeval(opts.timeout));
    return ctx;
  }

  /// Loads the scripts (whose SHA1 the server computes) once at open.
  caf::error load_scripts(redisContext* ctx) {
    std::pair<std::string_view, std::string*> scripts[] = {
      {claim_script, &claim_sha},
      {release_script, &release_sha},
      {forget_script, &forget_sha},
    };
    for (auto& [src, sha] : scripts) {
      auto reply = send_command(ctx, {"SCRIPT", "LOAD", src});
      if (!reply)
        return make_error(errc::unavailable,
                          "cannot load scripts into " + shown_url + ": "
                            + io_failure(*ctx, opts.connect_timeout));
      if (reply->type != REDIS_REPLY_STRING)
        return make_error(errc::invalid_config,
                          "Redis at " + shown_url
                            + " refused to load a Lua script: "
                            + describe_reply_error(reply_text(*reply))
                            + " (evmesh needs EVAL/EVALSHA and SCRIPT LOAD)");
      sha->assign(reply_text(*reply));
    }
    return caf::error{};
  }

  /// Whether claims can be one `SET key token NX PX ms GET` (Redis 7 allows
  /// NX with GET): asks `INFO server` for the version. A refused INFO (ACL)
  /// keeps the claim script.
  caf::error detect_set_claims(redisContext* ctx) {
    set_claims = false;
    if (opts.claim != redis_store_options::claim_mode::automatic)
      return caf::error{};
    auto reply = send_command(ctx, {"INFO", "server"});
    if (!reply)
      return make_error(errc::unavailable,
                        "cannot ask " + shown_url + " for its version: "
                          + io_failure(*ctx, opts.connect_timeout));
    if (reply->type != REDIS_REPLY_STRING)
      return caf::error{};
    set_claims = redis_major_version(reply_text(*reply)) >= 7;
    return caf::error{};
  }

  /// The arguments of a claim of `full` (a prefixed key) with `token`.
  void set_claim(pending_command& cmd, std::string_view full,
                 std::string_view token, std::string_view ms) const {
    if (set_claims) {
      cmd.set({"SET", full, token, "NX", "PX", ms, "GET"});
      cmd.script = {};
    } else {
      cmd.set({"EVALSHA", claim_sha, "1", full, token, ms, committed_marker});
      cmd.script = claim_script;
    }
  }

  /// What a claim's reply means; false when it is not a claim's answer.
  bool claim_answer(const redisReply& r, claim_result& out) const {
    if (set_claims) {
      // Nil: the key was absent and is ours now; else the value it holds.
      if (r.type == REDIS_REPLY_NIL) {
        out = claim_result::fresh;
        return true;
      }
      if (r.type != REDIS_REPLY_STRING)
        return false;
      out = reply_text(r) == committed_marker ? claim_result::duplicate
                                              : claim_result::in_flight;
      return true;
    }
    if (r.type != REDIS_REPLY_INTEGER)
      return false;
    out = r.integer == 1   ? claim_result::fresh
          : r.integer == 2 ? claim_result::duplicate
                           : claim_result::in_flight;
    return true;
  }

  void mark_failed(const caf::error& err) {
    if (healthy.exchange(false))
      spdlog::warn("redis idempotency store answers unavailable until the "
                   "server is back: {}",
                   render(err));
  }

  void mark_ok() {
    if (!healthy.load(std::memory_order_relaxed) && !healthy.exchange(true))
      spdlog::info("redis idempotency store: {} reachable again", shown_url);
  }

  /// Picks the connection for a call: an idle one if there is one (a round
  /// trip of its own), else the one with the shortest queue (its commands
  /// join that connection's next pipelined write).
  connection& pick() {
    auto n = opts.pool;
    auto start = next.fetch_add(1, std::memory_order_relaxed) % n;
    connection* best = nullptr;
    size_t best_len = std::numeric_limits<size_t>::max();
    for (size_t i = 0; i < n; ++i) {
      auto& conn = pool[(start + i) % n];
      std::unique_lock<std::mutex> lock{conn.mtx, std::try_to_lock};
      if (!lock.owns_lock())
        continue;
      if (!conn.writing)
        return conn;
      if (conn.queue.size() < best_len) {
        best = &conn;
        best_len = conn.queue.size();
      }
    }
    return best != nullptr ? *best : pool[start];
  }

  /// Sends `batch` on `conn` (the caller is its writer) and completes every
  /// command: a reply each, or the same failure for all after a connection
  /// problem (then the connection is dropped and reconnects later).
  void run_batch(connection& conn, std::vector<pending_command*>& batch) {
    auto fail_all = [&](size_t from, const std::string& why) {
      for (size_t i = from; i < batch.size(); ++i)
        batch[i]->failure = why;
    };
    if (!conn.ctx) {
      if (steady::now() < conn.retry_after) {
        fail_all(0, "no connection to " + shown_url
                      + " (reconnecting) — is redis-server running and "
                        "reachable?");
        return;
      }
      auto ctx = connect();
      if (!ctx) {
        conn.retry_after = steady::now() + reconnect_pause;
        fail_all(0, render(ctx.error()));
        return;
      }
      conn.ctx = std::move(*ctx);
    }
    sigpipe_guard guard;
    auto* ctx = conn.ctx.get();
    commands.fetch_add(batch.size(), std::memory_order_relaxed);
    round_trips.fetch_add(1, std::memory_order_relaxed);
    // The whole batch as RESP in one reused buffer, handed to hiredis at
    // once (redisAppendCommandArgv formats and copies every command into
    // fresh strings of its own).
    auto& buf = conn.wbuf;
    buf.clear();
    for (auto* cmd : batch)
      append_resp(buf, *cmd);
    if (redisAppendFormattedCommand(ctx, buf.data(), buf.size()) != REDIS_OK) {
      fail_all(0, "command on " + shown_url + " failed: " + ctx->errstr);
      conn.ctx.reset();
      return;
    }
    if (buf.capacity() > max_kept_buffer)
      std::string{}.swap(buf);
    for (size_t i = 0; i < batch.size(); ++i) {
      void* raw = nullptr;
      if (redisGetReply(ctx, &raw) != REDIS_OK || raw == nullptr) {
        fail_all(i, "command on " + shown_url
                      + " failed: " + io_failure(*ctx, opts.timeout)
                      + " — is redis-server running and reachable?");
        conn.ctx.reset();
        return;
      }
      batch[i]->reply.reset(static_cast<redisReply*>(raw));
    }
  }

  /// Runs `cmds` (one caller's, in order) on one connection, pipelined with
  /// whatever other callers send on it meanwhile, (re)connecting first if
  /// needed. Fills each command's `reply`, or its `failure` after a
  /// connection problem or timeout (then the connection is dropped).
  void submit(std::span<pending_command> cmds) {
    if (cmds.empty())
      return;
    waiter self;
    self.remaining = cmds.size();
    auto& conn = pick();
    bool writer = false;
    {
      std::lock_guard<std::mutex> guard{conn.mtx};
      for (auto& cmd : cmds) {
        cmd.owner = &self;
        conn.queue.push_back(&cmd);
      }
      if (!conn.writing) {
        conn.writing = true;
        writer = true;
      }
    }
    std::vector<pending_command*> batch;
    for (;;) {
      if (!writer) {
        self.wake.acquire();
        writer = self.writer;
        if (!writer)
          return; // every command is done
      }
      // Write everything queued so far (ours first when we just joined).
      batch.clear();
      {
        std::lock_guard<std::mutex> guard{conn.mtx};
        while (!conn.queue.empty() && batch.size() < max_pipeline) {
          batch.push_back(conn.queue.front());
          conn.queue.pop_front();
        }
      }
      run_batch(conn, batch);
      waiter* successor = nullptr;
      {
        std::lock_guard<std::mutex> guard{conn.mtx};
        if (conn.queue.empty()) {
          conn.writing = false;
        } else {
          successor = conn.queue.front()->owner;
          successor->writer = true;
        }
      }
      // The successor still has a queued command, so it is not released as
      // done below. A released caller returns at once and its commands are
      // gone: touch nothing of it after the release.
      for (auto* cmd : batch) {
        auto* owner = cmd->owner;
        if (--owner->remaining == 0 && owner != &self) {
          owner->writer = false;
          owner->wake.release();
        }
      }
      if (successor == &self)
        continue; // more of ours is queued: write again
      if (successor != nullptr)
        successor->wake.release();
      if (self.remaining == 0)
        return;
      writer = false;
    }
  }

  /// `submit`, then runs the scripts the server answered NOSCRIPT for
  /// (restart, SCRIPT FLUSH) again with EVAL, which caches them again.
  void submit_scripts(std::span<pending_command> cmds) {
    submit(cmds);
    std::vector<size_t> lost;
    for (size_t i = 0; i < cmds.size(); ++i)
      if (!cmds[i].script.empty() && cmds[i].reply
          && cmds[i].reply->type == REDIS_REPLY_ERROR
          && starts_with(reply_text(*cmds[i].reply), "NOSCRIPT"))
        lost.push_back(i);
    if (lost.empty())
      return;
    std::vector<pending_command> again(lost.size());
    for (size_t j = 0; j < lost.size(); ++j) {
      auto& from = cmds[lost[j]];
      auto& to = again[j];
      to.argc = from.argc;
      for (int a = 0; a < from.argc; ++a) {
        to.argv[a] = from.argv[a];
        to.argvlen[a] = from.argvlen[a];
      }
      to.argv[0] = "EVAL";
      to.argvlen[0] = 4;
      to.argv[1] = from.script.data();
      to.argvlen[1] = from.script.size();
    }
    submit(again);
    for (size_t j = 0; j < lost.size(); ++j) {
      cmds[lost[j]].reply = std::move(again[j].reply);
      cmds[lost[j]].failure = std::move(again[j].failure);
    }
  }

  /// The outcome of a done command: its reply (error replies included), or
  /// `errc::unavailable` after a connection problem or timeout.
  caf::expected<reply_ptr> outcome_of(pending_command& cmd) {
    if (!cmd.failure.empty()) {
      auto err = make_error(errc::unavailable, std::move(cmd.failure));
      mark_failed(err);
      return err;
    }
    if (cmd.reply->type != REDIS_REPLY_ERROR)
      mark_ok();
    return std::move(cmd.reply);
  }

  /// Runs one command, pipelined with whatever other callers send on the
  /// same connection meanwhile, (re)connecting first if needed. Error
  /// replies come back as replies; connection problems and timeouts as
  /// `errc::unavailable` (and the connection is dropped).
  caf::expected<reply_ptr> call(std::initializer_list<std::string_view> args) {
    pending_command cmd;
    cmd.set(args);
    submit({&cmd, 1});
    return outcome_of(cmd);
  }

  /// Runs a loaded script, loading it again if the server lost it (restart,
  /// SCRIPT FLUSH).
  caf::expected<reply_ptr> eval(const std::string& sha, std::string_view src,
                                std::string_view key,
                                std::initializer_list<std::string_view> argv) {
    // At most one key and three arguments: see the scripts above.
    std::string_view args[4] = {};
    size_t n = 0;
    for (auto arg : argv)
      args[n++] = arg;
    auto run = [&](std::string_view cmd, std::string_view body) {
      switch (n) {
        case 1:
          return call({cmd, body, "1", key, args[0]});
        case 2:
          return call({cmd, body, "1", key, args[0], args[1]});
        default:
          return call({cmd, body, "1", key, args[0], args[1], args[2]});
      }
    };
    auto reply = run("EVALSHA", sha);
    if (reply && (*reply)->type == REDIS_REPLY_ERROR
        && starts_with(reply_text(**reply), "NOSCRIPT"))
      return run("EVAL", src);
    return reply;
  }

  /// An error for a reply that is not what the script or command returns.
  caf::error unexpected(std::string_view what, const redisReply& reply) {
    std::string msg = "Redis at " + shown_url + " failed to "
                      + std::string{what} + ": ";
    if (reply.type == REDIS_REPLY_ERROR)
      msg += describe_reply_error(reply_text(reply));
    else
      msg += "unexpected reply type " + std::to_string(reply.type);
    return make_error(errc::io_error, std::move(msg));
  }

  std::string full_key(std::string_view key) const {
    std::string out;
    out.reserve(opts.prefix.size() + key.size());
    out += opts.prefix;
    out += key;
    return out;
  }

  // -- remembered claims --

  void remember(std::string_view key, std::string token,
                steady::time_point expires_at, bool replace) {
    std::lock_guard<std::mutex> guard{claims_mtx};
    remember_locked(key, std::move(token), expires_at, replace, steady::now());
  }

  // Requires claims_mtx.
  void remember_locked(std::string_view key, std::string token,
                       steady::time_point expires_at, bool replace,
                       steady::time_point now) {
    if (++claims_since_sweep >= sweep_interval) {
      claims_since_sweep = 0;
      std::erase_if(claims, [now](const auto& kv) {
        return kv.second.expires_at <= now;
      });
    }
    auto it = claims.find(key);
    if (it == claims.end()) {
      claims.emplace(std::string{key}, claim{std::move(token), expires_at});
    } else if (replace || it->second.expires_at <= now) {
      it->second = claim{std::move(token), expires_at};
    }
  }

  std::string token_of(std::string_view key) const {
    std::lock_guard<std::mutex> guard{claims_mtx};
    return token_of_locked(key, steady::now());
  }

  // Requires claims_mtx.
  std::string token_of_locked(std::string_view key,
                              steady::time_point now) const {
    auto it = claims.find(key);
    if (it == claims.end() || it->second.expires_at <= now)
      return {};
    return it->second.token;
  }

  void forget(std::string_view key, std::string_view token) {
    std::lock_guard<std::mutex> guard{claims_mtx};
    forget_locked(key, token);
  }

  // Requires claims_mtx.
  void forget_locked(std::string_view key, std::string_view token) {
    auto it = claims.find(key);
    if (it != claims.end() && (token.empty() || it->second.token == token))
      claims.erase(it);
  }
};

redis_idempotency_store::redis_idempotency_store(std::unique_ptr<impl> ptr)
  : impl_(std::move(ptr)) {
  // Nothing else to do.
}

redis_idempotency_store::~redis_idempotency_store() = default;

caf::expected<std::shared_ptr<redis_idempotency_store>>
redis_idempotency_store::open(std::string_view url) {
  auto opts = parse_redis_url(url);
  if (!opts)
    return std::move(opts.error());
  return open(std::move(*opts));
}

caf::expected<std::shared_ptr<redis_idempotency_store>>
redis_idempotency_store::open(redis_store_options opts) {
  if (opts.pool == 0 || opts.pool > max_pool)
    return make_error(errc::invalid_config,
                      "redis store pool size must be 1 to 256, got "
                        + std::to_string(opts.pool));
  auto st = std::make_unique<impl>(std::move(opts));
  auto ctx = st->connect();
  if (!ctx)
    return std::move(ctx.error());
  if (auto err = st->load_scripts(ctx->get()))
    return err;
  if (auto err = st->detect_set_claims(ctx->get()))
    return err;
  st->pool[0].ctx = std::move(*ctx);
  return std::shared_ptr<redis_idempotency_store>{
    new redis_idempotency_store(std::move(st))};
}

claim_result redis_idempotency_store::try_begin(std::string_view key,
                                                caf::timespan lease) {
  auto& st = *impl_;
  auto token = st.make_token();
  auto ms = std::to_string(ttl_ms(lease));
  auto expires_at = local_deadline(steady::now(), lease);
  auto full = st.full_key(key);
  pending_command cmd;
  st.set_claim(cmd, full, token, ms);
  st.submit_scripts({&cmd, 1});
  auto reply = st.outcome_of(cmd);
  auto answer = claim_result::unavailable;
  if (!reply || !st.claim_answer(**reply, answer)) {
    if (reply)
      st.mark_failed(st.unexpected("claim a key", **reply));
    // The claim may have reached the server before a timeout: remember the
    // token so an `abort` can still release it.
    st.remember(key, std::move(token), expires_at, false);
    return claim_result::unavailable;
  }
  if (answer == claim_result::fresh)
    st.remember(key, std::move(token), expires_at, true);
  return answer;
}

caf::error redis_idempotency_store::commit(std::string_view key,
                                           caf::timespan keep) {
  auto& st = *impl_;
  auto token = st.token_of(key);
  auto reply = keep.count() > 0
                 ? st.call({"SET", st.full_key(key), committed_marker, "PX",
                            std::to_string(ttl_ms(keep))})
                 : st.eval(st.forget_sha, forget_script, st.full_key(key),
                           {token, committed_marker});
  if (!reply)
    return std::move(reply.error());
  auto type = (*reply)->type;
  if (type != REDIS_REPLY_STATUS && type != REDIS_REPLY_INTEGER) {
    auto err = st.unexpected("commit a key", **reply);
    st.mark_failed(err);
    return err;
  }
  st.forget(key, token);
  return caf::error{};
}

caf::error redis_idempotency_store::abort(std::string_view key) {
  auto& st = *impl_;
  auto token = st.token_of(key);
  if (token.empty())
    return caf::error{};
  auto reply = st.eval(st.release_sha, release_script, st.full_key(key),
                       {token});
  if (!reply)
    return std::move(reply.error());
  if ((*reply)->type != REDIS_REPLY_INTEGER) {
    auto err = st.unexpected("abort a key", **reply);
    st.mark_failed(err);
    return err;
  }
  st.forget(key, token);
  return caf::error{};
}

void redis_idempotency_store::try_begin_many(
  std::span<const std::string_view> keys, caf::timespan lease,
  std::span<claim_result> out) {
  auto n = std::min(keys.size(), out.size());
  if (n == 0)
    return;
  auto& st = *impl_;
  auto ms = std::to_string(ttl_ms(lease));
  auto expires_at = local_deadline(steady::now(), lease);
  std::vector<std::string> full(n);
  std::vector<std::string> tokens(n);
  std::vector<pending_command> cmds(n);
  for (size_t i = 0; i < n; ++i) {
    full[i] = st.full_key(keys[i]);
    tokens[i] = st.make_token();
    st.set_claim(cmds[i], full[i], tokens[i], ms);
  }
  // One pipelined write and one read of the replies for the whole batch.
  st.submit_scripts(cmds);
  bool any_ok = false;
  caf::error first;
  std::lock_guard<std::mutex> guard{st.claims_mtx};
  auto now = steady::now();
  for (size_t i = 0; i < n; ++i) {
    auto& cmd = cmds[i];
    auto answer = claim_result::unavailable;
    if (!cmd.failure.empty() || !st.claim_answer(*cmd.reply, answer)) {
      if (!first)
        first = !cmd.failure.empty()
                  ? make_error(errc::unavailable, std::move(cmd.failure))
                  : st.unexpected("claim a key", *cmd.reply);
      // As in try_begin: the claim may have reached the server.
      st.remember_locked(keys[i], std::move(tokens[i]), expires_at, false, now);
      out[i] = claim_result::unavailable;
      continue;
    }
    any_ok = true;
    if (answer == claim_result::fresh)
      st.remember_locked(keys[i], std::move(tokens[i]), expires_at, true, now);
    out[i] = answer;
  }
  if (first)
    st.mark_failed(first);
  else if (any_ok)
    st.mark_ok();
}

caf::error redis_idempotency_store::finish_many(std::span<const finish_op> ops,
                                                caf::timespan keep,
                                                std::span<caf::error> errors) {
  auto n = std::min(ops.size(), errors.size());
  if (n == 0)
    return caf::error{};
  auto& st = *impl_;
  std::vector<std::string> tokens(n);
  {
    std::lock_guard<std::mutex> guard{st.claims_mtx};
    auto now = steady::now();
    for (size_t i = 0; i < n; ++i)
      tokens[i] = st.token_of_locked(ops[i].key, now);
  }
  auto keep_ms = std::to_string(ttl_ms(keep));
  std::vector<std::string> full(n);
  std::vector<pending_command> cmds;
  cmds.reserve(n);
  // Which command answers step i (npos: nothing to send).
  constexpr auto none = std::numeric_limits<size_t>::max();
  std::vector<size_t> cmd_of(n, none);
  for (size_t i = 0; i < n; ++i) {
    errors[i] = caf::error{};
    full[i] = st.full_key(ops[i].key);
    if (ops[i].kind == finish_op::abort && tokens[i].empty())
      continue; // never claimed here, or the lease ended: nothing to release
    cmd_of[i] = cmds.size();
    auto& cmd = cmds.emplace_back();
    if (ops[i].kind == finish_op::abort) {
      cmd.set({"EVALSHA", st.release_sha, "1", full[i], tokens[i]});
      cmd.script = release_script;
    } else if (keep.count() > 0) {
      cmd.set({"SET", full[i], committed_marker, "PX", keep_ms});
    } else {
      cmd.set(
        {"EVALSHA", st.forget_sha, "1", full[i], tokens[i], committed_marker});
      cmd.script = forget_script;
    }
  }
  // One pipelined write and one read of the replies for the whole batch.
  st.submit_scripts(cmds);
  caf::error first;
  bool any_ok = false;
  std::lock_guard<std::mutex> guard{st.claims_mtx};
  for (size_t i = 0; i < n; ++i) {
    if (cmd_of[i] == none)
      continue;
    auto& cmd = cmds[cmd_of[i]];
    bool commit = ops[i].kind == finish_op::commit;
    if (!cmd.failure.empty()) {
      errors[i] = make_error(errc::unavailable, cmd.failure);
    } else if (auto type = cmd.reply->type;
               type != REDIS_REPLY_INTEGER
               && !(commit && type == REDIS_REPLY_STATUS)) {
      errors[i] = st.unexpected(commit ? "commit a key" : "abort a key",
                                *cmd.reply);
    } else {
      any_ok = true;
      st.forget_locked(ops[i].key, tokens[i]);
      continue;
    }
    if (!first)
      first = errors[i];
  }
  if (first)
    st.mark_failed(first);
  else if (any_ok)
    st.mark_ok();
  return first;
}

bool redis_idempotency_store::remote() const noexcept {
  return true;
}

caf::error redis_idempotency_store::flush() {
  return caf::error{};
}

const redis_store_options& redis_idempotency_store::options() const noexcept {
  return impl_->opts;
}

redis_idempotency_store::pipeline_stats
redis_idempotency_store::pipelining() const noexcept {
  return {impl_->commands.load(std::memory_order_relaxed),
          impl_->round_trips.load(std::memory_order_relaxed)};
}

size_t redis_idempotency_store::pending_claims() const {
  std::lock_guard<std::mutex> guard{impl_->claims_mtx};
  return impl_->claims.size();
}

void register_redis_store() {
  register_idempotency_store(
    "redis", [](std::string_view url) -> caf::expected<idempotency_store_ptr> {
      auto store = redis_idempotency_store::open(url);
      if (!store)
        return std::move(store.error());
      return idempotency_store_ptr{std::move(*store)};
    });
}

} // namespace evmesh
