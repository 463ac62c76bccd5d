// The NestJS side of the evmesh interop test (test/interop/nestjs), in plain
// JavaScript: decorators are applied by hand, so no TypeScript compiler is
// needed. Modes:
//
//   node nest_interop.js emit URL QUEUE COUNT
//     A NestJS ClientRMQ emits COUNT `order.confirmed` events into QUEUE
//     (sendToQueue, as every NestJS RMQ client does), each with a message id
//     and headers set through RmqRecordBuilder, then exits 0.
//
//   node nest_interop.js consume URL QUEUE COUNT OUT
//     A NestJS RMQ microservice on QUEUE, bound to the topic exchange
//     `evmesh` (wildcards), with an @EventPattern('order.shipped') handler.
//     Writes OUT.ready once listening, one JSON line per event to OUT, and
//     exits 0 after COUNT events (1 after 60 s without them).
'use strict';
require('reflect-metadata');
const fs = require('fs');
const { Controller, Module } = require('@nestjs/common');
const { NestFactory } = require('@nestjs/core');
const {
  ClientProxyFactory, Ctx, EventPattern, Payload, RmqRecordBuilder, Transport,
} = require('@nestjs/microservices');
const { lastValueFrom } = require('rxjs');

const [mode, url, queue, countText, out] = process.argv.slice(2);
const count = Number(countText);
const traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';

async function emit() {
  const client = ClientProxyFactory.create({
    transport: Transport.RMQ,
    options: { urls: [url], queue, queueOptions: { durable: true } },
  });
  await client.connect();
  for (let i = 0; i < count; ++i) {
    const data = { order_id: `o-${i}`, sku: 'SKU-MUG', quantity: 1 + (i % 3) };
    const record = new RmqRecordBuilder(data)
      .setOptions({
        messageId: `nest-${i}`,
        headers: { traceparent, region: 'eu' },
      })
      .build();
    await lastValueFrom(client.emit('order.confirmed', record),
                        { defaultValue: null });
  }
  await client.close();
}

async function consume() {
  const received = [];
  let finish;
  const done = new Promise((resolve) => { finish = resolve; });
  class ShippingController {
    onShipped(data, context) {
      const props = context.getMessage().properties;
      received.push(JSON.stringify({
        pattern: context.getPattern(),
        data,
        message_id: props.messageId ?? null,
        traceparent: (props.headers ?? {}).traceparent ?? null,
      }));
      fs.appendFileSync(out, received[received.length - 1] + '\n');
      if (received.length >= count)
        finish();
    }
  }
  const proto = ShippingController.prototype;
  EventPattern('order.shipped')(
    proto, 'onShipped', Object.getOwnPropertyDescriptor(proto, 'onShipped'));
  Payload()(proto, 'onShipped', 0);
  Ctx()(proto, 'onShipped', 1);
  Controller()(ShippingController);
  class AppModule {}
  Module({ controllers: [ShippingController] })(AppModule);
  const app = await NestFactory.createMicroservice(AppModule, {
    transport: Transport.RMQ,
    options: {
      urls: [url], queue, queueOptions: { durable: true },
      exchange: 'evmesh', exchangeType: 'topic', wildcards: true,
    },
    logger: ['error', 'warn'],
  });
  await app.listen();
  fs.writeFileSync(out + '.ready', 'ready\n');
  const timer = setTimeout(() => finish('timeout'), 60000);
  const why = await done;
  clearTimeout(timer);
  await app.close();
  if (why === 'timeout') {
    console.error(`only ${received.length} of ${count} events arrived`);
    process.exit(1);
  }
}

const run = mode === 'emit' ? emit : mode === 'consume' ? consume : null;
if (!run) {
  console.error('usage: nest_interop.js emit|consume URL QUEUE COUNT [OUT]');
  process.exit(2);
}
run().then(() => process.exit(0), (err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});
