"""Structured logs (observability.logs): the JSON line's fields, trace and span ids inside a span,
redaction, the Ray worker hook; and `rtml logs` over log files (filters, merge order, --follow)."""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import format_span_id, format_trace_id
from typer.testing import CliRunner

from observability import logs
from rtml.cli import app
from rtml.errors import RtmlError
from rtml.settings import Settings, get_settings
from security.pii import RedactingFilter, Tokenizer, redact_logs

WAIT_S = 30.0  # an upper bound for something that happens within a poll or two


@pytest.fixture(autouse=True)
def restore_logging():
    """Each test starts from, and leaves, the root logger and the module's role as it found them."""
    root = logging.getLogger()
    handlers, level = {handler: list(handler.filters) for handler in root.handlers}, root.level
    role = logs._process_role
    yield
    for handler in list(root.handlers):
        if handler in handlers:
            handler.filters[:] = handlers[handler]  # redact_logs filters every root handler
        else:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logs._process_role = role


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    for variable in ("RTML_SECRET_PII_TOKEN_KEY", "RTML_SECRET_PII_ENCRYPTION_KEY"):
        monkeypatch.delenv(variable, raising=False)
    return Settings(home=tmp_path / "home")


def configured(settings: Settings, process: str = "driver") -> io.StringIO:
    """configure_logging, with its stderr handler writing into the returned buffer."""
    out = io.StringIO()
    logs.configure_logging(settings, process).setStream(out)
    return out


def json_lines(out: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


# the lines ------------------------------------------------------------------------------------


def test_a_json_line_has_time_level_logger_process_pid_message_and_the_extras(settings):
    out = configured(settings, "consumer")
    before = datetime.now(UTC)
    logging.getLogger("streaming.consumer").info("read %d events", 12, extra={"tenant": "acme", "group": "g-1"})
    [line] = json_lines(out)
    assert set(line) == {"time", "level", "logger", "process", "pid", "message", "tenant", "group"}
    assert line["level"] == "INFO" and line["logger"] == "streaming.consumer" and line["message"] == "read 12 events"
    assert line["process"] == "consumer" and line["pid"] == os.getpid()
    assert line["tenant"] == "acme" and line["group"] == "g-1"
    moment = datetime.fromisoformat(line["time"])
    assert moment.utcoffset() == timedelta(0) and before - timedelta(seconds=1) <= moment <= datetime.now(UTC)


def test_inside_a_span_the_line_carries_its_trace_and_span_ids(settings):
    out = configured(settings)
    tracer = TracerProvider().get_tracer("test")
    log = logging.getLogger("deployments.router")
    with tracer.start_as_current_span("score") as span:
        log.warning("slow scorer")
    log.warning("after the span")
    inside, after = json_lines(out)
    context = span.get_span_context()
    assert inside["trace_id"] == format_trace_id(context.trace_id) and len(inside["trace_id"]) == 32
    assert inside["span_id"] == format_span_id(context.span_id) and len(inside["span_id"]) == 16
    assert "trace_id" not in after and "span_id" not in after


def test_an_exception_is_written_as_its_traceback(settings):
    out = configured(settings)
    try:
        raise KeyError("no model for tenant acme")
    except KeyError:
        logging.getLogger("deployments.router").exception("scoring failed")
    [line] = json_lines(out)
    assert line["level"] == "ERROR" and line["message"] == "scoring failed"
    assert line["exception"].startswith("Traceback (most recent call last)") and "KeyError: 'no model for tenant acme'" in line["exception"]


def test_redact_logs_redacts_json_lines_and_their_exceptions(settings):
    tokenizer = Tokenizer(settings)
    out = configured(settings)
    redact_logs(tokenizer)
    try:
        raise ValueError("bad address bob@example.com")
    except ValueError:
        logging.getLogger("api.ingest").exception("rejected %s", "alice@example.com", extra={"tenant": "acme"})
    text = out.getvalue()
    assert "alice@example.com" not in text and "bob@example.com" not in text
    [line] = json_lines(out)
    assert line["message"] == f"rejected {tokenizer.token('email', 'alice@example.com')}"
    assert tokenizer.token("email", "bob@example.com") in line["exception"]


def test_a_handler_installed_after_redact_logs_gets_the_same_redaction(settings):
    tokenizer = Tokenizer(settings)
    earlier = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(earlier)
    redact_logs(tokenizer)
    out = configured(settings)
    logging.getLogger("api.ingest").warning("rejected %s", "alice@example.com")
    assert sum(isinstance(f, RedactingFilter) for f in logs.configure_logging(settings, None).filters) == 1
    assert json_lines(out)[0]["message"] == f"rejected {tokenizer.token('email', 'alice@example.com')}"


def test_configure_logging_again_updates_its_handler_in_place_and_keeps_others(settings):
    other = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    root.addHandler(other)
    first = logs.configure_logging(settings, "driver")
    redact_logs(Tokenizer(settings))
    text_settings = settings.model_copy(update={"observability": settings.observability.model_copy(update={"json_logs": False, "log_level": "warning"})})
    second = logs.configure_logging(text_settings, None)
    assert second is first and sum(isinstance(h, logs.RtmlLogHandler) for h in root.handlers) == 1
    assert other in root.handlers and any(isinstance(f, RedactingFilter) for f in second.filters)
    assert root.level == logging.WARNING
    out = io.StringIO()
    second.setStream(out)
    logging.getLogger("streaming.sink").info("not at WARNING")
    logging.getLogger("streaming.sink").warning("wrote %d rows", 5, extra={"tenant": "acme"})
    [line] = out.getvalue().splitlines()
    assert " WARNING driver[" in line and "streaming.sink: wrote 5 rows tenant=acme" in line
    assert not line.startswith("{")


def test_an_unknown_log_level_is_refused_with_the_allowed_names(settings):
    wrong = settings.model_copy(update={"observability": settings.observability.model_copy(update={"log_level": "LOUD"})})
    with pytest.raises(ValueError, match="observability.log_level is 'LOUD': use one of DEBUG, INFO, WARNING, ERROR, CRITICAL"):
        logs.configure_logging(wrong, "driver")


def test_a_driver_log_file_gets_json_lines_under_home_logs(settings):
    configured(settings, "demo")
    logs.configure_logging(settings, "demo", log_file=True)
    logging.getLogger("streaming.demo").info("replayed", extra={"tenant": "acme"})
    for handler in logging.getLogger().handlers:
        handler.flush()
    [line] = (settings.home_dir / "logs" / "demo.log").read_text().splitlines()
    assert orjson.loads(line)["message"] == "replayed" and orjson.loads(line)["process"] == "demo"


def test_the_ray_runtime_env_names_an_importable_hook_and_pins_the_logging_settings(settings):
    env = logs.ray_runtime_env(settings, {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"})
    module, function = env["worker_process_setup_hook"].rsplit(".", 1)
    assert getattr(__import__(module, fromlist=[function]), function) is logs.setup_worker_logging
    assert env["env_vars"] == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", logs.JSON_LOGS_ENV: "true", logs.LOG_LEVEL_ENV: "INFO"}


# `rtml logs` ----------------------------------------------------------------------------------

T0 = datetime(2026, 12, 5, 10, 0, 0, tzinfo=UTC)


def record(seconds: float, message: str, level: str = "INFO", process: str = "consumer", **extra) -> str:
    fields = {"time": (T0 + timedelta(seconds=seconds)).isoformat(), "level": level, "logger": "rtml.test", "process": process, "pid": 7, "message": message}
    return orjson.dumps({**fields, **extra}).decode()


@pytest.fixture
def cluster_logs(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A Ray session's logs directory and a driver logs directory with interleaved lines."""
    ray_logs, home = tmp_path / "session" / "logs", tmp_path / "home"
    (ray_logs / "serve").mkdir(parents=True)
    (home / "logs").mkdir(parents=True)
    trace = "ab" * 16
    (ray_logs / "worker-1-ffff-101.err").write_text(
        "\n".join([":job_id:01000000", ":actor_name:Consumer", record(1, "polled", tenant="acme"), "Traceback? a raw print", record(4, "slow batch", "WARNING", tenant="acme", trace_id=trace)]) + "\n"
    )
    (ray_logs / "worker-1-ffff-101.out").write_text(":job_id:01000000\n")
    (ray_logs / "serve" / "replica_app_Ingress_x.log").write_text(record(2, "accepted", process="Ingress", tenant="beta", trace_id=trace) + "\n")
    (ray_logs / "raylet.out").write_text(record(0, "not a file rtml logs to") + "\n")
    (home / "logs" / "driver.log").write_text(record(3, "started", process="driver") + "\n" + record(5, "stopped", "ERROR", process="driver") + "\n")
    monkeypatch.setenv("RTML_HOME", str(home))
    get_settings.cache_clear()
    yield ray_logs, home / "logs"
    get_settings.cache_clear()


def rtml_logs(ray_logs: Path, *options: str) -> list[str]:
    result = CliRunner().invoke(app, ["logs", "--ray-logs", str(ray_logs), "--json", *options])
    assert result.exit_code == 0, result.output
    return [orjson.loads(line)["message"] for line in result.output.splitlines()]


def test_rtml_logs_merges_every_process_file_by_time(cluster_logs):
    ray_logs, _ = cluster_logs
    assert rtml_logs(ray_logs) == ["polled", "accepted", "started", "slow batch", "stopped"]


def test_rtml_logs_filters_by_level_trace_tenant_process_and_time(cluster_logs):
    ray_logs, _ = cluster_logs
    assert rtml_logs(ray_logs, "--level", "warning") == ["slow batch", "stopped"]
    assert rtml_logs(ray_logs, "--trace", "abab") == ["accepted", "slow batch"]
    assert rtml_logs(ray_logs, "--tenant", "acme") == ["polled", "slow batch"]
    assert rtml_logs(ray_logs, "--process", "driver", "--process", "Ingress") == ["accepted", "started", "stopped"]
    assert rtml_logs(ray_logs, "--since", (T0 + timedelta(seconds=3)).isoformat()) == ["started", "slow batch", "stopped"]


def test_rtml_logs_shows_other_output_only_with_all_in_its_place(cluster_logs):
    ray_logs, _ = cluster_logs
    runner = CliRunner()
    plain = runner.invoke(app, ["logs", "--ray-logs", str(ray_logs)])
    assert plain.exit_code == 0, plain.output
    assert "polled" in plain.output and "consumer[7]" in plain.output and "tenant=acme" in plain.output
    assert ":actor_name:" not in plain.output and "raw print" not in plain.output
    everything = runner.invoke(app, ["logs", "--ray-logs", str(ray_logs), "--all"])
    assert everything.exit_code == 0, everything.output
    # Other output is placed at the time of its file's record before it (the first one's, before any).
    order = [everything.output.index(text) for text in (":actor_name:Consumer", "polled", "raw print", "accepted", "started", "slow batch")]
    assert order == sorted(order)
    assert "not a file rtml logs to" not in everything.output  # Ray's daemons' files are not read


def test_rtml_logs_refuses_a_since_it_cannot_read(cluster_logs):
    ray_logs, _ = cluster_logs
    result = CliRunner().invoke(app, ["logs", "--ray-logs", str(ray_logs), "--since", "yesterday"])
    assert isinstance(result.exception, RtmlError) and "neither a duration (90s, 10m, 2h, 1d) nor an ISO 8601 time" in str(result.exception)


def test_since_takes_durations_back_from_now():
    now = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    assert logs.parse_since("90s", now) == now - timedelta(seconds=90)
    assert logs.parse_since("2h", now) == now - timedelta(hours=2)
    assert logs.parse_since("2026-12-05T11:00:00", now) == datetime(2026, 12, 5, 11, 0, tzinfo=UTC)


def test_follow_prints_lines_appended_later_once_they_are_complete(cluster_logs):
    ray_logs, driver_logs = cluster_logs
    reader = logs.LogReader(ray_logs, driver_logs, logs.LogFilter(tenant="acme"))
    seen: queue.Queue[str] = queue.Queue()
    stop = threading.Event()
    follower = threading.Thread(target=reader.follow, args=(lambda line: seen.put(line.record["message"]), 0.05, stop.wait))
    follower.start()
    try:
        assert [seen.get(timeout=WAIT_S), seen.get(timeout=WAIT_S)] == ["polled", "slow batch"]
        with (ray_logs / "worker-1-ffff-101.err").open("a") as worker:
            worker.write(record(6, "another tenant's", tenant="beta") + "\n")
            worker.write(record(7, "half written", tenant="acme"))  # no newline yet: not a line
            worker.flush()
            (ray_logs / "worker-2-ffff-102.err").write_text(record(8, "from a new worker", tenant="acme") + "\n")
            assert seen.get(timeout=WAIT_S) == "from a new worker"
            worker.write("\n")
        assert seen.get(timeout=WAIT_S) == "half written"
    finally:
        stop.set()
        follower.join(WAIT_S)
    assert not follower.is_alive() and seen.empty()


# a real Ray worker ----------------------------------------------------------------------------


def test_an_actors_log_line_is_json_in_the_session_logs_and_rtml_logs_finds_it(ray_cluster, tmp_path, monkeypatch):
    ray = ray_cluster
    tenant = f"t-{uuid.uuid4().hex[:8]}"

    @ray.remote(num_cpus=0)
    class LogProbe:
        def report(self, tenant: str) -> int:
            logging.getLogger("tests.probe").warning("probe line", extra={"tenant": tenant, "group": "g-7"})
            return os.getpid()

    probe = LogProbe.remote()
    pid = ray.get(probe.report.remote(tenant))
    context = ray.get_runtime_context()
    session_logs = Path(context.get_temp_dir()) / context.get_session_name() / "logs"
    reader = logs.LogReader(session_logs, tmp_path / "no-driver-logs", logs.LogFilter(tenant=tenant))
    found: list[logs.LogLine] = []
    deadline = time.monotonic() + WAIT_S  # the worker has written it; the bound is only a safety net
    while not found and time.monotonic() < deadline:
        found = reader.read()
        time.sleep(0.1)
    assert len(found) == 1, f"want the actor's one JSON line about {tenant} in {session_logs}'s worker files, found {found}"
    [line] = found
    assert line.source.name.startswith("worker-") and line.source.suffix == ".err"
    assert line.record["process"] == "LogProbe" and line.record["pid"] == pid
    assert (line.record["level"], line.record["logger"], line.record["message"], line.record["group"]) == ("WARNING", "tests.probe", "probe line", "g-7")

    monkeypatch.setenv("RTML_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        assert rtml_logs(session_logs, "--process", "LogProbe", "--tenant", tenant) == ["probe line"]
        assert rtml_logs(session_logs, "--process", "driver", "--tenant", tenant) == []
    finally:
        get_settings.cache_clear()
    ray.kill(probe)
