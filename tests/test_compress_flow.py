"""End to end on the tiny model: a real Prefect flow run (ephemeral harness) and a real sqlite MLflow store."""

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from squeezeflow.flows.compress import compress, run_compress
from squeezeflow.flows.config import parse_config

from .conftest import make_tiny_config

METRICS = {
    "accuracy", "accuracy_drop", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "throughput_qps",
    "size_mb", "params_m", "peak_rss_mb", "speedup",
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
    assert sorted(r.data.tags["squeeze.lineage"] for r in variants) == ["teacher", "teacher>onnx", "teacher>onnx>int8-dynamic"]
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
    assert champion["metrics"]["accuracy_drop"] <= cfg.selection.max_accuracy_drop
    fastest_ok = min(
        (v for v in result["variants"] if v["metrics"]["accuracy_drop"] <= cfg.selection.max_accuracy_drop),
        key=lambda v: v["metrics"]["latency_p50_ms"],
    )
    assert champion["id"] == fastest_ok["id"]

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
    assert champion_row.startswith("| ★") and "teacher>onnx>int8-dynamic" in text
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = files[1].read_text().splitlines()
    assert rows[0].startswith("variant_id,parent_id,stage,lineage,format") and len(rows) == 1 + len(variants)


def test_report_and_table_are_prefect_artifacts(finished):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def fetch():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-report", "tiny-variants"])))

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

    third = compress(fp32_only)  # fp32 is bigger than the registered INT8 champion: nothing changes
    assert not third["promoted"] and third["model_version"] == "2"
    assert "stays champion" in third["selection"]
    assert len(client.search_model_versions("name='tiny-classifier'")) == 2

    fourth = compress(with_int8)  # the registered champion wins again: it is not registered a second time
    assert not fourth["promoted"] and fourth["model_version"] == "2"
    assert fourth["selection"].endswith("it is registered champion v2 already")
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
    from squeezeflow.tasks.tracking import close_abandoned_runs
    import socket
    import subprocess
    import sys

    cfg, _ = finished
    client = MlflowClient(cfg.tracking.uri)
    experiment_id = client.get_experiment_by_name("tiny").experiment_id
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    crashed = client.create_run(experiment_id, tags={"squeeze.role": "pipeline", "squeeze.host": socket.gethostname(), "squeeze.pid": dead})
    alive = client.create_run(experiment_id, tags={"squeeze.role": "pipeline", "squeeze.host": socket.gethostname(), "squeeze.pid": str(os.getpid())})
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
        {"kind": "early_exit", "thresholds": [0.3], "also_teacher": True, "training": {"epochs": 3, "learning_rate": 3e-3, "batch_size": 16}},
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
        "teacher", "teacher>prune[0.5]",
        "teacher>early_exit[0.3]", "teacher>prune[0.5]>early_exit[0.3]",
        "teacher>onnx", "teacher>prune[0.5]>onnx",
        "teacher>onnx>int8-dynamic", "teacher>prune[0.5]>onnx>int8-dynamic",
        "teacher>early_exit[0.3]>int8-dynamic", "teacher>prune[0.5]>early_exit[0.3]>int8-dynamic",
    }
    pruned, teacher = by_lineage["teacher>prune[0.5]"], by_lineage["teacher"]
    assert pruned["stage"] == "prune" and pruned["metrics"]["params_m"] < teacher["metrics"]["params_m"]
    for lineage, v in by_lineage.items():
        if "early_exit" in lineage:
            assert v["format"] == "onnx-exit" and 1.0 <= v["metrics"]["mean_exit_layer"] <= 2.0
            assert {"latency_mean_ms", "parity_agreement"} <= set(v["metrics"])
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.`squeeze.stage` = 'early_exit'")
    assert len(runs) == 2 and all("mean_exit_layer" in r.data.metrics for r in runs)


def test_dask_runner_makes_the_variants_on_an_existing_scheduler(prefect_harness, tmp_path, tiny_model_dir):
    """runner.kind dask with dask_address: the stage tasks run in the cluster's worker processes, and the
    pipeline logs the same variants as with threads, all FINISHED."""
    from distributed import Client, LocalCluster

    tree = make_tiny_config(tmp_path, tiny_model_dir)
    tree["stages"] = [{"kind": "export"}, {"kind": "quantize", "modes": ["dynamic", "static"], "calibration_examples": 32}]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        tree["runner"] = {"kind": "dask", "dask_address": cluster.scheduler_address}
        result = run_compress(parse_config(tree))
        ran = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert not result["failed"]
    assert sorted(v["lineage"] for v in result["variants"]) == [
        "teacher", "teacher>onnx", "teacher>onnx>int8-dynamic", "teacher>onnx>int8-static",
    ]
    assert {"export_task", "quantize_task"} <= set(ran), ran
    runs = MlflowClient(tree["tracking"]["uri"]).search_runs([result["experiment_id"]])
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs)
