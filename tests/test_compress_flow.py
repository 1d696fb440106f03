"""End to end on the tiny model: a real Prefect flow run (ephemeral harness) and a real sqlite MLflow store."""

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from squeezeflow.flows.compress import compress
from squeezeflow.flows.config import parse_config

from .conftest import make_tiny_config

METRICS = {
    "accuracy",
    "accuracy_drop",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "throughput_qps",
    "size_mb",
    "params_m",
    "peak_rss_mb",
    "speedup",
    "tokenize_p50_ms",
    "model_p50_ms",
    "tokenizer_plain_share",
}


@pytest.fixture(scope="module")
def finished(prefect_harness, tmp_path_factory, tiny_model_dir):
    tree = make_tiny_config(tmp_path_factory.mktemp("flow"), tiny_model_dir)
    # the static branch asks for more calibration sentences than the data has: it must fail alone
    tree["stages"][1] = {"kind": "quantize", "modes": ["dynamic", "static"], "calibration_examples": 1000}
    cfg = parse_config(tree)
    return cfg, compress(cfg)


def test_flow_logs_pipeline_and_variant_runs(finished):
    cfg, result = finished
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    pipelines = [r for r in runs if r.data.tags.get("squeeze.role") == "pipeline"]
    variants = [r for r in runs if r.data.tags.get("squeeze.role") == "variant" and r.info.status == "FINISHED"]
    assert len(pipelines) == 1 and pipelines[0].info.status == "FINISHED"
    assert pipelines[0].info.run_id == result["pipeline_run_id"]
    assert sorted(r.data.tags["squeeze.lineage"] for r in variants) == [
        "teacher",
        "teacher>onnx",
        "teacher>onnx>int8-dynamic",
    ]
    by_id = {r.data.tags["squeeze.variant_id"]: r for r in variants}
    for run in variants:
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == result["pipeline_run_id"]
        assert tags["squeeze.stage"] in {"teacher", "export", "quantize"}
        assert METRICS <= set(run.data.metrics), METRICS - set(run.data.metrics)
        assert 0.0 <= run.data.metrics["accuracy"] <= 1.0
        if tags["squeeze.stage"] != "teacher":
            assert tags["squeeze.parent_id"] in by_id
            assert {"parity_max_abs", "parity_agreement"} <= set(run.data.metrics)
    teacher = next(r for r in variants if r.data.tags["squeeze.stage"] == "teacher")
    assert teacher.data.metrics["accuracy"] >= 0.9  # the known-answer task is learnt
    assert teacher.data.metrics["speedup"] == pytest.approx(1.0)
    assert teacher.data.params["finetune"] == "True"
    int8 = next(r for r in variants if r.data.tags["squeeze.stage"] == "quantize")
    assert int8.data.metrics["size_mb"] < teacher.data.metrics["size_mb"]
    artifacts = {a.path for a in client.list_artifacts(result["pipeline_run_id"])}
    assert {"config.yaml", "report.md", "variants.csv", "pareto.png"} <= artifacts
    # the pipeline run carries its best variant's figures and its wall time; variant runs span their making
    pipeline = pipelines[0].data.metrics
    best = by_id[result["champion"]].data.metrics
    assert pipeline["latency_p50_ms"] == best["latency_p50_ms"] and pipeline["val_accuracy"] == best["val_accuracy"]
    assert pipeline["wall_time_s"] > 0 and pipeline["promoted"] == 1.0
    for run in variants:
        assert run.data.metrics["made_seconds"] > 0
        assert run.info.end_time - run.info.start_time == pytest.approx(run.data.metrics["made_seconds"] * 1000, abs=2)


def test_a_failing_branch_is_logged_as_failed_and_the_rest_finishes(finished):
    cfg, result = finished
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1
    assert failed[0].data.tags["squeeze.lineage"] == "teacher>onnx>int8-static"
    assert "calibration_examples is 1000" in failed[0].data.tags["squeeze.error"]
    assert failed[0].data.tags["mlflow.parentRunId"] == result["pipeline_run_id"]
    assert [f["lineage"] for f in result["failed"]] == ["teacher>onnx>int8-static"]
    assert not any(r.info.status == "RUNNING" for r in runs)


def test_champion_is_registered_and_predicts_raw_text(finished):
    cfg, result = finished
    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    version = client.get_model_version_by_alias("tiny-classifier", "champion")
    assert str(version.version) == result["model_version"]
    assert version.tags["squeeze.variant_id"] == result["champion"]
    champion = next(v for v in result["variants"] if v["id"] == result["champion"])
    assert champion["metrics"]["val_accuracy_drop"] <= cfg.selection.max_accuracy_drop
    c = champion["metrics"]
    for v in result["variants"]:  # no feasible variant is faster by more than the round-to-round spread
        m = v["metrics"]
        if m["val_accuracy_drop"] <= cfg.selection.max_accuracy_drop:
            assert c["latency_p50_ms"] <= m["latency_p50_ms"] + max(c["latency_spread_ms"], m["latency_spread_ms"])

    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pyfunc.load_model("models:/tiny-classifier@champion")
    out = model.predict(pd.DataFrame({"text": ["the film was really excellent", "the plot was awful and boring"]}))
    assert list(out["label"]) == ["pos", "neg"]
    assert out["probabilities"].map(len).tolist() == [2, 2]
    assert ((out["score"] > 0.5) & (out["score"] <= 1.0)).all()


def test_variant_files_are_safe_formats(finished):
    _, result = finished
    for v in result["variants"]:
        files = {p.suffix for p in Path(v["path"]).iterdir()}
        assert not files & {".bin", ".pt", ".pth", ".pkl"}
        assert (".safetensors" in files) if v["format"] == "hf" else (".onnx" in files)


def test_report_is_rebuilt_from_mlflow(finished, tmp_path):
    from squeezeflow.tasks.report import rebuild_report

    cfg, result = finished
    files, variants, selection = rebuild_report(MlflowClient(cfg.tracking.uri), result["pipeline_run_id"], tmp_path)
    assert [f.name for f in files] == ["report.md", "variants.csv", "pareto.png"]
    assert {v.id for v in variants} == {v["id"] for v in result["variants"]}
    assert selection.champion.id == result["champion"]
    text = files[0].read_text()
    champion_row = next(line for line in text.splitlines() if line.startswith("|") and result["champion"] in line)
    assert champion_row.startswith("| ▲ ★") and "teacher>onnx>int8-dynamic" in text  # best of run, registered
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = files[1].read_text().splitlines()
    assert rows[0].startswith("variant_id,parent_id,stage,lineage,format") and len(rows) == 1 + len(variants)


def test_report_and_table_are_prefect_artifacts(finished):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def fetch():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-report", "tiny-variants"]))
            )

    import asyncio

    artifacts = asyncio.run(fetch())
    kinds = {a.key: a.type for a in artifacts}
    assert kinds == {"tiny-report": "markdown", "tiny-variants": "table"}


def test_a_new_champion_is_promoted_only_when_it_beats_the_registered_one(prefect_harness, tmp_path, tiny_model_dir):
    tree = make_tiny_config(tmp_path, tiny_model_dir)
    tree["benchmark"] |= {"rounds": 1, "latency_texts": 10, "measure_rss": False}
    tree["selection"] = {"objective": "size", "max_accuracy_drop": 0.05}
    fp32_only = parse_config({**tree, "stages": [{"kind": "export"}]})
    with_int8 = parse_config({**tree, "stages": [{"kind": "export"}, {"kind": "quantize", "modes": ["dynamic"]}]})
    client = MlflowClient(tracking_uri=fp32_only.tracking.uri, registry_uri=fp32_only.tracking.uri)

    first = compress(fp32_only)
    assert first["promoted"] and first["model_version"] == "1"

    second = compress(with_int8)  # the INT8 variant is smaller: it replaces the champion, v1 becomes `previous`
    assert second["promoted"] and second["model_version"] == "2"
    assert client.get_model_version_by_alias("tiny-classifier", "champion").version in (2, "2")
    assert client.get_model_version_by_alias("tiny-classifier", "previous").version in (1, "1")
    # the replaced champion was measured in the same benchmark: its figures stand beside the new one's
    assert "(v1 is now @previous: p50 " in second["registry"] and " ms in this benchmark" in second["registry"]

    description = client.get_model_version("tiny-classifier", "2").description
    assert "teacher>onnx>int8-dynamic" in description and "Validation accuracy" in description
    assert "Promoted because: best size" in description and "replaces version 1" in description

    third = compress(fp32_only)  # fp32 is bigger than the registered INT8 champion: nothing changes
    assert not third["promoted"] and third["model_version"] == "2"
    assert third["registry"].startswith("tiny-classifier v2 (") and "teacher>onnx>int8-dynamic" in third["registry"]
    assert "stays" in third["registry"]
    assert len(client.search_model_versions("name='tiny-classifier'")) == 2
    report = (Path(third["run_dir"]) / "report" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert any(row.startswith("| ▲") for row in rows) and not any("★" in row for row in rows)  # never a false mark
    assert "Registered champion: tiny-classifier v2" in report
    # the kept champion's own figures from this benchmark, eval accuracy included, stand under the table
    assert "## The champion registered before this run, measured in the same benchmark" in report
    assert any(row.startswith("| champion-v2 | champion v2: teacher>onnx>int8-dynamic |") for row in rows)

    fourth = compress(with_int8)  # the registered champion wins again: it is not registered a second time
    assert not fourth["promoted"] and fourth["model_version"] == "2"
    assert fourth["registry"].endswith("is this run's best already, so nothing new was registered")
    assert client.get_model_version_by_alias("tiny-classifier", "previous").version in (1, "1")
    assert len(client.search_model_versions("name='tiny-classifier'")) == 2


def test_unchanged_rerun_reuses_every_stage_and_one_changed_knob_recomputes_only_its_subtree(finished):
    import os

    cfg, first = finished
    stamps = {v["id"]: os.stat(Path(v["path"]) / "variant.json").st_mtime_ns for v in first["variants"]}
    again = compress(cfg)
    assert {v["id"]: v["path"] for v in again["variants"]} == {v["id"]: v["path"] for v in first["variants"]}
    assert {v["id"]: os.stat(Path(v["path"]) / "variant.json").st_mtime_ns for v in again["variants"]} == stamps

    knob = cfg.model_copy(update={"stages": [cfg.stages[0], cfg.stages[1].model_copy(update={"per_channel": True})]})
    changed = compress(knob)
    new_ids = {v["id"] for v in changed["variants"]} - set(stamps)
    assert [v["lineage"] for v in changed["variants"] if v["id"] in new_ids] == ["teacher>onnx>int8-dynamic"]
    for v in changed["variants"]:
        if v["id"] in stamps:
            assert os.stat(Path(v["path"]) / "variant.json").st_mtime_ns == stamps[v["id"]]


def test_runs_left_running_by_a_dead_process_are_marked_killed(finished):
    import os
    import socket
    import subprocess
    import sys

    from squeezeflow.tasks.tracking import close_abandoned_runs

    cfg, _ = finished
    client = MlflowClient(cfg.tracking.uri)
    experiment_id = client.get_experiment_by_name("tiny").experiment_id
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    crashed = client.create_run(
        experiment_id, tags={"squeeze.role": "pipeline", "squeeze.host": socket.gethostname(), "squeeze.pid": dead}
    )
    alive = client.create_run(
        experiment_id,
        tags={"squeeze.role": "pipeline", "squeeze.host": socket.gethostname(), "squeeze.pid": str(os.getpid())},
    )
    assert close_abandoned_runs(client, experiment_id) == [crashed.info.run_id]
    assert client.get_run(crashed.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    client.set_terminated(alive.info.run_id, "FINISHED")


@pytest.fixture(scope="module")
def chained(prefect_harness, tmp_path_factory, tiny_model_dir):
    """prune → early exit → export → quantize: each stage takes what the one before made (early exit is a side
    branch, so the pruned model also goes on to export; also_teacher gives the teacher exits too)."""
    tree = make_tiny_config(tmp_path_factory.mktemp("chain"), tiny_model_dir)
    tree["stages"] = [
        {"kind": "prune", "ratios": [0.5], "recovery": {"epochs": 3, "learning_rate": 3e-3, "batch_size": 16}},
        {
            "kind": "early_exit",
            "thresholds": [0.3],
            "also_teacher": True,
            "training": {"epochs": 3, "learning_rate": 3e-3, "batch_size": 16},
        },
        {"kind": "export"},
        {"kind": "quantize", "modes": ["dynamic"]},
    ]
    cfg = parse_config(tree)
    return cfg, compress(cfg)


def test_pruned_and_early_exit_variants_flow_through_the_chain(chained):
    cfg, result = chained
    assert result["failed"] == []
    by_lineage = {v["lineage"]: v for v in result["variants"]}
    assert set(by_lineage) == {
        "teacher",
        "teacher>prune[0.5]",
        "teacher>early_exit[0.3]",
        "teacher>prune[0.5]>early_exit[0.3]",
        "teacher>onnx",
        "teacher>prune[0.5]>onnx",
        "teacher>onnx>int8-dynamic",
        "teacher>prune[0.5]>onnx>int8-dynamic",
        "teacher>early_exit[0.3]>int8-dynamic",
        "teacher>prune[0.5]>early_exit[0.3]>int8-dynamic",
    }
    pruned, teacher = by_lineage["teacher>prune[0.5]"], by_lineage["teacher"]
    assert pruned["stage"] == "prune" and pruned["metrics"]["params_m"] < teacher["metrics"]["params_m"]
    for lineage, v in by_lineage.items():
        if "early_exit" in lineage:
            assert v["format"] == "onnx-exit" and 1.0 <= v["metrics"]["mean_exit_layer"] <= 2.0
            assert {"latency_mean_ms", "parity_agreement"} <= set(v["metrics"])
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], "tags.`squeeze.stage` = 'early_exit'"
    )
    assert len(runs) == 2 and all("mean_exit_layer" in r.data.metrics for r in runs)


def test_permuting_the_eval_labels_changes_only_the_reported_eval_figures(prefect_harness, tmp_path, tiny_model_dir):
    """Eval is read once, to report: the same recipe with its eval labels permuted, run from scratch, makes the same
    variants (ids), keeps the same static-INT8 nodes in float and picks the same champion; only eval figures move.
    The objective is size, so that timing noise between the two runs cannot pick another champion."""
    import random

    runs = []
    for permuted in (False, True):
        tree = make_tiny_config(tmp_path / f"permuted-{permuted}", tiny_model_dir)
        if permuted:
            rows = [line.split("\t") for line in Path(tree["data"]["eval"]).read_text().splitlines()[1:]]
            labels = [label for _, label in rows]
            random.Random(0).shuffle(labels)
            Path(tree["data"]["eval"]).write_text(
                "text\tlabel\n" + "".join(f"{t}\t{y}\n" for (t, _), y in zip(rows, labels))
            )
        tree["stages"] = [
            {"kind": "export"},
            {"kind": "quantize", "modes": ["dynamic", "static"], "calibration_examples": 32, "accuracy_tolerance": 0.0},
        ]
        tree["benchmark"] |= {"rounds": 1, "latency_texts": 5, "measure_rss": False}
        tree["selection"] = {"objective": "size", "max_accuracy_drop": 0.05}
        runs.append(compress(parse_config(tree)))
    plain, permuted = ({v["lineage"]: v for v in run["variants"]} for run in runs)
    assert {k: v["id"] for k, v in plain.items()} == {k: v["id"] for k, v in permuted.items()}
    static = "teacher>onnx>int8-static"
    assert plain[static]["params"]["excluded_nodes"] == permuted[static]["params"]["excluded_nodes"]
    assert runs[0]["champion"] == runs[1]["champion"]
    for lineage in plain:
        assert plain[lineage]["metrics"]["val_accuracy"] == permuted[lineage]["metrics"]["val_accuracy"]
    assert plain["teacher"]["metrics"]["accuracy"] != permuted["teacher"]["metrics"]["accuracy"]


def test_every_variant_reports_eval_intervals_and_the_report_places_the_drop_against_the_budget(finished):
    cfg, result = finished
    for v in result["variants"]:
        m = v["metrics"]
        assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
        assert m["accuracy_drop_ci_low"] <= m["accuracy_drop_ci_high"]
        assert 0.0 <= m["val_accuracy"] <= 1.0 and m["bench_other_cpu_share"] >= 0.0
    report = (Path(result["run_dir"]) / "report" / "report.md").read_text()
    assert "95 % paired interval" in report and "the budget is applied on the validation split" in report
    assert "Benchmark machine: " in report and "cores, CPU flags" in report


@pytest.mark.parametrize("bad", [None, "", "   ", 5])
def test_the_champion_refuses_a_null_empty_or_non_string_text(finished, bad):
    from mlflow.exceptions import MlflowException

    cfg, _ = finished
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pyfunc.load_model("models:/tiny-classifier@champion")
    with pytest.raises(MlflowException, match=r"text of row 1 is .*send a non-empty string per row") as caught:
        model.predict(pd.DataFrame({"text": ["a fine film", bad]}, dtype=object))
    assert caught.value.get_http_status_code() == 400


def test_the_champion_serves_from_a_fresh_environment_made_from_its_own_requirements(finished, tmp_path):
    """`mlflow models serve` in a new virtual environment holding only the logged requirements (no squeezeflow, run
    away from the repository): raw texts in, the pyfunc's labels out; a null text is an HTTP 400."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from .conftest import free_port, wait_for

    cfg, _ = finished
    mlflow.set_tracking_uri(cfg.tracking.uri)
    local = Path(
        mlflow.artifacts.download_artifacts("models:/tiny-classifier@champion", dst_path=str(tmp_path / "model"))
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"MLFLOW_TRACKING_URI": cfg.tracking.uri, "PATH": f"{venv / 'bin'}:{env['PATH']}"}  # the venv, activated
    subprocess.run(
        [venv / "bin" / "pip", "install", "-q", "-r", local / "requirements.txt"], check=True, env=env, timeout=900
    )
    assert subprocess.run([venv / "bin" / "python", "-c", "import squeezeflow"], cwd=tmp_path, env=env).returncode != 0

    port, log = free_port(), (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [
            venv / "bin" / "mlflow",
            "models",
            "serve",
            "-m",
            "models:/tiny-classifier@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def post(texts):
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def ready():
        assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).status == 200

    try:
        wait_for(ready, 180, "mlflow models serve")
        status, answer = post(["the film was really excellent", "the plot was awful and boring"])
        assert status == 200 and [row["label"] for row in answer["predictions"]] == ["pos", "neg"]
        status, answer = post(["a fine film", None])
        assert status == 400 and "text of row 1 is null" in json.dumps(answer), answer
        # the load test speaks this server's protocol too (bench/serving.py compares it with squeeze deploy)
        from squeezeflow.flows.loadtest import run_level

        level = run_level(f"http://127.0.0.1:{port}", [("a fine film", 1), ("an awful plot", 0)], 2, 3, "mlflow")
        assert level["requests"] > 0 and level["failures"] == 0, level
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
