"""The SST-2 benchmark: the `configs/sst2.yaml` recipe, then its champion measured side by side with what a user
would pick instead, in one process and with the same harness (rounds interleaved, same threads, batch 1).

    python -m bench.sst2 --data-dir ../shared/data/sst2 --out DIR [--config configs/sst2.yaml] [--set key=value ...]
    python -m bench.sst2 --data-dir ../shared/data/sst2 --out DIR --config configs/sst2-search.yaml --budget 25

A recipe with `{search: ...}` knobs is searched (`squeeze search`, every trial scored on validation, `--budget`
minutes, `--trials`) instead of run as written; the champion it registers is then measured beside the peers.

Peers, all made from the recipe's fine-tuned teacher and stored under its id (a new teacher gets new peers), each
run as its users run it (ONNX Runtime's default session options, the same thread count): PyTorch fp32;
`torch.ao.quantization.quantize_dynamic` (the optimisation guide's method); ONNX Runtime fp32 (optimum export);
Optimum's documented path for BERT-like models, `ORTOptimizer` at O2 then `ORTQuantizer` dynamic INT8
(`AutoQuantizationConfig.avx512_vnni`, or `avx2` without VNNI); Optimum static INT8 (the same preset, `is_static`,
calibrated with `ORTQuantizer.fit` on training sentences); Microsoft Olive's CPU recipe (OnnxConversion →
OrtTransformersOptimization → OnnxDynamicQuantization). `pip install -e .[bench]` brings Olive and `datasets`.
Writes DIR/results.json and DIR/results.md."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PEER_KEYS = (
    "name",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "latency_p50_ms",
    "latency_p99_ms",
    "throughput_qps",
    "size_mb",
)
VARIANT_KEYS = (
    "variant_id",
    "parent_id",
    "lineage",
    "stage",
    "val_accuracy",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "accuracy_drop",
    "latency_p50_ms",
    "latency_p99_ms",
    "throughput_qps",
    "size_mb",
    "params_m",
)
CHAMPION_KEYS = (
    "variant_id",
    "lineage",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "accuracy_drop",
    "accuracy_drop_ci_low",
    "accuracy_drop_ci_high",
    "latency_p50_ms",
    "size_mb",
    "speedup_vs_torch_fp32",
    "speedup_vs_optimum_dynamic",
    "speedup_vs_olive",
    "speedup_vs_best_peer",
    "size_ratio_vs_teacher",
)
TOP_KEYS = ("machine", "wall_s", "search", "teacher", "peers", "variants", "champion", "serving")
SERVE_LEVELS = (1, 2, 4, 8)  # concurrent clients of the serving rows
SERVE_TARGET_P99_MS = 10.0
SERVED_COLUMNS = (("qps", 1), ("p50_ms", 0), ("p99_ms", 0))

TORCH_FP32, TORCH_DYNAMIC, ORT_FP32, OPTIMUM, OPTIMUM_STATIC, OLIVE = (
    "pytorch-fp32",
    "torch-quantize-dynamic",
    "onnxruntime-fp32",
    "optimum-o2-dynamic-int8",
    "optimum-static-int8",
    "olive-cpu-int8",
)
PEER_ORDER = (TORCH_FP32, TORCH_DYNAMIC, ORT_FP32, OPTIMUM, OPTIMUM_STATIC, OLIVE)
CALIBRATION_TEXTS = 128  # the static peer's calibration sentences, as many as the recipe's static mode reads
# the goals this benchmark is held to (the champion on the SST-2 dev set, batch 1)
GOALS = {
    "speedup_vs_torch_fp32": 15.0,
    "speedup_vs_best_peer": 3.0,
    "size_ratio_vs_teacher": 10.0,
    "accuracy_drop": 0.01,
}


def has_vnni() -> bool:
    from squeezeflow.tasks.evaluate import cpu_flags

    return "avx512_vnni" in cpu_flags().split(",")


def machine(threads: int) -> dict:
    from squeezeflow.tasks.evaluate import cpu_flags, cpu_model

    cpu = cpu_model()
    libraries = {}
    for name in (
        "squeezeflow",
        "torch",
        "transformers",
        "tokenizers",
        "optimum",
        "optimum-onnx",
        "onnx",
        "onnxruntime",
        "torch-pruning",
        "prefect",
        "mlflow",
        "olive-ai",
    ):
        try:
            libraries[name] = version(name)
        except PackageNotFoundError:
            libraries[name] = "-"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "cpu_flags": cpu_flags(),
        "vnni": has_vnni(),
        "libraries": libraries,
    }


# ------------------------------------------------------------------------------------------------ peers


def peer_torch_dynamic(teacher_dir: Path, out: Path) -> None:
    from squeezeflow.tasks.runtime import TORCH_DYNAMIC_MARKER

    shutil.copytree(teacher_dir, out, dirs_exist_ok=True)
    (out / TORCH_DYNAMIC_MARKER).write_text(json.dumps({"modules": ["Linear"], "dtype": "qint8"}))


def peer_ort_fp32(teacher_dir: Path, out: Path) -> None:
    from squeezeflow.tasks.export import ExportConfig, export_onnx

    export_onnx(teacher_dir, out, ExportConfig(optimize="none"))


def _optimum_preset():
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    return AutoQuantizationConfig.avx512_vnni if has_vnni() else AutoQuantizationConfig.avx2


def _keep_quantized(scratch: Path, out: Path, tokenizer_dir: Path) -> None:
    from squeezeflow.tasks.export import copy_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    shutil.move(str(next(scratch.glob("*quantized*.onnx"))), out / "model.onnx")
    shutil.rmtree(scratch, ignore_errors=True)
    copy_tokenizer(tokenizer_dir, out)


def peer_optimum_dynamic(onnx_dir: Path, out: Path) -> None:
    """Optimum's documented CPU path for BERT-like models: ORTOptimizer at O2 (fusions, GELU approximation), then
    ORTQuantizer dynamic INT8. Between them, ONNX Runtime's own quantization pre-processing (symbolic shape
    inference): without it ORTQuantizer stops at the fused ops' untyped outputs, and a user meets that error first."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from optimum.onnxruntime import ORTModelForSequenceClassification, ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig

    optimized = out.parent / f".{out.name}-optimized"
    model = ORTModelForSequenceClassification.from_pretrained(onnx_dir, file_name="model.onnx")
    ORTOptimizer.from_pretrained(model).optimize(save_dir=optimized, optimization_config=AutoOptimizationConfig.O2())
    quant_pre_process(
        str(optimized / "model_optimized.onnx"),
        str(optimized / "model_typed.onnx"),
        skip_optimization=True,
        auto_merge=True,
    )
    quantizer = ORTQuantizer.from_pretrained(optimized, file_name="model_typed.onnx")
    scratch = out.parent / f".{out.name}-optimum"
    quantizer.quantize(save_dir=scratch, quantization_config=_optimum_preset()(is_static=False, per_channel=False))
    _keep_quantized(scratch, out, onnx_dir)
    shutil.rmtree(optimized, ignore_errors=True)


def peer_optimum_static(onnx_dir: Path, out: Path, calibration: list[str]) -> None:
    """Optimum static INT8 as its documentation shows it: a calibration dataset of tokenized training sentences,
    ORTQuantizer.fit (min-max ranges), then quantize with those ranges."""
    try:
        from datasets import Dataset
    except ImportError:
        raise SystemExit("error: the Optimum static peer needs datasets: pip install -e '.[bench]'") from None
    import onnx
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoCalibrationConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    dataset = Dataset.from_dict(dict(tokenizer(calibration, truncation=True)))
    quantizer = ORTQuantizer.from_pretrained(onnx_dir, file_name="model.onnx")
    inputs = {i.name for i in onnx.load(str(Path(onnx_dir) / "model.onnx"), load_external_data=False).graph.input}
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in inputs])
    scratch = out.parent / f".{out.name}-optimum"
    scratch.mkdir(parents=True, exist_ok=True)
    ranges = quantizer.fit(
        dataset=dataset,
        calibration_config=AutoCalibrationConfig.minmax(dataset),
        onnx_augmented_model_name=scratch / "augmented_model.onnx",
    )
    config = _optimum_preset()(is_static=True, per_channel=False)
    quantizer.quantize(save_dir=scratch, quantization_config=config, calibration_tensors_range=ranges)
    (scratch / "augmented_model.onnx").unlink(missing_ok=True)
    _keep_quantized(scratch, out, onnx_dir)


def peer_olive(teacher_dir: Path, out: Path) -> None:
    try:
        from olive import run as olive_run
    except ImportError:
        raise SystemExit("error: the Olive peer needs olive-ai: pip install -e '.[bench]'") from None
    from squeezeflow.tasks.export import copy_tokenizer

    work = out.parent / f".{out.name}-olive"
    olive_run(
        {
            "input_model": {"type": "HfModel", "model_path": str(teacher_dir), "task": "text-classification"},
            "systems": {
                "local": {
                    "type": "LocalSystem",
                    "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}],
                }
            },
            "passes": {
                "conversion": {"type": "OnnxConversion"},
                "optimization": {"type": "OrtTransformersOptimization", "model_type": "bert"},
                "quantization": {"type": "OnnxDynamicQuantization"},
            },
            "host": "local",
            "target": "local",
            "output_dir": str(work / "output"),
            "cache_dir": str(work / "cache"),
            "log_severity_level": 3,
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    shutil.move(str(next((work / "output").rglob("model.onnx"))), out / "model.onnx")
    shutil.rmtree(work, ignore_errors=True)
    copy_tokenizer(teacher_dir, out)


def make_peers(teacher, root: Path, calibration: list[str]) -> list:
    """The peers as variant records (so the same harness measures them, ONNX ones with ONNX Runtime's default
    session options), all made from the teacher and kept under its id; `calibration`: the static peer's texts."""
    from squeezeflow.tasks.variant import Variant

    root = root / teacher.id
    root.mkdir(parents=True, exist_ok=True)
    teacher_dir = Path(teacher.path)
    made = [teacher.model_copy(update={"metrics": {}})]
    recipes = [
        (TORCH_DYNAMIC, "quantize", "hf", lambda d: peer_torch_dynamic(teacher_dir, d)),
        (ORT_FP32, "export", "onnx", lambda d: peer_ort_fp32(teacher_dir, d)),
        (OPTIMUM, "quantize", "onnx", lambda d: peer_optimum_dynamic(root / ORT_FP32, d)),
        (OPTIMUM_STATIC, "quantize", "onnx", lambda d: peer_optimum_static(root / ORT_FP32, d, calibration)),
        (OLIVE, "quantize", "onnx", lambda d: peer_olive(teacher_dir, d)),
    ]
    for name, stage, fmt, build in recipes:
        directory = root / name
        if not (directory / "done").exists():
            shutil.rmtree(directory, ignore_errors=True)
            started = time.perf_counter()
            build(directory)
            (directory / "done").write_text(f"{time.perf_counter() - started:.1f}\n")
        params = {"ort_session": "default"} if fmt == "onnx" else {}
        made.append(
            Variant(
                id=f"peer-{name}",
                parent_id=teacher.id,
                stage=stage,
                lineage=f"peer:{name}",
                format=fmt,
                path=str(directory),
                params=params,
            )
        )
    return made


# ---------------------------------------------------------------------------------------------- results


def results_document(
    machine_info: dict,
    wall_s: float,
    variants: list,
    side_by_side: list,
    champion_id: str,
    search: dict | None = None,
    serving: dict | None = None,
) -> dict:
    """The results.json document: the recipe's variants (as the flow measured them) and the champion against the
    peers (as measured side by side in one interleaved benchmark); `search`: the study that chose the knobs, if
    the recipe was searched."""
    by_name = {v.lineage.removeprefix("peer:"): v for v in side_by_side if v.lineage.startswith("peer:")}
    teacher = next(v for v in side_by_side if v.stage == "teacher")
    by_name[TORCH_FP32] = teacher
    champion = next(v for v in side_by_side if v.id == champion_id)
    peers = [
        {"name": name, **{k: by_name[name].metrics.get(k) for k in PEER_KEYS[1:]}}
        for name in PEER_ORDER
        if name in by_name
    ]
    p50 = champion.metrics["latency_p50_ms"]
    best_peer = min(p["latency_p50_ms"] for p in peers)
    return {
        "machine": {**machine_info, "other_cpu_share": teacher.metrics.get("bench_other_cpu_share")},
        "wall_s": wall_s,
        "search": search,
        "teacher": {k: teacher.metrics[k] for k in ("accuracy", "latency_p50_ms", "size_mb")},
        "peers": peers,
        "variants": [
            {
                "variant_id": v.id,
                "parent_id": v.parent_id,
                "lineage": v.lineage,
                "stage": v.stage,
                **{k: v.metrics.get(k) for k in VARIANT_KEYS[4:]},
            }
            for v in variants
        ],
        "champion": {
            "variant_id": champion.id,
            "lineage": champion.lineage,
            **{k: champion.metrics.get(k) for k in CHAMPION_KEYS[2:8]},
            "latency_p50_ms": p50,
            "size_mb": champion.metrics["size_mb"],
            "speedup_vs_torch_fp32": by_name[TORCH_FP32].metrics["latency_p50_ms"] / p50,
            "speedup_vs_optimum_dynamic": by_name[OPTIMUM].metrics["latency_p50_ms"] / p50
            if OPTIMUM in by_name
            else None,
            "speedup_vs_olive": by_name[OLIVE].metrics["latency_p50_ms"] / p50 if OLIVE in by_name else None,
            "speedup_vs_best_peer": best_peer / p50,
            "size_ratio_vs_teacher": teacher.metrics["size_mb"] / champion.metrics["size_mb"],
        },
        "serving": serving,
    }


def check_document(doc: dict) -> None:
    """Raises ValueError unless `doc` has exactly the results.json keys."""
    problems = []
    if tuple(doc) != TOP_KEYS:
        problems.append(f"top-level keys {list(doc)} != {list(TOP_KEYS)}")
    for i, peer in enumerate(doc.get("peers", [])):
        if tuple(peer) != PEER_KEYS:
            problems.append(f"peers[{i}] keys {list(peer)}")
    for i, variant in enumerate(doc.get("variants", [])):
        if tuple(variant) != VARIANT_KEYS:
            problems.append(f"variants[{i}] keys {list(variant)}")
    if tuple(doc.get("champion", {})) != CHAMPION_KEYS:
        problems.append(f"champion keys {list(doc.get('champion', {}))}")
    if problems:
        raise ValueError("results.json: " + "; ".join(problems))


def goal_lines(champion: dict) -> list[str]:
    lines = []
    for key, bar in GOALS.items():
        value = champion[key]
        met = value <= bar if key == "accuracy_drop" else value >= bar
        shown = f"{value * 100:.2f} pt" if key == "accuracy_drop" else f"{value:.2f}×"
        target = f"≤ {bar * 100:.1f} pt" if key == "accuracy_drop" else f"≥ {bar:g}×"
        lines.append(f"- {key}: {shown} (goal {target}): {'met' if met else 'NOT met'}")
    return lines


def _pct_ci(row: dict) -> str:
    """Accuracy in percent with its 95 % interval, when the row has one."""
    if row.get("accuracy_ci_low") is None:
        return f"{row['accuracy'] * 100:.2f} %"
    return f"{row['accuracy'] * 100:.2f} % [{row['accuracy_ci_low'] * 100:.1f}, {row['accuracy_ci_high'] * 100:.1f}]"


def markdown(doc: dict, command: str) -> str:
    m, c = doc["machine"], doc["champion"]
    share = m.get("other_cpu_share")
    load = "" if share is None else f"; other processes took {share * 100:.0f} % of the CPU during the side-by-side"
    lines = [
        "# squeezeflow SST-2 benchmark",
        "",
        f"`{command}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU flags {m.get('cpu_flags') or 'unknown'}, {m['threads']} "
        f"threads for every engine{load}; wall time {doc['wall_s'] / 60:.1f} min.",
        "",
    ]
    if doc.get("search"):
        s = doc["search"]
        lines += [
            f"Knobs chosen by `squeeze search` on the validation split: study `{s['study']}`, "
            f"{s['trials_completed']} trial(s) in a {s['budget_minutes']:g}-minute budget; its report: "
            f"`{s['report']}`.",
            "",
        ]
    lines += [
        "## Champion vs peers (one interleaved benchmark, SST-2 dev, batch 1; accuracy with its 95 % interval)",
        "",
        "| model | accuracy [95 % CI] | p50 ms | p99 ms | batch-32 qps | size MB |",
        "|---|---|---|---|---|---|",
    ]
    for p in doc["peers"]:
        lines.append(
            f"| {p['name']} | {_pct_ci(p)} | {p['latency_p50_ms']:.2f} | {p['latency_p99_ms']:.2f} | "
            f"{p['throughput_qps']:.0f} | {p['size_mb']:.1f} |"
        )
    lines.append(
        f"| **squeezeflow champion** `{c['lineage']}` | {_pct_ci(c)} | {c['latency_p50_ms']:.2f} | | | "
        f"{c['size_mb']:.1f} |"
    )
    drop = f"{c['accuracy_drop'] * 100:+.2f} points"
    if c.get("accuracy_drop_ci_low") is not None:
        drop += f" [{c['accuracy_drop_ci_low'] * 100:+.2f}, {c['accuracy_drop_ci_high'] * 100:+.2f}] (paired)"
    lines += [
        "",
        f"Champion's drop against the teacher on dev: {drop}.",
        "",
        "Goals:",
        *goal_lines(c),
        "",
        f"Speed-up vs Optimum dynamic INT8: {_times(c['speedup_vs_optimum_dynamic'])}; vs Olive: "
        f"{_times(c['speedup_vs_olive'])}.",
        "",
        "## The run's variants (as the flow measured them)",
        "",
        "| lineage | val acc | eval acc [95 % CI] | drop (pt) | p50 ms | p99 ms | qps | size MB | params M |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in doc["variants"]:
        val = "" if v.get("val_accuracy") is None else f"{v['val_accuracy'] * 100:.2f} %"
        lines.append(
            f"| {v['lineage']} | {val} | {_pct_ci(v)} | {v['accuracy_drop'] * 100:+.2f} | {v['latency_p50_ms']:.2f} | "
            f"{v['latency_p99_ms']:.2f} | {v['throughput_qps']:.0f} | {v['size_mb']:.1f} | {v['params_m']:.2f} |"
        )
    if doc.get("serving"):
        lines += serving_markdown(doc["serving"])
    return "\n".join(lines) + "\n"


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}×"


def serving_rows(champion, teacher, peers_root: Path, rows: list, seconds: int) -> dict:
    """The champion, the PyTorch teacher and the Optimum peer, each behind the same `squeeze deploy` (one replica)
    and loaded by the same Locust at rising concurrency: {name: [level figures]}."""
    from bench.serving import deploy_command, measure

    served = {"squeezeflow champion": champion.path, TORCH_FP32: teacher.path}
    served[OPTIMUM] = str(peers_root / teacher.id / OPTIMUM)
    url = "http://127.0.0.1:8000"
    return {
        name: measure(deploy_command(path, 8000), url, rows, SERVE_LEVELS, seconds) for name, path in served.items()
    }


def serving_markdown(serving: dict) -> list[str]:
    from squeezeflow.flows.loadtest import qps_at_p99

    lines = [
        "",
        "## Served (`squeeze deploy`, one replica; Locust on the same machine, one sentence per request)",
        "",
        f"| model | QPS at {' / '.join(map(str, SERVE_LEVELS))} clients | p50 ms | p99 ms | failures | "
        f"QPS at p99 ≤ {SERVE_TARGET_P99_MS:g} ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, levels in serving.items():
        qps, p50, p99 = (" / ".join(f"{x[key]:.{digits}f}" for x in levels) for key, digits in SERVED_COLUMNS)
        failures = sum(x["failures"] for x in levels)
        lines.append(f"| {name} | {qps} | {p50} | {p99} | {failures} | {qps_at_p99(levels, SERVE_TARGET_P99_MS):.1f} |")
    return lines


def plot_side_by_side(measured: list, champion_id: str, path: Path) -> None:
    """The champion and the peers, measured in one benchmark, on the report's plot (validation accuracy, latency)."""
    from squeezeflow.tasks.report import pareto_plot
    from squeezeflow.tasks.select import Selection, pareto_front

    champion = next(v for v in measured if v.id == champion_id)
    front = [v.id for v in pareto_front(measured)]
    pareto_plot(measured, Selection(champion, True, "champion of the recipe", front), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sst2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="directory with train.tsv and dev.tsv")
    parser.add_argument("--out", type=Path, required=True, help="where results.json, results.md and the artifacts go")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "sst2.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="recipe override key=value (repeatable)"
    )
    parser.add_argument(
        "--budget", type=float, default=25.0, help="a search recipe: minutes after which no trial starts (25)"
    )
    parser.add_argument("--trials", type=int, default=40, help="a search recipe: at most this many trials (40)")
    parser.add_argument(
        "--serve-seconds",
        type=int,
        default=0,
        help="also serve the champion, the teacher and the Optimum peer (squeeze deploy) and load each for this many "
        "seconds per level of 1, 2, 4, 8 clients (0: not served)",
    )
    args = parser.parse_args(argv)

    import squeezeflow.tasks  # noqa: F401  (offline environment defaults)
    from squeezeflow.flows.compress import run_compress
    from squeezeflow.flows.config import apply_overrides, read_recipe
    from squeezeflow.flows.search import SearchOptions, run_search
    from squeezeflow.flows.space import has_search, recipe_config
    from squeezeflow.tasks.base import SqueezeError
    from squeezeflow.tasks.evaluate import benchmark
    from squeezeflow.tasks.variant import Variant

    started = time.perf_counter()
    out = args.out.resolve()
    overrides = [f"data.dir={args.data_dir.resolve()}", f"artifacts_dir={out / 'artifacts'}", *args.overrides]
    search = None
    try:
        tree = apply_overrides(read_recipe(args.config), str(args.config), overrides)
        cfg = recipe_config(tree, str(args.config))
        if has_search(tree):
            options = SearchOptions(trials=args.trials, budget_minutes=args.budget, objective="latency")
            result = run_search(tree, options, str(args.config))
            search = {
                "study": result["study"],
                "trials_completed": result["trials_completed"],
                "budget_minutes": args.budget,
                "report": result["search_report"],
            }
        else:
            result = run_compress(cfg)
    except SqueezeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    variants = [Variant.model_validate(v) for v in result["variants"]]
    teacher = next(v for v in variants if v.stage == "teacher")
    champion = next(v for v in variants if v.id == result["champion"])
    from squeezeflow.tasks.data import load_splits

    train = load_splits(cfg.data, cfg.model.num_labels).train.texts
    peers = make_peers(teacher, out / "peers", random.Random(cfg.seed).sample(train, CALIBRATION_TEXTS))
    contenders = peers if champion.id == teacher.id else [*peers, champion]
    side_by_side = benchmark(
        contenders, cfg.data, cfg.model.num_labels, cfg.benchmark.model_copy(update={"measure_rss": False})
    )
    serving = None
    if args.serve_seconds > 0:
        from squeezeflow.tasks.data import read_split

        split = read_split(cfg.data, "eval", cfg.model.num_labels)
        rows = list(zip(split.texts, split.labels))
        serving = serving_rows(champion, teacher, out / "peers", rows, args.serve_seconds)
    wall_s = time.perf_counter() - started
    doc = results_document(machine(cfg.benchmark.threads), wall_s, variants, side_by_side, champion.id, search, serving)
    check_document(doc)
    command = "python -m bench.sst2 " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    (out / "results.md").write_text(markdown(doc, command))
    plot_side_by_side(side_by_side, champion.id, out / "pareto.png")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
