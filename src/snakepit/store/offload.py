"""Helper processes that decode, check and re-encode large written values off the event loop.

Why processes: decoding a 15 MB JSON string or list, checking it and encoding it again holds
the GIL for 100-300 ms, so a thread would stall the router's event loop just the same, and
every other caller of that router with it. A value above ``threshold`` therefore reaches the
store as ``rules.Encoded`` and is checked here, by ``rules.check_encoded`` (the same steps and
messages as a value checked inline), in one of at most ``processes`` helper processes started
on first use.

Nothing is pickled, either way. A request is two big-endian u32 lengths, a JSON header (the
declaration text, the type, the variable's name, how errors name the value, the store limits)
and the value's bytes; an answer is a status byte, two u32 lengths and two byte strings (the
declaration text and the stored bytes, or a JSON error and nothing). So the router reads back
only lengths it bounds, a text it parses with the same parser as a declaration read from Redis,
and bytes it stores opaque: even a helper subverted by a hostile value could at worst make the
router store wrong bytes for that caller's own variable, never run code in the router.

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
import os
import signal
import struct
import sys
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
_OK, _ERROR, _READY = b"o", b"e", b"r"
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
    """One helper process and its pipes; used by one check at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def exchange(self, header: bytes, data: bytes, most: int) -> tuple[bytes, bytes, bytes]:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(_LENGTHS.pack(len(header), len(data)))
        stdin.write(header)
        # In pieces, so the loop copies 1 MiB at a time into the pipe's buffer, not 15 MB.
        view = memoryview(data)
        for start in range(0, len(view), _PIECE):
            stdin.write(view[start : start + _PIECE])
            await stdin.drain()
        await stdin.drain()
        head = await stdout.readexactly(1 + _LENGTHS.size)
        first, second = _LENGTHS.unpack(head[1:])
        if first > _SLACK or second > most:
            raise ConnectionError(f"a helper announced {first} + {second} bytes")
        return head[:1], await stdout.readexactly(first), await stdout.readexactly(second)

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()

    async def stop(self, grace: float) -> None:
        """End of input, then the helper exits by itself; killed if it does not in time."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            await self.kill()


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
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "snakepit.store.offload",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                limit=_STREAM_LIMIT,
            )
        except OSError as exc:
            raise Unavailable(f"{what}: cannot start a process to check the value: {exc}") from exc
        helper = _Helper(proc)
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


# The helper process ----------------------------------------------------------------------------


def _read(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def _answer(header: dict[str, Any], data: bytes, limits: StoreLimits) -> tuple[bytes, bytes, bytes]:
    from . import rules  # imported before the helper says it is ready (``main``)

    try:
        text, stored = rules.check_encoded(
            header["decl"], header["type"], header["name"], header["what"], data, limits
        )
    except SnakepitError as exc:
        error = {"code": exc.code.name, "message": exc.message}
        return _ERROR, json.dumps(error).encode(), b""
    except Exception:  # a bug: the router logs only an error id, the traceback goes here
        log.exception("checking a value failed")
        error = {"code": "INTERNAL", "message": f"{header['what']}: internal error checking it"}
        return _ERROR, json.dumps(error).encode(), b""
    return _OK, text.encode(), stored


def main() -> None:
    """Answer requests from the router on stdin until it closes them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the router decides when its helpers end
    os.nice(HELPER_NICENESS)
    logging.basicConfig(level=logging.WARNING)
    from . import rules  # noqa: F401 - what checks values, imported once before any value

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(_READY)
    stdout.flush()
    limits: StoreLimits | None = None
    limits_seen: Any = None
    while (lengths := _read(stdin, _LENGTHS.size)) is not None:
        header_len, data_len = _LENGTHS.unpack(lengths)
        raw_header = _read(stdin, header_len)
        data = _read(stdin, data_len)
        if raw_header is None or data is None:
            return
        header = json.loads(raw_header)
        if header["limits"] != limits_seen or limits is None:
            limits_seen, limits = header["limits"], StoreLimits(**header["limits"])
        status, first, second = _answer(header, data, limits)
        stdout.write(status + _LENGTHS.pack(len(first), len(second)))
        stdout.write(first)
        stdout.write(second)
        stdout.flush()


if __name__ == "__main__":
    main()
