#include "evmesh/sqlite_store.hpp"

#include <algorithm>
#include <array>
#include <climits>
#include <filesystem>
#include <limits>
#include <mutex>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <sqlite3.h>

namespace evmesh {

namespace {

constexpr int busy_timeout_ms = 5000;

int64_t to_ms(std::chrono::system_clock::time_point tp) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
           tp.time_since_epoch())
    .count();
}

/// `now_ms + ttl` in whole milliseconds (rounded up), saturating.
int64_t deadline_ms(int64_t now_ms, caf::timespan ttl) {
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(ttl).count();
  constexpr auto max = std::numeric_limits<int64_t>::max();
  constexpr auto min = std::numeric_limits<int64_t>::min();
  if (ms > 0 && now_ms > max - ms)
    return max;
  if (ms < 0 && now_ms < min - ms)
    return min;
  return now_ms + ms;
}

/// What a person can do about a failed operation, by SQLite result code.
std::string_view hint(int rc) {
  switch (rc & 0xFF) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return " — another connection held the lock for more than 5 s; retry "
             "later";
    case SQLITE_FULL:
      return " — the disk is full; free space";
    case SQLITE_READONLY:
    case SQLITE_PERM:
    case SQLITE_CANTOPEN:
      return " — check the file and its directory are writable";
    case SQLITE_IOERR:
      return " — check the disk and the file system";
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return " — the file is damaged or not an SQLite database; move it "
             "away to start afresh";
    default:
      return "";
  }
}

/// One SQLite connection plus the statements prepared on it. Not
/// thread-safe: the owning store serialises access with its mutex.
class database {
public:
  ~database() {
    for (auto stmt : statements_)
      sqlite3_finalize(stmt);
    sqlite3_close_v2(db_);
  }

  /// Opens `path` and runs `schema`. `synchronous` is the PRAGMA value.
  static caf::expected<std::unique_ptr<database>>
  open(const std::string& path, std::string_view synchronous,
       const char* schema) {
    namespace fs = std::filesystem;
    if (path.empty())
      return make_error(errc::invalid_config,
                        "cannot open SQLite database: the path is empty");
    if (path != ":memory:") {
      auto dir = fs::path{path}.parent_path();
      std::error_code ec;
      if (!dir.empty() && !fs::is_directory(dir, ec)) {
        fs::create_directories(dir, ec);
        if (ec)
          return make_error(errc::unavailable,
                            "cannot create directory '" + dir.string()
                              + "' for SQLite database '" + path
                              + "': " + ec.message()
                              + " — check the parent directory exists and "
                                "is writable");
      }
    }
    sqlite3* raw = nullptr;
    auto flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE
                 | SQLITE_OPEN_NOMUTEX;
    auto rc = sqlite3_open_v2(path.c_str(), &raw, flags, nullptr);
    std::unique_ptr<database> db{new database(raw, path)};
    if (rc != SQLITE_OK)
      return make_error(errc::unavailable,
                        "cannot open SQLite database '" + path
                          + "': " + db->message(rc)
                          + " — check the directory exists and is writable");
    sqlite3_extended_result_codes(raw, 1);
    sqlite3_busy_timeout(raw, busy_timeout_ms);
    std::string pragmas = "PRAGMA journal_mode=WAL; PRAGMA synchronous=";
    pragmas += synchronous;
    pragmas += ';';
    if (auto err = db->exec(pragmas.c_str(), "configure"))
      return err;
    if (auto err = db->exec(schema, "initialise"))
      return err;
    return db;
  }

  sqlite3* get() const noexcept {
    return db_;
  }

  const std::string& path() const noexcept {
    return path_;
  }

  /// The last error message of this connection (or the text of `rc`).
  std::string message(int rc) const {
    if (db_ != nullptr && sqlite3_errcode(db_) != SQLITE_OK)
      return sqlite3_errmsg(db_);
    return sqlite3_errstr(rc);
  }

  /// A retryable error for a failed operation `what`.
  caf::error failure(std::string_view what, int rc) const {
    std::string msg = "SQLite ";
    msg += what;
    msg += " on '";
    msg += path_;
    msg += "' failed: ";
    msg += message(rc);
    msg += hint(rc);
    return make_error(errc::io_error, std::move(msg));
  }

  /// Prepares `sql` once; the statement lives as long as the connection.
  caf::expected<sqlite3_stmt*> prepare(const char* sql) {
    sqlite3_stmt* stmt = nullptr;
    auto rc = sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt,
                                 nullptr);
    if (rc != SQLITE_OK)
      return failure("prepare", rc);
    statements_.push_back(stmt);
    return stmt;
  }

  /// Runs `sql` (no result rows), e.g. BEGIN / COMMIT.
  caf::error run(const char* sql, std::string_view what) {
    return exec(sql, what);
  }

private:
  database(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {
    // Nothing else to do.
  }

  caf::error exec(const char* sql, std::string_view what) {
    char* msg = nullptr;
    auto rc = sqlite3_exec(db_, sql, nullptr, nullptr, &msg);
    if (rc == SQLITE_OK)
      return caf::error{};
    std::string text = msg != nullptr ? msg : sqlite3_errstr(rc);
    sqlite3_free(msg);
    std::string out = "cannot ";
    out += what;
    out += " SQLite database '";
    out += path_;
    out += "': ";
    out += text;
    auto h = hint(rc);
    out += h.empty() ? " — check the file is a writable SQLite database" : h;
    return make_error(errc::unavailable, std::move(out));
  }

  sqlite3* db_;
  std::string path_;
  std::vector<sqlite3_stmt*> statements_;
};

/// Binds, steps and reads one prepared statement; resets it when done so the
/// next user finds it clean.
class query {
public:
  explicit query(sqlite3_stmt* stmt) : stmt_(stmt) {
    // Nothing else to do.
  }

  query(const query&) = delete;
  query& operator=(const query&) = delete;

  ~query() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }

  void bind(int index, std::string_view text) {
    if (text.size() > static_cast<size_t>(INT_MAX)) {
      keep(SQLITE_TOOBIG);
      return;
    }
    keep(sqlite3_bind_text(stmt_, index, text.data(),
                           static_cast<int>(text.size()), SQLITE_STATIC));
  }

  void bind(int index, int64_t value) {
    keep(sqlite3_bind_int64(stmt_, index, value));
  }

  /// SQLITE_ROW, SQLITE_DONE or an error code.
  int step() {
    if (bind_rc_ != SQLITE_OK)
      return bind_rc_;
    return sqlite3_step(stmt_);
  }

  int64_t int64(int col) const {
    return sqlite3_column_int64(stmt_, col);
  }

  std::string text(int col) const {
    auto ptr = sqlite3_column_text(stmt_, col);
    auto len = sqlite3_column_bytes(stmt_, col);
    if (ptr == nullptr || len <= 0)
      return {};
    return std::string{reinterpret_cast<const char*>(ptr),
                       static_cast<size_t>(len)};
  }

private:
  void keep(int rc) {
    if (bind_rc_ == SQLITE_OK)
      bind_rc_ = rc;
  }

  sqlite3_stmt* stmt_;
  int bind_rc_ = SQLITE_OK;
};

// -- idempotency schema ---------------------------------------------------------

constexpr int state_in_flight = 0;
constexpr int state_committed = 1;

constexpr const char* idempotency_schema = R"sql(
CREATE TABLE IF NOT EXISTS evmesh_idempotency (
  key TEXT PRIMARY KEY NOT NULL,
  state INTEGER NOT NULL,
  expires_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS evmesh_idempotency_expiry
  ON evmesh_idempotency (expires_at_ms);
)sql";

// Claims a key that is absent or expired in one atomic statement; it changes
// no row (sqlite3_changes() == 0) while an unexpired entry exists.
constexpr const char* claim_sql = R"sql(
INSERT INTO evmesh_idempotency (key, state, expires_at_ms) VALUES (?1, 0, ?2)
ON CONFLICT (key) DO UPDATE
  SET state = 0, expires_at_ms = excluded.expires_at_ms
  WHERE evmesh_idempotency.expires_at_ms <= ?3
)sql";

constexpr const char* state_sql
  = "SELECT state FROM evmesh_idempotency WHERE key = ?1";

constexpr const char* commit_sql = R"sql(
INSERT INTO evmesh_idempotency (key, state, expires_at_ms) VALUES (?1, 1, ?2)
ON CONFLICT (key) DO UPDATE
  SET state = 1, expires_at_ms = excluded.expires_at_ms
)sql";

constexpr const char* forget_sql
  = "DELETE FROM evmesh_idempotency WHERE key = ?1";

constexpr const char* abort_sql
  = "DELETE FROM evmesh_idempotency WHERE key = ?1 AND state = 0";

constexpr const char* purge_sql = R"sql(
DELETE FROM evmesh_idempotency WHERE key IN (
  SELECT key FROM evmesh_idempotency WHERE expires_at_ms <= ?1 LIMIT ?2)
)sql";

constexpr const char* count_sql = "SELECT count(*) FROM evmesh_idempotency";

// -- dead-letter schema -----------------------------------------------------------

constexpr const char* dead_letter_schema = R"sql(
CREATE TABLE IF NOT EXISTS evmesh_dead_letters (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  category TEXT NOT NULL,
  consumer TEXT NOT NULL,
  pattern TEXT NOT NULL,
  topic TEXT NOT NULL,
  "key" TEXT NOT NULL,
  last_failure_ms INTEGER NOT NULL,
  replayed_ms INTEGER NOT NULL DEFAULT 0,
  record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS evmesh_dead_letters_time
  ON evmesh_dead_letters (last_failure_ms);
CREATE INDEX IF NOT EXISTS evmesh_dead_letters_category
  ON evmesh_dead_letters (category, last_failure_ms);
CREATE INDEX IF NOT EXISTS evmesh_dead_letters_consumer
  ON evmesh_dead_letters (consumer, last_failure_ms);
CREATE INDEX IF NOT EXISTS evmesh_dead_letters_pattern
  ON evmesh_dead_letters (pattern, last_failure_ms);
CREATE INDEX IF NOT EXISTS evmesh_dead_letters_topic
  ON evmesh_dead_letters (topic, last_failure_ms);
CREATE INDEX IF NOT EXISTS evmesh_dead_letters_key
  ON evmesh_dead_letters ("key", last_failure_ms);
CREATE INDEX IF NOT EXISTS evmesh_dead_letters_replayed
  ON evmesh_dead_letters (replayed_ms);
)sql";

constexpr const char* insert_sql = R"sql(
INSERT INTO evmesh_dead_letters
  (category, consumer, pattern, topic, "key", last_failure_ms, replayed_ms,
   record)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
)sql";

constexpr const char* select_one_sql = R"sql(
SELECT id, replayed_ms, record FROM evmesh_dead_letters WHERE id = ?1
)sql";

constexpr const char* replayed_sql
  = "UPDATE evmesh_dead_letters SET replayed_ms = ?2 WHERE id = ?1";

constexpr const char* remove_sql
  = "DELETE FROM evmesh_dead_letters WHERE id = ?1";

// Bits of the list filter mask; the parameter numbers are fixed (?1..?7) so
// every variant binds the same way.
constexpr unsigned by_topic = 1;
constexpr unsigned by_consumer = 2;
constexpr unsigned by_category = 4;
constexpr unsigned by_key = 8;
constexpr unsigned by_since = 16;
constexpr unsigned by_until = 32;
constexpr size_t list_variants = 64;

std::string list_sql(unsigned mask) {
  std::string sql = "SELECT id, replayed_ms, record, category, consumer, "
                    "pattern, topic, \"key\", last_failure_ms "
                    "FROM evmesh_dead_letters WHERE 1";
  if (mask & by_topic)
    sql += " AND topic = ?1";
  if (mask & by_consumer)
    sql += " AND consumer = ?2";
  if (mask & by_category)
    sql += " AND category = ?3";
  if (mask & by_key)
    sql += " AND \"key\" = ?4";
  if (mask & by_since)
    sql += " AND last_failure_ms >= ?5";
  if (mask & by_until)
    sql += " AND last_failure_ms <= ?6";
  sql += " ORDER BY last_failure_ms DESC, id DESC LIMIT ?7";
  return sql;
}

} // namespace

// -- sqlite_idempotency_store ---------------------------------------------------

struct sqlite_idempotency_store::state {
  std::mutex mtx;
  std::unique_ptr<database> db;
  wall_clock clock;
  sqlite3_stmt* claim = nullptr;
  sqlite3_stmt* read_state = nullptr;
  sqlite3_stmt* commit = nullptr;
  sqlite3_stmt* forget = nullptr;
  sqlite3_stmt* abort = nullptr;
  sqlite3_stmt* purge = nullptr;
  sqlite3_stmt* count = nullptr;
  size_t ops = 0;

  int64_t now_ms() const {
    return to_ms(clock ? clock() : std::chrono::system_clock::now());
  }

  // Requires mtx. Deletes up to `limit` expired rows (-1 = all).
  caf::expected<size_t> purge_rows(int64_t now, int64_t limit) {
    query q{purge};
    q.bind(1, now);
    q.bind(2, limit);
    if (auto rc = q.step(); rc != SQLITE_DONE)
      return db->failure("purge of expired keys", rc);
    return static_cast<size_t>(sqlite3_changes(db->get()));
  }

  // Require mtx. The single-key operations.
  caf::error commit_locked(std::string_view key, caf::timespan keep,
                           int64_t now);
  caf::error abort_locked(std::string_view key, int64_t now);

  // Requires mtx. Counts an operation; purges a batch every purge_interval.
  void tick(int64_t now) {
    if (++ops % purge_interval != 0)
      return;
    if (auto res = purge_rows(now, static_cast<int64_t>(purge_batch)); !res)
      spdlog::warn("{}", render(res.error()));
  }
};

sqlite_idempotency_store::sqlite_idempotency_store(std::unique_ptr<state> st)
  : state_(std::move(st)) {
  // Nothing else to do.
}

sqlite_idempotency_store::~sqlite_idempotency_store() = default;

caf::expected<std::shared_ptr<sqlite_idempotency_store>>
sqlite_idempotency_store::open(const std::string& path) {
  return open(path, wall_clock{});
}

caf::expected<std::shared_ptr<sqlite_idempotency_store>>
sqlite_idempotency_store::open(const std::string& path, wall_clock clock) {
  auto db = database::open(path, "NORMAL", idempotency_schema);
  if (!db)
    return std::move(db.error());
  auto st = std::make_unique<state>();
  st->db = std::move(*db);
  st->clock = std::move(clock);
  std::pair<sqlite3_stmt**, const char*> statements[] = {
    {&st->claim, claim_sql},   {&st->read_state, state_sql},
    {&st->commit, commit_sql}, {&st->forget, forget_sql},
    {&st->abort, abort_sql},   {&st->purge, purge_sql},
    {&st->count, count_sql},
  };
  for (auto [out, sql] : statements) {
    auto stmt = st->db->prepare(sql);
    if (!stmt)
      return std::move(stmt.error());
    *out = *stmt;
  }
  return std::shared_ptr<sqlite_idempotency_store>{
    new sqlite_idempotency_store(std::move(st))};
}

claim_result sqlite_idempotency_store::try_begin(std::string_view key,
                                                 caf::timespan lease) {
  auto& st = *state_;
  auto now = st.now_ms();
  std::lock_guard<std::mutex> guard{st.mtx};
  st.tick(now);
  {
    query q{st.claim};
    q.bind(1, key);
    q.bind(2, deadline_ms(now, lease));
    q.bind(3, now);
    if (auto rc = q.step(); rc != SQLITE_DONE) {
      spdlog::warn("{}", render(st.db->failure("claim of a key", rc)));
      return claim_result::unavailable;
    }
    if (sqlite3_changes(st.db->get()) > 0)
      return claim_result::fresh;
  }
  // An unexpired entry exists (or existed a moment ago); classify it.
  query q{st.read_state};
  q.bind(1, key);
  switch (auto rc = q.step()) {
    case SQLITE_ROW:
      return q.int64(0) == state_committed ? claim_result::duplicate
                                           : claim_result::in_flight;
    case SQLITE_DONE:
      // Aborted by another connection in between: let the caller retry.
      return claim_result::in_flight;
    default:
      spdlog::warn("{}", render(st.db->failure("read of a key", rc)));
      return claim_result::unavailable;
  }
}

caf::error sqlite_idempotency_store::commit(std::string_view key,
                                            caf::timespan keep) {
  auto& st = *state_;
  auto now = st.now_ms();
  std::lock_guard<std::mutex> guard{st.mtx};
  return st.commit_locked(key, keep, now);
}

caf::error sqlite_idempotency_store::state::commit_locked(std::string_view key,
                                                          caf::timespan keep,
                                                          int64_t now) {
  auto& st = *this;
  st.tick(now);
  if (keep.count() <= 0) {
    query q{st.forget};
    q.bind(1, key);
    if (auto rc = q.step(); rc != SQLITE_DONE)
      return st.db->failure("commit of a key", rc);
    return caf::error{};
  }
  query q{st.commit};
  q.bind(1, key);
  q.bind(2, deadline_ms(now, keep));
  if (auto rc = q.step(); rc != SQLITE_DONE)
    return st.db->failure("commit of a key", rc);
  return caf::error{};
}

caf::error sqlite_idempotency_store::abort(std::string_view key) {
  auto& st = *state_;
  auto now = st.now_ms();
  std::lock_guard<std::mutex> guard{st.mtx};
  return st.abort_locked(key, now);
}

caf::error sqlite_idempotency_store::state::abort_locked(std::string_view key,
                                                         int64_t now) {
  tick(now);
  query q{abort};
  q.bind(1, key);
  if (auto rc = q.step(); rc != SQLITE_DONE)
    return db->failure("abort of a key", rc);
  return caf::error{};
}

caf::error sqlite_idempotency_store::finish_many(std::span<const finish_op> ops,
                                                 caf::timespan keep,
                                                 std::span<caf::error> errors) {
  auto n = std::min(ops.size(), errors.size());
  if (n == 0)
    return caf::error{};
  auto& st = *state_;
  auto now = st.now_ms();
  std::lock_guard<std::mutex> guard{st.mtx};
  auto fail_all = [&](const caf::error& err) {
    for (size_t i = 0; i < n; ++i)
      errors[i] = err;
    return err;
  };
  // One transaction: one WAL commit for the whole batch.
  if (auto err = st.db->run("BEGIN IMMEDIATE", "begin a batch in"))
    return fail_all(err);
  caf::error first;
  for (size_t i = 0; i < n; ++i) {
    errors[i] = ops[i].kind == finish_op::commit
                  ? st.commit_locked(ops[i].key, keep, now)
                  : st.abort_locked(ops[i].key, now);
    if (errors[i] && !first)
      first = errors[i];
  }
  if (auto err = st.db->run("COMMIT", "commit a batch to")) {
    // Nothing of the batch was written.
    (void) st.db->run("ROLLBACK", "roll back a batch in");
    return fail_all(err);
  }
  return first;
}

caf::error sqlite_idempotency_store::flush() {
  auto& st = *state_;
  std::lock_guard<std::mutex> guard{st.mtx};
  auto rc = sqlite3_wal_checkpoint_v2(
    st.db->get(), nullptr, SQLITE_CHECKPOINT_PASSIVE, nullptr, nullptr);
  if (rc != SQLITE_OK)
    return st.db->failure("checkpoint", rc);
  return caf::error{};
}

caf::expected<size_t> sqlite_idempotency_store::size() {
  auto& st = *state_;
  std::lock_guard<std::mutex> guard{st.mtx};
  query q{st.count};
  if (auto rc = q.step(); rc != SQLITE_ROW)
    return st.db->failure("count of keys", rc);
  return static_cast<size_t>(q.int64(0));
}

caf::expected<size_t> sqlite_idempotency_store::purge_expired() {
  auto& st = *state_;
  auto now = st.now_ms();
  std::lock_guard<std::mutex> guard{st.mtx};
  return st.purge_rows(now, -1);
}

const std::string& sqlite_idempotency_store::path() const noexcept {
  return state_->db->path();
}

// -- sqlite_dead_letter_store ---------------------------------------------------

struct sqlite_dead_letter_store::state {
  std::mutex mtx;
  std::unique_ptr<database> db;
  sqlite3_stmt* insert = nullptr;
  sqlite3_stmt* select_one = nullptr;
  sqlite3_stmt* replayed = nullptr;
  sqlite3_stmt* remove = nullptr;
  // Prepared on first use, one per combination of filters, so that every
  // combination can use its index.
  std::array<sqlite3_stmt*, list_variants> lists{};
};

sqlite_dead_letter_store::sqlite_dead_letter_store(std::unique_ptr<state> st)
  : state_(std::move(st)) {
  // Nothing else to do.
}

sqlite_dead_letter_store::~sqlite_dead_letter_store() = default;

caf::expected<std::shared_ptr<sqlite_dead_letter_store>>
sqlite_dead_letter_store::open(const std::string& path) {
  // FULL: write() returning means the record survives power loss, and only
  // then may the original message be acked.
  auto db = database::open(path, "FULL", dead_letter_schema);
  if (!db)
    return std::move(db.error());
  auto st = std::make_unique<state>();
  st->db = std::move(*db);
  std::pair<sqlite3_stmt**, const char*> statements[] = {
    {&st->insert, insert_sql},
    {&st->select_one, select_one_sql},
    {&st->replayed, replayed_sql},
    {&st->remove, remove_sql},
  };
  for (auto [out, sql] : statements) {
    auto stmt = st->db->prepare(sql);
    if (!stmt)
      return std::move(stmt.error());
    *out = *stmt;
  }
  return std::shared_ptr<sqlite_dead_letter_store>{
    new sqlite_dead_letter_store(std::move(st))};
}

caf::expected<int64_t>
sqlite_dead_letter_store::write(const dead_letter_record& rec) {
  auto json = to_json(rec);
  auto& st = *state_;
  std::lock_guard<std::mutex> guard{st.mtx};
  query q{st.insert};
  q.bind(1, rec.category);
  q.bind(2, rec.consumer);
  q.bind(3, rec.pattern);
  q.bind(4, rec.topic);
  q.bind(5, rec.key);
  q.bind(6, rec.last_failure_ms);
  q.bind(7, rec.replayed_ms);
  q.bind(8, json);
  if (auto rc = q.step(); rc != SQLITE_DONE)
    return st.db->failure("write of a dead letter", rc);
  return sqlite3_last_insert_rowid(st.db->get());
}

caf::expected<std::vector<dead_letter_record>>
sqlite_dead_letter_store::list(const dead_letter_query& qry) {
  unsigned mask = 0;
  if (!qry.topic.empty())
    mask |= by_topic;
  if (!qry.consumer.empty())
    mask |= by_consumer;
  if (!qry.category.empty())
    mask |= by_category;
  if (!qry.key.empty())
    mask |= by_key;
  if (qry.since_ms != 0)
    mask |= by_since;
  if (qry.until_ms != 0)
    mask |= by_until;
  auto& st = *state_;
  std::lock_guard<std::mutex> guard{st.mtx};
  auto& stmt = st.lists[mask];
  if (stmt == nullptr) {
    auto prepared = st.db->prepare(list_sql(mask).c_str());
    if (!prepared)
      return std::move(prepared.error());
    stmt = *prepared;
  }
  query q{stmt};
  q.bind(1, qry.topic);
  q.bind(2, qry.consumer);
  q.bind(3, qry.category);
  q.bind(4, qry.key);
  q.bind(5, qry.since_ms);
  q.bind(6, qry.until_ms);
  constexpr auto max_limit
    = static_cast<size_t>(std::numeric_limits<int64_t>::max());
  q.bind(7, qry.limit == 0
              ? int64_t{-1}
              : static_cast<int64_t>(std::min(qry.limit, max_limit)));
  std::vector<dead_letter_record> result;
  int rc;
  while ((rc = q.step()) == SQLITE_ROW) {
    auto id = q.int64(0);
    auto rec = dead_letter_from_json(q.text(2));
    if (!rec) {
      // Keep listing: show what the indexed columns know, so the damaged
      // record can still be found and removed.
      spdlog::warn("dead letter {} in '{}' is unreadable: {}", id,
                   st.db->path(), render(rec.error()));
      dead_letter_record fallback;
      fallback.category = q.text(3);
      fallback.consumer = q.text(4);
      fallback.pattern = q.text(5);
      fallback.topic = q.text(6);
      fallback.key = q.text(7);
      fallback.last_failure_ms = q.int64(8);
      fallback.reason = "stored record is unreadable: " + render(rec.error());
      rec = std::move(fallback);
    }
    rec->id = id;
    rec->replayed_ms = q.int64(1);
    result.push_back(std::move(*rec));
  }
  if (rc != SQLITE_DONE)
    return st.db->failure("listing of dead letters", rc);
  return result;
}

caf::expected<dead_letter_record> sqlite_dead_letter_store::get(int64_t id) {
  auto& st = *state_;
  std::lock_guard<std::mutex> guard{st.mtx};
  query q{st.select_one};
  q.bind(1, id);
  auto rc = q.step();
  if (rc == SQLITE_DONE)
    return make_error(errc::not_found, "no dead letter with id "
                                         + std::to_string(id) + " in '"
                                         + st.db->path() + "'");
  if (rc != SQLITE_ROW)
    return st.db->failure("read of a dead letter", rc);
  auto rec = dead_letter_from_json(q.text(2));
  if (!rec)
    return make_error(errc::decode_error,
                      "dead letter " + std::to_string(id) + " in '"
                        + st.db->path()
                        + "' is unreadable: " + render(rec.error()));
  rec->id = q.int64(0);
  rec->replayed_ms = q.int64(1);
  return rec;
}

caf::error sqlite_dead_letter_store::mark_replayed(int64_t id, int64_t at_ms) {
  auto& st = *state_;
  std::lock_guard<std::mutex> guard{st.mtx};
  query q{st.replayed};
  q.bind(1, id);
  q.bind(2, at_ms);
  if (auto rc = q.step(); rc != SQLITE_DONE)
    return st.db->failure("update of a dead letter", rc);
  if (sqlite3_changes(st.db->get()) == 0)
    return make_error(errc::not_found, "no dead letter with id "
                                         + std::to_string(id) + " in '"
                                         + st.db->path() + "'");
  return caf::error{};
}

caf::error sqlite_dead_letter_store::remove(int64_t id) {
  auto& st = *state_;
  std::lock_guard<std::mutex> guard{st.mtx};
  query q{st.remove};
  q.bind(1, id);
  if (auto rc = q.step(); rc != SQLITE_DONE)
    return st.db->failure("removal of a dead letter", rc);
  if (sqlite3_changes(st.db->get()) == 0)
    return make_error(errc::not_found, "no dead letter with id "
                                         + std::to_string(id) + " in '"
                                         + st.db->path() + "'");
  return caf::error{};
}

const std::string& sqlite_dead_letter_store::path() const noexcept {
  return state_->db->path();
}

} // namespace evmesh
