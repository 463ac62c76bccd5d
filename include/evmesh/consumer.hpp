#pragma once

/// The umbrella header of evmesh: everything a service that consumes events
/// needs, from handler registration (`EVMESH_EVENT_PATTERN`) and the handler
/// context to the runtime, its configuration and the one-line
/// `EVMESH_MAIN()`. Also brings in Boost.Describe so payload structs can be
/// described (`BOOST_DESCRIBE_STRUCT`) for `event_context::payload<T>()`.

#include <boost/describe.hpp>

#include "evmesh/config.hpp"
#include "evmesh/container.hpp"
#include "evmesh/context.hpp"
#include "evmesh/envelope.hpp"
#include "evmesh/error.hpp"
#include "evmesh/inproc.hpp"
#include "evmesh/main.hpp"
#include "evmesh/messages.hpp"
#include "evmesh/options.hpp"
#include "evmesh/outcome.hpp"
#include "evmesh/registry.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/stores.hpp"
#include "evmesh/tracing.hpp"
