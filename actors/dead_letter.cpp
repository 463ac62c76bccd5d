// The dead-letter actor: makes records durable before the original is acked.
#include <unordered_map>

#include <boost/json.hpp>
#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/mesh.hpp"

namespace evmesh::internal {

namespace {

void mask_value(boost::json::value& v, const std::vector<std::string>& fields) {
  if (auto obj = v.if_object()) {
    for (auto& kv : *obj) {
      auto key = std::string_view{kv.key()};
      bool hit = false;
      for (auto& f : fields)
        if (f == key)
          hit = true;
      if (hit)
        kv.value() = "***";
      else
        mask_value(kv.value(), fields);
    }
  } else if (auto arr = v.if_array()) {
    for (auto& x : *arr)
      mask_value(x, fields);
  }
}

} // namespace

std::string mask_fields(std::string_view original,
                        const std::vector<std::string>& fields) {
  if (fields.empty())
    return std::string{original};
  boost::json::error_code ec;
  auto doc = boost::json::parse(original, ec);
  if (ec)
    return std::string{original}; // undecodable bytes are kept verbatim
  if (auto obj = doc.if_object()) {
    for (auto name : {"payload", "data"})
      if (auto p = obj->if_contains(name))
        mask_value(*p, fields);
  }
  return boost::json::serialize(doc);
}

dead_letter_record
make_intake_dead_letter(const runtime_env& env, const raw_message& raw,
                        const envelope* decoded, std::string category,
                        std::string reason) {
  dead_letter_record rec;
  rec.category = std::move(category);
  rec.reason = reason;
  auto now = wall_ms();
  rec.first_failure_ms = now;
  rec.last_failure_ms = now;
  rec.add_error(0, now, reason);
  rec.topic = decoded ? decoded->topic : raw.subject;
  if (decoded) {
    rec.key = decoded->key;
    rec.idempotency_key = decoded->idempotency_key;
    rec.traceparent = decoded->traceparent;
  } else {
    rec.key = raw.key;
    rec.traceparent = raw.traceparent;
  }
  rec.transport = std::string{env.transport->scheme()};
  rec.position = raw.position;
  rec.node = env.node;
  // Masked before any sink sees it: the store and the broker's DLQ alike.
  rec.original = decoded && !env.config.mask_fields.empty()
                   ? mask_fields(raw.bytes, env.config.mask_fields)
                   : raw.bytes;
  rec.original_decoded = decoded != nullptr;
  return rec;
}

namespace {

struct pending_write {
  caf::response_promise promise;
  std::shared_ptr<const dead_letter_record> record;
  uint32_t failures = 0;
};

struct dead_letter_state {
  std::unordered_map<uint64_t, pending_write> pending;
  uint64_t next_id = 1;
  std::mt19937_64 rng{std::random_device{}()};
};

} // namespace

caf::behavior dead_letter_writer(caf::event_based_actor* self,
                                 runtime_env_ptr env) {
  auto state = std::make_shared<dead_letter_state>();
  // Tries one write; on failure re-schedules itself with backoff. The
  // promise is answered only once the record is durable.
  auto try_write = [self, env, state](uint64_t id) {
    auto i = state->pending.find(id);
    if (i == state->pending.end())
      return;
    auto& p = i->second;
    auto res = env->dead_letters->write(*p.record);
    if (res) {
      p.promise.deliver(*res);
      state->pending.erase(i);
      return;
    }
    ++p.failures;
    backoff_policy policy{std::chrono::milliseconds{50}, 2.0,
                          std::chrono::seconds{10}, jitter::full};
    auto delay = next_backoff(p.failures, policy, state->rng);
    spdlog::error(
      "dead-letter store write failed (attempt {}), retrying in "
      "{} ms; the original message stays unacked: {}",
      p.failures,
      std::chrono::duration_cast<std::chrono::milliseconds>(delay).count(),
      render(res.error()));
    self->delayed_send(self, delay, retry_atom::value, id);
  };
  return {
    [self, env, state,
     try_write](write_atom, dead_letter_job& job) -> caf::result<int64_t> {
      if (!env->dead_letters)
        return int64_t{0};
      auto id = state->next_id++;
      auto rp = self->make_response_promise<int64_t>();
      state->pending.emplace(id, pending_write{rp, std::move(job.record), 0});
      try_write(id);
      return rp;
    },
    [try_write](retry_atom, uint64_t id) { try_write(id); },
  };
}

} // namespace evmesh::internal
