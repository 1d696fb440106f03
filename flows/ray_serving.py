"""`squeeze deploy`: registered models behind Ray Serve on 127.0.0.1. One deployment per model version (an arm),
each replica loading the model's own files (ONNX Runtime only, for an ONNX variant); a router in front splits the
traffic between the arms (A/B), refuses bad requests with a 4xx and a message, and records Prometheus metrics
(request latency, requests, errors, batch sizes, labelled accuracy) tagged with each arm's model version. Batches
form (`@serve.batch`) only for a model whose batched predictions were measured equal to its one-row ones."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from squeezeflow.tasks.base import StrictModel

LATENCY_BOUNDS_MS = [0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000]
BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64]


class ServeOptions(StrictModel):
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the endpoint (POST /).")
    metrics_port: int = Field(8080, ge=1, le=65535, description="Port of the Prometheus text metrics (/metrics).")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Largest batch a replica forms.")
    batch_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="How long a replica waits for a batch to fill once a row is waiting."
    )
    threads: int = Field(1, ge=1, le=64, description="Inference threads per replica (replicas do not share cores).")
    min_replicas: int = Field(1, ge=1, le=64, description="Replicas per arm when idle.")
    max_replicas: int = Field(1, ge=1, le=64, description="Replicas per arm under load (autoscaling above min).")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Requests in flight per replica that the autoscaler aims for."
    )
    scale_on_p99_ms: float | None = Field(
        None,
        gt=0,
        description="Scale on the replicas' p99 instead of requests in flight: add one above it, drop one below half.",
    )
    challenger: str | None = Field(None, description="A second model URI served beside the first (A/B).")
    challenger_share: float = Field(0.1, ge=0, le=1, description="Share of the requests sent to the challenger.")

    @model_validator(mode="after")
    def _replicas(self) -> ServeOptions:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        if self.port == self.metrics_port:
            raise ValueError(f"metrics_port is the same as port ({self.port}); give each its own")
        return self


@dataclass(frozen=True)
class ServedModel:
    """A registered model's files on this machine, and how the server may run it."""

    uri: str
    version: str
    path: str  # the model directory (ONNX file(s) or safetensors, and the tokenizer)
    format: str
    label_names: list[str]
    batched: bool  # batched predictions were measured equal to one-row ones


def local_model(directory: Path) -> ServedModel:
    """A model directory on this machine: a variant of artifacts/variants (e.g. the teacher) or any ONNX classifier
    exported with its tokenizer and config.json (e.g. a peer made by another tool), to load-test it under the same
    server. Served one row per call, as such figures are measured; labels from its config.json."""
    import json

    from squeezeflow.tasks.base import SqueezeError
    from squeezeflow.tasks.variant import Variant

    if (directory / "variant.json").exists():
        variant = Variant.model_validate_json((directory / "variant.json").read_text())
        version, model_format = variant.id, variant.format
    elif (directory / "model.onnx").exists():
        version, model_format = directory.name, "onnx"
    else:
        raise SqueezeError(f"{directory}: neither a variant (variant.json) nor an ONNX model directory (model.onnx)")
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").exists() else {}
    labels = config.get("id2label") or {}
    return ServedModel(
        uri=str(directory),
        version=version,
        path=str(directory),
        format=model_format,
        label_names=[labels[k] for k in sorted(labels, key=int)] if labels else [],
        batched=False,
    )


def fetch_model(uri: str, dst: Path) -> ServedModel:
    """Downloads `uri` (models:/NAME@alias, models:/NAME/VERSION, or a logged model's path) and reads its config;
    a model directory on this machine is served from where it is."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    from squeezeflow.tasks.base import SqueezeError

    if Path(uri).is_dir() and not (Path(uri) / "MLmodel").exists():
        return local_model(Path(uri))

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except (MlflowException, OSError) as e:
        raise SqueezeError(f"{uri}: cannot fetch the model ({str(e).splitlines()[0]})") from None
    if not (local / "MLmodel").exists():
        raise SqueezeError(f"{uri}: not an MLflow model (no MLmodel file); give models:/NAME@champion or similar")
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"].get("python_function") or {}
    config = flavor.get("config") or {}
    if "format" not in config or "model" not in (flavor.get("artifacts") or {}):
        raise SqueezeError(f"{uri}: not a squeezeflow champion (its pyfunc has no model format); register one first")
    version = config.get("variant_id", "?")
    if uri.startswith("models:/"):
        version = _registered_version(uri) or version
    return ServedModel(
        uri=uri,
        version=version,
        path=str(local / flavor["artifacts"]["model"]["path"]),
        format=config["format"],
        label_names=list(config["label_names"]),
        batched=config.get("batch_policy") == "batched",
    )


def _registered_version(uri: str) -> str | None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, _, ref = uri.removeprefix("models:/").partition("@")
    try:
        if ref:
            return f"{name} v{MlflowClient().get_model_version_by_alias(name, ref).version}"
        name, _, number = uri.removeprefix("models:/").partition("/")
        return f"{name} v{number}"
    except MlflowException:
        return None


def checked_request(body) -> tuple[list[str], list[int] | None]:
    """The texts (and optional true label ids) of a request; a malformed one raises ValueError with the reason."""
    if not isinstance(body, dict) or "texts" not in body:
        raise ValueError('expected a JSON object {"texts": ["...", ...]} (optionally with "labels": [id, ...])')
    unknown = set(body) - {"texts", "labels"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; send texts (and optionally labels)")
    texts = body["texts"]
    if not isinstance(texts, list) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            problem = "null" if text is None else "not a string" if not isinstance(text, str) else "empty"
            raise ValueError(f"texts[{row}] is {problem} ({text!r}): send a non-empty string per row")
    labels = body.get("labels")
    if labels is not None and (
        not isinstance(labels, list) or len(labels) != len(texts) or not all(isinstance(x, int) for x in labels)
    ):
        raise ValueError("labels must be a list of class ids, one per text")
    return texts, labels


P99_WINDOW = 500  # requests per replica that its p99 is taken over
SCALE_COOLDOWN_S = 10.0  # a p99 policy's decisions are this far apart, so a new replica is seen before the next


class P99Policy:
    """Ray Serve custom autoscaling policy: one replica more while the worst replica's p99 is above the target, one
    fewer while it is under half of it, within the configured bounds."""

    def __init__(self, target_p99_ms: float) -> None:
        self.target = target_p99_ms

    def __call__(self, ctx) -> tuple[int, dict]:
        state = dict(ctx.policy_state or {})
        now = ctx.current_time or time.time()
        p99 = max((ctx.aggregated_metrics or {}).get("p99_ms", {}).values(), default=0.0)
        replicas = ctx.current_num_replicas
        if now - state.get("decided_at", 0.0) >= SCALE_COOLDOWN_S:
            if p99 > self.target:
                replicas, state["decided_at"] = replicas + 1, now
            elif p99 < self.target / 2 and replicas > 1:
                replicas, state["decided_at"] = replicas - 1, now
        bounded = min(max(replicas, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
        return bounded, state


def classifier_deployment(options: ServeOptions):
    """The Ray Serve deployment class of one arm, with the options' replicas, autoscaling and batching."""
    from ray import serve

    autoscaling = (
        {
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
        }
        if options.max_replicas > options.min_replicas
        else None
    )
    if autoscaling and options.scale_on_p99_ms:
        autoscaling["policy"] = {
            "policy_function": f"{__name__}:P99Policy",
            "policy_kwargs": {"target_p99_ms": options.scale_on_p99_ms},
        }

    @serve.deployment(
        num_replicas=None if autoscaling else options.min_replicas,
        autoscaling_config=autoscaling,
        # a replica's inference threads are its share of the cores, so replicas do not fight over them
        ray_actor_options={"num_cpus": options.threads},
    )
    class Classifier:
        def __init__(self, model: ServedModel, arm: str, entry: bool = False) -> None:
            from ray.util import metrics

            from squeezeflow.tasks.runtime import load_predictor

            self.model, self.tags = model, {"model_version": model.version, "arm": arm}
            self.intake = Intake() if entry else None  # the lone arm takes the HTTP requests itself
            self.predictor = load_predictor(model.path, model.format, options.threads)
            self.batch_sizes = metrics.Histogram(
                "squeeze_batch_size", "Rows per model call", boundaries=BATCH_BOUNDS, tag_keys=tuple(self.tags)
            )
            self.batch_sizes.set_default_tags(self.tags)
            self.recent_ms: collections.deque[float] = collections.deque(maxlen=P99_WINDOW)

        def record_autoscaling_stats(self) -> dict[str, float]:
            """What the p99 policy reads: this replica's p99 over its recent requests (Ray Serve calls it)."""
            import numpy as np

            return {"p99_ms": float(np.percentile(self.recent_ms, 99)) if self.recent_ms else 0.0}

        def _run(self, texts: list[str]):
            import numpy as np

            from squeezeflow.tasks.runtime import softmax

            self.batch_sizes.observe(len(texts))
            return softmax(np.asarray(self.predictor.logits(texts)))

        @serve.batch(max_batch_size=options.max_batch_size, batch_wait_timeout_s=options.batch_wait_ms / 1000)
        async def _batched(self, texts: list[str]) -> list:
            return list(self._run(texts))

        async def predict(self, texts: list[str]) -> list[dict]:
            started = time.perf_counter()
            if self.model.batched:  # rows of concurrent requests share a model call
                rows = await asyncio.gather(*[self._batched(text) for text in texts])
            else:  # one row per call, as this model's figures were measured
                rows = [self._run([text])[0] for text in texts]
            self.recent_ms.append((time.perf_counter() - started) * 1000)
            return [
                {
                    "label": self.model.label_names[int(p.argmax())],
                    "label_id": int(p.argmax()),
                    "score": float(p.max()),
                    "probabilities": [float(x) for x in p],
                }
                for p in rows
            ]

        async def __call__(self, request):
            return await self.intake.answer(
                request, lambda: (self.predict, self.tags["model_version"], self.tags["arm"])
            )

    return Classifier


class Intake:
    """Reads a request, has an arm answer it, and records what the metrics need per arm: the application's entry,
    in the router when there are several arms and in the lone arm's replicas otherwise (one hop less)."""

    def __init__(self) -> None:
        from ray.util import metrics

        keys = ("model_version", "arm")
        self.latency = metrics.Histogram(
            "squeeze_request_latency_ms", "End-to-end latency of a request", LATENCY_BOUNDS_MS, tag_keys=keys
        )
        self.requests = metrics.Counter("squeeze_requests", "Requests answered", tag_keys=keys)
        self.errors = metrics.Counter("squeeze_errors", "Requests refused or failed", tag_keys=("reason",))
        self.labelled = metrics.Counter("squeeze_labelled_rows", "Rows sent with their true label", tag_keys=keys)
        self.correct = metrics.Counter("squeeze_correct_rows", "Labelled rows predicted right", tag_keys=keys)

    async def answer(self, request, choose):
        """`choose()` gives the arm for this request: (an async predict(texts), model version, arm name)."""
        from starlette.responses import JSONResponse

        started = time.perf_counter()
        try:
            texts, labels = checked_request(json.loads(await request.body()))
        except json.JSONDecodeError as e:
            self.errors.inc(tags={"reason": "bad_request"})
            return JSONResponse({"error": f"the body is not JSON ({e})"}, status_code=400)
        except ValueError as e:
            self.errors.inc(tags={"reason": "bad_request"})
            return JSONResponse({"error": str(e)}, status_code=400)
        predict, version, arm = choose()
        tags = {"model_version": version, "arm": arm}
        try:
            predictions = await predict(texts)
        except Exception as e:
            self.errors.inc(tags={"reason": "model_error"})
            return JSONResponse({"error": f"the model failed: {type(e).__name__}"}, status_code=500)
        if labels is not None:
            self.labelled.inc(len(labels), tags=tags)
            right = sum(p["label_id"] == y for p, y in zip(predictions, labels))
            if right:  # a Ray counter takes only positive steps
                self.correct.inc(right, tags=tags)
        self.requests.inc(tags=tags)
        self.latency.observe((time.perf_counter() - started) * 1000, tags=tags)
        return {"predictions": predictions, "model_version": version, "arm": arm}


def router_deployment():
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(ray_actor_options={"num_cpus": 0})  # it only waits on the arms: no core of its own
    class Router:
        """Chooses an arm per request by its share."""

        def __init__(self, arms: list[tuple], seed: int = 0) -> None:
            self.arms = arms  # (handle, share, version, arm name)
            self.random = random.Random(seed)
            self.intake = Intake()

        def _choose(self):
            handle, _, version, arm = self.random.choices(self.arms, weights=[a[1] for a in self.arms])[0]
            return handle.predict.remote, version, arm

        async def __call__(self, request: Request):
            return await self.intake.answer(request, self._choose)

    return Router


def build_app(models: list[tuple[ServedModel, float, str]], options: ServeOptions):
    """The application: one Classifier deployment per arm (model, share, arm name) behind the Router; a lone arm
    answers HTTP itself (a hop through a router costs ~7 ms here: `python -m bench.serve_overhead`)."""
    classifier = classifier_deployment(options)
    if len(models) == 1:
        (model, _, name), *_ = models
        return classifier.options(name=f"classifier-{name}").bind(model, name, entry=True)
    arms = [
        (classifier.options(name=f"classifier-{name}").bind(model, name), share, model.version, name)
        for model, share, name in models
    ]
    return router_deployment().bind(arms)


def start(models: list[tuple[ServedModel, float, str]], options: ServeOptions) -> None:
    """Starts a local Ray (its metrics on `metrics_port`) and the application on 127.0.0.1:`port`."""
    import ray
    from ray import serve

    ray.init(
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        _metrics_export_port=options.metrics_port,  # the metrics agent's Prometheus port (`ray start` names it so)
    )
    serve.start(http_options={"host": "127.0.0.1", "port": options.port})
    serve.run(build_app(models, options), name="squeezeflow", route_prefix="/")


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
