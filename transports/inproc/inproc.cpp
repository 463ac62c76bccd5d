#include "evmesh/inproc.hpp"

#include <algorithm>
#include <charconv>
#include <deque>
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
  /// Messages not delivered yet, in publish order (a publish appends).
  std::deque<entry> fresh;
  /// Messages to deliver again (nacked, requeued, due again), by publish
  /// sequence: a poll merges them with `fresh`, so redeliveries come back in
  /// publish order.
  std::map<uint64_t, entry> returned;
  std::multimap<time_point, entry> delayed;
  /// Delivered and not settled: slot i holds tag `unacked_base + i` (tags
  /// are handed out in order), or nothing (`msg` empty) once it is settled.
  /// Settled slots leave from the front. A slot that stays unsettled while
  /// far more later ones are settled moves to `stragglers`, so one stuck
  /// delivery does not make the window grow with every message after it.
  std::deque<entry> unacked;
  uint64_t unacked_base = 1;
  size_t unacked_live = 0;
  std::map<uint64_t, entry> stragglers;
  uint64_t next_tag = 1;
  inproc_group_stats stats;
  std::vector<std::string> dlq;
  std::map<uint64_t, std::function<void()>> wakeups; // by consumer id
  bool waiting = false;
  std::function<time_point()> now;

  /// The window's size from which a slot at its front, still unsettled, is
  /// a straggler (when it also exceeds 8 times the unsettled deliveries).
  static constexpr size_t straggler_window = 65536;

  size_t pending() const noexcept {
    return fresh.size() + returned.size() + delayed.size();
  }

  size_t unacked_count() const noexcept {
    return unacked_live + stragglers.size();
  }

  /// Whether a message is ready to deliver.
  bool has_ready() const noexcept {
    return !fresh.empty() || !returned.empty();
  }

  /// Takes the ready message with the lowest publish sequence.
  entry take_ready() {
    if (!returned.empty()
        && (fresh.empty() || returned.begin()->first < fresh.front().seq)) {
      auto node = returned.extract(returned.begin());
      return std::move(node.mapped());
    }
    entry e = std::move(fresh.front());
    fresh.pop_front();
    return e;
  }

  /// Records `e` as delivered under tag `tag` (the next tag in order).
  void add_unacked(uint64_t tag, entry e) {
    if (unacked.empty())
      unacked_base = tag;
    unacked.push_back(std::move(e));
    ++unacked_live;
  }

  /// Whether `tag` has a slot in the window (settled or not).
  bool in_window(uint64_t tag) const noexcept {
    return tag >= unacked_base && tag - unacked_base < unacked.size();
  }

  /// The unsettled delivery `tag`, or nullptr.
  entry* find_unacked(uint64_t tag) {
    if (in_window(tag)) {
      auto& e = unacked[tag - unacked_base];
      return e.msg != nullptr ? &e : nullptr;
    }
    auto i = stragglers.find(tag);
    return i != stragglers.end() ? &i->second : nullptr;
  }

  /// Settles the delivery `tag`, which `find_unacked` found, and returns
  /// its entry.
  entry take_unacked(uint64_t tag) {
    entry e;
    if (in_window(tag)) {
      e = std::move(unacked[tag - unacked_base]);
      unacked[tag - unacked_base].msg = nullptr;
      --unacked_live;
      trim();
    } else {
      auto node = stragglers.extract(tag);
      e = std::move(node.mapped());
    }
    return e;
  }

  /// Moves every unsettled delivery for which `pred(entry)` holds to
  /// `returned` (to be delivered again).
  template <class Pred>
  void return_unacked(Pred pred) {
    for (auto& e : unacked)
      if (e.msg != nullptr && pred(e)) {
        auto seq = e.seq;
        returned.emplace(seq, std::move(e));
        e.msg = nullptr;
        --unacked_live;
      }
    for (auto i = stragglers.begin(); i != stragglers.end();) {
      if (pred(i->second)) {
        returned.emplace(i->second.seq, std::move(i->second));
        i = stragglers.erase(i);
      } else {
        ++i;
      }
    }
    trim();
  }

private:
  // Drops settled slots from the window's front, and moves a straggler at
  // the front out of the way when the window has grown far beyond the
  // deliveries it holds.
  void trim() {
    for (;;) {
      while (!unacked.empty() && unacked.front().msg == nullptr) {
        unacked.pop_front();
        ++unacked_base;
      }
      if (unacked.size() <= straggler_window
          || unacked.size() <= 8 * unacked_live)
        return;
      stragglers.emplace(unacked_base, std::move(unacked.front()));
      unacked.pop_front();
      ++unacked_base;
      --unacked_live;
    }
  }
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
      g.fresh.push_back(e);
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
      g.returned.emplace(i->second.seq, std::move(i->second));
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
      g.fresh.push_back(e);
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
  result.pending = i->second.pending();
  result.unacked = i->second.unacked_count();
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
    g.return_unacked([](const entry&) { return true; });
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
    return poll_through_batch(max, out);
  }

  caf::error poll_into(size_t max, raw_batch& out) override {
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
    while (n < max && g.has_ready()) {
      auto e = g.take_ready();
      auto tag = g.next_tag++;
      ++e.deliveries;
      e.owner = id_;
      auto& msg = out.add();
      msg.tag = tag;
      msg.bytes = e.msg->bytes;
      msg.subject = e.msg->subject;
      msg.traceparent = e.msg->traceparent;
      msg.key = e.msg->key;
      msg.delivery_count = e.deliveries;
      char seq[20];
      auto seq_end = std::to_chars(seq, seq + sizeof(seq), e.seq).ptr;
      auto seq_len = static_cast<size_t>(seq_end - seq);
      msg.position.reserve(8 + group_.size() + seq_len);
      msg.position += "inproc:";
      msg.position += group_;
      msg.position += '#';
      msg.position.append(seq, seq_len);
      ++g.stats.delivered;
      if (e.deliveries > 1)
        ++g.stats.redelivered;
      g.add_unacked(tag, std::move(e));
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
    auto* e = g.find_unacked(tag);
    if (e == nullptr || e->owner != id_)
      return violation(g, "ack", tag);
    g.take_unacked(tag);
    ++g.stats.acked;
    return {};
  }

  caf::error nack(uint64_t tag, caf::timespan delay) override {
    std::lock_guard guard{broker_->state_->mtx};
    auto& g = broker_->state_->group(group_);
    auto* found = g.find_unacked(tag);
    if (found == nullptr || found->owner != id_)
      return violation(g, "nack", tag);
    auto e = g.take_unacked(tag);
    ++g.stats.nacked;
    if (delay.count() <= 0) {
      auto seq = e.seq;
      g.returned.emplace(seq, std::move(e));
    } else {
      auto now = g.now ? g.now() : std::chrono::steady_clock::now();
      g.delayed.emplace(now + delay, std::move(e));
    }
    return {};
  }

  caf::error dead_letter(uint64_t tag, const dead_letter_record& rec) override {
    std::lock_guard guard{broker_->state_->mtx};
    auto& g = broker_->state_->group(group_);
    auto* e = g.find_unacked(tag);
    if (e == nullptr || e->owner != id_)
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
      g.return_unacked([this](const entry& e) { return e.owner == id_; });
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
