// NestJS interoperability over RabbitMQ (issue 5), both directions, against
// a real rabbitmq-server and the real @nestjs/microservices RMQ transport
// (nest_interop.js, run with node):
//
// 1. A NestJS ClientRMQ `emit('order.confirmed', data)`s into a queue; an
//    evmesh handler on `order.confirmed` consumes it: the pattern becomes the
//    topic, the data the payload, AMQP properties the envelope's id, headers
//    and traceparent. Producers stay as they are.
// 2. evmesh publishes `order.shipped` events in NestJS's shape
//    (format=nestjs): once through the topic exchange `evmesh` (the NestJS
//    microservice binds its queue there with wildcards), once straight into
//    the NestJS queue (exchange= and routing_key=, like ClientRMQ); the NestJS
//    @EventPattern('order.shipped') handler receives all of them.
//
// Run through run_nestjs_interop.sh, which installs the npm packages and sets
// EVMESH_NESTJS_SCRIPT and NODE_PATH. Every wait has a deadline; the broker
// and the node processes are always stopped.
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "evmesh/amqp.hpp"
#include "evmesh/error.hpp"
#include "evmesh/runtime.hpp"
#include "evmesh/testing.hpp"

#include "rabbitmq_server.hpp"

using namespace evmesh;
using namespace std::chrono_literals;
using evmesh::testing::rabbitmq_server;

namespace {

constexpr auto nest_traceparent
  = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

rabbitmq_server& server() {
  static auto instance = std::make_unique<rabbitmq_server>();
  return *instance;
}

template <class Pred>
bool wait_for(Pred pred, std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline)
      return false;
    std::this_thread::sleep_for(20ms);
  }
  return true;
}

std::string read_file(const std::string& path) {
  std::ifstream in{path};
  return {std::istreambuf_iterator<char>{in}, {}};
}

// Messages ready (not delivered) in `queue`, by a passive declare; -1 when
// the broker does not answer.
int64_t ready_messages(uint16_t port, const std::string& queue) {
  auto* c = amqp_new_connection();
  auto* sock = amqp_tcp_socket_new(c);
  int64_t result = -1;
  if (sock != nullptr && amqp_socket_open(sock, "127.0.0.1", port) == 0
      && amqp_login(c, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest",
                    "guest")
             .reply_type
           == AMQP_RESPONSE_NORMAL
      && amqp_channel_open(c, 1) != nullptr) {
    auto* ok = amqp_queue_declare(c, 1, amqp_cstring_bytes(queue.c_str()), 1, 0,
                                  0, 0, amqp_empty_table);
    if (ok != nullptr)
      result = ok->message_count;
    amqp_connection_close(c, AMQP_REPLY_SUCCESS);
  }
  amqp_destroy_connection(c);
  return result;
}

// A child process running `args`; SIGKILLed and reaped by the destructor,
// killed by the kernel if the test binary dies.
class child_process {
public:
  child_process(std::vector<std::string> args, std::string log)
    : log_(std::move(log)) {
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    auto parent = getpid();
    pid_ = fork();
    if (pid_ < 0)
      throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent)
        _exit(1);
      int fd = open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      execvp(argv[0], argv.data());
      _exit(127);
    }
  }

  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;

  ~child_process() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status_, 0);
    }
  }

  void signal(int sig) {
    if (pid_ > 0)
      kill(pid_, sig);
  }

  /// Waits up to `limit` for the exit; returns the exit code (-1: still
  /// running or killed by a signal).
  int wait(std::chrono::milliseconds limit) {
    auto exited = wait_for(
      [&] {
        if (pid_ <= 0)
          return true;
        if (waitpid(pid_, &status_, WNOHANG) == pid_) {
          pid_ = -1;
          return true;
        }
        return false;
      },
      limit);
    if (!exited || !WIFEXITED(status_))
      return -1;
    return WEXITSTATUS(status_);
  }

  std::string log() const {
    return read_file(log_);
  }

private:
  std::string log_;
  pid_t pid_ = -1;
  int status_ = 0;
};

// One `node nest_interop.js ...` child; SIGKILLed and reaped by the
// destructor, killed by the kernel if the test binary dies.
class node_process {
public:
  node_process(std::vector<std::string> args, std::string log)
    : log_(std::move(log)) {
    args.insert(args.begin(), {"node", script()});
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    auto parent = getpid();
    pid_ = fork();
    if (pid_ < 0)
      throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent)
        _exit(1);
      int fd = open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      execvp(argv[0], argv.data());
      _exit(127);
    }
  }

  node_process(const node_process&) = delete;
  node_process& operator=(const node_process&) = delete;

  ~node_process() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status_, 0);
    }
  }

  static std::string script() {
    auto* s = std::getenv("EVMESH_NESTJS_SCRIPT");
    return s == nullptr ? std::string{} : std::string{s};
  }

  /// Waits up to `limit` for the exit; returns the exit code (-1: still
  /// running or killed by a signal).
  int wait(std::chrono::milliseconds limit) {
    auto exited = wait_for(
      [&] {
        if (pid_ <= 0)
          return true;
        if (waitpid(pid_, &status_, WNOHANG) == pid_) {
          pid_ = -1;
          return true;
        }
        return false;
      },
      limit);
    if (!exited || !WIFEXITED(status_))
      return -1;
    return WEXITSTATUS(status_);
  }

  std::string log() const {
    return read_file(log_);
  }

private:
  std::string log_;
  pid_t pid_ = -1;
  int status_ = 0;
};

struct temp_dir {
  std::string path;
  temp_dir() {
    char tmpl[] = "/tmp/evmesh-nestjs-XXXXXX";
    if (mkdtemp(tmpl) == nullptr)
      throw std::runtime_error("mkdtemp failed");
    path = tmpl;
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

// What the evmesh handler saw of the NestJS events.
struct seen_event {
  std::string topic;
  std::string id;
  std::string order_id;
  int64_t quantity = -1;
  std::string traceparent;
  std::string region;
  wire_format format = wire_format::native;
};

std::mutex seen_mtx;
std::vector<seen_event> seen;

outcome on_confirmed(event_context& ctx) {
  auto& env = ctx.message();
  seen_event e;
  e.topic = env.topic;
  e.id = env.id;
  e.format = env.format;
  e.traceparent = env.traceparent;
  if (auto i = env.headers.find("region"); i != env.headers.end())
    e.region = i->second;
  if (auto* obj = env.payload.if_object()) {
    if (auto* id = obj->if_contains("order_id"); id && id->is_string())
      e.order_id = std::string{id->get_string()};
    if (auto* q = obj->if_contains("quantity"); q && q->is_int64())
      e.quantity = q->get_int64();
  }
  std::lock_guard guard{seen_mtx};
  seen.push_back(std::move(e));
  return ok();
}

class nestjs_interop : public ::testing::Test {
protected:
  void SetUp() override {
    if (node_process::script().empty())
      GTEST_SKIP() << "run through run_nestjs_interop.sh (ctest "
                      "evmesh_nestjs_interop), which installs the npm "
                      "packages and sets EVMESH_NESTJS_SCRIPT";
    if (!rabbitmq_server::available())
      GTEST_SKIP() << "rabbitmq-server is not installed (scripts/"
                      "install-deps.sh --with-servers)";
    register_amqp_transport();
    std::lock_guard guard{seen_mtx};
    seen.clear();
  }

  temp_dir dir_;
};

} // namespace

TEST_F(nestjs_interop, a_nestjs_client_emit_is_handled_by_evmesh) {
  // The NestJS service's queue; evmesh consumes it in place of the NestJS
  // consumer (exchange= : no bindings, producers send to the queue).
  auto url = server().url() + "?queue=orders_nest&exchange=";
  handler_descriptor h;
  h.consumer = "orders";
  h.pattern = "order.confirmed";
  h.fn = &on_confirmed;
  auto cfg = evmesh::testing::test_config("unused");
  cfg.transport_url = url;
  cfg.dedupe_url = "memory://";
  cfg.dead_letter_url = "none";
  cfg.poll_idle = 5ms;
  consumer_runtime rt{cfg};
  rt.set_handlers({&h});
  ASSERT_FALSE(rt.start());
  constexpr int count = 20;
  node_process nest{{"emit", server().url(), "orders_nest",
                     std::to_string(count)},
                    dir_.path + "/emit.log"};
  EXPECT_EQ(nest.wait(90s), 0) << "the NestJS client failed:\n" << nest.log();
  EXPECT_TRUE(wait_for(
    [] {
      std::lock_guard guard{seen_mtx};
      return seen.size() >= size_t{count};
    },
    30s));
  rt.stop(5s);
  EXPECT_EQ(rt.stats().dead_lettered, 0u);
  std::lock_guard guard{seen_mtx};
  ASSERT_EQ(seen.size(), size_t{count});
  std::set<std::string> orders;
  for (auto& e : seen) {
    EXPECT_EQ(e.topic, "order.confirmed") << "pattern -> topic";
    EXPECT_EQ(e.format, wire_format::nestjs);
    ASSERT_EQ(e.order_id.rfind("o-", 0), 0u) << "data -> payload";
    auto i = std::stoi(e.order_id.substr(2));
    EXPECT_EQ(e.quantity, 1 + i % 3);
    EXPECT_EQ(e.id, "nest-" + std::to_string(i)) << "message_id -> id";
    EXPECT_EQ(e.traceparent, nest_traceparent) << "traceparent header";
    EXPECT_EQ(e.region, "eu") << "AMQP headers -> envelope headers";
    orders.insert(e.order_id);
  }
  EXPECT_EQ(orders.size(), size_t{count}) << "every event exactly once";
}

TEST_F(nestjs_interop, the_order_service_example_handles_nestjs_emits) {
  auto* service = std::getenv("EVMESH_ORDER_SERVICE");
  if (service == nullptr)
    GTEST_SKIP() << "EVMESH_ORDER_SERVICE is not set (the order_service "
                    "example is not built)";
  // examples/order_service, unchanged, takes over the NestJS queue: its
  // order.confirmed handler reserves stock, its order.* audit consumer sees
  // every event (two handler runs per event).
  auto url = server().url() + "?queue=orders_svc&exchange=&prefetch=1";
  child_process svc{{service, "--transport.url", url, "--dedupe.url",
                     "memory://", "--dead_letter.url",
                     "sqlite://" + dir_.path + "/dlq.db", "--runtime.log_level",
                     "warn"},
                    dir_.path + "/order_service.log"};
  ASSERT_TRUE(wait_for(
    [&] {
      return svc.log().find("order_service consuming from")
             != std::string::npos;
    },
    60s))
    << svc.log();
  constexpr int count = 20;
  node_process nest{{"emit", server().url(), "orders_svc",
                     std::to_string(count)},
                    dir_.path + "/emit.log"};
  EXPECT_EQ(nest.wait(90s), 0) << "the NestJS client failed:\n" << nest.log();
  // prefetch=1: once nothing is ready in the queue, the service holds at
  // most the last event; it finishes it on SIGTERM (graceful drain).
  EXPECT_TRUE(wait_for(
    [&] { return ready_messages(server().port(), "orders_svc") == 0; }, 60s));
  std::this_thread::sleep_for(1s);
  svc.signal(SIGTERM);
  EXPECT_EQ(svc.wait(30s), 0) << svc.log();
  auto log = svc.log();
  EXPECT_NE(log.find("received 20, handled 40, duplicates 0, retried 0, "
                     "dead-lettered 0"),
            std::string::npos)
    << log;
}

TEST_F(nestjs_interop, evmesh_events_reach_a_nestjs_event_pattern_handler) {
  constexpr int per_route = 10;
  auto out = dir_.path + "/received.jsonl";
  node_process nest{{"consume", server().url(), "shipping_nest",
                     std::to_string(2 * per_route), out},
                    dir_.path + "/consume.log"};
  ASSERT_TRUE(
    wait_for([&] { return std::filesystem::exists(out + ".ready"); }, 90s))
    << "the NestJS microservice did not start:\n"
    << nest.log();
  // Through the topic exchange `evmesh` (NestJS bound its queue with its
  // @EventPattern patterns) ...
  auto via_exchange = make_transport(server().url() + "?format=nestjs",
                                     {{}, "interop"});
  ASSERT_TRUE(via_exchange) << render(via_exchange.error());
  // ... and straight into the NestJS queue, as a NestJS ClientRMQ sends.
  auto via_queue = make_transport(server().url()
                                    + "?exchange=&routing_key=shipping_nest"
                                      "&format=nestjs",
                                  {{}, "interop"});
  ASSERT_TRUE(via_queue) << render(via_queue.error());
  for (int i = 0; i < 2 * per_route; ++i) {
    envelope e;
    e.topic = "order.shipped";
    e.id = "ship-" + std::to_string(i);
    e.traceparent = nest_traceparent;
    e.payload = boost::json::object{{"order_id", "o-" + std::to_string(i)},
                                    {"carrier", "dhl"}};
    auto& t = i < per_route ? *via_exchange : *via_queue;
    ASSERT_FALSE(t->publish(e)) << e.id;
  }
  EXPECT_EQ(nest.wait(90s), 0) << "the NestJS consumer failed:\n" << nest.log();
  std::map<std::string, boost::json::object> got;
  std::istringstream lines{read_file(out)};
  for (std::string line; std::getline(lines, line);) {
    auto v = boost::json::parse(line).as_object();
    EXPECT_EQ(v.at("pattern").as_string(), "order.shipped");
    auto data = v.at("data").as_object();
    got[std::string{data.at("order_id").as_string()}] = v;
  }
  ASSERT_EQ(got.size(), size_t{2 * per_route}) << read_file(out);
  for (int i = 0; i < 2 * per_route; ++i) {
    auto key = "o-" + std::to_string(i);
    ASSERT_TRUE(got.count(key)) << key << " did not reach NestJS";
    auto& v = got[key];
    EXPECT_EQ(v.at("data").at("carrier").as_string(), "dhl");
    EXPECT_EQ(v.at("message_id").as_string(), "ship-" + std::to_string(i));
    EXPECT_EQ(v.at("traceparent").as_string(), nest_traceparent);
  }
  EXPECT_FALSE((*via_exchange)->close());
  EXPECT_FALSE((*via_queue)->close());
}
