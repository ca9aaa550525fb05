"""Helper processes that decode, check and re-encode large written values off the event loop.

Why processes: decoding a 15 MB JSON string or list, checking it and encoding it again holds
the GIL for 100-300 ms, so a thread would stall the router's event loop just the same, and
every other caller of that router with it. A value above ``threshold`` therefore reaches the
store as ``rules.Encoded`` and is checked here, by ``rules.check_encoded`` (the same steps and
messages as a value checked inline), in one of at most ``processes`` helper processes started
on first use.

Nothing is pickled, either way. A request is two big-endian u32 lengths and a JSON header (the
declaration text, the type, the variable's name, how errors name the value, the store limits)
on the helper's stdin, the value's bytes in a memory region the two share; an answer is a
status byte, two u32 lengths and the declaration text (or a JSON error) on its stdout, and the
stored bytes: "the bytes you sent" (the common case: a value's stored form is its wire form)
or their length in the shared region. So the router reads back only lengths it bounds, a text
it parses with the same parser as a declaration read from Redis, and bytes it stores opaque:
even a helper subverted by a hostile value could at worst make the router store wrong bytes
for that caller's own variable, never run code in the router.

Why a shared region and not the pipe: the pipe moved a value 64 KiB per system call and loop
turn, each way, which cost the router's loop 25-30 ms of CPU per 15 MB value (measured with
``time.thread_time`` around one check). The region is an anonymous ``memfd`` (no file, no
``/dev/shm``) that each helper inherits at start; the router copies a value in, 1 MiB per loop
turn. Its pages stay once touched (a helper's region holds as much memory as the largest value
it has checked, at most ``max_value_bytes`` + 1 MiB): giving them back after each check made
the next copy fault every page in again, 14 ms of the loop per 15 MB instead of 2.

Helpers run ``HELPER_NICENESS`` steps nicer than the router, so on a busy machine (or a pod's
CPU share) checking a large value waits for the CPU before the router's other callers do.

Bounds: ``processes`` values are checked at once; ``waiting`` more may wait for a helper (then
RESOURCE_EXHAUSTED); one value's check ends after ``timeout`` seconds (DEADLINE_EXCEEDED; its
helper is killed). A helper that dies mid-check fails that write with UNAVAILABLE (nothing was
written) and the next value starts a fresh one. ``close`` ends them with the router.

``python -m snakepit.store.offload`` is the helper itself (``main``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import mmap
import os
import signal
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import grpc

from ..errors import (
    DeadlineExceeded,
    ResourceExhausted,
    SnakepitError,
    Unavailable,
    error_class_for,
)
from .limits import StoreLimits

log = logging.getLogger("snakepit.store.offload")

_LENGTHS = struct.Struct(">II")
# Room above a stored value's limit for its framing, and the most a declaration text takes.
_SLACK = 1 << 20
_STREAM_LIMIT = 1 << 20
_PIECE = 1 << 20
# Helpers yield the CPU to the router: a value's check may take longer on a busy machine, the
# router's answers to everyone else do not.
HELPER_NICENESS = 5
# Answers: stored bytes in the region, stored bytes are the bytes sent, an error; start-up.
_OK, _SAME, _ERROR, _READY = b"o", b"s", b"e", b"r"
# How long a new helper may take to import what it checks with (not part of a value's time).
_START_TIMEOUT = 60.0
DEFAULT_HELPERS = 2
# The helper imports the same snakepit as this process, wherever that came from.
_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True, slots=True)
class HelperConfig:
    """How much large-value checking a router does at once (``--value-helpers`` sets
    ``processes``; 0 checks every value on the event loop, as before)."""

    processes: int = DEFAULT_HELPERS
    waiting: int = 16
    timeout: float = 30.0
    # Values whose wire form is larger than this are checked in a helper; smaller ones are
    # cheaper to check on the loop than to send to another process.
    threshold: int = 256 * 1024


class _Helper:
    """One helper process, its pipes and the memory region they share; used by one check at a
    time."""

    def __init__(self, proc: asyncio.subprocess.Process, region: mmap.mmap) -> None:
        self.proc = proc
        self.region = region

    async def exchange(self, header: bytes, data: bytes, most: int) -> tuple[bytes, bytes, bytes]:
        """Send a request, ``data`` through the region: (status, first, stored bytes)."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        region = self.region
        if len(data) > len(region):
            raise ConnectionError(f"a value of {len(data)} bytes does not fit the shared region")
        # 1 MiB per loop turn: the loop never copies 15 MB in one go.
        view = memoryview(data)
        for start in range(0, len(view), _PIECE):
            piece = view[start : start + _PIECE]
            region[start : start + len(piece)] = piece
            await asyncio.sleep(0)
        stdin.write(_LENGTHS.pack(len(header), len(data)))
        stdin.write(header)
        await stdin.drain()
        head = await stdout.readexactly(1 + _LENGTHS.size)
        status = head[:1]
        first, second = _LENGTHS.unpack(head[1:])
        if first > _SLACK or second > min(most, len(region)):
            raise ConnectionError(f"a helper announced {first} + {second} bytes")
        text = await stdout.readexactly(first)
        if status == _SAME:
            return _OK, text, data
        return status, text, region[:second] if status == _OK else b""

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        self.region.close()

    async def stop(self, grace: float) -> None:
        """End of input, then the helper exits by itself; killed if it does not in time."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            await self.kill()
        self.region.close()


class ValueHelpers:
    """A small pool of helper processes checking large values (``rules.Checker``)."""

    def __init__(self, limits: StoreLimits, config: HelperConfig | None = None) -> None:
        self.config = config or HelperConfig()
        self.threshold = self.config.threshold
        self.limits = limits
        self._limits = dataclasses.asdict(limits)
        self._most = limits.max_value_bytes + _SLACK
        self._slots = asyncio.Semaphore(self.config.processes)
        self._idle: list[_Helper] = []
        self._busy: set[_Helper] = set()
        self._waiting = 0
        self._closed = False
        self.started = 0  # helper processes started so far (a dead one is replaced)

    async def check(
        self, decl_text: str, type_name: str, name: str, what: str, data: bytes
    ) -> tuple[str, bytes]:
        """``rules.check_encoded`` of these arguments, in a helper process."""
        if self._closed:
            raise Unavailable(f"{what}: this router is stopping")
        if self._slots.locked() and self._waiting >= self.config.waiting:
            raise ResourceExhausted(
                f"{what}: all {self.config.processes} value helpers of this router are busy "
                f"and {self._waiting} large values are waiting to be checked; "
                "send it again later"
            )
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            helper = self._idle.pop() if self._idle else await self._start(what)
            if helper.proc.returncode is not None:  # died while idle: nothing was lost
                helper = await self._start(what)
            header = json.dumps(
                {
                    "decl": decl_text,
                    "type": type_name,
                    "name": name,
                    "what": what,
                    "limits": self._limits,
                }
            ).encode()
            self._busy.add(helper)
            try:
                async with asyncio.timeout(self.config.timeout):
                    status, first, second = await helper.exchange(header, data, self._most)
            except BaseException as exc:
                await helper.kill()
                raise self._failure(exc, helper, what) from None
            finally:
                self._busy.discard(helper)
            if self._closed:
                await helper.stop(1.0)
            else:
                self._idle.append(helper)
        finally:
            self._slots.release()
        if status == _OK:
            return first.decode(), second
        error = json.loads(first)
        raise error_class_for(grpc.StatusCode[error["code"]])(error["message"])

    def _failure(self, exc: BaseException, helper: _Helper, what: str) -> BaseException:
        if isinstance(exc, TimeoutError):
            return DeadlineExceeded(
                f"{what}: checking the value took longer than {self.config.timeout:g} s; "
                "it was not written"
            )
        if isinstance(exc, ConnectionError | asyncio.IncompleteReadError):
            code = helper.proc.returncode
            log.warning("a value helper process ended mid-check (exit code %s)", code)
            return Unavailable(
                f"{what}: the process checking the value ended (exit code {code}); "
                "it was not written, send it again"
            )
        return exc  # cancelled with its call: the helper is gone, the call too

    async def _start(self, what: str) -> _Helper:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (_ROOT, env.get("PYTHONPATH"))))
        try:
            fd, region = _region(self._most)
        except OSError as exc:
            raise Unavailable(f"{what}: cannot share memory with a helper process: {exc}") from exc
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "snakepit.store.offload",
                str(fd),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                limit=_STREAM_LIMIT,
                pass_fds=(fd,),
            )
        except OSError as exc:
            region.close()
            raise Unavailable(f"{what}: cannot start a process to check the value: {exc}") from exc
        finally:
            os.close(fd)  # the helper has its own copy; the mapping keeps the memory
        helper = _Helper(proc, region)
        try:
            assert proc.stdout is not None
            ready = await asyncio.wait_for(proc.stdout.readexactly(1), _START_TIMEOUT)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            await helper.kill()
            raise Unavailable(f"{what}: the process to check the value did not start") from None
        except BaseException:  # cancelled with its call
            await helper.kill()
            raise
        if ready != _READY:
            await helper.kill()
            raise Unavailable(f"{what}: the process to check the value did not start")
        self.started += 1
        return helper

    def pids(self) -> list[int]:
        """The process ids of the helpers running now (idle or busy), as far as this event
        loop has seen: a helper that died is dropped when the loop learns of its exit."""
        helpers = (*self._idle, *self._busy)
        return [helper.proc.pid for helper in helpers if helper.proc.returncode is None]

    async def close(self, grace: float = 2.0) -> None:
        """Stop every idle helper; a busy one stops when its check ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(helper.stop(grace) for helper in idle))


def _region(size: int) -> tuple[int, mmap.mmap]:
    """``size`` bytes of anonymous shared memory (a memfd: no file, no /dev/shm; an unlinked
    temporary file where there is no memfd): its descriptor, for a helper to inherit and map
    too (the caller closes it), and its mapping here."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("snakepit-value-helper", os.MFD_CLOEXEC)
    else:  # pragma: no cover - not Linux
        with tempfile.TemporaryFile() as file:
            fd = os.dup(file.fileno())
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


# The helper process ----------------------------------------------------------------------------


def _read(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def _answer(
    header: dict[str, Any], data: memoryview, limits: StoreLimits, region: mmap.mmap
) -> tuple[bytes, bytes, int]:
    """Check one value: (status, declaration text or JSON error, stored length in the region)."""
    from . import rules  # imported before the helper says it is ready (``main``)

    try:
        text, stored = rules.check_encoded(
            header["decl"], header["type"], header["name"], header["what"], data, limits
        )
        if stored == data:
            return _SAME, text.encode(), 0
        if len(stored) > len(region):
            raise ValueError(f"stored form of {len(stored)} bytes does not fit the region")
        region[: len(stored)] = stored
    except SnakepitError as exc:
        error = {"code": exc.code.name, "message": exc.message}
        return _ERROR, json.dumps(error).encode(), 0
    except Exception:  # a bug: the router logs only an error id, the traceback goes here
        log.exception("checking a value failed")
        error = {"code": "INTERNAL", "message": f"{header['what']}: internal error checking it"}
        return _ERROR, json.dumps(error).encode(), 0
    return _OK, text.encode(), len(stored)


def main() -> None:
    """Answer requests from the router on stdin until it closes them; values arrive in the
    shared region whose descriptor is the first argument."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the router decides when its helpers end
    os.nice(HELPER_NICENESS)
    logging.basicConfig(level=logging.WARNING)
    from . import rules  # noqa: F401 - what checks values, imported once before any value

    region = mmap.mmap(int(sys.argv[1]), 0)
    shared = memoryview(region)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(_READY)
    stdout.flush()
    limits: StoreLimits | None = None
    limits_seen: Any = None
    while (lengths := _read(stdin, _LENGTHS.size)) is not None:
        header_len, data_len = _LENGTHS.unpack(lengths)
        raw_header = _read(stdin, header_len)
        if raw_header is None or data_len > len(region):
            return
        header = json.loads(raw_header)
        if header["limits"] != limits_seen or limits is None:
            limits_seen, limits = header["limits"], StoreLimits(**header["limits"])
        status, first, stored_len = _answer(header, shared[:data_len], limits, region)
        stdout.write(status + _LENGTHS.pack(len(first), stored_len))
        stdout.write(first)
        stdout.flush()


if __name__ == "__main__":
    main()
