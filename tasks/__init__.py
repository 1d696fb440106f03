"""The compression stages: one module per stage, each a plain function plus a thin Prefect task."""

import logging
import os

# Stage modules log to "squeezeflow.*"; Prefect forwards those records to the run's logs (CLI and UI) only if
# told before it configures logging, which happens when prefect is first imported.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "squeezeflow")
# This tool runs offline: no telemetry attempts, no progress bars in logs, no hub look-ups.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # stages also run outside flows
# The CLI's temporary Prefect server gets 20 s to start by default: too short on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("squeezeflow").setLevel(logging.INFO)
