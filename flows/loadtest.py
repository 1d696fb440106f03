"""`squeeze loadtest`: a bounded, self-stopping Locust load at rising concurrency against a served endpoint; per
level the QPS and latency percentiles, and the highest QPS whose p99 stays within the target."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def run_level(
    url: str, rows: list[tuple[str, int]], users: int, seconds: int, protocol: str = "squeeze"
) -> dict[str, float]:
    """One Locust run with `users` closed-loop clients for `seconds`: QPS, p50, p99 (ms) and failures.
    `protocol`: squeeze (POST / as `squeeze deploy` answers it) or mlflow (POST /invocations of `mlflow models
    serve`)."""
    with tempfile.TemporaryDirectory(prefix="squeezeflow-loadtest-") as tmp:
        texts = Path(tmp) / "texts.json"
        texts.write_text(json.dumps(rows))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(LOCUSTFILE),
                "--headless",
                "--only-summary",
                "-u",
                str(users),
                "-r",
                str(users),
                "-t",
                f"{seconds}s",
                "--host",
                url,
                "--csv",
                f"{tmp}/out",
                "--stop-timeout",
                "5",
                "--loglevel",
                "WARNING",
            ],
            env={**os.environ, "SQUEEZE_TEXTS": str(texts), "SQUEEZE_PROTOCOL": protocol},
            capture_output=True,
            text=True,
            timeout=seconds + 120,
        )
        stats = Path(f"{tmp}/out_stats.csv")
        if not stats.exists():
            raise RuntimeError(f"locust wrote no statistics (exit {done.returncode}): {done.stderr.strip()[-500:]}")
        row = next(r for r in csv.DictReader(stats.open()) if r["Name"] == "Aggregated")
    requests, failures = int(row["Request Count"]), int(row["Failure Count"])
    return {
        "users": users,
        # answered requests per second: a failed request is not throughput
        "qps": float(row["Requests/s"]) * (requests - failures) / max(requests, 1),
        "p50_ms": float(row["50%"]),
        "p99_ms": float(row["99%"]),
        "requests": requests,
        "failures": failures,
    }


def qps_at_p99(levels: list[dict[str, float]], target_ms: float) -> float:
    """The highest QPS among the levels with no failed request and a p99 within the target (0 when none is)."""
    return max(
        (level["qps"] for level in levels if level["p99_ms"] <= target_ms and not level["failures"]), default=0.0
    )


def check_endpoint(url: str) -> None:
    """One request, so that a load test against nothing (or something else) stops with the reason, not with a
    table of failures."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url.rstrip("/") + "/", json.dumps({"texts": ["hello"]}).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = json.loads(answer.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(
            f"it answers HTTP {e.code}: not a squeezeflow endpoint (start one with squeeze deploy)"
        ) from None
    except (OSError, ValueError) as e:
        raise RuntimeError(f"nothing usable answers there ({e}); start the server with squeeze deploy") from None
    if "predictions" not in body:
        raise RuntimeError("it is not a squeezeflow endpoint (no predictions in its answer); use squeeze deploy")


def log_to_variant_run(model_uri: str, levels: list[dict[str, float]], target_ms: float) -> str | None:
    """Logs the curve to the MLflow run of the variant behind `model_uri`; returns its run id (None: not found)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    try:
        version = client.get_model_version_by_alias(name, alias) if alias else None
    except MlflowException:
        return None
    variant_id = version.tags.get("squeeze.variant_id") if version else None
    if not variant_id:
        return None
    experiment = client.get_run(version.run_id).info.experiment_id
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.`squeeze.variant_id` = '{variant_id}' and tags.`squeeze.role` = 'variant'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run_id = runs[0].info.run_id
    client.log_metric(run_id, "serve_qps_at_p99", qps_at_p99(levels, target_ms))
    client.log_metric(run_id, "serve_p99_target_ms", target_ms)
    for level in levels:
        client.log_metric(run_id, f"serve_p99_ms_at_c{level['users']}", level["p99_ms"])
        client.log_metric(run_id, f"serve_qps_at_c{level['users']}", level["qps"])
    return run_id
