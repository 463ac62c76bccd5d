// cluster_node: one node of the cluster example (see README.md and run.sh).
// With --demo it is the ingress: it waits for two workers, publishes 3000
// jobs over 30 keys into its in-process broker, prints progress and the
// per-node tally, then exits. Without --demo it runs until SIGTERM and then
// prints how many jobs it ran.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <thread>

#include <evmesh/consumer.hpp>
#include <evmesh/main.hpp>

using namespace std::chrono_literals;

namespace cluster_example {
extern std::atomic<uint64_t> jobs_run;
} // namespace cluster_example

namespace {

constexpr int keys = 30;
constexpr int per_key = 100;

size_t alive(const evmesh::cluster_status& st) {
  size_t n = 0;
  for (auto& p : st.peers)
    n += p.state == "alive" ? 1 : 0;
  return n;
}

void print_tally(evmesh::consumer_runtime& rt, const char* title) {
  auto st = rt.cluster();
  auto stats = rt.stats();
  std::cout << title << ": acked " << stats.acked << ", handled "
            << stats.handled << ", dead-lettered " << stats.dead_lettered
            << ", re-dispatched " << st.redispatched << "\n  " << st.node
            << " (local lanes): " << cluster_example::jobs_run.load()
            << " job(s)\n";
  for (auto& p : st.peers)
    std::cout << "  " << p.name << " [" << p.state << "]: " << p.completed
              << " answered, " << p.in_flight << " in flight, last heartbeat "
              << p.last_heartbeat_ms << " ms ago\n";
  std::cout << std::flush;
}

int run_ingress(evmesh::consumer_runtime& rt) {
  std::cout << "ingress: waiting for 2 workers" << std::endl;
  for (int i = 0; i < 300 && alive(rt.cluster()) < 2; ++i)
    std::this_thread::sleep_for(100ms);
  if (alive(rt.cluster()) < 2) {
    std::cerr << "ingress: workers did not join within 30 s\n";
    return 1;
  }
  std::cout << "ingress: publishing " << keys * per_key << " jobs over " << keys
            << " keys" << std::endl;
  for (int s = 0; s < per_key; ++s)
    for (int k = 0; k < keys; ++k) {
      evmesh::envelope env;
      env.topic = "jobs.render";
      env.key = "customer-" + std::to_string(k);
      env.payload = boost::json::object{{"step", s}};
      if (auto err = rt.publish(std::move(env))) {
        std::cerr << "publish failed: " << evmesh::render(err) << "\n";
        return 1;
      }
    }
  uint64_t total = keys * per_key;
  for (int i = 0; i < 1200 && rt.stats().acked < total; ++i) {
    if (i % 5 == 0)
      print_tally(rt, "progress");
    if (evmesh::stop_requested())
      return 1;
    std::this_thread::sleep_for(100ms);
  }
  print_tally(rt, "final");
  return rt.stats().acked == total ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  evmesh::app_hooks hooks;
  hooks.description = "One node of the evmesh cluster example: --demo runs "
                      "the ingress that publishes jobs; otherwise a node that "
                      "runs until SIGTERM.";
  hooks.flags
    = {{"demo", "Ingress: publish 3000 jobs and print the tally.", false}};
  hooks.run = [](evmesh::consumer_runtime& rt, const evmesh::command_line& cl) {
    if (evmesh::has_flag(cl, "demo"))
      return run_ingress(rt);
    auto rc = evmesh::wait_for_stop(rt);
    std::cout << rt.config().node_name << ": ran "
              << cluster_example::jobs_run.load() << " job(s)" << std::endl;
    return rc;
  };
  return evmesh::run_main(argc, argv, std::move(hooks));
}
