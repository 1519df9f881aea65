"""Prefect flows: the compression pipeline (compress), its schedule (serve) and promotion."""
import os

# An offline or private machine should not try to phone home on every flow run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
