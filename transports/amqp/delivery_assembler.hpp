#pragma once

// Private to the amqp:// transport (and its tests): builds deliveries of the
// consuming channel from their frames as they arrive, without blocking and
// without rabbitmq-c's per-message copies (amqp_read_message allocates a
// 4 KiB pool page and a body buffer per message). The body goes once into
// the string handed to the runtime; what a retry copy needs later (the
// properties as encoded on the wire, the routing key, the body) goes into
// one reusable buffer per open delivery.

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <amqp.h>
#include <amqp_framing.h>

namespace evmesh::internal {

/// What a retry copy needs of an open delivery, in one buffer: its encoded
/// properties, then its routing key, then its body.
struct retained_delivery {
  std::string data;
  uint32_t props_len = 0;
  uint32_t rk_len = 0;

  /// The properties as encoded on the wire (amqp_decode_properties reads
  /// them back).
  amqp_bytes_t properties() const {
    return {props_len, const_cast<char*>(data.data())};
  }

  std::string_view routing_key() const {
    return std::string_view{data}.substr(props_len, rk_len);
  }

  amqp_bytes_t body() const {
    auto off = size_t{props_len} + rk_len;
    return {data.size() - off, const_cast<char*>(data.data() + off)};
  }
};

/// basic.deliver, content header, body frames* of the consuming channel.
/// Every step returns an empty string when the frame fits the sequence, else
/// what is wrong (the caller drops the connection: the broker then delivers
/// the message again).
class delivery_assembler {
public:
  /// `max_properties`: the largest encoded properties accepted (the frame
  /// size: a header frame carries them whole).
  explicit delivery_assembler(size_t max_properties = 131072)
    : max_properties_(std::max<size_t>(max_properties, 16)) {
  }

  /// Starts a delivery; `spare` is a buffer to reuse for what is retained.
  std::string deliver(uint64_t dtag, bool redelivered, amqp_bytes_t routing_key,
                      retained_delivery spare = {}) {
    if (active_)
      return "basic.deliver " + std::to_string(dtag)
             + " arrived before the content of delivery "
             + std::to_string(dtag_) + " was complete";
    active_ = true;
    have_header_ = false;
    dtag_ = dtag;
    redelivered_ = redelivered;
    retained_ = std::move(spare);
    retained_.data.clear();
    retained_.props_len = 0;
    retained_.rk_len = static_cast<uint32_t>(routing_key.len);
    rk_.assign(static_cast<const char*>(routing_key.bytes), routing_key.len);
    body_.clear();
    return {};
  }

  /// The content header of the delivery: encodes `p` for the retained copy.
  std::string header(const amqp_basic_properties_t& p, uint64_t body_size) {
    if (!active_)
      return "a content header arrived without a basic.deliver";
    if (have_header_)
      return "a second content header arrived for delivery "
             + std::to_string(dtag_);
    int n = -1;
    for (;;) {
      if (scratch_.empty())
        scratch_.resize(std::min<size_t>(1024, max_properties_));
      amqp_bytes_t out{scratch_.size(), scratch_.data()};
      n = amqp_encode_properties(AMQP_BASIC_CLASS,
                                 const_cast<amqp_basic_properties_t*>(&p), out);
      if (n >= 0 || scratch_.size() >= max_properties_)
        break;
      scratch_.resize(std::min(scratch_.size() * 2, max_properties_));
    }
    if (n < 0)
      return "the properties of delivery " + std::to_string(dtag_)
             + " do not re-encode within " + std::to_string(max_properties_)
             + " bytes (" + amqp_error_string2(n) + ")";
    have_header_ = true;
    body_size_ = body_size;
    retained_.props_len = static_cast<uint32_t>(n);
    auto cap = std::min<uint64_t>(body_size, uint64_t{16} << 20);
    retained_.data.reserve(static_cast<size_t>(n) + rk_.size() + cap);
    retained_.data.append(scratch_.data(), static_cast<size_t>(n));
    retained_.data.append(rk_);
    body_.reserve(static_cast<size_t>(cap));
    return {};
  }

  /// A body frame of the delivery.
  std::string body(amqp_bytes_t fragment) {
    if (!active_ || !have_header_)
      return "a body frame arrived without a content header";
    if (fragment.len > body_size_ - body_.size())
      return "body frames of delivery " + std::to_string(dtag_)
             + " exceed the announced " + std::to_string(body_size_) + " bytes";
    body_.append(static_cast<const char*>(fragment.bytes), fragment.len);
    retained_.data.append(static_cast<const char*>(fragment.bytes),
                          fragment.len);
    return {};
  }

  /// The header arrived and the body is complete.
  bool complete() const {
    return active_ && have_header_ && body_.size() == body_size_;
  }

  /// A delivery is under way.
  bool active() const {
    return active_;
  }

  uint64_t delivery_tag() const {
    return dtag_;
  }

  bool redelivered() const {
    return redelivered_;
  }

  const std::string& routing_key() const {
    return rk_;
  }

  /// Hands out the complete delivery's body and retained copy; the
  /// assembler waits for the next basic.deliver.
  std::pair<std::string, retained_delivery> take() {
    active_ = false;
    have_header_ = false;
    return {std::move(body_), std::move(retained_)};
  }

  /// Forgets a delivery under way (the connection is gone).
  void reset() {
    active_ = false;
    have_header_ = false;
    body_.clear();
  }

private:
  size_t max_properties_;
  std::vector<char> scratch_;
  bool active_ = false;
  bool have_header_ = false;
  uint64_t dtag_ = 0;
  bool redelivered_ = false;
  uint64_t body_size_ = 0;
  std::string rk_;
  std::string body_;
  retained_delivery retained_;
};

} // namespace evmesh::internal
