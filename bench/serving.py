"""Served figures: each model behind the same `squeeze deploy` server, loaded by the same Locust load at rising
concurrency; one table of QPS, p50 and p99. `--optimum-peer-of TEACHER` adds the peer a user of Optimum would serve
instead (the teacher exported, ORTOptimizer O2, ORTQuantizer dynamic INT8, as bench/sst2.py makes it);
`--mlflow-serve URI` adds a registered model behind `mlflow models serve` (one process, the logged pyfunc), as a user of
the Model Registry would serve it.

    python -m bench.serving configs/trec.yaml models:/squeezeflow-trec@champion artifacts/variants/teacher-668664 \
        --optimum-peer-of artifacts/variants/teacher-668664 --concurrency 1,2,4,8 --seconds 15
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from squeezeflow.flows.config import read_recipe
from squeezeflow.flows.loadtest import qps_at_p99, run_level
from squeezeflow.flows.space import recipe_config
from squeezeflow.tasks.data import read_split
from squeezeflow.tasks.evaluate import machine

SQUEEZE = str(Path(sys.executable).with_name("squeeze"))


def ready(url: str, body: dict, seconds: float) -> None:
    """Waits until a POST of `body` to `url` is answered."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=10).read()
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f}s")


def measure(command: list[str], url: str, rows, levels, seconds, protocol: str = "squeeze") -> list[dict]:
    """Starts a server, loads it at each level, stops it."""
    # the venv's bin first: mlflow models serve starts `uvicorn` by name
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    try:
        if protocol == "mlflow":
            ready(url + "/invocations", {"dataframe_split": {"columns": ["text"], "data": [["hello"]]}}, 300)
        else:
            ready(url + "/", {"texts": ["hello"]}, 300)
        return [run_level(url, rows, users, seconds, protocol) for users in levels]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)


def deploy_command(model: str, port: int, tracking_uri: str | None = None) -> list[str]:
    """`squeeze deploy` of a model URI or directory on `port` (metrics on port + 80)."""
    command = [SQUEEZE, "deploy", model, "--port", str(port), "--metrics-port", str(port + 80)]
    return command + (["--tracking-uri", tracking_uri] if tracking_uri else [])


def optimum_peer(teacher_dir: Path, root: Path) -> Path:
    """The teacher's Optimum dynamic INT8 peer (made once per teacher, kept under its directory name)."""
    import shutil

    from bench.sst2 import OPTIMUM, ORT_FP32, peer_optimum_dynamic, peer_ort_fp32

    root = root / teacher_dir.name
    if not (root / OPTIMUM / "done").exists():
        for name in (ORT_FP32, OPTIMUM):
            shutil.rmtree(root / name, ignore_errors=True)
        (root / OPTIMUM).parent.mkdir(parents=True, exist_ok=True)
        peer_ort_fp32(teacher_dir, root / ORT_FP32)
        peer_optimum_dynamic(root / ORT_FP32, root / OPTIMUM)
        (root / OPTIMUM / "done").write_text("made\n")
    return root / OPTIMUM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="the recipe whose eval texts are sent")
    parser.add_argument("models", nargs="+", help="model URIs or model directories, each served by squeeze deploy")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--target-p99-ms", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--optimum-peer-of", type=Path, help="a teacher variant directory: serve its Optimum INT8 too")
    parser.add_argument("--peers-dir", type=Path, default=Path("bench-out/serving-peers"))
    parser.add_argument(
        "--tracking-uri", help="the MLflow store models:/ URIs are read from (default: squeeze deploy's)"
    )
    parser.add_argument(
        "--mlflow-serve", help="a model URI: also serve it with mlflow models serve (--env-manager local)"
    )
    args = parser.parse_args()
    cfg = recipe_config(read_recipe(args.recipe), args.recipe)
    if args.optimum_peer_of:
        args.models.append(str(optimum_peer(args.optimum_peer_of, args.peers_dir)))
    split = read_split(cfg.data, "eval", cfg.model.num_labels)
    rows, levels = list(zip(split.texts, split.labels)), [int(x) for x in args.concurrency.split(",")]
    url = f"http://127.0.0.1:{args.port}"
    servers = []
    for model in args.models:
        servers.append((f"squeeze deploy {model}", deploy_command(model, args.port, args.tracking_uri), "squeeze"))
    if args.mlflow_serve:
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        command = [mlflow, "models", "serve", "-m", args.mlflow_serve, "--env-manager", "local"]
        servers.append(
            (f"mlflow models serve {args.mlflow_serve}", [*command, "-h", "127.0.0.1", "-p", str(args.port)], "mlflow")
        )
        if args.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri  # mlflow models serve reads the store from here
    print(f"machine: {machine()}; {args.seconds}s per level; Locust shares the machine's cores with the server")
    print("| server and model | clients | QPS | p50 ms | p99 ms | failures |")
    print("|---|---|---|---|---|---|", flush=True)
    for name, command, protocol in servers:  # each server's rows as soon as it is measured
        try:
            measured = measure(command, url, rows, levels, args.seconds, protocol)
        except RuntimeError as e:
            print(f"| {name} | not measured: {e} |||||", flush=True)
            continue
        for level in measured:
            print(
                f"| {name} | {level['users']} | {level['qps']:.1f} | {level['p50_ms']:.0f} | {level['p99_ms']:.0f} | "
                f"{level['failures']} |"
            )
        print(
            f"| {name} | QPS at p99 ≤ {args.target_p99_ms:g} ms | {qps_at_p99(measured, args.target_p99_ms):.1f} |||||",
            flush=True,
        )


if __name__ == "__main__":
    main()
