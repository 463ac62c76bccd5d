// redact_url: what the runtime logs of a transport URL never shows a secret.
#include <gtest/gtest.h>

#include "evmesh/transport.hpp"

using evmesh::redact_url;

TEST(redact_url, masks_passwords_tokens_and_secret_query_values) {
  EXPECT_EQ(redact_url("nats://evmesh:s3cret@127.0.0.1:4222?stream=S"),
            "nats://evmesh:***@127.0.0.1:4222?stream=S");
  EXPECT_EQ(redact_url("nats://t0ken@127.0.0.1:4222"),
            "nats://***@127.0.0.1:4222");
  EXPECT_EQ(redact_url("amqp://u:p@host:5672/vhost?queue=q"),
            "amqp://u:***@host:5672/vhost?queue=q");
  EXPECT_EQ(redact_url("kafka://b1,b2?group=g&sasl.username=app&sasl.password="
                       "hunter2&topics=a"),
            "kafka://b1,b2?group=g&sasl.username=app&sasl.password=***&"
            "topics=a");
  EXPECT_EQ(redact_url("kafka://b1?SASL.OAUTHBEARER.CLIENT.SECRET=x&"
                       "auth_token=y"),
            "kafka://b1?SASL.OAUTHBEARER.CLIENT.SECRET=***&auth_token=***");
}

TEST(redact_url, leaves_urls_without_secrets_alone) {
  for (const char* url :
       {"inproc://default", "nats://127.0.0.1:4222?stream=S&durable=D",
        "kafka://b1,b2?group=g&topics=a&tls_key=/etc/key.pem",
        "amqp://host/vhost?queue=a@b", "not a url", ""})
    EXPECT_EQ(redact_url(url), url);
}
