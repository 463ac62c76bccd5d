// Internal to the runtime: the actor messages, the shared environment and the
// actor implementations of DESIGN.md §3. Not installed, not part of the API.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>
#include <caf/behavior.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/type_id.hpp>

#include "evmesh/config.hpp"
#include "evmesh/container.hpp"
#include "evmesh/envelope.hpp"
#include "evmesh/messages.hpp"
#include "evmesh/registry.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/stores.hpp"
#include "evmesh/trace.hpp"
#include "evmesh/tracing.hpp"
#include "evmesh/transport.hpp"

namespace evmesh::internal {

/// Counters shared by all actors of one runtime and read by `stats()`.
struct stats_block {
  std::atomic<uint64_t> received{0};
  std::atomic<uint64_t> handled{0};
  std::atomic<uint64_t> duplicates{0};
  std::atomic<uint64_t> retried{0};
  std::atomic<uint64_t> dead_lettered{0};
  std::atomic<uint64_t> discarded{0};
  std::atomic<uint64_t> acked{0};
  std::atomic<uint64_t> nacked{0};
  std::atomic<uint64_t> timeouts{0};
  std::atomic<uint64_t> lane_restarts{0};
  std::atomic<uint64_t> supervisor_restarts{0};
  std::atomic<uint64_t> new_root_traces{0};
  std::atomic<uint64_t> deferred{0};
  std::atomic<uint64_t> in_flight{0};
  std::atomic<uint64_t> max_concurrent{0};
  std::atomic<uint64_t> paused{0};
  /// Attempts re-dispatched because the cluster node running them was lost.
  std::atomic<uint64_t> redispatched{0};
  std::atomic<uint8_t> health{static_cast<uint8_t>(health_status::starting)};
  std::atomic<bool> stopped{false};

  static void inc(std::atomic<uint64_t>& x, uint64_t n = 1) noexcept {
    x.fetch_add(n, std::memory_order_relaxed);
  }
};

/// Publishes through the transport (the runtime's `publisher`).
class transport_publisher : public publisher {
public:
  explicit transport_publisher(transport_ptr t) : transport_(std::move(t)) {
  }

  caf::error publish(envelope env) override {
    return transport_->publish(env);
  }

private:
  transport_ptr transport_;
};

/// Everything the actors share; immutable after start.
struct runtime_env {
  runtime_config config;
  dispatch_table table;
  container services;
  idempotency_store_ptr dedupe;
  dead_letter_store_ptr dead_letters;
  span_sink_ptr spans;
  std::shared_ptr<tenant_registry> tenants;
  transport_ptr transport;
  std::shared_ptr<publisher> out;
  std::shared_ptr<stats_block> stats;
  std::string node;
  bool detach_io = true;
  /// Whether this node consumes from the transport (`cluster.role` ingress).
  bool ingress = true;
  /// The cluster node actor (DESIGN.md §3 "node"); invalid without [cluster].
  caf::actor cluster;
};

using runtime_env_ptr = std::shared_ptr<const runtime_env>;

/// The producer's side of a delivery's trace: every attempt is a child of
/// `span` in `trace`. The tracestate is the envelope's (none for a new root).
struct producer_trace {
  trace_id trace{};
  /// The producer's span; all zero when this hop started a new root trace.
  span_id span{};
  /// Trace flags, kept from the producer (bit 0 = sampled).
  uint8_t flags = 1;
  /// True when no (valid) traceparent was carried.
  bool is_root = true;
};

/// One delivery after decoding, shared by every subscription it matched.
/// Kept small: one lives for every message in flight.
class incoming_message {
public:
  /// Source-local id of the delivery.
  uint64_t delivery_id = 0;
  /// The transport's handle (for `attempt_started`).
  uint64_t tag = 0;
  /// Decoded from `bytes()`; subject, trace headers and key filled its gaps.
  envelope env;
  /// Handler executions made in earlier deliveries:
  /// max(broker delivery count - 1, envelope attempt).
  uint32_t prior_attempts = 0;

private:
  uint32_t bytes_size_ = 0;
  uint32_t position_size_ = 0;

public:
  /// The producer's span (parent of every attempt), or a new root.
  producer_trace producer;

  incoming_message() = default;
  /// Takes `e` by move construction: its payload keeps its own storage
  /// (assignment would copy it into the default one).
  explicit incoming_message(envelope&& e) : env(std::move(e)) {
  }
  incoming_message(const incoming_message&) = delete;
  incoming_message& operator=(const incoming_message&) = delete;

  /// A message made from `e` whose copies of `bytes` and `position` sit in
  /// the same heap block as the message and its reference count (each at
  /// most 4 GiB - 1: the source dead-letters larger messages before
  /// decoding): one allocation per delivery instead of two.
  static std::shared_ptr<incoming_message>
  make(envelope&& e, std::string_view bytes, std::string_view position);

  /// The bytes as received: a dead-letter record's `original`.
  std::string_view bytes() const noexcept {
    return {origin_, bytes_size_};
  }

  /// The native position, for dead-letter records.
  std::string_view position() const noexcept {
    return {origin_ + bytes_size_, position_size_};
  }

  /// `dedupe_key(env)`: `env.idempotency_key` or `env.id`, or a key of its
  /// own when the key is a digest (see `set_dedupe_key`).
  std::string_view dedupe_key() const noexcept {
    switch (key_from_) {
      case from::idempotency_key:
        return env.idempotency_key;
      case from::id:
        return env.id;
      default:
        return owned_ ? std::string_view{owned_->key} : std::string_view{};
    }
  }

  /// Picks `dedupe_key(env)`; call once `env` is final.
  void set_dedupe_key() {
    if (!env.idempotency_key.empty())
      key_from_ = from::idempotency_key;
    else if (!env.id.empty())
      key_from_ = from::id;
    else
      set_dedupe_key(evmesh::dedupe_key(env));
  }

  /// Sets a key computed elsewhere (a cluster peer sends it along).
  void set_dedupe_key(std::string key) {
    owned().key = std::move(key);
    key_from_ = from::own;
  }

  /// The tenant after resolution (fallback applied).
  std::string_view tenant() const noexcept {
    if (tenant_from_ == from::own)
      return owned_->tenant;
    return env.tenant;
  }

  /// Sets the resolved tenant (kept apart only when it differs from
  /// `env.tenant`).
  void set_tenant(std::string_view resolved) {
    if (resolved == env.tenant) {
      tenant_from_ = from::tenant;
      return;
    }
    owned().tenant = std::string{resolved};
    tenant_from_ = from::own;
  }

private:
  /// Where `dedupe_key()` and `tenant()` come from.
  enum class from : uint8_t { id, idempotency_key, tenant, own };

  /// The strings `env` does not hold (most deliveries have none: one pointer
  /// instead of two empty strings).
  struct owned_strings {
    std::string key;
    std::string tenant;
  };

  owned_strings& owned() {
    if (!owned_)
      owned_ = std::make_unique<owned_strings>();
    return *owned_;
  }

  from key_from_ = from::own;
  from tenant_from_ = from::tenant;
  /// The bytes as received followed by the native position, in the
  /// message's own heap block (`make`); null when made otherwise.
  char* origin_ = nullptr;
  std::unique_ptr<owned_strings> owned_;
};

using incoming_ptr = std::shared_ptr<const incoming_message>;

namespace detail {

/// What `tail_allocator` is to add and where that landed. Passed through a
/// thread-local rather than the allocator, which the control block would
/// then carry for the message's lifetime (16 bytes more per message in
/// flight).
struct tail_request {
  size_t extra = 0;
  char* tail = nullptr;
};

inline thread_local tail_request tail_req;

/// Allocates `tail_req.extra` bytes past what it is asked for and stores
/// where they start in `tail_req.tail` (for `incoming_message::make`).
template <class T>
struct tail_allocator {
  using value_type = T;

  tail_allocator() noexcept = default;

  template <class U>
  tail_allocator(const tail_allocator<U>&) noexcept {
    // Stateless.
  }

  T* allocate(size_t n) {
    auto size = n * sizeof(T);
    auto* p = static_cast<char*>(::operator new(size + tail_req.extra));
    tail_req.tail = p + size;
    return reinterpret_cast<T*>(p);
  }

  void deallocate(T* p, size_t) noexcept {
    ::operator delete(static_cast<void*>(p));
  }

  template <class U>
  bool operator==(const tail_allocator<U>&) const noexcept {
    return true;
  }
};

} // namespace detail

inline std::shared_ptr<incoming_message>
incoming_message::make(envelope&& e, std::string_view bytes,
                       std::string_view position) {
  detail::tail_req.extra = bytes.size() + position.size();
  auto msg = std::allocate_shared<incoming_message>(
    detail::tail_allocator<incoming_message>{}, std::move(e));
  auto* origin = detail::tail_req.tail;
  if (!bytes.empty())
    std::memcpy(origin, bytes.data(), bytes.size());
  if (!position.empty())
    std::memcpy(origin + bytes.size(), position.data(), position.size());
  msg->origin_ = origin;
  msg->bytes_size_ = static_cast<uint32_t>(bytes.size());
  msg->position_size_ = static_cast<uint32_t>(position.size());
  return msg;
}

/// Source -> topic supervisor: new deliveries for one subscription.
struct dispatch_batch {
  std::vector<incoming_ptr> items;
};

/// Topic supervisor -> lane: run one attempt. Sent as an ordinary message
/// (not a request): the lane answers with an `attempt_result` message, which
/// saves CAF's per-request response bookkeeping on the hot path.
struct attempt_msg {
  incoming_ptr msg;
  /// Delivery id and dispatch sequence number, echoed in the result so the
  /// supervisor can drop answers of abandoned attempts.
  uint64_t id = 0;
  uint64_t seq = 0;
  /// 1-based attempt number (executions so far + 1).
  uint32_t attempt = 1;
  /// This attempt's span.
  trace_context trace;
  /// The previous attempt's span (all zero on the first).
  span_id link{};
  /// When the supervisor abandons the attempt.
  caf::timestamp deadline;
};

/// Lane -> topic supervisor: what happened.
struct attempt_result {
  enum kind_t : uint8_t {
    /// The handler ran; see `out`.
    handled,
    /// The idempotency key was already handled: ack without running.
    duplicate,
    /// Another worker holds the claim: try later, not counted.
    in_flight,
    /// The store is unavailable and the policy is fail_closed.
    store_unavailable,
  };
  kind_t kind = handled;
  outcome out;
  /// Echo of `attempt_msg::id` and `seq`.
  uint64_t id = 0;
  uint64_t seq = 0;
};

/// Topic supervisor -> function lane: attempts of distinct keys, run one
/// after the other (one actor message for many attempts). `token` identifies
/// the batch; the lane answers with one `result_batch`.
struct attempt_batch {
  uint64_t token = 0;
  std::vector<attempt_msg> items;
};

/// Function lane -> topic supervisor: the results of one `attempt_batch`, in
/// order (fewer when the supervisor abandoned the batch meanwhile).
struct result_batch {
  uint64_t token = 0;
  std::vector<attempt_result> items;
};

/// Where a function lane is in its current batch: written by the lane before
/// each attempt, read by the supervisor's timeout tick. `abandoned` tells the
/// lane to run nothing more of the batch (its attempts were taken back).
/// `done` holds the results of the batch so far, so a supervisor abandoning
/// the batch keeps the outcomes of the attempts that finished.
struct lane_progress {
  std::atomic<uint32_t> index{0};
  std::atomic<int64_t> started{0};
  std::atomic<bool> abandoned{false};
  std::mutex mtx;
  std::vector<attempt_result> done;
};

using lane_progress_ptr = std::shared_ptr<lane_progress>;

/// How a subscription finished with a delivery.
/// `defer`: the next attempt is due so late that the message leaves the
/// stream through `transport::defer` (a retry topic) instead of waiting here.
enum class settle_kind : uint8_t { ack, dead_lettered, nack, defer };

/// Topic supervisor -> source.
struct settlement {
  uint64_t delivery_id = 0;
  settle_kind kind = settle_kind::ack;
  std::shared_ptr<const dead_letter_record> record;
  /// For `defer`: when the next attempt is due and the runs so far.
  caf::timespan delay{0};
  uint32_t attempts = 0;
  /// Index of the subscription that settles (unused for intake settlements).
  uint32_t sub = 0;
};

/// Topic supervisor -> source: settlements collected while handling one
/// message (one actor message for many deliveries).
struct settlement_batch {
  std::vector<settlement> items;
};

/// Anyone -> dead-letter actor; answered with the record id (int64_t).
struct dead_letter_job {
  std::shared_ptr<const dead_letter_record> record;
};

} // namespace evmesh::internal

CAF_BEGIN_TYPE_ID_BLOCK(evmesh_internal, caf::first_custom_type_id + 50)

  CAF_ADD_TYPE_ID(evmesh_internal, (evmesh::internal::dispatch_batch))
  CAF_ADD_TYPE_ID(evmesh_internal, (evmesh::internal::attempt_msg))
  CAF_ADD_TYPE_ID(evmesh_internal, (evmesh::internal::attempt_result))
  CAF_ADD_TYPE_ID(evmesh_internal, (evmesh::internal::settlement))
  CAF_ADD_TYPE_ID(evmesh_internal, (evmesh::internal::dead_letter_job))
  CAF_ADD_TYPE_ID(evmesh_internal, (evmesh::internal::attempt_batch))
  CAF_ADD_TYPE_ID(evmesh_internal, (evmesh::internal::result_batch))
  CAF_ADD_TYPE_ID(evmesh_internal, (evmesh::internal::settlement_batch))

CAF_END_TYPE_ID_BLOCK(evmesh_internal)

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(evmesh::internal::dispatch_batch)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(evmesh::internal::attempt_msg)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(evmesh::internal::attempt_result)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(evmesh::internal::settlement)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(evmesh::internal::dead_letter_job)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(evmesh::internal::attempt_batch)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(evmesh::internal::result_batch)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(evmesh::internal::settlement_batch)

namespace evmesh::internal {

using poll_atom = caf::atom_constant<caf::atom("poll")>;
using run_atom = caf::atom_constant<caf::atom("run")>;
using settle_atom = caf::atom_constant<caf::atom("settle")>;
using retry_atom = caf::atom_constant<caf::atom("retry")>;
using tick_atom = caf::atom_constant<caf::atom("tick")>;
using drain_atom = caf::atom_constant<caf::atom("drain")>;
using abandon_atom = caf::atom_constant<caf::atom("abandon")>;
using drained_atom = caf::atom_constant<caf::atom("drained")>;
using stop_atom = caf::atom_constant<caf::atom("stop")>;
using write_atom = caf::atom_constant<caf::atom("write")>;
using resume_atom = caf::atom_constant<caf::atom("resume")>;
using stopped_atom = caf::atom_constant<caf::atom("stopped")>;
/// Cluster node -> topic supervisor: `(node_up_atom, node, lane proxy,
/// lanes)` adds a peer's lanes; `(node_down_atom, node, lane proxy)` removes
/// them and re-dispatches their in-flight attempts.
using node_up_atom = caf::atom_constant<caf::atom("node_up")>;
using node_down_atom = caf::atom_constant<caf::atom("node_down")>;
/// Mesh supervisor -> cluster node: `(join_sup_atom, sub, supervisor)`.
using join_sup_atom = caf::atom_constant<caf::atom("sup_join")>;
/// Mesh supervisor -> source: `(restart_atom, index, supervisor)` after the
/// topic supervisor `index` crashed and was replaced.
using restart_atom = caf::atom_constant<caf::atom("restart")>;
/// Fault injection (testing): `(crash_atom, index)` to the mesh supervisor
/// makes topic supervisor `index` throw inside its message handler.
using crash_atom = caf::atom_constant<caf::atom("crash")>;

// -- plain functions (unit-tested) ---------------------------------------------

/// Scoped idempotency key of one subscription: "consumer:pattern:key".
std::string scoped_dedupe_key(const subscription& sub,
                              const incoming_message& m);

/// The length of `scoped_dedupe_key(sub, m)`.
size_t scoped_key_size(const subscription& sub, const incoming_message& m);

/// Appends `scoped_dedupe_key(sub, m)` to `out`.
void append_scoped_dedupe_key(std::string& out, const subscription& sub,
                              const incoming_message& m);

/// Runs a function handler, converting exceptions once: permanent_error ->
/// dead letter (with its category), other std::exception -> retry with
/// what(), anything else -> retry "unknown exception".
outcome invoke_guarded(handler_fn fn, event_context& ctx) noexcept;

/// Milliseconds / nanoseconds since the Unix epoch (wall clock).
int64_t wall_ms() noexcept;
int64_t wall_ns() noexcept;

/// Builds a record for a message that never reached a subscription
/// (decode_error, no_handler, tenant_rejected, too_large).
dead_letter_record
make_intake_dead_letter(const runtime_env& env, const raw_message& raw,
                        const envelope* decoded, std::string category,
                        std::string reason);

/// Masks `fields` (by name, at any depth) in the payload of `original` JSON.
std::string mask_fields(std::string_view original,
                        const std::vector<std::string>& fields);

// -- actors --------------------------------------------------------------------

/// The dead-letter writer: `(write_atom, dead_letter_job) -> int64_t`. Writes
/// to the dead-letter store (masked), retrying failures with backoff; answers
/// only after the record is durable. With no store it answers 0 at once.
caf::behavior dead_letter_writer(caf::event_based_actor* self,
                                 runtime_env_ptr env);

/// Spawns a handler lane for subscription `sub`, linked to `parent`: an
/// actor lane for actor handlers, a function lane otherwise (reporting its
/// batch progress to `progress`); on its own thread when the handler blocks
/// or the idempotency store is remote.
caf::actor spawn_handler_lane(caf::event_based_actor* parent,
                              const runtime_env_ptr& env, uint32_t sub);

/// `spawn_handler_lane` for the local supervisor: function lanes report their
/// batch progress to `progress` (may be null for actor handlers).
caf::actor spawn_local_lane(caf::event_based_actor* parent,
                            const runtime_env_ptr& env, uint32_t sub,
                            lane_progress_ptr progress);

/// Runs attempts of a function handler: `(run_atom, attempt_msg) ->
/// attempt_result` (cluster peers), and `attempt_batch` -> `result_batch`
/// (the local supervisor).
caf::behavior function_lane(caf::event_based_actor* self, runtime_env_ptr env,
                            uint32_t sub, lane_progress_ptr progress);

/// Runs attempts on a user actor spawned from the subscription's factory;
/// dies with the user actor (the supervisor then counts a crash).
caf::behavior actor_lane(caf::event_based_actor* self, runtime_env_ptr env,
                         uint32_t sub);

/// One per subscription: owns in-flight records, key lanes, retry timers,
/// handler lanes; settles each delivery with the source exactly once.
caf::behavior topic_supervisor(caf::event_based_actor* self,
                               runtime_env_ptr env, uint32_t sub,
                               caf::actor source, caf::actor dead_letter);

/// Owns the transport: polls, decodes, matches, routes, settles, acks.
caf::behavior source_actor(caf::event_based_actor* self, runtime_env_ptr env,
                           caf::actor dead_letter);

/// Root of the tree: spawns and supervises the others, runs shutdown.
caf::behavior mesh_supervisor(caf::event_based_actor* self,
                              runtime_env_ptr env);

} // namespace evmesh::internal
