// Internal: what crosses node links. Only plain fields (strings, integers):
// the envelope travels as its canonical JSON, the trace ids as raw bytes.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <caf/atom.hpp>
#include <caf/expected.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/type_id.hpp>

#include "actors/mesh.hpp"

namespace evmesh::internal {

/// Lanes a node offers for one subscription ("consumer/pattern").
struct lane_offer {
  std::string sub;
  uint32_t lanes = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, lane_offer& x) {
  return f(caf::meta::type_name("lane_offer"), x.sub, x.lanes);
}

/// Connector -> acceptor, first message of the join handshake.
struct join_hello {
  std::string node;
  uint64_t incarnation = 0;
  /// Connector's random challenge (hex).
  std::string nonce;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, join_hello& x) {
  return f(caf::meta::type_name("join_hello"), x.node, x.incarnation, x.nonce);
}

/// Acceptor -> connector: the acceptor's challenge and its proof of the
/// secret over the connector's challenge.
struct join_challenge {
  std::string node;
  uint64_t incarnation = 0;
  std::string nonce;
  std::string mac;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, join_challenge& x) {
  return f(caf::meta::type_name("join_challenge"), x.node, x.incarnation,
           x.nonce, x.mac);
}

/// Connector -> acceptor: the connector's proof and its lanes.
struct join_proof {
  std::string node;
  uint64_t incarnation = 0;
  /// Echo of the acceptor's nonce (names the handshake).
  std::string nonce;
  std::string mac;
  std::vector<lane_offer> lanes;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, join_proof& x) {
  return f(caf::meta::type_name("join_proof"), x.node, x.incarnation, x.nonce,
           x.mac, x.lanes);
}

/// Acceptor -> connector after a valid proof: the acceptor's lanes and the
/// session id that heartbeats carry.
struct join_welcome {
  std::string session;
  std::vector<lane_offer> lanes;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, join_welcome& x) {
  return f(caf::meta::type_name("join_welcome"), x.session, x.lanes);
}

/// One attempt for a remote lane (`attempt_msg` flattened).
struct wire_attempt {
  std::string sub;
  uint64_t id = 0;
  uint64_t seq = 0;
  uint32_t attempt = 1;
  uint32_t prior_attempts = 0;
  /// `encode_envelope(env)`.
  std::string envelope;
  std::string tenant;
  std::string dedupe_key;
  /// Raw bytes of the trace id (16), span, parent and link (8 each).
  std::string trace;
  std::string span;
  std::string parent;
  std::string link;
  uint8_t flags = 1;
  std::string tracestate;
  bool is_root = true;
  /// Time left until the attempt's deadline, in nanoseconds.
  int64_t timeout_ns = 0;
  /// The dispatching node (for logs and dead-letter records).
  std::string origin;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, wire_attempt& x) {
  return f(caf::meta::type_name("wire_attempt"), x.sub, x.id, x.seq, x.attempt,
           x.prior_attempts, x.envelope, x.tenant, x.dedupe_key, x.trace,
           x.span, x.parent, x.link, x.flags, x.tracestate, x.is_root,
           x.timeout_ns, x.origin);
}

/// A remote lane's answer (`attempt_result` flattened).
struct wire_result {
  uint8_t kind = 0;
  uint8_t outcome = 0;
  std::string reason;
  /// Retry delay in nanoseconds; -1: none.
  int64_t after_ns = -1;
  std::string category;
  uint64_t id = 0;
  uint64_t seq = 0;
  /// The node that ran it.
  std::string node;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, wire_result& x) {
  return f(caf::meta::type_name("wire_result"), x.kind, x.outcome, x.reason,
           x.after_ns, x.category, x.id, x.seq, x.node);
}

// -- conversions and credentials (plain functions, unit-tested) ----------------

/// Flattens an attempt for subscription `sub`.
wire_attempt to_wire(const attempt_msg& am, const std::string& sub,
                     const std::string& origin);

/// Rebuilds the attempt on the receiving node; the envelope is decoded again.
caf::expected<attempt_msg> from_wire(const wire_attempt& w);

wire_result to_wire(const attempt_result& res, const std::string& node);

attempt_result from_wire(const wire_result& w);

/// 32 random bytes, hex.
std::string random_nonce();

/// Milliseconds since the Unix epoch.
int64_t unix_ms() noexcept;

/// A random 64-bit number (process incarnations).
uint64_t random_u64();

/// HMAC-SHA256 of `text` under `secret`, hex.
std::string hmac_hex(std::string_view secret, std::string_view text);

/// Compares two MACs in time independent of where they differ.
bool same_mac(std::string_view x, std::string_view y) noexcept;

/// What the acceptor proves (`join_challenge::mac`) and what the connector
/// proves (`join_proof::mac`): each binds both nonces and both names, in a
/// role-specific order, so a proof can be neither replayed nor reflected.
std::string acceptor_mac(std::string_view secret, const join_hello& hello,
                         std::string_view acceptor, std::string_view nonce);
std::string connector_mac(std::string_view secret, const join_hello& hello,
                          std::string_view acceptor, std::string_view nonce);

} // namespace evmesh::internal

CAF_BEGIN_TYPE_ID_BLOCK(evmesh_cluster, caf::first_custom_type_id + 100)

  CAF_ADD_TYPE_ID(evmesh_cluster, (evmesh::internal::join_hello))
  CAF_ADD_TYPE_ID(evmesh_cluster, (evmesh::internal::join_challenge))
  CAF_ADD_TYPE_ID(evmesh_cluster, (evmesh::internal::join_proof))
  CAF_ADD_TYPE_ID(evmesh_cluster, (evmesh::internal::join_welcome))
  CAF_ADD_TYPE_ID(evmesh_cluster, (evmesh::internal::wire_attempt))
  CAF_ADD_TYPE_ID(evmesh_cluster, (evmesh::internal::wire_result))

CAF_END_TYPE_ID_BLOCK(evmesh_cluster)

namespace evmesh::internal {

using hello_atom = caf::atom_constant<caf::atom("hello")>;
using heartbeat_atom = caf::atom_constant<caf::atom("heartbeat")>;
using rejoin_atom = caf::atom_constant<caf::atom("rejoin")>;
using connect_seed_atom = caf::atom_constant<caf::atom("seed")>;
using timeout_atom = caf::atom_constant<caf::atom("timeout")>;
using status_atom = caf::atom_constant<caf::atom("status")>;

} // namespace evmesh::internal
