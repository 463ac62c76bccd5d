// The handler every node of the example runs: 10 ms of "work" per job. Keys
// keep their order across nodes; the counter tells how many jobs this node
// ran (main.cpp prints it).
#include <atomic>
#include <chrono>
#include <thread>

#include <evmesh/consumer.hpp>

namespace cluster_example {

std::atomic<uint64_t> jobs_run{0};

struct jobs {
  static evmesh::outcome on_job(evmesh::event_context&) {
    std::this_thread::sleep_for(std::chrono::milliseconds{10});
    jobs_run.fetch_add(1);
    return evmesh::ok();
  }
};

} // namespace cluster_example

EVMESH_EVENT_PATTERN(cluster_example::jobs, "jobs.*",
                     &cluster_example::jobs::on_job, .concurrency = 4,
                     .execution = evmesh::execution::blocking);
