// The NestJS peer of the AMQP benchmark (bench/e2e_amqp.cpp): a NestJS
// microservice on RabbitMQ with one @EventPattern handler that acks each
// message by hand (noAck: false, channel.ack), prefetch 1000. Plain
// JavaScript: decorators are applied by hand, so no TypeScript compiler is
// needed (the decorated class is what `nest build` would emit).
//
//   node consume.js URL QUEUE COUNT OUT
//
// Consumes the (preloaded) queue QUEUE, whose messages are NestJS events
// {"pattern": "bench.created", "data": {...}}. Writes OUT.ready once
// listening, and after COUNT events OUT.done with one JSON object:
// {count, secs, cpu_us} — wall time and process.cpuUsage() from the first
// event to the last ack. Then waits for SIGTERM (so the driver can read
// /proc/PID/stat), or exits 1 after 120 s without COUNT events.
'use strict';
require('reflect-metadata');
const fs = require('fs');
const { Controller, Module } = require('@nestjs/common');
const { NestFactory } = require('@nestjs/core');
const {
  Ctx, EventPattern, Payload, Transport,
} = require('@nestjs/microservices');

const [url, queue, countText, out] = process.argv.slice(2);
const count = Number(countText);
if (!url || !queue || !(count > 0) || !out) {
  console.error('usage: consume.js URL QUEUE COUNT OUT');
  process.exit(2);
}

let seen = 0;
let t0 = null;
let cpu0 = null;

class BenchController {
  onCreated(data, context) {
    if (seen === 0) {
      t0 = process.hrtime.bigint();
      cpu0 = process.cpuUsage();
    }
    context.getChannelRef().ack(context.getMessage());
    if (data === undefined || data === null)
      console.error('an event without data');
    if (++seen === count) {
      const secs = Number(process.hrtime.bigint() - t0) / 1e9;
      const cpu = process.cpuUsage(cpu0);
      // Written whole, then renamed: the driver never reads half a file.
      fs.writeFileSync(out + '.done.tmp', JSON.stringify({
        count, secs, cpu_us: cpu.user + cpu.system,
      }) + '\n');
      fs.renameSync(out + '.done.tmp', out + '.done');
    }
  }
}
const proto = BenchController.prototype;
EventPattern('bench.created')(
  proto, 'onCreated', Object.getOwnPropertyDescriptor(proto, 'onCreated'));
Payload()(proto, 'onCreated', 0);
Ctx()(proto, 'onCreated', 1);
Controller()(BenchController);
class AppModule {}
Module({ controllers: [BenchController] })(AppModule);

async function main() {
  const app = await NestFactory.createMicroservice(AppModule, {
    transport: Transport.RMQ,
    options: {
      urls: [url], queue, queueOptions: { durable: true },
      noAck: false, prefetchCount: 1000,
    },
    logger: ['error', 'warn'],
  });
  await app.listen();
  fs.writeFileSync(out + '.ready', 'ready\n');
  const timer = setTimeout(() => {
    console.error(`only ${seen} of ${count} events arrived within 120 s`);
    process.exit(1);
  }, 120000);
  process.on('SIGTERM', () => {
    clearTimeout(timer);
    process.exit(seen >= count ? 0 : 1);
  });
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});
