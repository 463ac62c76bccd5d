#include "evmesh/inproc.hpp"

#include <algorithm>
#include <map>
#include <mutex>

#include "evmesh/error.hpp"

namespace evmesh {

namespace {

using time_point = std::chrono::steady_clock::time_point;

struct stored_message {
  std::string subject;
  std::string bytes;
  std::string traceparent;
  std::string key;
};

using stored_ptr = std::shared_ptr<const stored_message>;

struct entry {
  uint64_t seq = 0;
  stored_ptr msg;
  uint32_t deliveries = 0;
  uint64_t owner = 0;
};

struct group_state {
  std::map<uint64_t, entry>
    ready; // by publish sequence: redeliveries keep order
  std::multimap<time_point, entry> delayed;
  // By delivery tag. A map like `ready`, so a polled entry's node moves
  // from one to the other without an allocation (tags only grow, so the
  // insertion goes at the end).
  std::map<uint64_t, entry> unacked;
  uint64_t next_tag = 1;
  inproc_group_stats stats;
  std::vector<std::string> dlq;
  std::map<uint64_t, std::function<void()>> wakeups; // by consumer id
  bool waiting = false;
  std::function<time_point()> now;
};

} // namespace

struct inproc_broker::state {
  mutable std::mutex mtx;
  std::map<std::string, group_state, std::less<>> groups;
  /// Messages published while no group existed; the first group takes them.
  std::vector<entry> backlog;
  uint64_t next_seq = 1;
  uint64_t next_consumer = 1;

  group_state& group(std::string_view name) {
    auto i = groups.find(name);
    if (i != groups.end())
      return i->second;
    auto& g = groups[std::string{name}];
    for (auto& e : backlog) {
      g.ready.emplace(e.seq, e);
      ++g.stats.published;
    }
    backlog.clear();
    return g;
  }

  // Moves delayed entries that are due into the ready queue.
  static void promote(group_state& g) {
    if (g.delayed.empty())
      return;
    auto now = g.now ? g.now() : std::chrono::steady_clock::now();
    auto end = g.delayed.upper_bound(now);
    for (auto i = g.delayed.begin(); i != end; ++i)
      g.ready.emplace(i->second.seq, std::move(i->second));
    g.delayed.erase(g.delayed.begin(), end);
  }

  std::vector<std::function<void()>> publish(stored_ptr msg) {
    std::vector<std::function<void()>> wake;
    entry e{next_seq++, std::move(msg), 0, 0};
    if (groups.empty()) {
      backlog.push_back(std::move(e));
      return wake;
    }
    for (auto& [name, g] : groups) {
      g.ready.emplace(e.seq, e);
      ++g.stats.published;
      if (g.waiting) {
        g.waiting = false;
        for (auto& [id, fn] : g.wakeups)
          wake.push_back(fn);
      }
    }
    return wake;
  }
};

inproc_broker::inproc_broker() : state_(std::make_shared<state>()) {
}

std::shared_ptr<inproc_broker> inproc_broker::get(std::string_view name) {
  static std::mutex mtx;
  static std::map<std::string, std::shared_ptr<inproc_broker>, std::less<>>
    brokers;
  std::lock_guard guard{mtx};
  auto i = brokers.find(name);
  if (i != brokers.end())
    return i->second;
  auto ptr = std::shared_ptr<inproc_broker>(new inproc_broker);
  brokers.emplace(std::string{name}, ptr);
  return ptr;
}

void inproc_broker::reset() {
  std::lock_guard guard{state_->mtx};
  state_->groups.clear();
  state_->backlog.clear();
}

void inproc_broker::publish(const envelope& env) {
  publish_raw(env.topic, encode_envelope(env));
}

void inproc_broker::publish_raw(std::string subject, std::string bytes,
                                std::string traceparent, std::string key) {
  auto msg = std::make_shared<const stored_message>(
    stored_message{std::move(subject), std::move(bytes), std::move(traceparent),
                   std::move(key)});
  std::vector<std::function<void()>> wake;
  {
    std::lock_guard guard{state_->mtx};
    wake = state_->publish(std::move(msg));
  }
  for (auto& fn : wake)
    fn();
}

inproc_group_stats inproc_broker::stats(std::string_view group) const {
  std::lock_guard guard{state_->mtx};
  auto i = state_->groups.find(group);
  if (i == state_->groups.end()) {
    inproc_group_stats result;
    result.pending = state_->backlog.size();
    return result;
  }
  auto result = i->second.stats;
  result.pending = i->second.ready.size() + i->second.delayed.size();
  result.unacked = i->second.unacked.size();
  return result;
}

std::vector<std::string>
inproc_broker::dead_letters(std::string_view group) const {
  std::lock_guard guard{state_->mtx};
  auto i = state_->groups.find(group);
  if (i == state_->groups.end())
    return {};
  return i->second.dlq;
}

void inproc_broker::requeue_unacked(std::string_view group) {
  std::vector<std::function<void()>> wake;
  {
    std::lock_guard guard{state_->mtx};
    auto& g = state_->group(group);
    for (auto& [tag, e] : g.unacked)
      g.ready.emplace(e.seq, std::move(e));
    g.unacked.clear();
    for (auto& [id, fn] : g.wakeups)
      wake.push_back(fn);
  }
  for (auto& fn : wake)
    fn();
}

namespace {

/// The consumer side: one member of a consumer group.
class inproc_transport : public transport {
public:
  inproc_transport(std::shared_ptr<inproc_broker> broker, std::string group,
                   transport_environment env)
    : broker_(std::move(broker)),
      group_(std::move(group)),
      env_(std::move(env)) {
    std::lock_guard guard{broker_->state_->mtx};
    id_ = broker_->state_->next_consumer++;
  }

  ~inproc_transport() override {
    close();
  }

  std::string_view scheme() const noexcept override {
    return "inproc";
  }

  transport_capabilities capabilities() const noexcept override {
    return {true, true, true, true};
  }

  caf::error subscribe(const std::vector<std::string>&) override {
    // Like a stream consumer without a filter: the group receives every
    // topic; unmatched topics are dead-lettered by the runtime.
    std::lock_guard guard{broker_->state_->mtx};
    auto& g = broker_->state_->group(group_);
    g.now = env_.now;
    if (wakeup_)
      g.wakeups[id_] = wakeup_;
    subscribed_ = true;
    return {};
  }

  caf::error poll(size_t max, std::vector<raw_message>& out) override {
    if (!subscribed_)
      return make_error(errc::invalid_state,
                        "inproc transport: poll before subscribe");
    if (closed_)
      return make_error(errc::invalid_state,
                        "inproc transport: poll after close (make a new "
                        "transport to consume again)");
    std::lock_guard guard{broker_->state_->mtx};
    auto& g = broker_->state_->group(group_);
    inproc_broker::state::promote(g);
    size_t n = 0;
    while (n < max && !g.ready.empty()) {
      auto node = g.ready.extract(g.ready.begin());
      auto& e = node.mapped();
      auto tag = g.next_tag++;
      ++e.deliveries;
      e.owner = id_;
      raw_message msg;
      msg.tag = tag;
      msg.bytes = e.msg->bytes;
      msg.subject = e.msg->subject;
      msg.traceparent = e.msg->traceparent;
      msg.key = e.msg->key;
      msg.delivery_count = e.deliveries;
      auto seq = std::to_string(e.seq);
      msg.position.reserve(8 + group_.size() + seq.size());
      msg.position += "inproc:";
      msg.position += group_;
      msg.position += '#';
      msg.position += seq;
      ++g.stats.delivered;
      if (e.deliveries > 1)
        ++g.stats.redelivered;
      node.key() = tag;
      g.unacked.insert(g.unacked.end(), std::move(node));
      out.push_back(std::move(msg));
      ++n;
    }
    // Short of `max`: the next publish wakes the source (it re-polls only
    // rarely on its own).
    if (n < max)
      g.waiting = true;
    return {};
  }

  caf::error ack(uint64_t tag) override {
    std::lock_guard guard{broker_->state_->mtx};
    auto& g = broker_->state_->group(group_);
    auto i = g.unacked.find(tag);
    if (i == g.unacked.end() || i->second.owner != id_)
      return violation(g, "ack", tag);
    g.unacked.erase(i);
    ++g.stats.acked;
    return {};
  }

  caf::error nack(uint64_t tag, caf::timespan delay) override {
    std::lock_guard guard{broker_->state_->mtx};
    auto& g = broker_->state_->group(group_);
    auto i = g.unacked.find(tag);
    if (i == g.unacked.end() || i->second.owner != id_)
      return violation(g, "nack", tag);
    auto e = std::move(i->second);
    g.unacked.erase(i);
    ++g.stats.nacked;
    if (delay.count() <= 0) {
      g.ready.emplace(e.seq, std::move(e));
    } else {
      auto now = g.now ? g.now() : std::chrono::steady_clock::now();
      g.delayed.emplace(now + delay, std::move(e));
    }
    return {};
  }

  caf::error dead_letter(uint64_t tag, const dead_letter_record& rec) override {
    std::lock_guard guard{broker_->state_->mtx};
    auto& g = broker_->state_->group(group_);
    auto i = g.unacked.find(tag);
    if (i == g.unacked.end() || i->second.owner != id_)
      return violation(g, "dead_letter", tag);
    g.dlq.push_back(to_json(rec));
    ++g.stats.dead_lettered;
    return {};
  }

  caf::error extend(uint64_t) override {
    return {}; // no ack deadline in-process
  }

  caf::error publish(const envelope& env) override {
    broker_->publish(env);
    return {};
  }

  void set_wakeup(std::function<void()> fn) override {
    wakeup_ = std::move(fn);
    if (!subscribed_)
      return;
    std::lock_guard guard{broker_->state_->mtx};
    broker_->state_->group(group_).wakeups[id_] = wakeup_;
  }

  caf::error close() override {
    if (closed_)
      return {};
    closed_ = true;
    std::vector<std::function<void()>> wake;
    {
      std::lock_guard guard{broker_->state_->mtx};
      auto i = broker_->state_->groups.find(group_);
      if (i == broker_->state_->groups.end())
        return {};
      auto& g = i->second;
      g.wakeups.erase(id_);
      for (auto j = g.unacked.begin(); j != g.unacked.end();) {
        if (j->second.owner == id_) {
          g.ready.emplace(j->second.seq, std::move(j->second));
          j = g.unacked.erase(j);
        } else {
          ++j;
        }
      }
      g.waiting = false;
      for (auto& [id, fn] : g.wakeups)
        wake.push_back(fn);
    }
    for (auto& fn : wake)
      fn();
    return {};
  }

private:
  caf::error violation(group_state& g, const char* what, uint64_t tag) {
    if (tag < g.next_tag)
      ++g.stats.protocol_violations;
    return make_error(errc::invalid_state,
                      std::string{"inproc transport: "} + what + " of tag "
                        + std::to_string(tag)
                        + " which is not an unacked delivery of this "
                          "consumer");
  }

  std::shared_ptr<inproc_broker> broker_;
  std::string group_;
  transport_environment env_;
  uint64_t id_ = 0;
  std::function<void()> wakeup_;
  bool subscribed_ = false;
  bool closed_ = false;
};

// Splits "inproc://NAME?group=G" into name and group.
caf::expected<std::pair<std::string, std::string>>
parse_inproc_url(std::string_view url) {
  constexpr std::string_view prefix = "inproc://";
  if (url.substr(0, prefix.size()) != prefix)
    return make_error(errc::invalid_url,
                      "not an inproc URL: '" + std::string{url}
                        + "' (expected inproc://NAME[?group=G])");
  auto rest = url.substr(prefix.size());
  auto q = rest.find('?');
  std::string name{rest.substr(0, q)};
  if (name.empty())
    name = "default";
  std::string group = "default";
  if (q != std::string_view::npos) {
    auto query = rest.substr(q + 1);
    while (!query.empty()) {
      auto amp = query.find('&');
      auto kv = query.substr(0, amp);
      auto eq = kv.find('=');
      auto k = kv.substr(0, eq);
      auto v = eq == std::string_view::npos ? std::string_view{}
                                            : kv.substr(eq + 1);
      if (k == "group" && !v.empty())
        group = std::string{v};
      else
        return make_error(errc::invalid_url,
                          "unknown parameter '" + std::string{k} + "' in '"
                            + std::string{url}
                            + "' (inproc URLs take only group=NAME)");
      if (amp == std::string_view::npos)
        break;
      query = query.substr(amp + 1);
    }
  }
  return std::make_pair(std::move(name), std::move(group));
}

} // namespace

void register_inproc_transport() {
  register_transport("inproc",
                     [](std::string_view url, const transport_environment& env)
                       -> caf::expected<transport_ptr> {
                       auto parsed = parse_inproc_url(url);
                       if (!parsed)
                         return parsed.error();
                       auto& [name, group] = *parsed;
                       return transport_ptr{std::make_shared<inproc_transport>(
                         inproc_broker::get(name), group, env)};
                     });
}

} // namespace evmesh
