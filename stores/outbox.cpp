#include "evmesh/outbox.hpp"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <mutex>
#include <utility>

#include <sqlite3.h>

#include "evmesh/error.hpp"

namespace evmesh::outbox {

namespace {

constexpr const char* schema_sql
  = "CREATE TABLE IF NOT EXISTS evmesh_outbox ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " key TEXT NOT NULL DEFAULT '',"
    " topic TEXT NOT NULL,"
    " envelope_json TEXT NOT NULL,"
    " state TEXT NOT NULL DEFAULT 'pending',"
    " attempts INTEGER NOT NULL DEFAULT 0,"
    " last_error TEXT NOT NULL DEFAULT '',"
    " next_attempt_ms INTEGER NOT NULL DEFAULT 0,"
    " published_ms INTEGER NOT NULL DEFAULT 0);"
    "CREATE INDEX IF NOT EXISTS evmesh_outbox_state_seq"
    " ON evmesh_outbox(state, seq);"
    "CREATE INDEX IF NOT EXISTS evmesh_outbox_state_next"
    " ON evmesh_outbox(state, next_attempt_ms);";

caf::error sql_error(sqlite3* db, std::string_view what) {
  std::string msg = "outbox: ";
  msg += what;
  msg += " failed: ";
  msg += db != nullptr ? sqlite3_errmsg(db) : "no database connection";
  return make_error(errc::io_error, std::move(msg));
}

/// A prepared statement, finalized on scope exit.
class statement {
public:
  statement(sqlite3* db, const char* sql) {
    rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr);
  }
  ~statement() {
    sqlite3_finalize(stmt_);
  }
  statement(const statement&) = delete;
  statement& operator=(const statement&) = delete;

  bool ok() const noexcept {
    return rc_ == SQLITE_OK;
  }
  sqlite3_stmt* get() const noexcept {
    return stmt_;
  }
  void bind(int i, std::string_view text) {
    sqlite3_bind_text(stmt_, i, text.data(), static_cast<int>(text.size()),
                      SQLITE_TRANSIENT);
  }
  void bind(int i, int64_t x) {
    sqlite3_bind_int64(stmt_, i, x);
  }
  int step() {
    return sqlite3_step(stmt_);
  }
  std::string text(int col) const {
    auto p = sqlite3_column_text(stmt_, col);
    auto n = sqlite3_column_bytes(stmt_, col);
    return p == nullptr ? std::string{}
                        : std::string{reinterpret_cast<const char*>(p),
                                      static_cast<size_t>(n)};
  }
  int64_t integer(int col) const {
    return sqlite3_column_int64(stmt_, col);
  }

private:
  sqlite3_stmt* stmt_ = nullptr;
  int rc_ = SQLITE_OK;
};

std::string new_uuid() {
  auto bytes = new_trace_id(); // 16 random bytes
  bytes[6] = static_cast<uint8_t>((bytes[6] & 0x0F) | 0x40);
  bytes[8] = static_cast<uint8_t>((bytes[8] & 0x3F) | 0x80);
  auto hex = to_hex(bytes.data(), bytes.size());
  return hex.substr(0, 8) + '-' + hex.substr(8, 4) + '-' + hex.substr(12, 4)
         + '-' + hex.substr(16, 4) + '-' + hex.substr(20);
}

row read_row(const statement& st) {
  row r;
  r.seq = st.integer(0);
  r.key = st.text(1);
  r.topic = st.text(2);
  r.envelope_json = st.text(3);
  r.state = st.text(4);
  r.attempts = static_cast<uint32_t>(st.integer(5));
  r.last_error = st.text(6);
  r.next_attempt_ms = st.integer(7);
  r.published_ms = st.integer(8);
  return r;
}

constexpr const char* row_columns = "seq, key, topic, envelope_json, state, "
                                    "attempts, last_error, next_attempt_ms, "
                                    "published_ms";

caf::error exec(sqlite3* db, const char* sql, std::string_view what) {
  char* msg = nullptr;
  if (sqlite3_exec(db, sql, nullptr, nullptr, &msg) != SQLITE_OK) {
    std::string text = "outbox: ";
    text += what;
    text += " failed: ";
    text += msg != nullptr ? msg : "unknown error";
    sqlite3_free(msg);
    return make_error(errc::io_error, std::move(text));
  }
  return {};
}

} // namespace

caf::error ensure_schema(sqlite3* db) {
  if (db == nullptr)
    return make_error(errc::invalid_state, "outbox: no database connection");
  return exec(db, schema_sql, "creating the evmesh_outbox table");
}

void stamp(envelope& env, const trace_context* current) {
  if (env.id.empty())
    env.id = new_uuid();
  if (env.idempotency_key.empty())
    env.idempotency_key = env.id;
  if (env.traceparent.empty()) {
    if (current != nullptr) {
      env.traceparent = current->traceparent();
      if (env.tracestate.empty())
        env.tracestate = current->tracestate;
    } else {
      env.traceparent = new_root_trace().traceparent();
    }
  }
  if (env.produced_at.empty())
    env.produced_at = rfc3339_now();
}

caf::expected<int64_t> enqueue(sqlite3* db, envelope env,
                               const trace_context* current,
                               envelope* stamped) {
  if (db == nullptr)
    return make_error(errc::invalid_state, "outbox: no database connection");
  if (env.topic.empty())
    return make_error(errc::invalid_config,
                      "outbox: cannot enqueue an envelope without a topic");
  stamp(env, current);
  statement st{db, "INSERT INTO evmesh_outbox (key, topic, envelope_json, "
                   "state) VALUES (?1, ?2, ?3, 'pending')"};
  if (!st.ok())
    return sql_error(db, "preparing the insert (did ensure_schema run?)");
  st.bind(1, env.key);
  st.bind(2, env.topic);
  st.bind(3, encode_envelope(env));
  if (st.step() != SQLITE_DONE)
    return sql_error(db, "inserting an outbox row");
  auto seq = sqlite3_last_insert_rowid(db);
  if (stamped != nullptr)
    *stamped = std::move(env);
  return seq;
}

caf::timespan relay_backoff(uint32_t attempts, caf::timespan initial,
                            caf::timespan max) {
  if (attempts == 0)
    return caf::timespan{0};
  auto d = initial;
  for (uint32_t i = 1; i < attempts && d < max; ++i)
    d *= 2;
  return d < max ? d : max;
}

// -- store ---------------------------------------------------------------------

struct store::impl {
  sqlite3* db = nullptr;
  std::string path;
  std::mutex mtx;

  ~impl() {
    sqlite3_close_v2(db);
  }
};

store::store(std::unique_ptr<impl> p) : impl_(std::move(p)) {
}

store::~store() = default;

caf::expected<store_ptr> store::open(const std::string& path) {
  namespace fs = std::filesystem;
  if (path.empty())
    return make_error(errc::invalid_config,
                      "cannot open the outbox: the path is empty");
  auto p = std::make_unique<impl>();
  p->path = path;
  if (path != ":memory:") {
    auto dir = fs::path{path}.parent_path();
    std::error_code ec;
    if (!dir.empty() && !fs::is_directory(dir, ec))
      fs::create_directories(dir, ec);
  }
  auto rc = sqlite3_open_v2(
    path.c_str(), &p->db,
    SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
  if (rc != SQLITE_OK)
    return make_error(errc::unavailable,
                      "cannot open the outbox database '" + path
                        + "': " + sqlite3_errstr(rc)
                        + " — check the directory exists and is writable");
  sqlite3_busy_timeout(p->db, 5000);
  if (auto err = exec(p->db,
                      "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                      "configuring the connection"))
    return make_error(errc::unavailable, "cannot open the outbox database '"
                                           + path + "': " + render(err));
  if (auto err = ensure_schema(p->db))
    return make_error(errc::unavailable,
                      "cannot initialise the outbox database '" + path
                        + "': " + render(err));
  return store_ptr{new store(std::move(p))};
}

caf::expected<store_ptr> store::open_url(std::string_view url) {
  for (std::string_view prefix : {"outbox:sqlite://", "sqlite://"})
    if (url.starts_with(prefix))
      return open(std::string{url.substr(prefix.size())});
  return make_error(errc::invalid_url, "not an outbox URL: '" + std::string{url}
                                         + "' — expected outbox:sqlite://PATH");
}

sqlite3* store::handle() const noexcept {
  return impl_->db;
}

const std::string& store::path() const noexcept {
  return impl_->path;
}

caf::expected<int64_t>
store::enqueue(envelope env, const trace_context* current, envelope* stamped) {
  std::lock_guard guard{impl_->mtx};
  return outbox::enqueue(impl_->db, std::move(env), current, stamped);
}

namespace {

/// Steps `st` to the end, reading every row; `what` names the query in errors.
caf::expected<std::vector<row>> collect_rows(sqlite3* db, statement& st,
                                             const char* what) {
  std::vector<row> result;
  int rc;
  while ((rc = st.step()) == SQLITE_ROW)
    result.push_back(read_row(st));
  if (rc != SQLITE_DONE)
    return sql_error(db, what);
  return result;
}

} // namespace

caf::expected<std::vector<row>> store::ready(int64_t now_ms, size_t limit,
                                             bool parked_blocks_key) {
  std::lock_guard guard{impl_->mtx};
  // A key is blocked by a row waiting for its retry (or parked): its later
  // rows are never attempted before it, so excluding the whole key is exact.
  std::string sql = "SELECT ";
  sql += row_columns;
  sql += " FROM evmesh_outbox WHERE state = 'pending' AND next_attempt_ms <= "
         "?1 AND (key = '' OR key NOT IN (SELECT key FROM evmesh_outbox WHERE "
         "state = 'pending' AND next_attempt_ms > ?1";
  if (parked_blocks_key)
    sql += " UNION SELECT key FROM evmesh_outbox WHERE state = 'parked'";
  sql += ")) ORDER BY seq LIMIT ?2";
  statement st{impl_->db, sql.c_str()};
  if (!st.ok())
    return sql_error(impl_->db, "preparing the ready-rows query");
  st.bind(1, now_ms);
  st.bind(2, limit == 0 ? int64_t{-1} : static_cast<int64_t>(limit));
  return collect_rows(impl_->db, st, "reading ready rows");
}

caf::error store::mark_published(int64_t seq, int64_t at_ms) {
  std::lock_guard guard{impl_->mtx};
  statement st{impl_->db, "UPDATE evmesh_outbox SET state = 'published', "
                          "published_ms = ?2 WHERE seq = ?1"};
  st.bind(1, seq);
  st.bind(2, at_ms);
  if (!st.ok() || st.step() != SQLITE_DONE)
    return sql_error(impl_->db,
                     "marking row " + std::to_string(seq) + " published");
  return {};
}

caf::error store::mark_failed(int64_t seq, uint32_t attempts,
                              std::string_view error, int64_t next_attempt_ms) {
  std::lock_guard guard{impl_->mtx};
  statement st{impl_->db,
               "UPDATE evmesh_outbox SET attempts = ?2, last_error = ?3, "
               "next_attempt_ms = ?4 WHERE seq = ?1"};
  st.bind(1, seq);
  st.bind(2, static_cast<int64_t>(attempts));
  st.bind(3, error);
  st.bind(4, next_attempt_ms);
  if (!st.ok() || st.step() != SQLITE_DONE)
    return sql_error(impl_->db,
                     "recording the failure of row " + std::to_string(seq));
  return {};
}

caf::error store::park(int64_t seq, uint32_t attempts, std::string_view error) {
  std::lock_guard guard{impl_->mtx};
  statement st{impl_->db,
               "UPDATE evmesh_outbox SET state = 'parked', attempts = ?2, "
               "last_error = ?3 WHERE seq = ?1"};
  st.bind(1, seq);
  st.bind(2, static_cast<int64_t>(attempts));
  st.bind(3, error);
  if (!st.ok() || st.step() != SQLITE_DONE)
    return sql_error(impl_->db, "parking row " + std::to_string(seq));
  return {};
}

caf::expected<size_t> store::unpark(int64_t seq) {
  std::lock_guard guard{impl_->mtx};
  statement st{impl_->db,
               "UPDATE evmesh_outbox SET state = 'pending', attempts = 0, "
               "next_attempt_ms = 0 WHERE state = 'parked' AND (?1 = 0 OR seq "
               "= ?1)"};
  st.bind(1, seq);
  if (!st.ok() || st.step() != SQLITE_DONE)
    return sql_error(impl_->db, "unparking rows");
  return static_cast<size_t>(sqlite3_changes(impl_->db));
}

caf::expected<counts> store::count() {
  std::lock_guard guard{impl_->mtx};
  statement st{impl_->db,
               "SELECT state, COUNT(*) FROM evmesh_outbox GROUP BY state"};
  if (!st.ok())
    return sql_error(impl_->db, "counting rows");
  counts c;
  int rc;
  while ((rc = st.step()) == SQLITE_ROW) {
    auto state = st.text(0);
    auto n = static_cast<uint64_t>(st.integer(1));
    if (state == state_pending)
      c.pending = n;
    else if (state == state_published)
      c.published = n;
    else if (state == state_parked)
      c.parked = n;
  }
  if (rc != SQLITE_DONE)
    return sql_error(impl_->db, "counting rows");
  return c;
}

caf::expected<std::vector<row>> store::rows(int64_t after, size_t limit) {
  std::lock_guard guard{impl_->mtx};
  std::string sql = "SELECT ";
  sql += row_columns;
  sql += " FROM evmesh_outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2";
  statement st{impl_->db, sql.c_str()};
  if (!st.ok())
    return sql_error(impl_->db, "preparing the rows query");
  st.bind(1, after);
  st.bind(2, limit == 0 ? int64_t{-1} : static_cast<int64_t>(limit));
  return collect_rows(impl_->db, st, "reading rows");
}

} // namespace evmesh::outbox
