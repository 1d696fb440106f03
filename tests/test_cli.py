"""The `squeeze` console script, run as a user runs it: user mistakes give one line and a non-zero exit."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import make_tiny_config, written

SQUEEZE = str(Path(sys.executable).with_name("squeeze"))


def squeeze(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([SQUEEZE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def recipe(tmp_path, tree) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def assert_one_line_error(done, *fragments):
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def run_statuses(db: Path) -> list[str]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("select status from runs")]


def test_unknown_key(tmp_path, tiny_config):
    tiny_config["benchmark"]["thread"] = 4
    done = squeeze("run", recipe(tmp_path, tiny_config))
    assert_one_line_error(done, "benchmark.thread: unknown key")
    assert done.stderr.count("\n") == 1
    assert run_statuses(tmp_path / "mlflow.db") == []


def test_dataset_without_label_column(tmp_path, tiny_config):
    (tmp_path / "nolabel.tsv").write_text("text\tsentiment\ngood film\t1\n")
    tiny_config["data"]["train"] = str(tmp_path / "nolabel.tsv")
    done = squeeze("run", recipe(tmp_path, tiny_config))
    assert_one_line_error(done, "nolabel.tsv: missing column 'label'")


def test_nonexistent_model_path(tmp_path, tiny_config):
    tiny_config["model"]["source"] = str(tmp_path / "no-such-model")
    done = squeeze("run", recipe(tmp_path, tiny_config))
    assert_one_line_error(done, "model.source:", "no-such-model")


def test_bad_override_and_missing_config(tmp_path, tiny_config):
    assert_one_line_error(squeeze("run", recipe(tmp_path, tiny_config), "--set", "teacher.epochs=-1"), "teacher.epochs")
    assert_one_line_error(squeeze("run", str(tmp_path / "nope.yaml")), "config file not found")


def test_model_that_fails_inside_the_flow_leaves_no_running_run(tmp_path, tiny_config, tiny_model_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for file in tiny_model_dir.iterdir():  # config and tokenizer, but no weights: preflight cannot tell, loading can
        if not file.name.endswith(".safetensors"):
            (broken / file.name).write_bytes(file.read_bytes())
    tiny_config["model"]["source"] = str(broken)
    done = squeeze("run", recipe(tmp_path, tiny_config))
    assert_one_line_error(done, "model.source:", "broken-model")
    statuses = run_statuses(tmp_path / "mlflow.db")
    assert statuses == ["FAILED"]
    assert written(tmp_path / "artifacts" / "variants") == []  # nothing half-written


def test_two_runs_at_once_on_a_new_store_and_a_failed_variant_is_loud(tmp_path, tiny_model_dir):
    """Two `squeeze run` started together on a fresh artifacts dir and MLflow store: both finish, the teacher and
    the shared variants are made once, the later run measures itself against the earlier one's champion (the same
    variant: nothing new is registered) and each console says which happened. The second recipe adds a static
    branch that names a node its graph does not have: it is listed on the console and in the report, and that run
    exits 3 while its champion is still chosen from the rest."""
    tree = make_tiny_config(tmp_path, tiny_model_dir)
    tree["selection"] = {
        "objective": "size",
        "max_accuracy_drop": 0.05,
    }  # the same champion for both, whatever the timings
    plain = recipe(tmp_path, tree)
    tree["stages"][1] = {"kind": "quantize", "modes": ["dynamic", "static"], "exclude_nodes": ["NoSuchNode"]}
    (tmp_path / "failing").mkdir()
    failing = recipe(tmp_path / "failing", tree)
    env = {**os.environ, "COLUMNS": "200"}
    runs = [
        subprocess.Popen(
            [SQUEEZE, "run", path, "--set", "benchmark.rounds=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for path in (plain, failing)
    ]
    (out_plain, err_plain), (out_failing, err_failing) = (run.communicate(timeout=600) for run in runs)
    assert runs[0].returncode == 0, err_plain[-3000:]
    assert runs[1].returncode == 3, err_failing[-3000:]
    for out in (out_plain, out_failing):
        assert "teacher>onnx>int8-dynamic" in out and "best of this run:" in out
    said = sorted(
        out.split("models:/tiny-classifier@champion = version 1: ")[1].split("\n")[0]
        for out in (out_plain, out_failing)
    )
    assert said == [
        "tiny-classifier v1 is this run's best already, so nothing new was registered",
        "tiny-classifier v1 is this run's best, promoted in this run",
    ], said
    assert len(list((tmp_path / "artifacts" / "variants").glob("teacher-*"))) == 1

    assert (
        "1 variant(s) failed" in out_failing
        and "teacher>onnx>int8-static" in out_failing
        and "NoSuchNode" in out_failing
    )
    assert "exit code 3" in err_failing and "Traceback" not in out_failing + err_failing + out_plain + err_plain
    report = next(p for p in (tmp_path / "artifacts" / "runs").glob("*/report/report.md") if "failed" in p.read_text())
    assert "| teacher>onnx>int8-static | " in report.read_text()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tree["tracking"]["uri"], registry_uri=tree["tracking"]["uri"])
    assert [v.version for v in client.search_model_versions("name='tiny-classifier'")] in ([1], ["1"])
    statuses = run_statuses(tmp_path / "mlflow.db")
    assert statuses.count("FINISHED") == 2 + 3 + 3 and statuses.count("FAILED") == 1 and "RUNNING" not in statuses


def test_schema_and_validate(tmp_path, tiny_config):
    done = squeeze("schema")
    assert done.returncode == 0
    assert "stages" in json.loads(done.stdout)["properties"]
    done = squeeze("validate", recipe(tmp_path, tiny_config))
    assert done.returncode == 0 and "name: tiny" in done.stdout


def test_a_store_locked_by_another_process_is_one_clear_line(tmp_path, tiny_config, monkeypatch):
    from typer.testing import CliRunner

    import squeezeflow.flows.cli as cli

    monkeypatch.setattr(cli, "STORE_LOCK_WAIT_S", 1)
    db = tmp_path / "mlflow.db"  # tiny_config's tracking store
    holder = sqlite3.connect(db)
    holder.execute("create table held (x)")
    holder.execute("BEGIN EXCLUSIVE")  # as another writer mid-transaction would
    try:
        result = CliRunner().invoke(cli.app, ["validate", recipe(tmp_path, tiny_config)])
    finally:
        holder.rollback()
        holder.close()
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == f"error: tracking.uri: the MLflow store {db} is locked by another process; wait for it or set tracking.uri "
        f"elsewhere"
    )


def test_kill_9_of_the_cli_leaves_no_process_it_started(tmp_path, tiny_model_dir):
    """During the teacher's fine-tuning the CLI has started a temporary Prefect server (and the watchdog); after
    `kill -9` of the CLI, every one of its descendants is gone within seconds."""
    import signal
    import time

    import psutil

    from .conftest import wait_for

    tree = make_tiny_config(tmp_path, tiny_model_dir)
    tree["teacher"] |= {"epochs": 500}  # long enough to be killed while training
    cli = subprocess.Popen(
        [SQUEEZE, "run", recipe(tmp_path, tree)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:

        def training_with_a_server():
            started = psutil.Process(cli.pid).children(recursive=True)
            has_server = any("uvicorn" in " ".join(p.cmdline()) for p in started if p.is_running())
            return started if has_server and "RUNNING" in run_statuses(tmp_path / "mlflow.db") else None

        descendants = wait_for(training_with_a_server, 300, "the run to start training beside its Prefect server")
        descendants += [
            p
            for p in psutil.process_iter()
            if "squeezeflow.flows.watchdog" in " ".join(p.cmdline() or []) and str(cli.pid) in p.cmdline()
        ]
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
            p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in descendants
        ):
            time.sleep(0.5)
        alive = [" ".join(p.cmdline()) for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], alive
    finally:
        if cli.poll() is None:
            cli.kill()


def test_the_teacher_fine_tunes_data_parallel_in_two_processes_and_compresses_from_its_directory(tmp_path, tiny_config):
    """`squeeze teacher` under torchrun (what `accelerate launch` starts on GPUs): two CPU processes share each epoch's
    batches, one writes the model; a recipe then starts from that directory without fine-tuning again."""
    tiny_config["teacher"] |= {"epochs": 1, "batch_size": 8}
    path = recipe(tmp_path, tiny_config)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = ["--standalone", "--nproc_per_node", "2", SQUEEZE, "teacher", path, "--out"]
    done = subprocess.run(
        [torchrun, *command, str(tmp_path / "dp")], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("teacher fine-tuned in 2 process(es)") == 1  # the main process alone writes and reports
    figures = json.loads((tmp_path / "dp" / "training.json").read_text())
    # 240 rows, 10 % set aside for validation: 216 to train, 27 batches of 8; one process would step 27 times
    assert figures["train_processes"] == 2 and figures["train_steps"] == 13
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "dp").iterdir()}

    again = squeeze("teacher", path, "--out", str(tmp_path / "dp"))
    assert_one_line_error(again, "--out", "is not empty")
    tiny_config["model"]["source"], tiny_config["teacher"]["finetune"] = str(tmp_path / "dp"), False
    done = squeeze("validate", recipe(tmp_path, tiny_config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_one_line_error(squeeze("teacher", recipe(tmp_path, tiny_config), "--out", "x"), "teacher.finetune: false")
