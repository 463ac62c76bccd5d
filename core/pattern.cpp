#include "evmesh/pattern.hpp"

#include <algorithm>

#include "evmesh/error.hpp"

namespace evmesh {

namespace {

// Splits off the first token of `rest`; `rest` becomes the remainder after
// the separating dot (empty after the last token).
std::string_view next_token(std::string_view& rest) noexcept {
  auto pos = rest.find('.');
  auto token = rest.substr(0, pos);
  rest = pos == std::string_view::npos ? std::string_view{}
                                       : rest.substr(pos + 1);
  return token;
}

// Returns what is wrong with `pattern`, or nullptr when it is valid.
const char* pattern_problem(std::string_view pattern) noexcept {
  if (pattern.empty())
    return "a pattern must not be empty";
  if (pattern.front() == '.' || pattern.back() == '.')
    return "empty token: a pattern must not start or end with '.'";
  auto rest = pattern;
  while (!rest.empty()) {
    auto token = next_token(rest);
    if (token.empty())
      return "empty token between two dots";
    if (token == ">") {
      if (!rest.empty())
        return "'>' must be the last token";
    } else if (token != "*"
               && token.find_first_of("*>") != std::string_view::npos) {
      return "'*' and '>' must be whole tokens (write 'a.*', not 'a*')";
    }
  }
  return nullptr;
}

bool valid_topic(std::string_view topic) noexcept {
  return !topic.empty() && topic.front() != '.' && topic.back() != '.'
         && topic.find("..") == std::string_view::npos;
}

bool has_wildcard(std::string_view pattern) noexcept {
  auto rest = pattern;
  while (!rest.empty()) {
    auto token = next_token(rest);
    if (token == "*" || token == ">")
      return true;
  }
  return false;
}

void sort_unique(std::vector<uint32_t>& xs, size_t first) {
  auto begin = xs.begin() + static_cast<std::ptrdiff_t>(first);
  std::sort(begin, xs.end());
  xs.erase(std::unique(begin, xs.end()), xs.end());
}

} // namespace

caf::error validate_pattern(std::string_view pattern) {
  if (auto problem = pattern_problem(pattern)) {
    std::string msg = "invalid topic pattern '";
    msg.append(pattern);
    msg += "': ";
    msg += problem;
    return make_error(errc::invalid_pattern, std::move(msg));
  }
  return {};
}

bool pattern_matches(std::string_view pattern,
                     std::string_view topic) noexcept {
  if (!valid_topic(topic) || pattern_problem(pattern) != nullptr)
    return false;
  auto prest = pattern;
  auto trest = topic;
  while (!prest.empty()) {
    auto ptoken = next_token(prest);
    if (ptoken == ">")
      return !trest.empty();
    if (trest.empty())
      return false;
    auto ttoken = next_token(trest);
    if (ptoken != "*" && ptoken != ttoken)
      return false;
  }
  return trest.empty();
}

struct topic_matcher::node {
  std::unordered_map<std::string, std::unique_ptr<node>, detail::string_hash,
                     std::equal_to<>>
    children;
  /// Child for a `*` token.
  std::unique_ptr<node> star;
  /// Ids of patterns ending at this node.
  std::vector<uint32_t> here;
  /// Ids of patterns whose next (last) token is `>`.
  std::vector<uint32_t> tail;

  void finalize() {
    sort_unique(here, 0);
    sort_unique(tail, 0);
    for (auto& [token, child] : children)
      child->finalize();
    if (star)
      star->finalize();
  }

  // `rest` holds the tokens left to match; it is empty when all are consumed.
  void collect(std::string_view rest, std::vector<uint32_t>& out) const {
    if (rest.empty()) {
      out.insert(out.end(), here.begin(), here.end());
      return;
    }
    out.insert(out.end(), tail.begin(), tail.end());
    auto token = next_token(rest);
    if (auto i = children.find(token); i != children.end())
      i->second->collect(rest, out);
    if (star)
      star->collect(rest, out);
  }
};

topic_matcher::topic_matcher() = default;

topic_matcher::topic_matcher(topic_matcher&&) noexcept = default;

topic_matcher& topic_matcher::operator=(topic_matcher&&) noexcept = default;

topic_matcher::~topic_matcher() = default;

caf::expected<topic_matcher> topic_matcher::make(
  const std::vector<std::pair<std::string, uint32_t>>& patterns_and_ids) {
  topic_matcher result;
  for (const auto& [pattern, id] : patterns_and_ids) {
    if (auto err = validate_pattern(pattern))
      return err;
    if (!has_wildcard(pattern)) {
      result.exact_[pattern].push_back(id);
      continue;
    }
    if (!result.root_)
      result.root_ = std::make_unique<node>();
    auto* current = result.root_.get();
    std::string_view rest = pattern;
    while (!rest.empty()) {
      auto token = next_token(rest);
      if (token == ">") {
        current->tail.push_back(id);
        current = nullptr;
        break;
      }
      auto& child = token == "*" ? current->star
                                 : current->children[std::string{token}];
      if (!child)
        child = std::make_unique<node>();
      current = child.get();
    }
    if (current != nullptr)
      current->here.push_back(id);
  }
  for (auto& [pattern, ids] : result.exact_)
    sort_unique(ids, 0);
  if (result.root_)
    result.root_->finalize();
  return result;
}

void topic_matcher::match(std::string_view topic,
                          std::vector<uint32_t>& out) const {
  auto first = out.size();
  if (auto i = exact_.find(topic); i != exact_.end())
    out.insert(out.end(), i->second.begin(), i->second.end());
  if (root_ && valid_topic(topic))
    root_->collect(topic, out);
  if (out.size() - first > 1)
    sort_unique(out, first);
}

bool topic_matcher::empty() const noexcept {
  return exact_.empty() && !root_;
}

} // namespace evmesh
