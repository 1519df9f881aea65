"""Prefect flows: the compression pipeline (compress), its schedule (serve) and promotion."""
import os
import sys

from convheads import ConvHeadsError

# An offline or private machine should not try to phone home on every flow run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


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
