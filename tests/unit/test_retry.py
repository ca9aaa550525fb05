"""The router's decision after a failed attempt (router/retry.py), one case per kind of failure."""

from __future__ import annotations

import grpc

from snakepit.errors import Cancelled, DeadlineExceeded, ResourceExhausted, ToolError, Unavailable
from snakepit.protocol import pb
from snakepit.protocol.status import ERROR_DETAIL_KEY, error_from_rpc, never_started
from snakepit.router.retry import MAX_FAULTS, Attempts, Next


def test_a_call_that_may_have_run_is_never_sent_again() -> None:
    attempts = Attempts(wait_budget=30)
    assert attempts.after(ToolError("boom"), "w0", None) is Next.GIVE_UP
    assert attempts.after(Unavailable("stream reset"), "w0", None) is Next.GIVE_UP
    assert attempts.after(DeadlineExceeded("late"), "w0", None) is Next.GIVE_UP


def test_a_full_worker_means_wait_and_try_any_worker_within_the_budget() -> None:
    attempts = Attempts(wait_budget=0.5)
    full = ResourceExhausted("at its limit", not_started=True)
    backoffs = []
    while (step := attempts.after(full, "w0", None)) is Next.LATER:
        backoffs.append(attempts.backoff)
        attempts.started -= attempts.backoff  # as if the backoff was slept
    assert step is Next.GIVE_UP
    assert backoffs == sorted(backoffs) and backoffs[-1] <= 0.2  # doubling, capped
    assert attempts.avoid == []  # the same worker may take it once it has room
    assert sum(backoffs) <= 0.5


def test_a_full_worker_is_not_waited_for_past_the_callers_deadline() -> None:
    attempts = Attempts(wait_budget=30)
    full = ResourceExhausted("at its limit", not_started=True)
    assert attempts.after(full, "w0", time_remaining=0.001) is Next.GIVE_UP


def test_a_draining_worker_sends_the_call_elsewhere_at_once_and_without_limit() -> None:
    attempts = Attempts(wait_budget=30)
    draining = Unavailable("worker w is draining", not_started=True)
    for i in range(MAX_FAULTS + 5):
        assert attempts.after(draining, f"w{i}", None) is Next.ELSEWHERE
    # Not avoided by id: a replacement under the same id (serve, a restart) is usable at once.
    assert attempts.avoid == []


def test_workers_that_cannot_be_reached_are_avoided_a_few_times_at_most() -> None:
    attempts = Attempts(wait_budget=30)
    refused = Unavailable("failed to connect to all addresses", code=grpc.StatusCode.UNAVAILABLE)
    steps = [attempts.after(refused, f"w{i}", None) for i in range(MAX_FAULTS)]
    assert steps == [Next.ELSEWHERE] * (MAX_FAULTS - 1) + [Next.GIVE_UP]
    assert attempts.avoid == [f"w{i}" for i in range(MAX_FAULTS - 1)]


class _CutOff(grpc.RpcError):
    """What grpc core raises for an answer that ended without a status (a real one comes from
    HAProxy 2.6 cutting a large answer whose worker died: docs/architecture.md)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNKNOWN

    def details(self) -> str:
        return "Stream removed (Data frame with END_STREAM flag received)"

    def trailing_metadata(self) -> None:
        return None


def test_an_answer_cut_off_before_its_status_is_unavailable_and_not_sent_again() -> None:
    error = error_from_rpc(_CutOff())
    assert isinstance(error, Unavailable)
    assert "cut off" in str(error) and "END_STREAM" in str(error)
    assert not never_started(error)
    assert Attempts(wait_budget=30).after(error, "w0", None) is Next.GIVE_UP


class _ResetAfterAnswer(grpc.RpcError):
    """What grpc core raises when HAProxy 2.6 answers a request it refuses before the body has
    ended and then resets the stream (router/haproxy/message_size.py; the integration test is
    test_router.py's bad-input test): CANCELLED, with the answer's detail in the metadata."""

    def __init__(self, detail: pb.ErrorDetail | None) -> None:
        self.detail = detail

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "Stream removed (RST_STREAM (Received RST_STREAM with error code 8))"

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        if self.detail is None:
            return ()
        return ((ERROR_DETAIL_KEY, self.detail.SerializeToString()),)


def test_a_reset_after_snakepits_answer_is_that_answer() -> None:
    refused = pb.ErrorDetail(type="ResourceExhausted", message="larger than the limit")
    error = error_from_rpc(_ResetAfterAnswer(refused))
    assert isinstance(error, ResourceExhausted) and str(error) == "larger than the limit"
    # A reset with no answer of snakepit's, or with a tool's own exception, stays CANCELLED.
    assert isinstance(error_from_rpc(_ResetAfterAnswer(None)), Cancelled)
    tools = pb.ErrorDetail(type="ResourceExhausted", message="mine", traceback="Traceback ...")
    assert isinstance(error_from_rpc(_ResetAfterAnswer(tools)), Cancelled)
