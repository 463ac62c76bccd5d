// The transport contract suite for inproc://, the reference transport.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "evmesh/inproc.hpp"
#include "evmesh/testing/transport_contract.hpp"

namespace {

using evmesh::testing::transport_harness;

/// A fresh broker per test and a manual clock the suite advances, given to
/// every transport as `transport_environment::now`.
class inproc_harness : public transport_harness {
public:
  inproc_harness()
    : name_("contract-" + std::to_string(++instances)),
      clock_(std::make_shared<std::atomic<int64_t>>(0)),
      broker_(evmesh::inproc_broker::get(name_)) {
    evmesh::register_inproc_transport();
    broker_->reset();
    env_.now = [clock = clock_] {
      auto ns = std::chrono::nanoseconds{clock->load()};
      return std::chrono::steady_clock::time_point{} + std::chrono::hours{1}
             + ns;
    };
    env_.node = "contract-node";
  }

  void stop() override {
    // Drops the groups, and with them the wakeups and clock they hold.
    broker_->reset();
  }

  caf::expected<evmesh::transport_ptr>
  make_consumer(std::string group) override {
    return evmesh::make_transport("inproc://" + name_ + "?group=" + group,
                                  env_);
  }

  caf::expected<evmesh::transport_ptr> make_producer() override {
    return evmesh::make_transport("inproc://" + name_, env_);
  }

  std::string unique_topic_prefix() override {
    return "contract.t" + std::to_string(instances);
  }

  evmesh::transport_capabilities capabilities() const override {
    return {true, true, true, true};
  }

  void advance(caf::timespan d) override {
    *clock_ += d.count();
  }

  std::optional<std::vector<evmesh::dead_letter_record>>
  dead_letters(const std::string& group) override {
    std::vector<evmesh::dead_letter_record> result;
    for (auto& json : broker_->dead_letters(group)) {
      auto rec = evmesh::dead_letter_from_json(json);
      if (!rec) {
        ADD_FAILURE() << "unreadable DLQ record " << json << ": "
                      << evmesh::render(rec.error());
        continue;
      }
      result.push_back(std::move(*rec));
    }
    return result;
  }

  uint64_t violations(const std::string& group) override {
    return broker_->stats(group).protocol_violations;
  }

private:
  static inline std::atomic<int> instances = 0;

  std::string name_;
  std::shared_ptr<std::atomic<int64_t>> clock_;
  std::shared_ptr<evmesh::inproc_broker> broker_;
  evmesh::transport_environment env_;
};

} // namespace

namespace evmesh::testing {

INSTANTIATE_TYPED_TEST_SUITE_P(inproc, transport_contract, inproc_harness);

} // namespace evmesh::testing
