// Handler lanes: run one attempt at a time (claim -> handler -> commit/abort
// -> span). Plain functions do the work; the behaviors only route.
#include <chrono>

#include <boost/json.hpp>
#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/mesh.hpp"

namespace evmesh::internal {

int64_t wall_ms() noexcept {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch())
    .count();
}

int64_t wall_ns() noexcept {
  using namespace std::chrono;
  return duration_cast<nanoseconds>(system_clock::now().time_since_epoch())
    .count();
}

size_t scoped_key_size(const subscription& sub, const incoming_message& m) {
  return std::string_view{sub.handler->consumer}.size()
         + std::string_view{sub.handler->pattern}.size() + m.dedupe_key().size()
         + 2;
}

void append_scoped_dedupe_key(std::string& out, const subscription& sub,
                              const incoming_message& m) {
  out += sub.handler->consumer;
  out += ':';
  out += sub.handler->pattern;
  out += ':';
  out += m.dedupe_key();
}

std::string scoped_dedupe_key(const subscription& sub,
                              const incoming_message& m) {
  std::string result;
  result.reserve(scoped_key_size(sub, m));
  append_scoped_dedupe_key(result, sub, m);
  return result;
}

outcome invoke_guarded(handler_fn fn, event_context& ctx) noexcept {
  try {
    return fn(ctx);
  } catch (const permanent_error& ex) {
    return outcome{outcome_kind::dead_letter, ex.what(), std::nullopt,
                   ex.category()};
  } catch (const std::exception& ex) {
    return retry(ex.what());
  } catch (...) {
    return retry("handler threw an exception of unknown type");
  }
}

namespace {

const char* status_of(const outcome& out) {
  switch (out.kind) {
    case outcome_kind::ok:
      return "ok";
    case outcome_kind::retry:
      return "retry";
    case outcome_kind::dead_letter:
      return "dead_letter";
    default:
      return "discard";
  }
}

/// An attempt between claim and finish.
struct attempt_scope {
  const runtime_env* env;
  const subscription* sub;
  const attempt_msg* msg;
  std::string key;
  bool claimed = false;
  int64_t start_ns = 0;
  /// Whether the transport was told that the handler runs (and its token).
  bool announced = false;
  uint64_t token = 0;

  /// Tells the transport that the handler is about to run.
  void announce() {
    if (env->transport) {
      token = env->transport->attempt_started(msg->msg->tag);
      announced = true;
    }
  }

  /// Tells the transport that the handler run is over (once).
  void conclude() noexcept {
    if (announced) {
      announced = false;
      env->transport->attempt_finished(token);
    }
  }

  attempt_scope(const runtime_env* e, const subscription* s,
                const attempt_msg* m)
    : env(e), sub(s), msg(m) {
  }
  attempt_scope(const attempt_scope&) = delete;
  attempt_scope& operator=(const attempt_scope&) = delete;

  /// A lane that dies mid-attempt (actor handler crash) ends the run too.
  ~attempt_scope() {
    conclude();
  }
};

void emit_span(const attempt_scope& a, const char* status,
               const std::string& detail) {
  if (!a.env->spans)
    return;
  // Reused per thread: no allocation per span once it has grown.
  thread_local std::string name;
  name.assign("consume ");
  name.append(a.msg->msg->env.topic);
  span_record span;
  span.context = a.msg->trace;
  span.link = a.msg->link;
  span.name = name;
  span.consumer = a.sub->handler->consumer;
  span.pattern = a.sub->handler->pattern;
  span.topic = a.msg->msg->env.topic;
  span.attempt = a.msg->attempt;
  span.start_ns = a.start_ns;
  span.end_ns = wall_ns();
  span.status = status;
  span.detail = detail;
  a.env->spans->record(span);
}

/// Starts attempt `a` whose idempotency key answered `claim`. Returns a result
/// when the handler must not run; otherwise the transport has been told that
/// the handler is about to run.
std::optional<attempt_result> begin_claimed(attempt_scope& a,
                                            claim_result claim) {
  auto& env = *a.env;
  switch (claim) {
    case claim_result::fresh:
      a.claimed = true;
      a.announce();
      return std::nullopt;
    case claim_result::duplicate:
      emit_span(a, "duplicate", {});
      return attempt_result{attempt_result::duplicate, ok()};
    case claim_result::in_flight:
      return attempt_result{attempt_result::in_flight,
                            retry("idempotency key is claimed by another "
                                  "worker")};
    default: // unavailable
      if (env.config.dedupe_policy == store_failure_policy::fail_closed)
        return attempt_result{attempt_result::store_unavailable,
                              retry("idempotency store unavailable "
                                    "(dedupe.on_unavailable = fail_closed)")};
      spdlog::warn("idempotency store unavailable; running {} without dedupe "
                   "(dedupe.on_unavailable = fail_open)",
                   a.sub->name);
      a.announce();
      return std::nullopt;
  }
}

/// Claims the idempotency key. Returns a result when the handler must not run.
std::optional<attempt_result> begin_attempt(attempt_scope& a) {
  a.start_ns = wall_ns();
  auto& env = *a.env;
  if (!env.dedupe) {
    a.announce();
    return std::nullopt;
  }
  a.key = scoped_dedupe_key(*a.sub, *a.msg->msg);
  return begin_claimed(a,
                       env.dedupe->try_begin(a.key, env.config.dedupe_lease));
}

/// Whether a claim is committed after `out` (else it is aborted).
bool commits(const outcome& out) {
  return out.kind == outcome_kind::ok || out.kind == outcome_kind::discard;
}

void warn_finish_failed(std::string_view key, bool commit,
                        const caf::error& err) {
  spdlog::warn("idempotency store: {} of key '{}' failed: {}",
               commit ? "commit" : "abort", key, render(err));
}

/// Commits or aborts the claim and records the span.
attempt_result finish_attempt(attempt_scope& a, outcome out) {
  a.conclude();
  auto& env = *a.env;
  if (a.claimed) {
    auto commit = commits(out);
    auto err = commit ? env.dedupe->commit(a.key, env.config.dedupe_keep)
                      : env.dedupe->abort(a.key);
    if (err)
      warn_finish_failed(a.key, commit, err);
  }
  emit_span(a, status_of(out), out.reason);
  return attempt_result{attempt_result::handled, std::move(out)};
}

template <class F>
auto with_context(const attempt_scope& a, F&& f) {
  auto& env = *a.env;
  auto& m = *a.msg;
  return f(m.msg->env, env.services, m.trace, m.attempt,
           std::string{m.msg->tenant()}, env.out.get(), m.deadline,
           std::string_view{a.sub->handler->consumer},
           std::string_view{a.sub->handler->pattern});
}

/// One attempt of a function handler: claim, run, commit/abort, span.
attempt_result run_function_attempt(const runtime_env& env, uint32_t sub,
                                    const attempt_msg& msg) {
  attempt_scope a{&env, &env.table.subscriptions[sub], &msg};
  auto result = [&a]() -> attempt_result {
    if (auto early = begin_attempt(a))
      return std::move(*early);
    return with_context(a, [&a](auto&&... xs) {
      event_context ctx{xs...};
      return finish_attempt(a, invoke_guarded(a.sub->handler->fn, ctx));
    });
  }();
  result.id = msg.id;
  result.seq = msg.seq;
  return result;
}

/// One attempt of a batch whose key was claimed up front (answer `claim`):
/// runs the handler unless the claim says otherwise and records the span.
/// The commit or abort is left to the batch (see `run_deduped_batch`);
/// `claimed` says whether this attempt holds a claim to finish.
attempt_result run_claimed_attempt(const runtime_env& env, uint32_t sub,
                                   const attempt_msg& msg, claim_result claim,
                                   bool& claimed) {
  attempt_scope a{&env, &env.table.subscriptions[sub], &msg};
  a.start_ns = wall_ns();
  auto result = [&a, claim]() -> attempt_result {
    if (auto early = begin_claimed(a, claim))
      return std::move(*early);
    return with_context(a, [&a](auto&&... xs) {
      event_context ctx{xs...};
      auto out = invoke_guarded(a.sub->handler->fn, ctx);
      a.conclude();
      emit_span(a, status_of(out), out.reason);
      return attempt_result{attempt_result::handled, std::move(out)};
    });
  }();
  claimed = a.claimed;
  result.id = msg.id;
  result.seq = msg.seq;
  return result;
}

/// Runs `batch` with dedupe on: claims every key in one store call, runs the
/// attempts in order, then commits or aborts every claim in one store call,
/// so a remote store costs two round trips per batch instead of two per
/// attempt. Results go to `results` only after their commit (ack after
/// commit). When the supervisor abandons the batch (a timeout), nothing more
/// runs: the claims of attempts that never ran are aborted, the finished
/// ones are still committed, and the function returns false (the supervisor
/// took the batch back; its attempts run again and find their commits).
bool run_deduped_batch(caf::event_based_actor* self, const runtime_env& env,
                       uint32_t sub, lane_progress* progress,
                       const attempt_batch& batch,
                       std::vector<attempt_result>& results) {
  auto& s = env.table.subscriptions[sub];
  auto n = batch.items.size();
  if (progress && progress->abandoned.load(std::memory_order_acquire))
    return false;
  // The scoped keys, side by side in one buffer (one allocation per batch).
  size_t total = 0;
  for (auto& item : batch.items)
    total += scoped_key_size(s, *item.msg);
  std::string keys;
  keys.reserve(total);
  std::vector<size_t> ends;
  ends.reserve(n);
  for (auto& item : batch.items) {
    append_scoped_dedupe_key(keys, s, *item.msg);
    ends.push_back(keys.size());
  }
  std::vector<std::string_view> views;
  views.reserve(n);
  for (size_t i = 0, from = 0; i < n; from = ends[i++])
    views.emplace_back(keys.data() + from, ends[i] - from);
  std::vector<claim_result> claims(n, claim_result::unavailable);
  env.dedupe->try_begin_many(views, env.config.dedupe_lease, claims);
  std::vector<finish_op> ops;
  ops.reserve(n);
  results.reserve(n);
  bool abandoned = false;
  size_t ran = 0;
  for (; ran < n; ++ran) {
    if (progress) {
      // The supervisor took the batch back (a timeout): run no more.
      if (progress->abandoned.load(std::memory_order_acquire)) {
        abandoned = true;
        break;
      }
      // Start time first, index second (see function_lane).
      progress->started.store(self->clock().now().time_since_epoch().count(),
                              std::memory_order_release);
      progress->index.store(static_cast<uint32_t>(ran),
                            std::memory_order_release);
    }
    bool claimed = false;
    auto res = run_claimed_attempt(env, sub, batch.items[ran], claims[ran],
                                   claimed);
    if (claimed)
      ops.push_back(finish_op{views[ran], commits(res.out) ? finish_op::commit
                                                           : finish_op::abort});
    results.push_back(std::move(res));
  }
  // Claims of attempts that never ran: released for their next run.
  for (size_t k = ran; k < n; ++k)
    if (claims[k] == claim_result::fresh)
      ops.push_back(finish_op{views[k], finish_op::abort});
  if (!ops.empty()) {
    std::vector<caf::error> errors(ops.size());
    if (env.dedupe->finish_many(ops, env.config.dedupe_keep, errors))
      for (size_t i = 0; i < ops.size(); ++i)
        if (errors[i])
          warn_finish_failed(ops[i].key, ops[i].kind == finish_op::commit,
                             errors[i]);
  }
  return !abandoned;
}

} // namespace

caf::behavior function_lane(caf::event_based_actor* self, runtime_env_ptr env,
                            uint32_t sub, lane_progress_ptr progress) {
  return {
    [env, sub](run_atom, const attempt_msg& msg) -> attempt_result {
      return run_function_attempt(*env, sub, msg);
    },
    [self, env, sub, progress](attempt_batch& batch) {
      result_batch out;
      out.token = batch.token;
      auto n = static_cast<uint32_t>(batch.items.size());
      if (env->dedupe) {
        // Claims and commits for the whole batch at once; the results are
        // published only after their commits.
        std::vector<attempt_result> results;
        if (!run_deduped_batch(self, *env, sub, progress.get(), batch, results))
          return;
        if (progress)
          progress->index.store(n, std::memory_order_release);
        out.items = std::move(results);
        self->send(caf::actor_cast<caf::actor>(self->current_sender()),
                   std::move(out));
        return;
      }
      for (uint32_t k = 0; k < n; ++k) {
        if (progress) {
          // The supervisor took the batch back (a timeout): run no more.
          if (progress->abandoned.load(std::memory_order_acquire))
            return;
          // Start time first, index second: a reader that sees index k never
          // sees an older start than attempt k's (see on_tick).
          progress->started.store(
            self->clock().now().time_since_epoch().count(),
            std::memory_order_release);
          progress->index.store(k, std::memory_order_release);
        }
        auto res = run_function_attempt(*env, sub, batch.items[k]);
        if (progress) {
          std::lock_guard guard{progress->mtx};
          progress->done.push_back(std::move(res));
        } else {
          out.items.push_back(std::move(res));
        }
      }
      if (progress) {
        std::lock_guard guard{progress->mtx};
        out.items.swap(progress->done);
        progress->index.store(n, std::memory_order_release);
      }
      self->send(caf::actor_cast<caf::actor>(self->current_sender()),
                 std::move(out));
    },
  };
}

namespace {

struct actor_lane_state {
  caf::actor handler;
};

} // namespace

caf::behavior actor_lane(caf::event_based_actor* self, runtime_env_ptr env,
                         uint32_t sub) {
  auto& s = env->table.subscriptions[sub];
  auto handler = self->spawn<caf::linked>(s.handler->factory);
  // Any exit of the handler actor (even a normal one) ends this lane, so the
  // supervisor sees the crash, counts the attempt and spawns a fresh lane.
  self->set_exit_handler([self](caf::exit_msg& msg) {
    self->quit(msg.reason ? msg.reason
                          : caf::make_error(caf::exit_reason::unknown));
  });
  return {
    [self, env, sub, handler](run_atom,
                              attempt_msg& msg) -> caf::result<attempt_result> {
      auto a = std::make_shared<attempt_scope>(
        env.get(), &env->table.subscriptions[sub], nullptr);
      auto held = std::make_shared<attempt_msg>(std::move(msg));
      a->msg = held.get();
      if (auto early = begin_attempt(*a))
        return std::move(*early);
      auto ctx = with_context(*a, [](auto&&... xs) {
        return std::make_shared<event_context>(xs...);
      });
      auto rp = self->make_response_promise<attempt_result>();
      // The supervisor sends one attempt at a time, so `then` keeps this lane
      // sequential while leaving it responsive to exit messages.
      self->request(handler, caf::infinite, delivery{ctx.get()})
        .then(
          [a, held, ctx, rp](outcome& out) mutable {
            rp.deliver(finish_attempt(*a, std::move(out)));
          },
          [a, held, ctx, rp](caf::error& err) mutable {
            rp.deliver(
              finish_attempt(*a, retry("handler actor answered with an error: "
                                       + caf::to_string(err))));
          });
      return rp;
    },
  };
}

} // namespace evmesh::internal
