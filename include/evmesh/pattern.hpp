#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>

namespace evmesh {

/// Checks a NATS-style topic pattern: tokens separated by `.`, `*` matches
/// exactly one token, `>` matches one or more trailing tokens and must be the
/// last token. Returns `errc::invalid_pattern` naming the pattern and the rule
/// it breaks (empty pattern, empty token as in `a..b`, `>` not last, a
/// wildcard inside a token as in `a*`); a default error when valid.
caf::error validate_pattern(std::string_view pattern);

/// Whether `topic` matches `pattern`. An invalid pattern matches nothing, and
/// so does a topic that is empty or has an empty token. Wildcard characters in
/// the topic are plain characters. Does not allocate.
bool pattern_matches(std::string_view pattern, std::string_view topic) noexcept;

namespace detail {

/// Transparent string hash: lets unordered containers keyed by `std::string`
/// be searched with a `std::string_view` without allocating.
struct string_hash {
  using is_transparent = void;

  size_t operator()(std::string_view x) const noexcept {
    return std::hash<std::string_view>{}(x);
  }
};

} // namespace detail

/// Matches topics against a fixed set of patterns, each carrying an id. Built
/// once by `make`, immutable afterwards: concurrent `match` calls are safe.
/// Wildcard-free patterns live in a hash map, wildcard patterns in a token
/// trie.
class topic_matcher {
public:
  /// A matcher without patterns; matches nothing.
  topic_matcher();

  topic_matcher(topic_matcher&&) noexcept;

  topic_matcher& operator=(topic_matcher&&) noexcept;

  ~topic_matcher();

  /// Builds a matcher from (pattern, id) pairs. Several patterns may share an
  /// id and one pattern may appear with several ids. Fails with
  /// `errc::invalid_pattern` on the first pattern `validate_pattern` rejects.
  static caf::expected<topic_matcher>
  make(const std::vector<std::pair<std::string, uint32_t>>& patterns_and_ids);

  /// Appends to `out` the ids of all patterns matching `topic`, ascending and
  /// without duplicates (among the appended ids; `out`'s prior content is
  /// left alone). Allocates only when `out` grows.
  void match(std::string_view topic, std::vector<uint32_t>& out) const;

  /// Whether the matcher holds no pattern at all.
  bool empty() const noexcept;

private:
  struct node;

  using exact_map = std::unordered_map<std::string, std::vector<uint32_t>,
                                       detail::string_hash, std::equal_to<>>;

  /// Wildcard-free patterns.
  exact_map exact_;

  /// Root of the wildcard trie; null when there is no wildcard pattern.
  std::unique_ptr<node> root_;
};

} // namespace evmesh
