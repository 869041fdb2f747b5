// A Node program of the kind the field uses: msgpack-rpc-lite, talking to statefuld over its
// socket. It prints one JSON object of what it saw, for tests/test_interop.py.
const rpc = require('msgpack-rpc-lite');

const client = new rpc.Client({ path: process.argv[2] });
const call = (message) => new Promise((resolve) => client.send(message, (error, result) => resolve({ error, result })));

(async () => {
  const seen = {};
  const [pong] = await client.request('ping');
  seen.ping = pong;
  seen.set = (await client.request('set_service_state', 'game', 'lobby', 3, 'Ready'))[0];
  seen.states = (await client.request('get_service_state', 'game', 'lobby'))[0];
  // msgids from 2^31 up: msgpack-rpc-lite's encoder writes them as float64.
  seen.big_msgid = await call([0, 2147483648 + 5, 'ping', []]);
  seen.top_msgid = await call([0, 4294967295, 'ping', []]);
  try {
    await client.request('get_linked_pod', 'game', 'bad{uid', 'lobby');
  } catch (error) {
    seen.error = error;
  }
  console.log(JSON.stringify(seen));
  client.close();
})();
