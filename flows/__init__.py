"""Prefect flows: the compression pipeline (compress), its frontier (sweep), its schedule (serve)
and promotion (promote); what their command lines share."""
import argparse
import contextlib
import functools
import logging
import os
import subprocess
import sys
from typing import Callable, Iterator, List, Optional

# An offline or private machine should not try to phone home on every flow run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.client.schemas.schedules import CronSchedule  # noqa: E402
from prefect.states import Failed  # noqa: E402

from convheads import ConvHeadsError  # noqa: E402
from pipeline import preflight  # noqa: E402
from pipeline.config import PipelineConfig, ScheduleConfig, load_config  # noqa: E402


def parse_command_line(prog: str, doc: str, argv=None, force: bool = False) -> argparse.Namespace:
    """A flow's command line: --params, --run-name, key=value overrides (and --force)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="configuration file (default: params.yaml)")
    p.add_argument("--run-name", default=None, help="name of the MLflow run")
    if force:
        p.add_argument("--force", action="store_true", help="log and register even if nothing changed")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    return p.parse_args(argv)


def checked_config(params_file: str, overrides: List[str]) -> Optional[PipelineConfig]:
    """The validated configuration for a command line, checked in seconds before the Prefect server
    starts; None (and the message printed) if it is bad."""
    try:
        config = load_config(params_file, overrides)
        check_schedule(config.schedule)
        preflight.check(config)
    except ConvHeadsError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    return config


def check_schedule(schedule: ScheduleConfig) -> CronSchedule:
    """The deployment's schedule, or a clear error naming the keys."""
    try:
        return CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    except ValueError:
        raise ConvHeadsError(f"schedule.cron {schedule.cron!r} with timezone {schedule.timezone!r} is not a valid "
                             f"cron schedule (e.g. '0 3 * * *')") from None


def quiet_failure(fn: Callable) -> Callable:
    """For a flow function: bad input (a ConvHeadsError, its own or a task's) ends the run Failed
    with its message alone, not with a traceback in the run's log; the command line prints the
    message once. A bug's exception keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConvHeadsError as e:
            return Failed(message=str(e), data=e)
    return wrapper


class _BadInputWithoutTraceback(logging.Filter):
    """A task that fails on bad input (a ConvHeadsError) is logged by Prefect with its traceback;
    the message says what to fix, so keep the message and drop the traceback. A bug's keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ConvHeadsError):
            record.exc_info = None
        return True


logging.getLogger("prefect.task_runs").addFilter(_BadInputWithoutTraceback())


def exit_status(state) -> int:
    """A command line's exit status for a finished flow run: 0 done, 2 bad input (message printed), 1 other failure."""
    if not state.is_failed():
        return 0
    try:
        state.result()
    except ConvHeadsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception:  # Prefect has already logged its traceback
        pass
    return 1


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Prefect's API for a command line: the server at PREFECT_API_URL if one is set, else a temporary
    one for this command (as Prefect itself would start), stopped when the block ends so that the
    command's summary comes last.

    The temporary server runs with its root logger at CRITICAL: when it stops, library loggers
    (SQLAlchemy's connection pool, docket) can report tasks cancelled mid-query as ERROR tracebacks
    (a shutdown race, PrefectHQ/prefect#16504) that mean nothing for a finished run. Prefect's own
    server messages keep their level."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    server = SubprocessASGIServer()
    previous = os.environ.get("PREFECT_LOGGING_ROOT_LEVEL")
    os.environ["PREFECT_LOGGING_ROOT_LEVEL"] = "CRITICAL"  # read by the server's process only, at its start
    try:
        # Prefect's 20 s default is too short on a busy machine (training beside it): a run would fail
        # before its first stage; a larger setting is kept
        server.start(timeout=max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), 120))
    finally:
        if previous is None:
            del os.environ["PREFECT_LOGGING_ROOT_LEVEL"]
        else:
            os.environ["PREFECT_LOGGING_ROOT_LEVEL"] = previous
    # The server ends with this command even if it is killed (kill -9): flows/watchdog.py
    watchdog = subprocess.Popen([sys.executable, "-m", "flows.watchdog", str(os.getpid()),
                                 str(server.server_process.pid)], stdin=subprocess.DEVNULL)
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
            # What the run logged and emitted goes to the server before it stops (as Prefect's test
            # harness does), not to a closed port at exit ("Error logging to API").
            APILogWorker.drain_all(timeout=5)
            EventsWorker.drain_all(timeout=5)
    finally:
        server.stop()
        watchdog.terminate()
        watchdog.wait()
