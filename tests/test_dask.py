"""The stage tasks on a Dask cluster: the same variants as with threads, and a worker killed mid-task loses nothing."""

from mlflow.tracking import MlflowClient

from squeezeflow.flows.compress import run_compress
from squeezeflow.flows.config import parse_config

from .conftest import make_tiny_config


def test_dask_runner_makes_the_variants_on_an_existing_scheduler(prefect_harness, tmp_path, tiny_model_dir):
    """runner.kind dask with dask_address: the stage tasks run in the cluster's worker processes, and the
    pipeline logs the same variants as with threads, all FINISHED."""
    from distributed import Client, LocalCluster

    tree = make_tiny_config(tmp_path, tiny_model_dir)
    tree["stages"] = [
        {"kind": "export"},
        {"kind": "quantize", "modes": ["dynamic", "static"], "calibration_examples": 32},
    ]
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        tree["runner"] = {"kind": "dask", "dask_address": cluster.scheduler_address}
        result = run_compress(parse_config(tree))
        ran = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert not result["failed"]
    assert sorted(v["lineage"] for v in result["variants"]) == [
        "teacher",
        "teacher>onnx",
        "teacher>onnx>int8-dynamic",
        "teacher>onnx>int8-static",
    ]
    assert {"export_task", "quantize_task"} <= set(ran), ran
    runs = MlflowClient(tree["tracking"]["uri"]).search_runs([result["experiment_id"]])
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs)


def test_a_dask_worker_killed_mid_training_loses_nothing(prefect_harness, tmp_path, tiny_model_dir):
    """kill -9 of the Dask worker that is distilling a student: the scheduler hands the task to a fresh worker, which
    makes the variant from scratch (the dead worker's scratch directory is removed); the run finishes with every
    variant, none RUNNING, and every stored variant complete."""
    import os
    import signal
    import threading

    from distributed import Client, LocalCluster

    from squeezeflow.tasks.variant import Variant, finished

    from .conftest import wait_for

    tree = make_tiny_config(tmp_path, tiny_model_dir)
    tree["stages"] = [
        {"kind": "distill", "students": [{"num_layers": 1}], "training": {"epochs": 30, "batch_size": 8}},
        {"kind": "export"},
        {"kind": "quantize", "modes": ["dynamic"]},
    ]
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        tree["runner"] = {"kind": "dask", "dask_address": cluster.scheduler_address}
        outcome = {}
        flow = threading.Thread(target=lambda: outcome.update(result=run_compress(parse_config(tree))))
        flow.start()

        def distilling_worker():
            busy = [w for w, keys in client.processing().items() if any("distill" in str(k) for k in keys)]
            return busy[0] if busy else None

        worker = wait_for(distilling_worker, 300, "a worker to start distilling")
        scratch_dirs = lambda: list((tmp_path / "artifacts" / "variants").glob(".distill-*.*"))  # noqa: E731
        os.kill(client.run(os.getpid, workers=[worker])[worker], signal.SIGKILL)
        flow.join(timeout=600)
        assert worker not in client.scheduler_info()["workers"]  # it died; its nanny started another
    result = outcome["result"]
    assert not result["failed"], result["failed"]
    assert sorted(v["lineage"].split(">")[-1] for v in result["variants"]) == [
        "distill[L1]",
        "int8-dynamic",
        "int8-dynamic",
        "onnx",
        "onnx",
        "teacher",
    ]
    runs = MlflowClient(tree["tracking"]["uri"]).search_runs([result["experiment_id"]])
    assert {r.info.status for r in runs} == {"FINISHED"}
    for v in result["variants"]:
        assert finished(Variant.model_validate(v)) is not None, v["lineage"]  # complete, hash-checked
    assert [d for d in scratch_dirs() if d.is_dir()] == []
