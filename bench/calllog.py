"""What HAProxy's call log costs the router: Python CPU per call line, read and counted.

    python bench/calllog.py [--lines N] [--rounds R]

With HAProxy on the data path the router reads one datagram per tool call (``calllog``) on its
event loop. Two numbers, each the median of R rounds:

- *handler*: ``CallLog.datagram_received`` called directly on N lines (parse and metrics);
- *socket*: the same lines sent by another process to the abstract datagram socket the router
  listens on (``calllog.listen``), received through asyncio's datagram endpoint; the receiving
  thread's CPU time (``time.thread_time``) over the lines counted, so the recvfrom, the
  event loop's dispatch and the handler are all in it, the sender's work is not.

The lines are real HAProxy 2.6.12 lines (as in tests/unit/test_haproxy_calllog.py): OK, tool
error, queued and stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from snakepit.metrics import RouterMetrics
from snakepit.router.haproxy.calllog import CallLog, listen

PATH = b"/snakepit.bridge.v1.BridgeService/"
LINES = [
    b"workers s1 -- 0 13 0 7 0 0 0 - 48 " + PATH + b"ExecuteTool 616464\n",
    b"workers s1 -- 0 4 0 0 0 0 0 13 40 " + PATH + b"ExecuteTool 6661696C\n",
    b"workers s1 -- 502 1011 0 0 0 1 0 - 37 " + PATH + b"ExecuteTool 736C656570\n",
    b"workers s1 -- 0 2 0 0 0 0 0 - 37 " + PATH + b"ExecuteStreamingTool 636F756E74\n",
]
SENDER = """
import socket, sys, time
name, count = sys.argv[1], int(sys.argv[2])
lines = [bytes.fromhex(h) for h in sys.argv[3:]]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
address = ("\\0" + name).ljust(108, "\\0")
for i in range(count):
    while True:
        try:
            sock.sendto(lines[i % len(lines)], address)
            break
        except BlockingIOError:
            time.sleep(0.0005)
        except OSError:  # receive buffer full (ENOBUFS/EAGAIN on unix datagram sockets)
            time.sleep(0.0005)
"""


def handler_us(count: int) -> float:
    reader = CallLog(RouterMetrics(), {b"s1": "worker-a"}.get)
    lines = [LINES[i % len(LINES)] for i in range(count)]
    started = time.perf_counter()
    for line in lines:
        reader.datagram_received(line, None)
    return (time.perf_counter() - started) / count * 1e6


async def socket_us(count: int, round_: int) -> float:
    metrics = RouterMetrics()
    name = f"snakepit-bench-calllog-{round_}-{time.monotonic_ns()}"
    reader = await listen(name, metrics, {b"s1": "worker-a"}.get)
    seen = 0
    all_seen = asyncio.Event()
    handle = reader.datagram_received

    def counted(data: bytes, addr: object) -> None:
        nonlocal seen
        seen += 1
        handle(data, addr)
        if seen >= count:
            all_seen.set()

    reader.datagram_received = counted  # type: ignore[method-assign]
    sender = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SENDER, name, str(count), *(line.hex() for line in LINES)
    )
    cpu = time.thread_time()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_seen.wait(), 120)
    used = time.thread_time() - cpu
    await sender.wait()
    reader.close()
    return used / max(seen, 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    handler = [handler_us(args.lines) for _ in range(args.rounds)]
    through = [asyncio.run(socket_us(args.lines, r)) for r in range(args.rounds)]
    print(f"handler: {statistics.median(handler):.1f} µs per line (rounds: "
          + ", ".join(f"{v:.1f}" for v in handler) + ")")  # fmt: skip
    print(f"socket:  {statistics.median(through):.1f} µs per line (rounds: "
          + ", ".join(f"{v:.1f}" for v in through) + ")")  # fmt: skip


if __name__ == "__main__":
    main()
