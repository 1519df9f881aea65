"""Prefect flows: the compression pipeline (compress), its schedule (serve) and promotion."""
import os
import sys
from typing import List, Optional

# An offline or private machine should not try to phone home on every flow run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from convheads import ConvHeadsError  # noqa: E402
from tasks import preflight  # noqa: E402
from tasks.config import PipelineConfig, load_config  # noqa: E402


def checked_config(params_file: str, overrides: List[str]) -> Optional[PipelineConfig]:
    """The validated configuration for a command line, checked in seconds before the Prefect server
    starts; None (and the message printed) if it is bad."""
    try:
        config = load_config(params_file, overrides)
        preflight.check(config)
    except ConvHeadsError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    return config


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
