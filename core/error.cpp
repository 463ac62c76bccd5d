#include "evmesh/error.hpp"

#include <utility>

#include <caf/atom.hpp>
#include <caf/make_message.hpp>
#include <caf/message.hpp>

namespace evmesh {

namespace {

constexpr caf::atom_value evmesh_category = caf::atom("evmesh");

} // namespace

const char* to_string(errc x) noexcept {
  switch (x) {
    case errc::none:
      return "none";
    case errc::decode_error:
      return "decode_error";
    case errc::invalid_traceparent:
      return "invalid_traceparent";
    case errc::invalid_config:
      return "invalid_config";
    case errc::invalid_url:
      return "invalid_url";
    case errc::invalid_pattern:
      return "invalid_pattern";
    case errc::duplicate_subscription:
      return "duplicate_subscription";
    case errc::unavailable:
      return "unavailable";
    case errc::io_error:
      return "io_error";
    case errc::not_found:
      return "not_found";
    case errc::invalid_state:
      return "invalid_state";
    case errc::too_large:
      return "too_large";
  }
  return "unknown_errc";
}

bool is_retryable(errc x) noexcept {
  switch (x) {
    case errc::unavailable:
    case errc::io_error:
      return true;
    default:
      return false;
  }
}

bool is_retryable(const caf::error& err) noexcept {
  if (!err || err.category() != evmesh_category)
    return false;
  return is_retryable(static_cast<errc>(err.code()));
}

caf::error make_error(errc code, std::string message) {
  return caf::error{static_cast<uint8_t>(code), evmesh_category,
                    caf::make_message(std::move(message))};
}

std::string render(const caf::error& err) {
  if (!err || err.category() != evmesh_category)
    return caf::to_string(err);
  std::string result = to_string(static_cast<errc>(err.code()));
  const auto& ctx = err.context();
  if (ctx.empty())
    return result;
  result += ": ";
  if (ctx.size() == 1 && ctx.match_element<std::string>(0))
    result += ctx.get_as<std::string>(0);
  else
    result += caf::to_string(ctx);
  return result;
}

} // namespace evmesh
