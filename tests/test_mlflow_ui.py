"""The MLflow UI, as a user opens it on the store of a finished pipeline, rendered by headless Chromium: the
variant runs are listed under their pipeline run, and a variant's page shows its benchmark metrics."""

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from squeezeflow.flows.compress import compress
from squeezeflow.flows.config import parse_config

from .browser import CHROMIUM, Browser
from .conftest import free_port, make_tiny_config, wait_for

if CHROMIUM is None:
    # .ci/run installs Debian's chromium and sets SQUEEZE_REQUIRE_BROWSER, so there this is a failure
    reason = "no chromium on PATH (apt-get install chromium)"
    if os.environ.get("SQUEEZE_REQUIRE_BROWSER"):
        raise RuntimeError(reason)
    pytest.skip(reason, allow_module_level=True)

# the run-name cell's expand/collapse button of a parent run, in MLflow 3's runs table
EXPAND_CHILDREN = """(() => {
  const buttons = [...document.querySelectorAll('button[data-component-id$="runnamecellrenderer.tsx_46"]')];
  buttons.forEach(b => b.click());
  return buttons.length;
})()"""


@pytest.fixture(scope="module")
def finished(prefect_harness, tmp_path_factory, tiny_model_dir):
    tree = make_tiny_config(tmp_path_factory.mktemp("ui"), tiny_model_dir)
    return tree, compress(parse_config(tree))


@pytest.fixture(scope="module")
def mlflow_ui(finished, tmp_path_factory):
    tree, _ = finished
    port = free_port()
    log = (tmp_path_factory.mktemp("mlflow-ui") / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            tree["tracking"]["uri"],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: urllib.request.urlopen(f"{url}/health", timeout=5).status == 200, 180, "the MLflow server")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    page = Browser()
    yield page
    page.close()


def test_mlflow_ui_lists_the_variant_runs_of_a_finished_pipeline(finished, mlflow_ui, browser):
    tree, result = finished
    pipeline = Path(result["run_dir"]).name
    variants = [v["id"] for v in result["variants"]]
    browser.goto(f"{mlflow_ui}/#/experiments/{result['experiment_id']}/runs")
    wait_for(lambda: pipeline in browser.text(), 120, f"pipeline run {pipeline} in the runs table")
    assert not any(v in browser.text() for v in variants), "variant runs should be folded under their pipeline run"
    assert browser.evaluate(EXPAND_CHILDREN) >= 1
    wait_for(lambda: all(v in browser.text() for v in variants), 60, f"variant runs {variants} under the pipeline run")


def test_mlflow_ui_shows_a_variants_benchmark_metrics(finished, mlflow_ui, browser):
    tree, result = finished
    client = MlflowClient(tree["tracking"]["uri"])
    champion = client.get_run(client.get_run(result["pipeline_run_id"]).data.tags["squeeze.champion_run_id"])
    browser.goto(f"{mlflow_ui}/#/experiments/{result['experiment_id']}/runs/{champion.info.run_id}")
    wait_for(lambda: champion.info.run_name in browser.text(), 120, f"the page of run {champion.info.run_name}")
    wanted = ["accuracy", "accuracy_drop", "latency_p50_ms", "size_mb", "parity_agreement"]
    wait_for(lambda: all(name in browser.text() for name in wanted), 180, f"metrics {wanted} on the run page")
