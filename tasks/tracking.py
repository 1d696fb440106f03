"""Every MLflow write of a pipeline: the experiment, one child run per variant, the champion in the registry.
These functions are called from the flow's own thread only (sqlite allows one writer at a time)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from .base import StrictModel
from .variant import Variant

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("squeezeflow.tracking")

SERVING_CODE = Path(__file__).with_name("serving.py")
# what the served pyfunc imports from this package: logged with the model as its code, so that it serves in an
# environment made from its requirements alone, without squeezeflow installed
SERVED_MODULES = ("__init__.py", "base.py", "runtime.py")


class TrackingConfig(StrictModel):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default: the file mlflow.db in artifacts_dir (sqlite)."
    )
    experiment: str | None = Field(None, description="MLflow experiment; default: the config's name.")
    registered_model: str | None = Field(
        None, description="Registry name for the champion; default: squeezeflow- followed by the recipe name."
    )


def tracking_uri(cfg: TrackingConfig, artifacts_dir: Path) -> str:
    return cfg.uri or f"sqlite:///{Path(artifacts_dir).resolve() / 'mlflow.db'}"


def store_lock(uri: str, artifacts_dir: Path, purpose: str):
    """A lock shared by every pipeline on this machine that uses the store at `uri` (beside a sqlite file, else in
    artifacts_dir): `purpose` names what it serialises."""
    from filelock import FileLock

    where = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path(artifacts_dir)
    where.mkdir(parents=True, exist_ok=True)
    return FileLock(str(where / f".mlflow-{re.sub(r'[^A-Za-z0-9_.-]', '_', purpose)}.lock"))


def use_experiment(uri: str, name: str, artifacts_dir: Path) -> str:
    """Points MLflow at `uri` and returns the experiment id, creating it with artifacts beside the store. One
    process at a time: two runs creating a new sqlite store at once race on its schema migration."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with store_lock(uri, artifacts_dir, "store"):
        client = MlflowClient(uri)
        existing = client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        location = (Path(artifacts_dir).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        return client.create_experiment(name, artifact_location=location)


def close_abandoned_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Pipeline runs left RUNNING by a process that no longer exists on this host (a crash, `kill -9`) are
    marked KILLED; returns their ids. Runs of live processes, or of other hosts, are left alone."""
    import os
    import socket

    closed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get("squeeze.host") != socket.gethostname() or not tags.get("squeeze.pid", "").isdigit():
            continue
        try:
            os.kill(int(tags["squeeze.pid"]), 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed


def _flat_params(params: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out |= _flat_params(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def variant_tags(v: Variant) -> dict[str, str]:
    return {
        "squeeze.role": "variant",
        "squeeze.variant_id": v.id,
        "squeeze.parent_id": v.parent_id or "",
        "squeeze.stage": v.stage,
        "squeeze.lineage": v.lineage,
        "squeeze.format": v.format,
    }


def log_variant(client: MlflowClient, experiment_id: str, pipeline_run_id: str, v: Variant) -> str:
    """One finished child run for a measured variant; returns its run id."""
    from mlflow.entities import Metric, Param, RunTag

    # the run spans the variant's making (training included), so MLflow's duration column says how long it took
    start_ms = int((v.made_at - v.made_seconds) * 1000) if v.made_at and v.made_seconds is not None else None
    run = client.create_run(
        experiment_id,
        run_name=v.id,
        start_time=start_ms,
        tags={"mlflow.parentRunId": pipeline_run_id, **variant_tags(v)},
    )
    made = {"made_seconds": v.made_seconds} if v.made_seconds is not None else {}
    try:
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, float(val), 0, 0) for k, val in sorted({**v.metrics, **made}.items())],
            params=[Param(k, val[:6000]) for k, val in _flat_params(v.params).items()],
            tags=[RunTag("squeeze.path", v.path)],
        )
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED", end_time=int(v.made_at * 1000) if start_ms else None)
    return run.info.run_id


def log_failed_variant(
    client: MlflowClient,
    experiment_id: str,
    pipeline_run_id: str,
    parent: Variant,
    stage: str,
    lineage: str,
    error: str,
) -> str:
    """A FAILED child run for a variant whose stage raised, carrying the error."""
    run = client.create_run(
        experiment_id,
        run_name=f"failed: {lineage.rsplit('>', 1)[-1]}",
        tags={
            "mlflow.parentRunId": pipeline_run_id,
            "squeeze.role": "variant",
            "squeeze.parent_id": parent.id,
            "squeeze.stage": stage,
            "squeeze.lineage": lineage,
            "squeeze.error": error[:5000],
        },
    )
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


def fetch_incumbent(registered_model: str, dst: Path, label_names: list[str]) -> tuple[Variant, str] | None:
    """The model behind the registry's `champion` alias as a variant (and its version), so the new candidate can
    be measured against it in the same benchmark; None when there is none or it predicts other classes."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        version = MlflowClient().get_model_version_by_alias(registered_model, "champion")
    except MlflowException:
        return None
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{registered_model}@champion", dst_path=str(dst))
    )
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    config = flavor.get("config") or {}
    if list(config.get("label_names", [])) != list(label_names):
        log.warning("the current champion of %s predicts other classes; it is not compared", registered_model)
        return None
    tags = version.tags
    variant = Variant(
        id=f"champion-v{version.version}",
        stage=tags.get("squeeze.stage", "export"),
        lineage=f"champion v{version.version}: {tags.get('squeeze.lineage', '?')}",
        format=config["format"],
        path=str(local / flavor["artifacts"]["model"]["path"]),
        params={"registered_version": str(version.version), "variant_id": tags.get("squeeze.variant_id")},
    )
    return variant, str(version.version)


def version_description(v: Variant, why: str, previous: str | None) -> str:
    """What a registered version is, how it measured and why it was promoted: shown on its page in the registry."""
    m = v.metrics

    def figure(name: str, fmt: str) -> str:
        return format(m[name], fmt) if name in m else "?"

    interval = f" [{m['accuracy_ci_low']:.4f}, {m['accuracy_ci_high']:.4f}]" if "accuracy_ci_low" in m else ""
    return (
        f"{v.lineage} (variant {v.id}, {v.format}).\n"
        f"Validation accuracy {figure('val_accuracy', '.4f')} (drop {figure('val_accuracy_drop', '+.4f')}); "
        f"eval accuracy {figure('accuracy', '.4f')}{interval}; p50 {figure('latency_p50_ms', '.2f')} ms, "
        f"p99 {figure('latency_p99_ms', '.2f')} ms at batch 1; {figure('size_mb', '.1f')} MB; "
        f"{figure('speedup', '.2f')}× the PyTorch teacher.\n"
        f"Promoted because: {why}" + (f"; it replaces version {previous} (now @previous)." if previous else ".")
    )


def batch_policy(v: Variant) -> str:
    """ "batched" when the benchmark found the variant's batched predictions equal to its one-row ones (and it is not
    an early-exit model, whose exits are taken per row); else "per_row", the way its figures were measured."""
    agrees = v.metrics.get("batch_agreement") == 1.0
    return "batched" if agrees and v.format != "onnx-exit" else "per_row"


def register_champion(
    v: Variant,
    registered_model: str,
    label_names: list[str],
    threads: int,
    previous: str | None = None,
    why: str = "",
) -> str:
    """Logs the champion as a code-defined pyfunc in the active pipeline run, registers it with a description
    (lineage, figures, `why`) and points the `champion` alias at the new version (and `previous` at the one it
    replaces); returns the version."""
    import mlflow
    import numpy
    import onnxruntime
    import pandas
    import pydantic
    import tokenizers
    from mlflow.models.signature import ModelSignature
    from mlflow.tracking import MlflowClient
    from mlflow.types import ColSpec, Schema

    requirements = [
        f"mlflow=={mlflow.__version__}",
        f"tokenizers=={tokenizers.__version__}",
        f"pandas=={pandas.__version__}",
        f"numpy=={numpy.__version__}",
        f"pydantic=={pydantic.__version__}",
    ]
    if v.format != "hf":
        requirements.append(f"onnxruntime=={onnxruntime.__version__}")
    else:
        import torch
        import transformers

        requirements += [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as code:
        package = Path(code) / "squeezeflow" / "tasks"
        package.mkdir(parents=True)
        for name in SERVED_MODULES:
            shutil.copy2(SERVING_CODE.with_name(name), package / name)
        # MLflow nags about type hints and input examples; the signature below is explicit
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            code_paths=[str(Path(code) / "squeezeflow")],
            name="champion",
            python_model=str(SERVING_CODE),
            artifacts={"model": v.path},
            # how a server may call it: batched only where batched predictions were measured equal to one-row ones
            model_config={
                "format": v.format,
                "label_names": label_names,
                "threads": threads,
                "variant_id": v.id,
                "batch_policy": batch_policy(v),
            },
            signature=ModelSignature(inputs=Schema([ColSpec("string", "text")])),
            pip_requirements=requirements,
            registered_model_name=registered_model,
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.update_model_version(registered_model, version, description=version_description(v, why, previous))
    client.set_registered_model_alias(registered_model, "champion", version)
    if previous is not None:
        client.set_registered_model_alias(registered_model, "previous", previous)
    for key, value in {"squeeze.variant_id": v.id, "squeeze.lineage": v.lineage, "squeeze.stage": v.stage}.items():
        client.set_model_version_tag(registered_model, version, key, value)
    return version
