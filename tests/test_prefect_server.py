"""A real Prefect server on loopback: `squeeze serve` registers the deployment, a run is triggered through the
Prefect API with parameters (as the UI's form or `prefect deployment run` would), and it completes."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from squeezeflow.flows.form import Recipe

from .conftest import free_port, make_tiny_config, wait_for

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "squeezeflow",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    log = (home / "server.log").open("w")
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        health = f"http://127.0.0.1:{port}/api/health"
        wait_for(lambda: urllib.request.urlopen(health, timeout=5).status == 200, 240, "the Prefect server")
        yield env, home
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def test_served_deployment_runs_with_parameters_from_the_api(server, tmp_path, tiny_model_dir):
    env, home = server
    tree = make_tiny_config(tmp_path / "recipe", tiny_model_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    serve_log = (home / "serve.log").open("w")
    serving = subprocess.Popen(
        [str(BIN / "squeeze"), "serve", str(recipe), "--name", "served"],
        env=env,
        cwd=tmp_path,
        stdout=serve_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def deployment_listed():
            listed = subprocess.run(
                [str(BIN / "prefect"), "deployment", "ls"], env=env, capture_output=True, text=True, timeout=60
            )
            return "compress/served" in listed.stdout

        wait_for(deployment_listed, 180, "the deployment compress/served")
        # the parameters a user would change in the UI's form: here, the experiment the run logs to
        config = Recipe.model_validate(json.loads(json.dumps(tree))).model_dump(mode="json")  # the form's shape
        config["tracking"]["experiment"] = "triggered-from-the-api"
        triggered = subprocess.run(
            [
                str(BIN / "prefect"),
                "deployment",
                "run",
                "compress/served",
                "--params",
                json.dumps({"config": config}),
                "--watch",
                "--watch-timeout",
                "600",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=700,
        )
        assert triggered.returncode == 0, triggered.stdout[-3000:] + triggered.stderr[-3000:]
        assert "Completed" in triggered.stdout + triggered.stderr
    finally:
        os.killpg(serving.pid, signal.SIGTERM)
        serving.wait(timeout=60)

    client = MlflowClient(tree["tracking"]["uri"])
    experiment = client.get_experiment_by_name("triggered-from-the-api")
    assert experiment is not None, "the run did not use the parameters sent through the API"
    runs = client.search_runs([experiment.experiment_id])
    assert any(r.data.tags.get("squeeze.role") == "pipeline" and r.info.status == "FINISHED" for r in runs)
