"""Binary vs JSON values, and a tensor echo through a worker vs a bare grpcio bytes echo.

    python bench/codec.py [--quick] [--client-keeps-buffers]

Everything runs in this process tree (the worker and the bare echo server are child processes),
so the ratios printed side by side are measured under the same conditions. Targets (issue 2):
binary decode copies nothing; binary >= 50x faster than JSON from 1 MB up; the worker echo
reaches >= 0.85x the bare grpcio echo's MB/s at 1, 10 and 100 MB (issue 11; the echoes
alternate call by call). Two bare echoes: plain grpcio, and grpcio with the allocator settings
snakepit's servers run with (``heap.keep_large_buffers``), the like-for-like floor.
``--client-keeps-buffers`` gives this process (every echo's client) those settings too.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, spawn, table, wait_serving

from snakepit import Client
from snakepit.grpc_options import channel_options
from snakepit.heap import keep_large_buffers
from snakepit.protocol import decode_value, encode_value

MB = 1024 * 1024


def human(size: int) -> str:
    return f"{size // MB} MB" if size >= MB else f"{size // 1024} KB"


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def best_of(fn: Callable[..., object], repeat: int, *args: object) -> float:
    return min(timed(fn, *args) for _ in range(repeat))


def round_trip(array: np.ndarray, threshold: int) -> object:
    return decode_value(encode_value(array, threshold=threshold))


def codec_rows(sizes: list[int]) -> list[list[str]]:
    rows = []
    for size in sizes:
        array = np.random.default_rng(0).random(size // 4, dtype=np.float32)
        repeat = 5 if size <= MB else 2
        binary = encode_value(array, threshold=0)
        json_form = encode_value(array, threshold=1 << 62)
        t_bin = best_of(round_trip, repeat, array, 0)
        json_repeat = 3 if size <= MB else 1
        t_json = best_of(round_trip, json_repeat, array, 1 << 62)
        decoded = decode_value(binary)
        zero_copy = np.shares_memory(decoded, np.frombuffer(binary, np.uint8))
        t_decode = best_of(decode_value, repeat, binary)
        rows.append(
            [
                human(size),
                f"{t_bin * 1000:.2f} ms",
                f"{t_json * 1000:.1f} ms",
                f"{t_json / t_bin:.0f}x",
                f"{len(json_form) / len(binary):.1f}x",
                f"{t_decode * 1e6:.0f} us",
                "yes" if zero_copy else "NO",
            ]
        )
    return rows


ECHO_SERVER = """
import asyncio, sys
import grpc
from snakepit.grpc_options import server_options
from snakepit.heap import keep_large_buffers
async def main():
    if sys.argv[2] == "kept":  # the allocator settings the worker runs with (heap.py)
        assert keep_large_buffers(512)
    server = grpc.aio.server(options=server_options(512))
    async def echo(request, context):
        return request
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    from grpc_health.v1 import health, health_pb2_grpc
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""


def memory_mb(pid: int) -> tuple[float, float]:
    """A process's resident memory now and at its peak (``VmRSS``, ``VmHWM``), in MB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    now, peak = (int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))
    return now, peak


def echo_rows(sizes: list[int], repeat: int) -> tuple[list[list[str]], str]:
    """The worker's echo against two bare grpcio echoes: glibc's default allocator settings
    (what plain grpcio gets) and the ones snakepit's servers set (``heap.keep_large_buffers``),
    so the second ratio compares like with like; and what each server holds in memory after
    the echoes, against its peak (what the kept buffers cost)."""
    bare_port, kept_port, worker_port = free_port(), free_port(), free_port()
    bares = [
        subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port), mode])
        for port, mode in ((bare_port, "default"), (kept_port, "kept"))
    ]
    worker = spawn(
        ["worker", "--host", "127.0.0.1", "--port", str(worker_port), "--max-message-mb", "512"]
    )
    rows = []
    try:
        for port in (bare_port, kept_port, worker_port):
            wait_serving(f"127.0.0.1:{port}")
        channels = [
            grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options(512))
            for port in (bare_port, kept_port)
        ]
        bare_echo, kept_echo = (c.unary_unary("/bench.Echo/Echo") for c in channels)
        with Client(f"127.0.0.1:{worker_port}", max_message_mb=512) as client:
            for size in sizes:
                array = np.random.default_rng(1).random(size // 4, dtype=np.float32)
                payload = array.tobytes()
                calls: dict[str, Callable[[], object]] = {
                    "bare": partial(bare_echo, payload, timeout=300),
                    "kept": partial(kept_echo, payload, timeout=300),
                    "worker": partial(client.execute, "echo", value=array, timeout=300),
                }
                for call in calls.values():
                    call()  # warm up every path
                # Interleaved call by call, so the machine's load moves all alike.
                times: dict[str, list[float]] = {name: [] for name in calls}
                for _ in range(repeat):
                    for name, call in calls.items():
                        times[name].append(timed(call))
                out = client.execute("echo", value=array, timeout=300)
                assert out.dtype == array.dtype and np.array_equal(out, array)
                median = {name: statistics.median(t) for name, t in times.items()}
                mbps = {name: 2 * size / MB / t for name, t in median.items()}
                rows.append(
                    [
                        human(size),
                        *(f"{median[name] * 1000:.1f} ms" for name in calls),
                        *(f"{mbps[name]:.0f}" for name in calls),
                        f"{mbps['worker'] / mbps['bare']:.2f}x",
                        f"{mbps['worker'] / mbps['kept']:.2f}x",
                    ]
                )
        for channel in channels:
            channel.close()
        time.sleep(1.0)  # let grpc free the last call's buffers
        held = ", ".join(
            f"{name} {now:.0f} MB (peak {peak:.0f})"
            for name, (now, peak) in (
                (name, memory_mb(proc.pid))
                for name, proc in (("bare", bares[0]), ("bare kept", bares[1]), ("worker", worker))
            )
        )
    finally:
        for proc in (*bares, worker):
            proc.kill()
    return rows, f"resident memory after the echoes: {held}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the 100 MB sizes")
    parser.add_argument(
        "--client-keeps-buffers",
        action="store_true",
        help="this process (the client of every echo) calls heap.keep_large_buffers, as an "
        "application sending large tensors may",
    )
    args = parser.parse_args()
    if args.client_keeps_buffers:
        assert keep_large_buffers(512)
    sizes = [10 * 1024, MB] + ([] if args.quick else [100 * MB])
    print("value codec: float32 array, encode + decode (best of several)")
    print(
        table(
            [
                "size",
                "binary",
                "json",
                "binary speed-up",
                "json size",
                "binary decode",
                "zero-copy",
            ],
            codec_rows(sizes),
        )
    )
    echo_sizes = [MB, 10 * MB] + ([] if args.quick else [100 * MB])
    print("\ntensor echo round trip (send + receive), median of 7, interleaved; target >= 0.85x")
    print("(bare kept: bare grpcio with the allocator settings snakepit's servers use, heap.py)")
    headers = ["size", "bare grpcio", "bare kept", "snakepit worker"]
    headers += ["bare MB/s", "kept MB/s", "worker MB/s", "worker/bare", "worker/bare kept"]
    rows, held = echo_rows(echo_sizes, 7)
    print(table(headers, rows))
    print(held)


if __name__ == "__main__":
    main()
