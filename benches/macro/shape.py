#!/usr/bin/env python3
"""A modelled remote link on loopback: a TCP proxy adding latency and a shared bandwidth limit.

  shape.py LISTEN_PORT TARGET_PORT RATE_MBIT RTT_MS [PER_CONNECTION_MBIT]

Every byte crossing the proxy, in each direction, is delayed by RTT/2 and paced through one token
bucket per direction shared by all connections (one link, not one per connection), as a remote
registry behind a `RATE_MBIT`, `RTT_MS` path would be. With PER_CONNECTION_MBIT, each
connection's downstream is also capped on its own (a registry or CDN that limits every
connection, so one stream cannot use the whole link). Used by the macro benchmarks when the
kernel has no `netem` qdisc (this machine's does not); stdlib only.

  env SHAPE_COUNT=FILE: count the bytes sent to clients (the target's egress) and keep FILE
      holding the running total (rewritten at most every 50 ms and on every connection's end).
  env SHAPE_EXTRA=LISTEN_PORT:TARGET_PORT: a second listener and target behind the same link
      (e.g. an object store beside the registry); its bytes are not counted.
"""
import asyncio
import os
import sys
import time


class Link:
    """One direction of the link: latency plus a shared pacing clock."""

    def __init__(self, rate_bytes_per_s, delay_s):
        self.rate = rate_bytes_per_s
        self.delay = delay_s
        self.free_at = 0.0  # when the link finishes sending what it has been given

    def schedule(self, n):
        now = time.monotonic()
        start = max(now, self.free_at)
        self.free_at = start + n / self.rate
        return self.free_at + self.delay


class Counter:
    """Bytes sent to clients, mirrored to a file for the benchmark to read."""

    def __init__(self, path):
        self.path, self.total, self.written_at = path, 0, 0.0

    def add(self, n):
        self.total += n
        if time.monotonic() - self.written_at > 0.05:
            self.flush()

    def flush(self):
        self.written_at = time.monotonic()
        with open(self.path + ".tmp", "w") as f:
            f.write(str(self.total))
        os.replace(self.path + ".tmp", self.path)


async def pump(reader, writer, link, own=None, counter=None):
    queue = asyncio.Queue()

    async def sender():
        while True:
            item = await queue.get()
            if item is None:
                break
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            pass

    task = asyncio.create_task(sender())
    try:
        while True:
            data = await reader.read(64 * 1024)
            if not data:
                break
            if counter is not None:
                counter.add(len(data))
            due = link.schedule(len(data))
            if own is not None:
                due = max(due, own.schedule(len(data)) + link.delay)
            await queue.put((due, data))
    except (ConnectionError, OSError):
        pass
    await queue.put(None)
    try:
        await task
    except (ConnectionError, OSError):
        pass


async def main():
    listen, target, mbit, rtt = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    per_conn = float(sys.argv[5]) * 1e6 / 8 if len(sys.argv) > 5 else None
    rate = mbit * 1e6 / 8
    up, down = Link(rate, rtt / 2000), Link(rate, rtt / 2000)

    counter = Counter(os.environ["SHAPE_COUNT"]) if os.environ.get("SHAPE_COUNT") else None
    if counter is not None:
        counter.flush()

    def handler(to, count):
        async def handle(client_r, client_w):
            try:
                server_r, server_w = await asyncio.open_connection("127.0.0.1", to)
            except OSError:
                client_w.close()
                return
            own = Link(per_conn, 0.0) if per_conn else None
            await asyncio.gather(
                pump(client_r, server_w, up), pump(server_r, client_w, down, own, count)
            )
            for w in (client_w, server_w):
                w.close()
            if count is not None:
                count.flush()

        return handle

    servers = [await asyncio.start_server(handler(target, counter), "127.0.0.1", listen)]
    if os.environ.get("SHAPE_EXTRA"):
        extra_listen, extra_target = (int(x) for x in os.environ["SHAPE_EXTRA"].split(":"))
        servers.append(
            await asyncio.start_server(handler(extra_target, None), "127.0.0.1", extra_listen)
        )
    async def tick():
        while counter is not None:
            await asyncio.sleep(0.1)
            counter.flush()

    await asyncio.gather(tick(), *(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main())
