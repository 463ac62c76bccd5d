// Credentials other than user/password on a real nats-server: token auth and
// mutual TLS (a CA, a server certificate for 127.0.0.1 and a client
// certificate, made with the openssl CLI in a temporary directory). A
// connection with the right credentials publishes and consumes; every wrong
// one fails at start with an actionable error, within a bounded time.
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "evmesh/error.hpp"
#include "evmesh/nats.hpp"
#include "evmesh/transport.hpp"

#include "nats_server.hpp"

using namespace evmesh;
using namespace std::chrono_literals;
using evmesh::testing::nats_server;

namespace {

transport_environment env() {
  return {{}, "tls-test-node"};
}

bool openssl_available() {
  return std::system("command -v openssl >/dev/null 2>&1") == 0;
}

/// A throwaway PKI: ca.pem signs server.pem (SAN IP:127.0.0.1) and
/// client.pem; rogue.pem is a client certificate from another CA.
class test_pki {
public:
  test_pki() {
    char tmpl[] = "/tmp/evmesh-pki-XXXXXX";
    if (mkdtemp(tmpl) == nullptr)
      throw std::runtime_error("mkdtemp failed");
    dir_ = tmpl;
    auto run = [this](const std::string& cmd) {
      auto full = "cd " + dir_ + " && " + cmd + " >>pki.log 2>&1";
      if (std::system(full.c_str()) != 0)
        throw std::runtime_error("openssl failed: " + cmd + " (see " + dir_
                                 + "/pki.log)");
    };
    auto make_ca = [&](const std::string& name) {
      run("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -keyout " + name
          + ".key -out " + name + ".pem -subj '/CN=evmesh " + name + "'");
    };
    auto make_cert = [&](const std::string& name, const std::string& ca,
                         const std::string& cn, const std::string& ext) {
      run("openssl req -newkey rsa:2048 -nodes -keyout " + name + ".key -out "
          + name + ".csr -subj '/CN=" + cn + "'");
      std::ofstream{dir_ + "/" + name + ".ext"} << ext << '\n';
      run("openssl x509 -req -in " + name + ".csr -CA " + ca + ".pem -CAkey "
          + ca + ".key -CAcreateserial -days 2 -out " + name + ".pem -extfile "
          + name + ".ext");
    };
    make_ca("ca");
    make_ca("rogue-ca");
    make_cert("server", "ca", "127.0.0.1",
              "subjectAltName=IP:127.0.0.1,DNS:localhost");
    make_cert("client", "ca", "evmesh-consumer", "extendedKeyUsage=clientAuth");
    make_cert("rogue", "rogue-ca", "intruder", "extendedKeyUsage=clientAuth");
  }

  test_pki(const test_pki&) = delete;
  test_pki& operator=(const test_pki&) = delete;

  ~test_pki() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::string file(const std::string& name) const {
    return dir_ + "/" + name;
  }

private:
  std::string dir_;
};

/// Publishes one envelope on `producer`, then polls `consumer` (subscribed to
/// `pattern`) until it arrives (10 s at most) and acks it.
void round_trip(transport& producer, transport& consumer,
                const std::string& topic) {
  envelope e;
  e.topic = topic;
  e.id = "tls-1";
  e.idempotency_key = "tls-1";
  e.payload = boost::json::object{{"secure", true}};
  ASSERT_FALSE(producer.publish(e));
  std::vector<raw_message> got;
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (got.empty() && std::chrono::steady_clock::now() < deadline) {
    ASSERT_FALSE(consumer.poll(16, got));
    if (got.empty())
      std::this_thread::sleep_for(10ms);
  }
  ASSERT_EQ(got.size(), 1u) << "the message did not arrive within 10 s";
  EXPECT_EQ(got[0].subject, topic);
  EXPECT_NE(got[0].bytes.find("\"secure\":true"), std::string::npos)
    << got[0].bytes;
  EXPECT_FALSE(consumer.ack(got[0].tag));
}

class nats_credentials : public ::testing::Test {
protected:
  void SetUp() override {
    if (!nats_server::available())
      GTEST_SKIP() << "nats-server is not installed (apt-get install "
                      "nats-server, or scripts/install-deps.sh "
                      "--with-servers)";
    register_nats_transport();
  }
};

} // namespace

TEST_F(nats_credentials, token_auth_accepts_the_token_and_refuses_others) {
  nats_server server{{"--auth", "t0ken-abc"}};
  auto base = "127.0.0.1:" + std::to_string(server.port())
              + "?stream=TOK&subjects=tok.>&connect_timeout=2s";
  auto bad = make_transport("nats://wrong-token@" + base, env());
  ASSERT_FALSE(bad);
  auto text = render(bad.error());
  EXPECT_NE(text.find("authentication failed"), std::string::npos) << text;
  EXPECT_EQ(text.find("wrong-token"), std::string::npos) << "token leaked";
  auto none = make_transport("nats://" + base, env());
  ASSERT_FALSE(none);
  EXPECT_NE(render(none.error()).find("authentication"), std::string::npos)
    << render(none.error());
  auto producer = make_transport("nats://t0ken-abc@" + base, env());
  ASSERT_TRUE(producer) << render(producer.error());
  auto consumer = make_transport("nats://t0ken-abc@" + base + "&durable=tok",
                                 env());
  ASSERT_TRUE(consumer) << render(consumer.error());
  ASSERT_FALSE((*consumer)->subscribe({"tok.>"}));
  round_trip(**producer, **consumer, "tok.created");
  EXPECT_FALSE((*consumer)->close());
  EXPECT_FALSE((*producer)->close());
}

class nats_mutual_tls : public nats_credentials {
protected:
  void SetUp() override {
    nats_credentials::SetUp();
    if (IsSkipped())
      return;
    if (!openssl_available())
      GTEST_SKIP() << "the openssl CLI is not installed (apt-get install "
                      "openssl)";
    pki_ = std::make_unique<test_pki>();
    server_ = std::make_unique<nats_server>(std::vector<std::string>{
      "--tlsverify", "--tlscert", pki_->file("server.pem"), "--tlskey",
      pki_->file("server.key"), "--tlscacert", pki_->file("ca.pem")});
  }

  std::string url(const std::string& extra) const {
    return "nats://127.0.0.1:" + std::to_string(server_->port())
           + "?stream=SEC&subjects=sec.>&connect_timeout=2s" + extra;
  }

  std::string client_tls() const {
    return "&tls_ca=" + pki_->file("ca.pem") + "&tls_cert="
           + pki_->file("client.pem") + "&tls_key=" + pki_->file("client.key");
  }

  std::unique_ptr<test_pki> pki_;
  std::unique_ptr<nats_server> server_;
};

TEST_F(nats_mutual_tls, client_certificate_from_the_ca_connects_and_consumes) {
  auto producer = make_transport(url(client_tls()), env());
  ASSERT_TRUE(producer) << render(producer.error());
  auto consumer = make_transport(url(client_tls() + "&durable=sec"), env());
  ASSERT_TRUE(consumer) << render(consumer.error());
  EXPECT_TRUE((*consumer)->connected());
  ASSERT_FALSE((*consumer)->subscribe({"sec.>"}));
  round_trip(**producer, **consumer, "sec.created");
  EXPECT_FALSE((*consumer)->close());
  EXPECT_FALSE((*producer)->close());
}

TEST_F(nats_mutual_tls, every_wrong_credential_fails_at_start_and_says_why) {
  struct scenario {
    const char* what;
    std::string extra;
    std::string expect; // substring of the error
  };
  std::vector<scenario> cases{
    {"no TLS at all", "", "TLS"},
    {"CA but no client certificate", "&tls_ca=" + pki_->file("ca.pem"),
     "client certificate"},
    {"client certificate from another CA",
     "&tls_ca=" + pki_->file("ca.pem") + "&tls_cert=" + pki_->file("rogue.pem")
       + "&tls_key=" + pki_->file("rogue.key"),
     "client certificate"},
    {"server certificate not trusted (wrong CA)",
     "&tls_ca=" + pki_->file("rogue-ca.pem") + "&tls_cert="
       + pki_->file("client.pem") + "&tls_key=" + pki_->file("client.key"),
     "unable to get local issuer certificate"},
    {"missing CA file", "&tls_ca=" + pki_->file("nope.pem"), "nope.pem"},
    {"certificate without key", "&tls_cert=" + pki_->file("client.pem"),
     "tls_cert and tls_key go together"},
  };
  for (auto& c : cases) {
    SCOPED_TRACE(c.what);
    auto start = std::chrono::steady_clock::now();
    auto tr = make_transport(url(c.extra), env());
    auto took = std::chrono::steady_clock::now() - start;
    ASSERT_FALSE(tr) << "connected although: " << c.what;
    auto text = render(tr.error());
    std::cout << c.what << " -> " << text << '\n';
    EXPECT_NE(text.find(c.expect), std::string::npos) << text;
    EXPECT_LT(took, 15s) << "a refused connection must not hang";
  }
}
