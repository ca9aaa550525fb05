"""Binary vs JSON values, and a tensor echo through a worker vs a bare grpcio bytes echo.

    python bench/codec.py [--quick]

Everything runs in this process tree (the worker and the bare echo server are child processes),
so the ratios printed side by side are measured under the same conditions. Targets (issue 2):
binary decode copies nothing; binary >= 50x faster than JSON from 1 MB up; the worker echo
reaches >= 0.85x the bare grpcio echo's MB/s at 1, 10 and 100 MB (issue 11; the two alternate
call by call).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, spawn, table, wait_serving

from snakepit import Client
from snakepit.grpc_options import channel_options
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
async def main():
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


def echo_rows(sizes: list[int], repeat: int) -> list[list[str]]:
    bare_port, worker_port = free_port(), free_port()
    bare = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(bare_port)])
    worker = spawn(
        ["worker", "--host", "127.0.0.1", "--port", str(worker_port), "--max-message-mb", "512"]
    )
    rows = []
    try:
        wait_serving(f"127.0.0.1:{bare_port}")
        wait_serving(f"127.0.0.1:{worker_port}")
        channel = grpc.insecure_channel(f"127.0.0.1:{bare_port}", options=channel_options(512))
        bare_echo = channel.unary_unary("/bench.Echo/Echo")
        with Client(f"127.0.0.1:{worker_port}", max_message_mb=512) as client:
            for size in sizes:
                array = np.random.default_rng(1).random(size // 4, dtype=np.float32)
                payload = array.tobytes()
                bare_echo(payload, timeout=300)  # warm up both paths
                client.execute("echo", value=array, timeout=300)
                # Interleaved call by call, so the machine's load moves both alike.
                bare_times, worker_times = [], []
                for _ in range(repeat):
                    bare_times.append(timed(bare_echo, payload, timeout=300))
                    worker_times.append(timed(client.execute, "echo", value=array, timeout=300))
                t_bare, t_worker = statistics.median(bare_times), statistics.median(worker_times)
                out = client.execute("echo", value=array, timeout=300)
                assert out.dtype == array.dtype and np.array_equal(out, array)
                mbps_bare = 2 * size / MB / t_bare
                mbps_worker = 2 * size / MB / t_worker
                rows.append(
                    [
                        human(size),
                        f"{t_bare * 1000:.1f} ms",
                        f"{t_worker * 1000:.1f} ms",
                        f"{mbps_bare:.0f}",
                        f"{mbps_worker:.0f}",
                        f"{mbps_worker / mbps_bare:.2f}x",
                    ]
                )
        channel.close()
    finally:
        bare.kill()
        worker.kill()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the 100 MB sizes")
    args = parser.parse_args()
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
    print(
        table(
            ["size", "bare grpcio", "snakepit worker", "bare MB/s", "worker MB/s", "worker/bare"],
            echo_rows(echo_sizes, 7),
        )
    )


if __name__ == "__main__":
    main()
