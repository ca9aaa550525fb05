"""HAProxy's call log read into the router's metrics, and its load into the gauges.

The lines are ones HAProxy 2.6.12 sent for real calls (``config.CALL_LOG_FIELDS``; "- -": an
untraced call's trace fields), except where a test says it built one; the answer's length (the
13th field, added later) is what a call of that tool answers ("-": none). The integration tests
(tests/integration/test_haproxy.py, test_metrics.py) run the whole path.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from snakepit.metrics import RouterMetrics
from snakepit.metrics.router import Load
from snakepit.router.haproxy.calllog import MAX_PENDING, CallLog, _Lines, parse
from snakepit.router.haproxy.config import CALL_LOG_FIELDS
from snakepit.router.haproxy.load import dropped_logs, load_of
from snakepit.router.haproxy.runtime import BackendStats, ServerStats

PATH = b"/snakepit.bridge.v1.BridgeService/"
OK_ADD = b"workers s1 -- 0 13 0 7 0 0 0 - 48 0000001B " + PATH + b"ExecuteTool - - - - - 616464\n"
FAILED = b"workers s1 -- 0 4 0 0 0 0 0 13 40 - " + PATH + b"ExecuteTool - - - - - 6661696C\n"
UNKNOWN_TOOL = (
    b"workers s1 -- 0 2 0 0 0 0 0 5 40 - " + PATH + b"ExecuteTool - - - - - 6E6F73756368746F6F6C\n"
)
# the worker died while sending the answer (server abort in the data phase)
CUT = b"workers s1 SD 0 2 0 0 0 0 0 - 37 0640001C " + PATH + b"ExecuteTool - - - - - 626C6F62\n"
STREAMED = (
    b"control router -- 0 2 0 0 0 0 0 - 37 - "
    + PATH
    + b"ExecuteStreamingTool - - - - - 636F756E74\n"
)
QUEUED = (
    b"workers s1 -- 502 1011 0 0 0 1 0 - 37 0000001B "
    + PATH
    + b"ExecuteTool - - - - - 736C656570\n"
)
QUEUE_TIMEOUT = (
    b"workers s1 sQ 1001 1001 0 -1 0 1 0 4 37 - " + PATH + b"ExecuteTool - - - - - 736C656570\n"
)
QUEUE_FULL = (
    b"snakepit <NOSRV> LR -1 0 0 -1 0 0 0 8 37 - " + PATH + b"ExecuteTool - - - - - 736C656570\n"
)
# waited out its principal's line (--max-calls-per-principal) and was answered by HAProxy
SHARE_TIMEOUT = (
    b"snakepit <NOSRV> LR -1 4001 4001 -1 0 0 0 4 37 - "
    + PATH
    + b"ExecuteTool - - - - - 736C656570\n"
)
# a message over --max-message-mb, answered by the Lua applet once its body was read
OVERSIZE = (
    b"snakepit <lua.snakepit_answer_after_body> LR 0 91 91 0 0 0 0 8 8388647 - "
    + PATH
    + b"ExecuteTool - - - - - 6563686F\n"
)
# built: no worker was up when HAProxy picked one (it went down after the frontend's test)
UNPLACED = b"workers <NOSRV> SC -1 0 0 -1 0 0 0 14 37 - " + PATH + b"ExecuteTool - - - - - 616464\n"
# no worker was ready: HAProxy handed the call to the Python router, which counts it
NO_WORKER = b"control router -- 0 3 0 0 0 0 0 - 37 - " + PATH + b"ExecuteTool - - - - - 616464\n"


def test_the_format_has_the_fields_the_parser_reads() -> None:
    assert len(CALL_LOG_FIELDS) == len(OK_ADD.split(b" ")) == 20
    assert CALL_LOG_FIELDS[-1] == "%[var(txn.tool)]"  # last: a truncated line cuts only the name


@pytest.mark.parametrize(
    ("line", "method", "tool", "code", "rejection"),
    [
        (OK_ADD, "ExecuteTool", b"616464", "OK", ""),
        (FAILED, "ExecuteTool", b"6661696C", "INTERNAL", ""),
        (UNKNOWN_TOOL, "ExecuteTool", b"6E6F73756368746F6F6C", "NOT_FOUND", ""),
        # the answer was cut: HAProxy 2.6 ends it without a status (docs/architecture.md)
        (CUT, "ExecuteTool", b"626C6F62", "unknown", ""),
        (QUEUE_TIMEOUT, "ExecuteTool", b"736C656570", "DEADLINE_EXCEEDED", "queue_timeout"),
        (QUEUE_FULL, "ExecuteTool", b"736C656570", "RESOURCE_EXHAUSTED", "queue_full"),
        (SHARE_TIMEOUT, "ExecuteTool", b"736C656570", "DEADLINE_EXCEEDED", "queue_timeout"),
        (UNPLACED, "ExecuteTool", b"616464", "UNAVAILABLE", "no_worker"),
    ],
)
def test_a_line_says_the_tool_the_code_and_whether_the_call_was_refused(
    line: bytes, method: str, tool: bytes, code: str, rejection: str
) -> None:
    call = parse(line)
    assert call is not None
    assert (call.method, call.tool_hex, call.code, call.rejection) == (
        method,
        tool,
        code,
        rejection,
    )
    assert (call.slot == b"s1") is (not rejection)  # an attempt on a worker, or a refusal


def test_a_message_refused_for_its_size_is_counted_but_no_attempt_nor_queue_rejection() -> None:
    """The Python router's gRPC server refuses it before any handler (no rejection counted
    there either); before the applet, HAProxy's refusal was counted as ``queue_full``."""
    call = parse(OVERSIZE)
    assert call is not None
    assert (call.code, call.rejection, call.slot, call.sent) == ("RESOURCE_EXHAUSTED", "", b"", 0)


def test_times_and_bytes_come_from_haproxys_fields() -> None:
    call = parse(QUEUED)
    assert call is not None
    assert call.seconds == 1.011
    assert call.waited == 0.502  # queued (1 ahead in the server's queue counts it) and then sent
    assert call.attempt == pytest.approx(0.509)  # the rest was on the worker
    assert call.received == 32  # the body less gRPC's 5-byte prefix
    unqueued = parse(OK_ADD)
    assert unqueued is not None and unqueued.waited is None and unqueued.seconds == 0.013
    timed_out = parse(QUEUE_TIMEOUT)
    assert timed_out is not None and timed_out.waited is None  # rejected, not a queue wait


def test_a_calls_duration_is_microseconds_from_the_dates_haproxy_logs() -> None:
    """HAProxy's timers are milliseconds (a quick call's ``%Ta`` is 0); its start and end dates
    in microseconds give the duration and place the call's spans. Without them (or with an end
    before the start) the milliseconds are used and the end is unknown."""
    dated = QUEUED.replace(b"- - - - - ", b"- - - 1796283848000000 1796283849011350 ")
    call = parse(dated)
    assert call is not None
    assert call.seconds == pytest.approx(1.01135)
    assert call.ended_us == 1796283849011350
    assert call.attempt == pytest.approx(1.01135 - 0.502)  # less the queue (and request) time
    quick = parse(OK_ADD.replace(b"- - - - - ", b"- - - 1796283848000000 1796283848000420 "))
    assert quick is not None and quick.seconds == pytest.approx(0.00042)
    backwards = parse(QUEUED.replace(b"- - - - - ", b"- - - 1796283849000000 1796283848000000 "))
    assert backwards is not None and (backwards.seconds, backwards.ended_us) == (1.011, 0)


def test_a_caller_that_went_away_is_cancelled_and_a_retry_is_counted() -> None:
    # built: the caller reset the stream while the worker ran (CD), after one failed connect
    call = parse(
        b"workers s2 CD 0 40 0 0 +1 0 0 - 37 - " + PATH + b"ExecuteTool - - - - - 736C656570"
    )
    assert call is not None and (call.code, call.retries, call.rejection) == ("CANCELLED", 1, "")
    # built: the worker could not be reached (HAProxy's 503, answered UNAVAILABLE): no rejection
    call = parse(
        b"workers s2 SC 0 3 0 -1 2 0 0 14 37 - " + PATH + b"ExecuteTool - - - - - 736C656570"
    )
    assert call is not None and (call.code, call.rejection, call.slot) == ("UNAVAILABLE", "", b"")


def test_lines_the_python_router_counts_itself_or_that_are_no_tool_call_are_skipped() -> None:
    large = OK_ADD.replace(b"workers s1", b"control router")  # a large body, through Python
    other = OK_ADD.replace(b"ExecuteTool", b"GetSession")
    assert parse(large) is None and parse(other) is None and parse(NO_WORKER) is None
    assert parse(b"garbage") is None and parse(b"") is None
    unnamed = parse(OK_ADD.replace(b" 616464", b" -"))  # no field 1 in the body
    assert unnamed is not None and unnamed.tool_hex == b""
    too_long = parse(OK_ADD.replace(b"616464", b"61" * 513))
    assert too_long is not None and too_long.tool_hex == b""


def _value(metrics: RouterMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_the_reader_counts_each_line_into_the_router_metrics() -> None:
    metrics = RouterMetrics()
    reader = CallLog(metrics, {b"s1": "worker-a"}.get)
    for line in (OK_ADD, OK_ADD, FAILED, CUT, STREAMED, QUEUED, QUEUE_TIMEOUT, QUEUE_FULL):
        reader.line_received(line)
    reader.line_received(
        b"control router -- 0 1 0 0 0 0 0 - 48 - " + PATH + b"ExecuteTool - - - - - 61"
    )
    calls = "snakepit_router_calls_total"
    assert _value(metrics, calls, tool="add", code="OK") == 2
    assert _value(metrics, calls, tool="fail", code="INTERNAL") == 1
    assert _value(metrics, calls, tool="blob", code="unknown") == 1
    assert _value(metrics, calls, tool="count", code="OK") == 0  # the Python router counts it
    assert _value(metrics, calls, tool="sleep", code="OK") == 1
    assert _value(metrics, calls, tool="sleep", code="DEADLINE_EXCEEDED") == 1
    assert _value(metrics, calls, tool="sleep", code="RESOURCE_EXHAUSTED") == 1
    assert _value(metrics, "snakepit_router_call_duration_seconds_count", tool="sleep") == 3
    assert (
        _value(metrics, "snakepit_router_call_duration_seconds_bucket", tool="sleep", le="1.0") == 1
    )
    assert _value(metrics, "snakepit_router_queue_wait_seconds_count") == 1
    assert _value(metrics, "snakepit_router_queue_rejections_total", reason="queue_timeout") == 1
    assert _value(metrics, "snakepit_router_queue_rejections_total", reason="queue_full") == 1
    assert (
        _value(metrics, "snakepit_router_worker_call_duration_seconds_count", worker="worker-a")
        == 5
    )
    assert _value(metrics, "snakepit_router_received_bytes_total", method="ExecuteTool") == (
        43 + 43 + 35 + 32 + 32 + 32 + 32
    )
    # the answers' message lengths HAProxy read from their gRPC prefixes (hex); none for the
    # errors or the answer cut off (CUT), and the Python router counts its own (control)
    assert _value(metrics, "snakepit_router_sent_bytes_total", method="ExecuteTool") == 3 * 0x1B


def test_a_tool_name_in_hex_is_labelled_as_the_python_router_labels_it() -> None:
    metrics = RouterMetrics()
    reader = CallLog(metrics, lambda server: None)
    name = "é ü\n/x"
    reader.line_received(OK_ADD.replace(b"616464", name.encode().hex().upper().encode()))
    reader.line_received(OK_ADD.replace(b"616464", b"ABC"))  # odd: truncated
    assert _value(metrics, "snakepit_router_calls_total", tool=name, code="OK") == 1
    assert _value(metrics, "snakepit_router_calls_total", tool="unknown", code="OK") == 1


def test_lines_are_read_whole_however_the_stream_cuts_them() -> None:
    """HAProxy's ring forwarder writes newline-terminated lines; a read may hold many lines,
    or end inside one, whose rest comes with the next read. A run of bytes with no newline
    longer than any line HAProxy writes is dropped instead of kept without end."""
    metrics = RouterMetrics()
    reader = CallLog(metrics, {b"s1": "worker-a"}.get)
    stream = _Lines(reader)
    whole = OK_ADD * 3 + FAILED
    stream.data_received(whole[:10])
    stream.data_received(whole[10:100])
    stream.data_received(whole[100:] + OK_ADD[:-20])
    assert _value(metrics, "snakepit_router_calls_total", tool="add", code="OK") == 3
    assert _value(metrics, "snakepit_router_calls_total", tool="fail", code="INTERNAL") == 1
    stream.data_received(OK_ADD[-20:])
    assert _value(metrics, "snakepit_router_calls_total", tool="add", code="OK") == 4
    stream.data_received(b"x" * (MAX_PENDING + 1))
    assert stream.pending == b""
    stream.data_received(b"tail of the junk\n" + OK_ADD)
    assert _value(metrics, "snakepit_router_calls_total", tool="add", code="OK") == 5


def test_handling_a_line_costs_microseconds() -> None:
    """The per-call Python cost of the HAProxy data path's metrics (the number is in
    docs/observability.md: run with -s to see it)."""
    metrics = RouterMetrics()
    reader = CallLog(metrics, {b"s1": "worker-a"}.get)
    lines = [OK_ADD, FAILED, QUEUED, STREAMED] * 2500
    started = time.perf_counter()
    for line in lines:
        reader.line_received(line)
    each = (time.perf_counter() - started) / len(lines) * 1e6
    print(f"\ncall log: {each:.1f} µs per line handled")
    assert each < 200  # generous: a shared, loaded 2-core machine


def test_haproxys_load_is_mapped_onto_workers() -> None:
    def server(name: str, running: int, queued: int) -> ServerStats:
        return ServerStats(name, running, queued, 0, 0, "UP")

    stats = BackendStats({"s1": server("s1", 2, 1), "s7": server("s7", 1, 0)}, queued=4)
    workers: dict[bytes, str] = {b"s1": "worker-a"}
    load = load_of(stats, workers.get)
    assert (load.in_flight, load.queued, load.workers) == (3, 4, {"worker-a": 2})


def _bound(in_flight: int) -> RouterMetrics:
    """Router metrics bound to a stand-in pool with ``in_flight`` calls and no workers."""
    config = SimpleNamespace(queue_size=10, worker_concurrency=1)
    pool = SimpleNamespace(in_flight=in_flight, queued=0, workers={}, config=config)
    metrics = RouterMetrics()
    metrics.bind(pool)  # type: ignore[arg-type]
    return metrics


def test_the_gauges_add_the_extra_load_to_the_pools() -> None:
    metrics = _bound(in_flight=1)
    metrics.add_load(lambda: Load(in_flight=2, queued=3))
    assert _value(metrics, "snakepit_router_in_flight") == 3
    assert _value(metrics, "snakepit_router_queued") == 3
    metrics.add_load(lambda: None)  # HAProxy did not answer: the pool's own
    assert _value(metrics, "snakepit_router_in_flight") == 1


def test_haproxys_dropped_log_lines_are_a_counter() -> None:
    assert dropped_logs("Name: HAProxy\nDroppedLogs: 289\nBusyPolling: 0\n") == 289
    assert dropped_logs("Name: HAProxy\n") is None
    metrics = _bound(in_flight=0)
    assert metrics.registry.get_sample_value("snakepit_router_call_log_dropped_total") is None
    metrics.add_load(lambda: Load(dropped_log_lines=289))
    assert _value(metrics, "snakepit_router_call_log_dropped_total") == 289


def test_a_traced_call_carries_its_callers_traceparent_and_the_routers_span_id() -> None:
    parent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    traced = OK_ADD.replace(
        b"ExecuteTool - - - ", b"ExecuteTool " + parent + b" 6c23a607c973495d 8f1e2d3c4b5a6978 "
    )
    call = parse(traced)
    assert call is not None and call.tool_hex == b"616464"
    assert (call.parent, call.span_id) == (parent.decode(), 0x6C23A607C973495D)
    assert call.attempt_span_id == 0x8F1E2D3C4B5A6978  # the worker's parent
    untraced = parse(OK_ADD)
    assert untraced is not None and (untraced.parent, untraced.span_id) == ("", 0)
    mangled = parse(traced.replace(b" 6c23a607c973495d ", b" 6c23a607c973495z "))
    assert mangled is not None and mangled.span_id == 0  # no span rather than a wrong one
