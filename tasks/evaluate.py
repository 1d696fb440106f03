"""Measuring every variant the same way: accuracy, batch-1 latency on real eval texts, batch throughput,
size, parameters and peak memory; rounds are interleaved across variants so machine drift hits all alike.
The measuring happens in a fresh process (`python -m squeezeflow.tasks.evaluate`), as serving would."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
from prefect import task
from pydantic import Field

from .base import StrictModel
from .data import DataConfig, load_splits
from .intervals import accuracy, paired_drop_interval, wilson
from .progress import advance
from .runtime import FOUR_BIT_CODES, load_predictor
from .variant import Variant, size_on_disk_mb, weight_files

log = logging.getLogger("squeezeflow.evaluate")
# how the measuring process marks, on its stderr, the lines meant for this one
PROGRESS, FAILURE = "squeezeflow.evaluate: ", "squeezeflow.evaluate failed: "


class BenchmarkConfig(StrictModel):
    threads: int = Field(
        2, ge=1, le=256, description="Threads for every engine (torch.set_num_threads, ORT intra_op_num_threads)."
    )
    batch_size: int = Field(32, ge=1, le=4096, description="Batch size for accuracy and the throughput measurement.")
    warmup: int = Field(10, ge=0, description="Untimed batch-1 calls per variant before the timed rounds.")
    rounds: int = Field(
        3, ge=1, le=100, description="Timed rounds; each round runs every variant over the latency texts."
    )
    latency_texts: int | None = Field(
        200, ge=1, description="Eval texts timed at batch 1 per round (None: all of them)."
    )
    measure_rss: bool = Field(True, description="Measure peak resident memory of each variant in a fresh process.")


def count_params(variant: Variant) -> int:
    if variant.format == "hf":
        from safetensors import safe_open

        total = 0
        for file in weight_files(variant.path):
            with safe_open(str(file), framework="np") as f:
                total += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
        return total
    import onnx

    def graph_params(graph) -> int:  # subgraphs too: an early-exit model keeps later layers inside If branches
        # a 4-bit table holds two values per byte; its block scales, zero points and shapes are not parameters
        own = sum(
            int(np.prod(t.dims)) * (2 if t.name.endswith(FOUR_BIT_CODES) else 1)
            for t in graph.initializer
            if FOUR_BIT_CODES + "/" not in t.name
        )
        return own + sum(
            graph_params(attr.g)
            for node in graph.node
            for attr in node.attribute
            if attr.type == onnx.AttributeProto.GRAPH
        )

    return sum(
        graph_params(onnx.load(str(file)).graph) for file in weight_files(variant.path) if file.suffix == ".onnx"
    )


def peak_rss_mb(variant: Variant, texts: list[str], threads: int) -> float:
    request = {"path": variant.path, "format": variant.format, "threads": threads, "texts": texts}
    done = subprocess.run(
        [sys.executable, "-m", "squeezeflow.tasks.runtime"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"peak-RSS probe failed for {variant.id}: {done.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


# the flags that decide how fast INT8 and bf16 run, so every figure can name the kind of CPU it ran on
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
# share of the machine's CPU time taken by other processes above which the benchmark's timings are flagged
BUSY_SHARE = 0.10


def cpu_flags() -> str:
    """The speed-relevant flags of this CPU, e.g. `avx2,avx512f,avx512_vnni`, or `unknown` off Linux."""
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return "unknown"
    return ",".join(f for f in SPEED_FLAGS if f in flags) or "none"


def cpu_model() -> str:
    """The CPU's model name, e.g. `AMD EPYC`, or `unknown CPU` off Linux."""
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return "unknown CPU"


def machine() -> str:
    """The benchmark machine in one line: CPU model, cores this process may use, speed-relevant flags."""
    import os

    return f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, CPU flags {cpu_flags()}"


class LoadMeter:
    """How busy the rest of the machine was while this process measured: the CPU time the whole machine spent,
    minus this process's own, as a share of the wall time × cores."""

    def start(self) -> LoadMeter:
        import psutil

        self._me, self._started = psutil.Process(), time.perf_counter()
        self._machine, self._own = self._busy_seconds(), self._own_seconds()
        return self

    @staticmethod
    def _busy_seconds() -> float:
        import psutil

        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def _own_seconds(self) -> float:
        own = self._me.cpu_times()
        return own.user + own.system + own.children_user + own.children_system

    def stop(self) -> float:
        """The other processes' share of the machine's CPU since start()."""
        import psutil

        wall = max(1e-9, time.perf_counter() - self._started)
        others = (self._busy_seconds() - self._machine) - (self._own_seconds() - self._own)
        return max(0.0, others / (wall * (psutil.cpu_count() or 1)))


def benchmark(
    variants: list[Variant], data_cfg: DataConfig, num_labels: int, cfg: BenchmarkConfig, report_eval: bool = True
) -> list[Variant]:
    """`measure` run in a fresh process; its progress lines are logged here. `report_eval=False` (a search's trials)
    times the validation texts and never reads the eval split.

    Why not here: PyTorch's OpenMP runtime counts the worker threads of every thread that has run PyTorch. Once a
    flow's training tasks have left their pools alive in other threads, there are more of them than cores, and
    OpenMP stops spinning between parallel regions: PyTorch at batch 1 then ran 2-2.5x slower (SST-2 teacher p50
    5.99 ms in a fresh process, 11.9 ms beside one idle pool), which would flatter every speed-up over it."""
    with tempfile.TemporaryDirectory(prefix="squeezeflow-benchmark-") as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "measured.json"
        request.write_text(
            json.dumps(
                {
                    "variants": [v.model_dump(mode="json") for v in variants],
                    "data": data_cfg.model_dump(mode="json"),
                    "num_labels": num_labels,
                    "benchmark": cfg.model_dump(mode="json"),
                    "report_eval": report_eval,
                }
            )
        )
        child = subprocess.Popen(
            [sys.executable, "-m", __name__, str(request), str(answer)], stderr=subprocess.PIPE, text=True
        )
        tail: deque[str] = deque(maxlen=3)  # the last lines it wrote, should it die without saying why
        reason = None
        for line in child.stderr:
            line = line.rstrip()
            if line.startswith(FAILURE):
                reason = line.removeprefix(FAILURE)
            elif line.startswith(PROGRESS):
                message = line.removeprefix(PROGRESS)
                if counted := re.fullmatch(r"measured (\d+)/(\d+)", message):
                    advance(f"benchmark-{child.pid}", "benchmark", int(counted[1]), int(counted[2]))
                else:
                    log.info(message)
            elif line:
                tail.append(line)
        if child.wait() != 0:
            raise RuntimeError(f"the benchmark process failed (exit {child.returncode}): {reason or ' | '.join(tail)}")
        return [Variant.model_validate(v) for v in json.loads(answer.read_text())]


def _tokenize_ms(encoder, texts: list[str]) -> list[float]:
    """Milliseconds the variant's tokenizing takes per text, one text per call as in the latency loop."""
    samples = []
    for text in texts:
        started = time.perf_counter()
        encoder([text])
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def measure(
    variants: list[Variant], data_cfg: DataConfig, num_labels: int, cfg: BenchmarkConfig, report_eval: bool = True
) -> list[Variant]:
    """Returns the variants with their metrics (without the eval ones when `report_eval` is false: the validation
    texts are then the timed ones). The first variant whose stage is `teacher` (PyTorch fp32) is the
    reference for `accuracy_drop` and `speedup`; a variant whose parent is measured also gets parity metrics.
    Accuracy and parity come from batch-1 calls, as latency does: dynamic INT8 quantizes activations with one
    range per call, so inside a batch the padding and the other rows would move each row's result."""
    splits = load_splits(data_cfg, num_labels)
    val_texts = splits.validation.texts
    texts, labels = (splits.eval.texts, np.asarray(splits.eval.labels)) if report_eval else (val_texts, None)
    timed_texts = texts[: cfg.latency_texts] if cfg.latency_texts else texts
    predictors = {}
    for v in variants:
        try:
            predictors[v.id] = load_predictor(
                v.path, v.format, cfg.threads, ort_defaults=v.params.get("ort_session") == "default"
            )
        except Exception as e:  # ORT, tokenizers and transformers each raise their own types for unreadable files
            raise RuntimeError(f"cannot load {v.id} ({v.format}) from {v.path}: {e}") from e

    logits: dict[str, np.ndarray] = {}
    val_preds: dict[str, np.ndarray] = {}
    exit_layers: dict[str, list[np.ndarray]] = {}
    batched: dict[str, list[np.ndarray]] = {}  # round 0's predictions in batches of batch_size
    batch_seconds: dict[str, list[float]] = {v.id: [] for v in variants}
    latencies: dict[str, list[list[float]]] = {v.id: [] for v in variants}
    tokenizing: dict[str, list[float]] = {v.id: [] for v in variants}  # the same texts, tokenized alone
    for v in variants:
        predictor = predictors[v.id]
        for text in timed_texts[: cfg.warmup]:
            predictor.logits([text])
    meter = LoadMeter().start()
    measured_count = 0
    for round_no in range(cfg.rounds):
        # rotate the order each round so no variant always runs first (or right after the heaviest one)
        order = variants[round_no % len(variants) :] + variants[: round_no % len(variants)]
        for v in order:
            predictor = predictors[v.id]
            started = time.perf_counter()
            for i in range(0, len(texts), cfg.batch_size):
                batch_logits = predictor.logits(texts[i : i + cfg.batch_size])
                if round_no == 0:
                    batched.setdefault(v.id, []).append(batch_logits.argmax(-1))
                    if hasattr(predictor, "last_exit_layers"):  # early exit: where each input left
                        exit_layers.setdefault(v.id, []).append(predictor.last_exit_layers)
            batch_seconds[v.id].append(time.perf_counter() - started)
            samples, served = [], []
            for text in timed_texts:
                started = time.perf_counter()
                served.append(predictor.logits([text]))
                samples.append((time.perf_counter() - started) * 1000)
            latencies[v.id].append(samples)
            tokenizing[v.id] += _tokenize_ms(predictor.encoder, timed_texts)
            measured_count += 1
            log.info("measured %d/%d", measured_count, cfg.rounds * len(variants))
            if round_no == 0:
                served += [predictor.logits([text]) for text in texts[len(timed_texts) :]]
                logits[v.id] = np.concatenate(served)
                val_logits = np.concatenate([predictor.logits([t]) for t in val_texts]) if report_eval else logits[v.id]
                val_preds[v.id] = val_logits.argmax(-1)
        log.info("benchmark round %d/%d done", round_no + 1, cfg.rounds)
    other_share = meter.stop()
    if other_share > BUSY_SHARE:
        log.warning(
            "the machine was busy during the benchmark: other processes took %.0f %% of its CPU", 100 * other_share
        )

    reference = next(v for v in variants if v.stage == "teacher")
    # a slice of an unlabelled train file is scored against the teacher's labels
    val_truth = (
        np.asarray(splits.validation.labels) if splits.validation.labels is not None else val_preds[reference.id]
    )
    measured = {}
    for v in variants:
        flat = [ms for r in latencies[v.id] for ms in r]
        round_medians = [float(np.median(r)) for r in latencies[v.id]]
        preds = logits[v.id].argmax(-1)
        metrics = eval_figures(preds, logits[reference.id].argmax(-1), labels) if report_eval else {}
        metrics |= {
            "val_accuracy": accuracy(val_preds[v.id], val_truth),
            "latency_p50_ms": percentile(flat, 50),
            "tokenize_p50_ms": percentile(tokenizing[v.id], 50),
            "model_p50_ms": percentile(flat, 50) - percentile(tokenizing[v.id], 50),
            "tokenizer_plain_share": predictors[v.id].encoder.plain_share(timed_texts),
            "latency_mean_ms": float(np.mean(flat)),
            "latency_p90_ms": percentile(flat, 90),
            "latency_p99_ms": percentile(flat, 99),
            "latency_round_min_ms": min(round_medians),
            "latency_round_median_ms": float(np.median(round_medians)),
            "latency_round_max_ms": max(round_medians),
            "latency_spread_ms": max(round_medians) - min(round_medians),
            "bench_other_cpu_share": other_share,
            "throughput_qps": len(texts) / float(np.median(batch_seconds[v.id])),
            # whether a server may batch this variant: its batched predictions against the one-row ones it was scored on
            "batch_agreement": float((np.concatenate(batched[v.id]) == preds).mean()),
            "size_mb": size_on_disk_mb(v.path),
            "params_m": count_params(v) / 1e6,
        }
        if v.id in exit_layers:
            metrics["mean_exit_layer"] = float(np.concatenate(exit_layers[v.id]).mean())
        if v.parent_id in logits:
            parent_logits = logits[v.parent_id]
            metrics["parity_max_abs"] = float(np.abs(logits[v.id] - parent_logits).max())
            metrics["parity_agreement"] = float((preds == parent_logits.argmax(-1)).mean())
        if cfg.measure_rss:
            metrics["peak_rss_mb"] = peak_rss_mb(v, timed_texts[:32], cfg.threads)
        measured[v.id] = metrics
    ref = measured[reference.id]
    return [
        v.with_metrics(
            **measured[v.id],
            **({"accuracy_drop": ref["accuracy"] - measured[v.id]["accuracy"]} if report_eval else {}),
            val_accuracy_drop=ref["val_accuracy"] - measured[v.id]["val_accuracy"],
            speedup=ref["latency_p50_ms"] / measured[v.id]["latency_p50_ms"],
        )
        for v in variants
    ]


def eval_figures(preds: np.ndarray, reference_preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The reported figures: eval accuracy with its 95 % interval, and the paired interval of the drop against the
    reference's predictions on the same examples."""
    correct, reference_correct = preds == labels, reference_preds == labels
    ci_low, ci_high = wilson(int(correct.sum()), len(labels))
    drop_low, drop_high = paired_drop_interval(reference_correct, correct)
    return {
        "accuracy": accuracy(preds, labels),
        "accuracy_ci_low": ci_low,
        "accuracy_ci_high": ci_high,
        "accuracy_drop_ci_low": drop_low,
        "accuracy_drop_ci_high": drop_high,
    }


@task(name="benchmark")
def benchmark_task(
    variants: list[Variant], data_cfg: DataConfig, num_labels: int, cfg: BenchmarkConfig, report_eval: bool = True
) -> list[Variant]:
    return benchmark(variants, data_cfg, num_labels, cfg, report_eval)


def _measure_request(request: Path, answer: Path) -> None:
    """The fresh process: measures the variants in `request` and writes them, with their metrics, to `answer`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(PROGRESS + "%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    asked = json.loads(request.read_text())
    try:
        measured = measure(
            [Variant.model_validate(v) for v in asked["variants"]],
            DataConfig.model_validate(asked["data"]),
            asked["num_labels"],
            BenchmarkConfig.model_validate(asked["benchmark"]),
            asked["report_eval"],
        )
    except Exception as e:
        print(f"{FAILURE}{e}", file=sys.stderr)
        raise
    answer.write_text(json.dumps([v.model_dump(mode="json") for v in measured]))


if __name__ == "__main__":
    _measure_request(Path(sys.argv[1]), Path(sys.argv[2]))
