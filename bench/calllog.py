"""What HAProxy's call log costs the router: Python CPU per call line, read and counted.

    python bench/calllog.py [--lines N] [--rounds R] [--rate LINES_PER_SECOND]

With HAProxy on the data path and metrics on, the router reads one line per tool call
(``calllog``) from a unix stream socket HAProxy's ring forwarder writes to. Three numbers, each
the median of R rounds:

- *handler*: ``CallLog.line_received`` called directly on N lines (parse and metrics);
- *flood*: the same lines written as fast as another process can to the abstract socket the
  router listens on (``calllog.listen``), read on an event loop; the receiving thread's CPU
  time (``time.thread_time``) over the lines counted, so the reads, the event loop's turns and
  the handler are all in it, the sender's work is not;
- *paced*: the same, the lines written one by one at ``--rate`` a second, as calls end under
  load (the actual rate is printed: a Python sender's sleeps undershoot); the whole process's
  CPU (``time.process_time``).

What a line costs in a real router under ghz is in bench/datapath.py (the router with metrics
on): there the process wakes between the worker's and HAProxy's turns with cold caches, which
neither number here reproduces.

The lines are HAProxy 2.6.12 lines of tool calls (as in tests/unit/test_haproxy_calllog.py):
OK, a tool error, and one that queued. (Streaming calls go through the Python router.)
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
from snakepit.router.haproxy.calllog import CallLog, listen, parse

PATH = b"/snakepit.bridge.v1.BridgeService/"
LINES = [
    b"workers s1 -- 0 13 0 7 0 0 0 - 48 0000001B "
    + PATH
    + b"ExecuteTool - - - 1796283848982052 1796283848982952 616464\n",
    b"workers s1 -- 0 4 0 0 0 0 0 13 40 - "
    + PATH
    + b"ExecuteTool - - - 1796283848982052 1796283848986127 6661696C\n",
    b"workers s1 -- 502 1011 0 0 0 1 0 - 37 0000001B "
    + PATH
    + b"ExecuteTool - - - 1796283848000000 1796283849011350 736C656570\n",
]
# A line in an older format parses to None and costs next to nothing: the figures would say
# nothing about the router. (Until stop 33 they did not: a field had been added since.)
if any(parse(line) is None for line in LINES):
    raise SystemExit("bench/calllog.py: its LINES no longer parse; update them to CALL_LOG_FIELDS")
SENDER = """
import socket, sys, time
name, count, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
lines = [bytes.fromhex(h) for h in sys.argv[4:]]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(("\\0" + name).ljust(108, "\\0"))
if rate:
    for i in range(count):
        sock.sendall(lines[i % len(lines)])
        time.sleep(1 / rate)
else:
    sock.sendall(b"".join(lines[i % len(lines)] for i in range(count)))
sock.close()
"""


def handler_us(count: int) -> float:
    reader = CallLog(RouterMetrics(), {b"s1": "worker-a"}.get)
    lines = [LINES[i % len(LINES)] for i in range(count)]
    started = time.perf_counter()
    for line in lines:
        reader.line_received(line)
    return (time.perf_counter() - started) / count * 1e6


async def socket_us(count: int, round_: int, rate: float = 0) -> tuple[float, float]:
    """CPU per line read through the socket, and the lines a second the sender managed."""
    metrics = RouterMetrics()
    name = f"snakepit-bench-calllog-{round_}-{time.monotonic_ns()}"
    reader = await listen(name, metrics, {b"s1": "worker-a"}.get)
    seen = 0
    all_seen = asyncio.Event()
    handle = reader.line_received

    def counted(line: bytes) -> None:
        nonlocal seen
        seen += 1
        handle(line)
        if seen >= count:
            all_seen.set()

    reader.line_received = counted  # type: ignore[method-assign]
    clock = time.process_time if rate else time.thread_time
    cpu, started = clock(), time.monotonic()
    sender = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SENDER, name, str(count), str(rate), *(line.hex() for line in LINES)
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_seen.wait(), 120)
    used, took = clock() - cpu, time.monotonic() - started
    await sender.wait()
    reader.close()
    return used / max(seen, 1) * 1e6, seen / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=float, default=2000, help="paced lines a second")
    args = parser.parse_args()
    paced_lines = min(args.lines, int(args.rate * 3))
    results: dict[str, list[float]] = {"handler": [], "flood": [], "paced": []}
    rates = []
    for r in range(args.rounds):
        results["handler"].append(handler_us(args.lines))
        results["flood"].append(asyncio.run(socket_us(args.lines, r))[0])
        paced, rate = asyncio.run(socket_us(paced_lines, r, args.rate))
        results["paced"].append(paced)
        rates.append(rate)
    for name, values in results.items():
        print(f"{name + ':':8} {statistics.median(values):.1f} µs per line (rounds: "
              + ", ".join(f"{v:.1f}" for v in values) + ")"
              + (f", {statistics.median(rates):.0f} lines/s" if name == "paced" else ""))  # fmt: skip


if __name__ == "__main__":
    main()
