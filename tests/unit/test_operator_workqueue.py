"""The reconcile work queue: deduplication, one pass per pool at a time, retries with backoff."""

from __future__ import annotations

import asyncio
import threading

import pytest

from snakepit.operator.workqueue import WorkQueue, run_worker


async def test_adds_of_a_waiting_key_collapse_into_one() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for _ in range(5):
        queue.add("a")
    queue.add("b")
    assert len(queue) == 2
    assert await queue.get() == "a"
    assert await queue.get() == "b"


async def test_key_added_while_processing_runs_again_afterwards_never_concurrently() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    key = await queue.get()
    queue.add("a")  # an event arrives during the pass
    assert len(queue) == 0  # not handed to a second worker
    queue.done(key)
    assert len(queue) == 1
    assert await queue.get() == "a"


async def test_failures_back_off_exponentially_and_reset_on_success() -> None:
    queue: WorkQueue[str] = WorkQueue(base_delay=0.01, max_delay=0.04)
    queue.add("a")
    key = await queue.get()
    assert queue.retry(key) == 0.01
    queue.done(key)
    assert len(queue) == 0
    assert await asyncio.wait_for(queue.get(), 1) == "a"
    assert queue.retry("a") == 0.02
    queue.done("a")
    assert await asyncio.wait_for(queue.get(), 1) == "a"
    assert queue.retry("a") == 0.04
    queue.done("a")
    assert await asyncio.wait_for(queue.get(), 1) == "a"
    assert queue.retry("a") == 0.04  # capped
    queue.forget("a")
    queue.done("a")
    queue.close()


async def test_an_event_cuts_a_pending_backoff_short() -> None:
    queue: WorkQueue[str] = WorkQueue(base_delay=30)
    queue.add("a")
    await queue.get()
    queue.retry("a")
    queue.done("a")
    queue.add("a")
    assert await asyncio.wait_for(queue.get(), 1) == "a"
    queue.close()


async def test_worker_survives_a_failing_pass_and_retries_it() -> None:
    queue: WorkQueue[str] = WorkQueue(base_delay=0.01)
    calls: list[str] = []
    finished = asyncio.Event()

    async def handle(key: str) -> None:
        calls.append(key)
        if len(calls) == 1:
            raise RuntimeError("API server hiccup")
        finished.set()

    worker = asyncio.create_task(run_worker(queue, handle))
    queue.add("pool")
    await asyncio.wait_for(finished.wait(), 2)
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker
    assert calls == ["pool", "pool"]


async def test_many_workers_never_process_one_key_at_the_same_time() -> None:
    queue: WorkQueue[int] = WorkQueue()
    running: set[int] = set()
    overlaps = 0
    passes = 0

    async def handle(key: int) -> None:
        nonlocal overlaps, passes
        if key in running:
            overlaps += 1
        running.add(key)
        await asyncio.sleep(0.001)
        running.discard(key)
        passes += 1

    workers = [asyncio.create_task(run_worker(queue, handle)) for _ in range(4)]
    for i in range(200):
        queue.add(i % 3)
        await asyncio.sleep(0)
    await asyncio.sleep(0.3)  # passes take ~1 ms; the queue drains well within this
    assert len(queue) == 0
    assert queue.processing == 0
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    assert overlaps == 0
    assert 3 <= passes < 200


async def test_a_key_added_from_another_thread_is_processed_without_other_wakeups() -> None:
    """kopf calls the event handlers (and so ``add``) from its executor's threads. The loop here
    has nothing else to do: no timer, no I/O. Before ``add`` was handed to the loop, the worker
    slept on until something unrelated woke the loop (here: never)."""
    queue: WorkQueue[str] = WorkQueue()
    processed = threading.Event()

    async def handle(key: str) -> None:
        processed.set()

    worker = asyncio.create_task(run_worker(queue, handle))
    await asyncio.sleep(0)  # the worker waits for work
    # The add comes while the loop sleeps in its selector, waiting only for this thread.
    adder = threading.Timer(0.2, queue.add, args=("pool",))
    adder.start()
    assert await asyncio.to_thread(processed.wait, 10), "the key added off-loop never ran"
    adder.join()
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker
