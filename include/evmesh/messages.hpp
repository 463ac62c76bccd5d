#pragma once

#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>
#include <caf/type_id.hpp>

#include "evmesh/context.hpp"
#include "evmesh/outcome.hpp"

namespace evmesh {

/// What an actor handler receives: the attempt's context, valid until the
/// actor answered with an `evmesh::outcome` (directly or via a response
/// promise). Local only: delivery never crosses nodes.
struct delivery {
  event_context* context = nullptr;
};

} // namespace evmesh

CAF_BEGIN_TYPE_ID_BLOCK(evmesh, caf::first_custom_type_id)

  CAF_ADD_TYPE_ID(evmesh, (evmesh::delivery))
  CAF_ADD_TYPE_ID(evmesh, (evmesh::outcome))

CAF_END_TYPE_ID_BLOCK(evmesh)

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(evmesh::delivery)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(evmesh::outcome)
