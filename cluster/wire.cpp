#include "cluster/wire.hpp"

#include <algorithm>
#include <chrono>

#include <caf/timestamp.hpp>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "evmesh/error.hpp"

namespace evmesh::internal {

namespace {

template <size_t N>
std::string bytes_of(const std::array<uint8_t, N>& xs) {
  return std::string{reinterpret_cast<const char*>(xs.data()), N};
}

template <size_t N>
bool read_bytes(const std::string& in, std::array<uint8_t, N>& out) {
  if (in.size() != N)
    return false;
  std::copy(in.begin(), in.end(), reinterpret_cast<char*>(out.data()));
  return true;
}

} // namespace

wire_attempt to_wire(const attempt_msg& am, const std::string& sub,
                     const std::string& origin) {
  wire_attempt w;
  w.sub = sub;
  w.id = am.id;
  w.seq = am.seq;
  w.attempt = am.attempt;
  w.prior_attempts = am.msg->prior_attempts;
  w.envelope = encode_envelope(am.msg->env);
  w.tenant = std::string{am.msg->tenant()};
  w.dedupe_key = std::string{am.msg->dedupe_key()};
  w.trace = bytes_of(am.trace.trace);
  w.span = bytes_of(am.trace.span);
  w.parent = bytes_of(am.trace.parent);
  w.link = bytes_of(am.link);
  w.flags = am.trace.flags;
  w.tracestate = am.trace.tracestate;
  w.is_root = am.trace.is_root;
  auto left = am.deadline - caf::make_timestamp();
  w.timeout_ns = std::max<int64_t>(left.count(), 0);
  w.origin = origin;
  return w;
}

caf::expected<attempt_msg> from_wire(const wire_attempt& w) {
  auto env = decode_envelope(w.envelope);
  if (!env)
    return env.error();
  auto msg = incoming_message::make(std::move(*env), w.envelope, {});
  msg->prior_attempts = w.prior_attempts;
  msg->set_tenant(w.tenant);
  msg->set_dedupe_key(w.dedupe_key);
  attempt_msg am;
  if (!read_bytes(w.trace, am.trace.trace) || !read_bytes(w.span, am.trace.span)
      || !read_bytes(w.parent, am.trace.parent) || !read_bytes(w.link, am.link))
    return make_error(errc::decode_error,
                      "remote attempt with malformed trace ids");
  am.trace.flags = w.flags;
  am.trace.tracestate = w.tracestate;
  am.trace.is_root = w.is_root;
  msg->producer = producer_trace{am.trace.trace, am.trace.parent,
                                 am.trace.flags, am.trace.is_root};
  am.msg = std::move(msg);
  am.id = w.id;
  am.seq = w.seq;
  am.attempt = w.attempt;
  am.deadline = caf::make_timestamp() + caf::timespan{w.timeout_ns};
  return am;
}

wire_result to_wire(const attempt_result& res, const std::string& node) {
  wire_result w;
  w.kind = static_cast<uint8_t>(res.kind);
  w.outcome = static_cast<uint8_t>(res.out.kind);
  w.reason = res.out.reason;
  w.after_ns = res.out.after ? res.out.after->count() : -1;
  w.category = res.out.category;
  w.id = res.id;
  w.seq = res.seq;
  w.node = node;
  return w;
}

attempt_result from_wire(const wire_result& w) {
  attempt_result res;
  res.kind = w.kind <= attempt_result::store_unavailable
               ? static_cast<attempt_result::kind_t>(w.kind)
               : attempt_result::handled;
  auto kind = w.outcome <= static_cast<uint8_t>(outcome_kind::discard)
                ? static_cast<outcome_kind>(w.outcome)
                : outcome_kind::retry;
  res.out = outcome{kind, w.reason, std::nullopt, w.category};
  if (w.after_ns >= 0)
    res.out.after = caf::timespan{w.after_ns};
  res.id = w.id;
  res.seq = w.seq;
  return res;
}

std::string random_nonce() {
  unsigned char buf[32];
  if (RAND_bytes(buf, sizeof(buf)) != 1) {
    // RAND_bytes only fails without entropy; never fall back to a weak nonce.
    std::abort();
  }
  return to_hex(buf, sizeof(buf));
}

int64_t unix_ms() noexcept {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch())
    .count();
}

uint64_t random_u64() {
  uint64_t x = 0;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(&x), sizeof(x)) != 1)
    std::abort();
  return x;
}

std::string hmac_hex(std::string_view secret, std::string_view text) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(text.data()), text.size(), out,
       &len);
  return to_hex(out, len);
}

bool same_mac(std::string_view x, std::string_view y) noexcept {
  if (x.size() != y.size() || x.empty())
    return false;
  return CRYPTO_memcmp(x.data(), y.data(), x.size()) == 0;
}

namespace {

std::string mac_text(std::string_view role, std::string_view first_nonce,
                     std::string_view second_nonce, std::string_view first,
                     std::string_view second) {
  std::string text = "evmesh-join-v1|";
  text += role;
  for (auto part : {first_nonce, second_nonce, first, second}) {
    text += '|';
    text += std::to_string(part.size());
    text += ':';
    text += part;
  }
  return text;
}

} // namespace

std::string acceptor_mac(std::string_view secret, const join_hello& hello,
                         std::string_view acceptor, std::string_view nonce) {
  return hmac_hex(secret, mac_text("acceptor", hello.nonce, nonce, acceptor,
                                   hello.node));
}

std::string connector_mac(std::string_view secret, const join_hello& hello,
                          std::string_view acceptor, std::string_view nonce) {
  return hmac_hex(secret, mac_text("connector", nonce, hello.nonce, hello.node,
                                   acceptor));
}

} // namespace evmesh::internal
