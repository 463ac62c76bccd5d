#pragma once

#include <map>
#include <mutex>
#include <string>

namespace order_service {

/// Counts handled events per topic and remembers the trace id each event was
/// handled under. Thread-safe.
class audit_log {
public:
  /// Records that the event `event_id` of `topic` ran in trace `trace_id`.
  void record(const std::string& topic, const std::string& event_id,
              const std::string& trace_id) {
    std::lock_guard guard{mtx_};
    ++counts_[topic];
    traces_[event_id] = trace_id;
  }

  /// Handled events per topic.
  std::map<std::string, int> counts() const {
    std::lock_guard guard{mtx_};
    return counts_;
  }

  /// The trace id `event_id` was handled under, or "" if it was not handled.
  std::string trace_of(const std::string& event_id) const {
    std::lock_guard guard{mtx_};
    auto i = traces_.find(event_id);
    return i == traces_.end() ? std::string{} : i->second;
  }

private:
  mutable std::mutex mtx_;
  std::map<std::string, int> counts_;
  std::map<std::string, std::string> traces_;
};

} // namespace order_service
