"""`squeeze deploy`: the tiny classifier alone, then two registered versions of it (A/B), behind a real Ray Serve
on 127.0.0.1, answered as the pyfunc answers, batched only for the model whose batching was measured, refusing bad
requests, exposing Prometheus metrics, stopped cleanly; `squeeze ab` and `squeeze loadtest` read and load it."""

import contextlib
import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

from squeezeflow.flows.ab import compare_arms
from squeezeflow.tasks.export import ExportConfig, export
from squeezeflow.tasks.quantize import QuantizeConfig, quantize
from squeezeflow.tasks.tracking import log_variant, register_champion
from squeezeflow.tasks.variant import StageContext

from .conftest import free_port, sentiment_rows, wait_for, write_tsv
from .test_cli import SQUEEZE, recipe, squeeze

TEXTS = [text for text, _ in sentiment_rows(40, seed=5)]


@pytest.fixture(scope="module")
def registry(trained_tiny, tmp_path_factory):
    """models:/tiny@previous: fp32 ONNX, measured batch-invariant; models:/tiny@champion: dynamic INT8, per row."""
    teacher, data = trained_tiny
    root = tmp_path_factory.mktemp("serving")
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher)
    fp32 = export(teacher, ExportConfig(), root / "variants").with_metrics(batch_agreement=1.0)
    int8 = quantize(fp32, "dynamic", QuantizeConfig(), ctx, root / "variants").with_metrics(batch_agreement=0.98)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("tiny", artifact_location=str(root / "mlartifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        log_variant(MlflowClient(), experiment, run.info.run_id, int8)
        first = register_champion(fp32, "tiny", ["neg", "pos"], 1)
        register_champion(int8, "tiny", ["neg", "pos"], 1, previous=first)
    recipe_tree = {
        "name": "tiny",
        "model": {"source": teacher.path, "num_labels": 2, "max_length": 32},
        "data": {"train": str(data.train), "eval": str(write_tsv(root / "eval.tsv", sentiment_rows(30, seed=9)))},
        "artifacts_dir": str(root / "artifacts"),
    }
    return uri, recipe_tree


def post(port: int, body) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/", data=raw, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except json.JSONDecodeError:  # Ray's proxy, not the application (e.g. while it starts)
            return e.code, {"error": raw.decode(errors="replace")}


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def metrics_with(port: int, name: str) -> str | None:
    """The metrics text once it holds `name` (Ray exports every few seconds)."""
    text = metrics(port)
    return text if name in text else None


def batch_sizes(text: str) -> dict[str, dict[float, float]]:
    """Cumulative batch-size histogram per arm, summed over replicas."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.removeprefix("ray_") == "squeeze_batch_size_bucket":
                arm = out.setdefault(s.labels["arm"], {})
                arm[float(s.labels["le"])] = arm.get(float(s.labels["le"]), 0) + s.value
    return out


@contextlib.contextmanager
def deployed(uri: str, *args: str):
    """`squeeze deploy` on free ports, answering; on leaving, SIGTERM must stop it and everything it started."""
    port, metrics_port = free_port(), free_port()
    server = subprocess.Popen(
        [SQUEEZE, "deploy", *args, "--port", str(port), "--metrics-port", str(metrics_port), "--tracking-uri", uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: post(port, {"texts": ["warm up"]})[0] == 200, 240, "the Ray Serve endpoint")
        descendants = psutil.Process(server.pid).children(recursive=True)
        yield port, metrics_port
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=120)
        assert server.returncode == 0 and "stopped" in output, output[-2000:]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(p.is_running() for p in descendants):
            time.sleep(0.5)
        alive = [
            " ".join(p.cmdline())[:120] for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]
        assert alive == []
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def expected_labels(uri: str, alias: str, texts: list[str]) -> list[str]:
    mlflow.set_tracking_uri(uri)
    return list(mlflow.pyfunc.load_model(f"models:/tiny@{alias}").predict(pd.DataFrame({"text": texts}))["label"])


def test_a_lone_model_answers_in_one_hop_batches_refuses_bad_requests_and_is_load_tested(registry, tmp_path):
    uri, recipe_tree = registry
    with deployed(uri, "models:/tiny@previous", "--max-batch-size", "8", "--batch-wait-ms", "20") as (port, mport):
        # the pyfunc's answers
        status, answer = post(port, {"texts": TEXTS[:8]})
        assert status == 200, answer
        assert [p["label"] for p in answer["predictions"]] == expected_labels(uri, "previous", TEXTS[:8])
        assert set(answer["predictions"][0]) == {"label", "label_id", "score", "probabilities"}

        # under concurrency the rows of concurrent requests share model calls (this model's batching was measured)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda t: post(port, {"texts": [t], "labels": [1]}), TEXTS * 4))
        sizes = wait_for(lambda: batch_sizes(metrics(mport)).get("a"), 60, "the batch-size metric")
        assert sizes[float("inf")] > sizes[1.0], "no batch was formed"

        # bad requests: a 4xx with the reason
        for body, fragment in [
            (b"", "not JSON"),
            ({"text": ["x"]}, "expected a JSON object"),
            ({"texts": [None]}, "texts[0] is null"),
            ({"texts": []}, "non-empty list"),
        ]:
            status, answer = post(port, body)
            assert status == 400 and fragment in answer["error"], (body, status, answer)

        # metrics: the latency histogram; one deployment answers HTTP itself (no router hop)
        text = wait_for(lambda: metrics_with(mport, "squeeze_request_latency_ms_bucket"), 60, "the latency metric")
        deployments = set(re.findall(r'deployment="([^"]+)"', text))
        assert deployments == {"classifier-a"}, deployments

        # a short load test, logged to the registered variant's run
        done = squeeze(
            "loadtest", recipe(tmp_path, recipe_tree), "--url", f"http://127.0.0.1:{port}", "--concurrency", "1,2",
            "--seconds", "2", "--model-uri", "models:/tiny@champion", "--tracking-uri", uri,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "QPS at p99" in done.stdout and "logged to the variant run" in done.stdout
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("tiny").experiment_id
        logged = client.search_runs([experiment], filter_string="tags.`squeeze.role` = 'variant'")[0].data.metrics
        assert {"serve_qps_at_p99", "serve_p99_ms_at_c1", "serve_p99_ms_at_c2"} <= set(logged)


def test_two_versions_share_the_endpoint_each_arm_labelled_and_compared(registry):
    uri, _ = registry
    args = ["models:/tiny@previous", "--challenger", "models:/tiny@champion", "--challenger-share", "0.5"]
    with deployed(uri, *args, "--max-batch-size", "8", "--batch-wait-ms", "20") as (port, mport):
        # both arms get traffic, each answering as its own pyfunc
        expected = {"a": expected_labels(uri, "previous", TEXTS[:8]), "b": expected_labels(uri, "champion", TEXTS[:8])}
        arms_seen = set()
        for _ in range(12):
            status, answer = post(port, {"texts": TEXTS[:8]})
            assert status == 200, answer
            arms_seen.add(answer["arm"])
            assert [p["label"] for p in answer["predictions"]] == expected[answer["arm"]]
        assert arms_seen == {"a", "b"}

        # under concurrency the batch-invariant arm forms batches; the per-row arm never does
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda t: post(port, {"texts": [t], "labels": [1]}), TEXTS * 4))

        def both_arms_counted():
            sizes = batch_sizes(metrics(mport))
            return sizes if {"a", "b"} <= set(sizes) else None

        sizes = wait_for(both_arms_counted, 60, "the batch-size metrics of both arms")
        assert sizes["a"][float("inf")] > sizes["a"][1.0], "arm a (batched) never formed a batch"
        assert sizes["b"][float("inf")] == sizes["b"][1.0], "arm b (per row) was batched"

        # per-arm metrics: the A/B comparison reads them
        text = wait_for(lambda: metrics_with(mport, "squeeze_correct_rows"), 60, "the labelled-rows metrics")
        arms, verdict = compare_arms(text)
        assert {a["arm"] for a in arms} == {"a", "b"} and all(a["labelled"] for a in arms)
        assert {a["model_version"] for a in arms} == {"tiny v1", "tiny v2"}
        assert "latency: arm" in verdict
        done = squeeze("ab", f"http://127.0.0.1:{mport}/metrics")
        assert done.returncode == 0 and "tiny v2" in done.stdout, done.stderr


def test_the_p99_policy_adds_a_replica_above_the_target_and_drops_one_well_below_it():
    from types import SimpleNamespace

    from squeezeflow.flows.ray_serving import SCALE_COOLDOWN_S, P99Policy

    policy = P99Policy(target_p99_ms=10)

    def decide(p99s, replicas, state=None, now=1000.0):
        ctx = SimpleNamespace(
            aggregated_metrics={"p99_ms": dict(enumerate(p99s))},
            current_num_replicas=replicas,
            capacity_adjusted_min_replicas=1,
            capacity_adjusted_max_replicas=3,
            policy_state=state or {},
            current_time=now,
        )
        return policy(ctx)

    assert decide([4, 12], 1)[0] == 2  # the worst replica decides
    assert decide([6, 7], 2)[0] == 2  # between half the target and the target: stay
    assert decide([2, 3], 2)[0] == 1
    assert decide([50], 3)[0] == 3  # never above the bound
    replicas, state = decide([12], 1)
    assert decide([12], replicas, state, now=1000 + SCALE_COOLDOWN_S / 2)[0] == replicas  # cooling down
    assert decide([], 2)[0] == 1  # no traffic: scale in


def test_deploy_and_loadtest_mistakes_are_one_line_before_ray_starts(registry, tmp_path):
    from .test_cli import assert_one_line_error

    uri, recipe_tree = registry
    nowhere = f"http://127.0.0.1:{free_port()}"
    done = squeeze("loadtest", recipe(tmp_path, recipe_tree), "--url", nowhere, "--seconds", "1")
    assert_one_line_error(done, f"--url {nowhere}: nothing usable answers there")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    with busy:
        done = squeeze("deploy", "models:/tiny@champion", "--port", str(port), "--tracking-uri", uri)
    assert_one_line_error(done, f"--port: 127.0.0.1:{port} is in use by another process")
    done = squeeze("deploy", "models:/tiny@champion", "--port", "8123", "--metrics-port", "8123", "--tracking-uri", uri)
    assert_one_line_error(done, "--metrics-port is the same as port (8123)")
    assert_one_line_error(squeeze("deploy", "models:/nope@champion", "--tracking-uri", uri), "models:/nope@champion")
    done = squeeze(
        "deploy", "models:/tiny@champion", "--min-replicas", "3", "--max-replicas", "2", "--tracking-uri", uri
    )
    assert_one_line_error(done, "--max-replicas (2) is below min-replicas (3)")


def test_qps_at_the_p99_target_counts_only_levels_without_failures():
    from squeezeflow.flows.loadtest import qps_at_p99

    levels = [
        {"users": 1, "qps": 90.0, "p99_ms": 8.0, "failures": 0},
        {"users": 2, "qps": 150.0, "p99_ms": 9.0, "failures": 3},
        {"users": 4, "qps": 170.0, "p99_ms": 14.0, "failures": 0},
    ]
    assert qps_at_p99(levels, 10.0) == 90.0
    assert qps_at_p99(levels, 5.0) == 0.0


def test_a_model_directory_is_served_from_where_it_is(tmp_path):
    from squeezeflow.flows.ray_serving import fetch_model
    from squeezeflow.tasks.base import SqueezeError

    peer = tmp_path / "optimum-int8"  # an ONNX classifier made by another tool: no variant.json
    peer.mkdir()
    (peer / "model.onnx").write_bytes(b"")
    (peer / "config.json").write_text(json.dumps({"id2label": {"1": "pos", "0": "neg"}}))
    served = fetch_model(str(peer), tmp_path / "unused")
    assert (served.format, served.version, served.label_names, served.batched) == (
        "onnx",
        "optimum-int8",
        ["neg", "pos"],
        False,
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(SqueezeError, match="neither a variant .* nor an ONNX model directory"):
        fetch_model(str(tmp_path / "empty"), tmp_path / "unused")
