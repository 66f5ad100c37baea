// A phone on the official SignalR client (@microsoft/signalr), driven by
// tests/signalr.rs. Environment:
//   HUB_URL     http://127.0.0.1:PORT/v1/hub
//   HUB_TOKEN   the mobile JWT, given through accessTokenFactory
//   SKIP_NEGOTIATION=1   connect the WebSocket directly (skipNegotiation)
//   ACK_RATIO   0..1: ack (invoke "Ack") this fraction of messages itself
//   CHURN_MS    if set, "lo-hi": stop and start again after a random time
//               in that range, over and over (a phone that comes and goes)
// It prints one JSON object per line on stdout (events) and reads commands
// as JSON lines on stdin: {"cmd":"invoke"|"send","method","args","tag"},
// {"cmd":"stop"}. It exits when stdin closes.
"use strict";
const signalR = require("@microsoft/signalr");
const readline = require("readline");

const url = process.env.HUB_URL;
const token = process.env.HUB_TOKEN;
const skip = process.env.SKIP_NEGOTIATION === "1";
const ackRatio = Number(process.env.ACK_RATIO || "0");
const churn = process.env.CHURN_MS ? process.env.CHURN_MS.split("-").map(Number) : null;

function out(o) {
  process.stdout.write(JSON.stringify(o) + "\n");
}

const options = { accessTokenFactory: () => token };
if (skip) {
  options.skipNegotiation = true;
  options.transport = signalR.HttpTransportType.WebSockets;
}
const connection = new signalR.HubConnectionBuilder()
  .withUrl(url, options)
  // Retry every 250 ms for a minute (the engine restarts after kill -9).
  .withAutomaticReconnect({ nextRetryDelayInMilliseconds: (c) => (c.elapsedMilliseconds < 60000 ? 250 : null) })
  .configureLogging(signalR.LogLevel.None)
  .build();

connection.on("ReceiveMessage", (message) => {
  out({ event: "message", message });
  if (ackRatio > 0 && Math.random() < ackRatio) {
    connection
      .invoke("Ack", message.id)
      .then(() => out({ event: "acked", id: message.id }))
      .catch((e) => out({ event: "ack_failed", id: message.id, error: String(e && e.message) }));
  }
});
connection.onreconnecting((e) => out({ event: "reconnecting", error: e ? e.message : null }));
connection.onreconnected(() => out({ event: "reconnected" }));
connection.onclose((e) => out({ event: "closed", error: e ? e.message : null }));

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function churnLoop() {
  // start() itself does not retry, so a refused start (engine down) is
  // tried again; a connection the automatic reconnect brought back counts.
  for (;;) {
    if (connection.state === signalR.HubConnectionState.Disconnected) {
      try {
        await connection.start();
        out({ event: "started" });
      } catch (e) {
        await sleep(100);
        continue;
      }
    }
    await sleep(churn[0] + Math.random() * (churn[1] - churn[0]));
    await connection.stop().catch(() => {});
  }
}

if (churn) {
  churnLoop();
} else {
  connection
    .start()
    .then(() => out({ event: "started" }))
    .catch((e) => {
      out({ event: "start_failed", error: String(e && e.message) });
    });
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const c = JSON.parse(line);
  if (c.cmd === "invoke") {
    connection
      .invoke(c.method, ...c.args)
      .then((result) => out({ event: "result", tag: c.tag, result: result === undefined ? null : result }))
      .catch((e) => out({ event: "error", tag: c.tag, error: String(e && e.message) }));
  } else if (c.cmd === "send") {
    connection.send(c.method, ...c.args).catch((e) => out({ event: "error", tag: c.tag, error: String(e && e.message) }));
  } else if (c.cmd === "stop") {
    connection.stop().then(() => out({ event: "stopped" }));
  }
});
rl.on("close", () => process.exit(0));
