// Subscribe with the npm graphql-ws client (the protocol Apollo Client speaks) and print each
// `next` payload as one JSON line on stdout; exit 0 after `count` of them, 1 on an error.
//   node subscribe.mjs <ws-url> '<Authorization header value>' <count> '<subscription document>'
import { createClient } from "graphql-ws";
import WebSocket from "ws";

const [url, authorization, count, query] = process.argv.slice(2);
const client = createClient({
  url,
  webSocketImpl: WebSocket,
  connectionParams: { authorization },
  retryAttempts: 0,
  keepAlive: 10_000,
});
let received = 0;
client.on("connected", () => console.error("connected"));
client.subscribe(
  { query },
  {
    next: (payload) => {
      console.log(JSON.stringify(payload));
      received += 1;
      if (received >= Number(count)) {
        client.dispose();
        process.exit(0);
      }
    },
    error: (error) => {
      console.error(JSON.stringify(error instanceof Error ? { message: error.message } : error));
      process.exit(1);
    },
    complete: () => process.exit(received >= Number(count) ? 0 : 1),
  },
);
