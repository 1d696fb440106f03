"""Static INT8: calibration on training texts, then the accuracy-aware fallback that keeps the most
quantization-sensitive MatMul / Attention nodes in float (scored on the validation split); early-exit variants
segment by segment."""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..base import DataError, ModelError
from ..data import load_splits
from ..export import copy_tokenizer
from ..intervals import accuracy
from ..runtime import EARLY_EXIT_FILE, SEGMENTS_DIR
from ..variant import StageContext, Variant
from .activations import static_activations, uint8_scale_zero
from .config import QUANTIZABLE, Produced, QuantizeConfig
from .dynamic import ort_dynamic

log = logging.getLogger("squeezeflow.quantize")


def encoded(tokenizer_dir: str | Path, texts: list[str], input_names: list[str]) -> list[dict]:
    from ..runtime import TextEncoder

    # one row per feed, all padded to the longest text (ORT's QDQ debugging concatenates the feeds)
    columns = TextEncoder(Path(tokenizer_dir))(texts)
    return [{name: columns[name][row : row + 1] for name in input_names} for row in range(len(texts))]


def calibration_reader(feeds: list[dict]):
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    return Feeds()


def validation_split(splits, ctx: StageContext, out: Path) -> tuple[list[str], list[int]]:
    """The validation texts and what the fallback scores them against (labels, or the teacher's if it has none)."""
    from ..distill import validation_truth

    if splits.validation.labels is None and ctx.teacher is None:
        raise ModelError("quantize static: the validation split has no labels and there is no teacher to label it")
    teacher = ctx.teacher.path if ctx.teacher else None
    texts, truth = validation_truth(splits.validation, teacher, ctx.max_length, ctx.cache_dir or out.parent / ".cache")
    return texts, list(truth)


def onnx_accuracy(model_dir: Path, texts: list[str], labels: list[int], fmt: str = "onnx") -> float:
    from ..runtime import load_predictor

    predictor = load_predictor(model_dir, fmt, threads=2)
    return accuracy(np.concatenate([predictor.logits(texts[i : i + 32]) for i in range(0, len(texts), 32)]), labels)


def weight_sqnr(weight, cfg: QuantizeConfig) -> float:
    """Signal-to-quantization-noise ratio (dB) of a MatMul weight [in, out] stored as ORT's dynamic quantizer
    stores it: symmetric int8 ([-127, 127], or [-64, 64] with reduce_range), one scale per output column with
    per_channel, else one for the tensor."""
    import numpy as np
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

    levels = 64.0 if cfg.reduce_range else 127.0
    peak = np.abs(weight).max(axis=0 if cfg.per_channel else None, keepdims=True)
    scale = np.maximum(peak / levels, 1e-12)
    return float(compute_signal_to_quantization_noice_ratio(weight, np.round(weight / scale) * scale))


def calibrated_ranges(
    dynamic_graph: Path, feeds: list[dict], method
) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """(range, quantization noise) of every activation the dynamic INT8 graph quantizes at run time, measured on
    that graph — so the ranges are those its integer kernels will see. The noise is the signal-to-quantization-
    noise ratio (dB) of the activation quantized with its static range, on up to 32 of the feeds."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import create_calibrator
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

    model = onnx.load(str(dynamic_graph))
    tensors = sorted({n.input[0] for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"})
    # shape inference cannot type the outputs of com.microsoft ops; these are all float
    known = {v.name for v in model.graph.value_info} | {v.name for v in model.graph.input}
    model.graph.value_info.extend(
        onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors if t not in known
    )
    with tempfile.TemporaryDirectory() as tmp:
        typed = Path(tmp) / "typed.onnx"
        onnx.save(model, str(typed))
        calibrator = create_calibrator(
            typed,
            ["DynamicQuantizeLinear"],
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=method,
            extra_options={"symmetric": False},
        )
        calibrator.collect_data(calibration_reader(feeds))
        data = calibrator.compute_data()
        ranges = {t: tuple(float(np.asarray(v).item()) for v in data[t].range_value) for t in tensors}
        model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
        onnx.save(model, str(typed))
        session = ort.InferenceSession(str(typed), providers=["CPUExecutionProvider"])
        samples = [session.run(tensors, feed) for feed in feeds[:32]]
    noise = {}
    for i, tensor in enumerate(tensors):
        low, high = ranges[tensor]
        zero, scale = uint8_scale_zero(low, high)
        values = [s[i] for s in samples]
        restored = [(np.clip(np.round(v / scale) + zero, 0, 255) - zero) * scale for v in values]
        noise[tensor] = float(compute_signal_to_quantization_noice_ratio(values, restored))
    return ranges, noise


def calibration_texts(train, cfg: QuantizeConfig, seed: int) -> list[str]:
    if cfg.calibration_examples > len(train):
        raise DataError(
            f"quantize.calibration_examples is {cfg.calibration_examples} but the train split ({train.path}) has only "
            f"{len(train)} examples"
        )
    return random.Random(seed).sample(train.texts, cfg.calibration_examples)


def calibration_method(cfg: QuantizeConfig):
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[cfg.calibration_method]


def static(parent: Variant, source: Variant | None, cfg: QuantizeConfig, ctx: StageContext, out: Path) -> Produced:
    """Static INT8 on the same integer kernels as dynamic (QAttention, MatMulIntegerToFloat), with every
    activation range fixed by calibration. Without VNNI, QOperator/QDQ static graphs (QLinearMatMul, and
    Attention left in float) measured 1.2-1.3x slower than dynamic here (QDQ was not faster); this form runs at
    dynamic's speed."""
    import onnx

    if parent.format == "onnx-exit":
        return static_segments(parent, cfg, ctx, out)
    splits = load_splits(ctx.data, ctx.num_labels)
    calibration = calibration_texts(splits.train, cfg, ctx.seed)
    validation = validation_split(splits, ctx, out)
    fp32 = Path(parent.path) / "model.onnx"
    graph = onnx.load(str(fp32)).graph
    quantizable = sorted(n.name for n in graph.node if n.op_type in QUANTIZABLE)
    if unknown := [name for name in cfg.exclude_nodes if name not in quantizable]:
        raise ModelError(
            f"quantize.exclude_nodes: {unknown} are not MatMul or Attention nodes of {parent.id}'s graph "
            f"({len(quantizable)} are, e.g. {quantizable[:2]})"
        )
    feeds = encoded(parent.path, calibration, [i.name for i in graph.input])
    copy_tokenizer(parent.path, out)

    excluded = list(cfg.exclude_nodes)
    ort_dynamic(fp32, out / "model.onnx", cfg, excluded)
    ranges, activation_sqnr = calibrated_ranges(out / "model.onnx", feeds, calibration_method(cfg))

    def attempt() -> float:
        """Makes the dynamic INT8 graph in out/model.onnx static and scores it."""
        static_activations(out / "model.onnx", ranges)
        return onnx_accuracy(out, *validation)

    accuracy = attempt()
    if cfg.accuracy_tolerance is None:
        return Produced({}, {"excluded_nodes": excluded})

    def rebuild(now: list[str]) -> float:
        ort_dynamic(fp32, out / "model.onnx", cfg, now)
        return attempt()

    scores = sensitivity(graph, activation_sqnr, cfg)
    excluded, metrics = fall_back(
        parent, scores, excluded, accuracy, onnx_accuracy(Path(parent.path), *validation), rebuild, cfg
    )
    return Produced(metrics, {"excluded_nodes": excluded})


def sensitivity(graph, activation_sqnr: dict[str, float], cfg: QuantizeConfig) -> dict[str, float]:
    """Each quantized MatMul / Attention node's score, lower = more sensitive: its worse signal-to-quantization-noise
    ratio, activation (static range) or weight. Outliers in either are how per-tensor INT8 breaks a layer; the
    worst go back to float first."""
    import onnx

    weights = {t.name: t for t in graph.initializer}
    return {
        n.name: min(activation_sqnr[n.input[0]], weight_sqnr(onnx.numpy_helper.to_array(weights[n.input[1]]), cfg))
        for n in graph.node
        if n.op_type in QUANTIZABLE and n.input[0] in activation_sqnr and n.input[1] in weights
    }


def fall_back(
    parent: Variant,
    scores: dict[str, float],
    excluded: list[str],
    accuracy: float,
    parent_accuracy: float,
    rebuild: Callable[[list[str]], float],
    cfg: QuantizeConfig,
) -> tuple[list[str], dict[str, float]]:
    """The accuracy-aware fallback: while the drop against the fp32 parent exceeds the tolerance, the next 1, 2, 4, ...
    nodes not yet `excluded`, lowest score (most sensitive) first, stay in float (`rebuild(excluded)` makes the graph
    again and returns its accuracy), up to max_fallback_nodes. Returns the excluded nodes and the fallback's metrics."""
    ranked, step = sorted((name for name in scores if name not in excluded), key=scores.get), 1
    while parent_accuracy - accuracy > cfg.accuracy_tolerance and len(excluded) < cfg.max_fallback_nodes and ranked:
        take, ranked = ranked[:step], ranked[step:]
        excluded = excluded + take[: cfg.max_fallback_nodes - len(excluded)]
        accuracy = rebuild(excluded)
        log.info(
            "static fallback: %d nodes in float, accuracy %.4f (fp32 parent %.4f)",
            len(excluded),
            accuracy,
            parent_accuracy,
        )
        step *= 2
    met = parent_accuracy - accuracy <= cfg.accuracy_tolerance
    if not met:
        log.warning(
            "static INT8 of %s: drop %.4f still above tolerance %.4f with %d nodes in float",
            parent.id,
            parent_accuracy - accuracy,
            cfg.accuracy_tolerance,
            len(excluded),
        )
    return excluded, {
        "fallback_excluded_nodes": float(len(excluded) - len(cfg.exclude_nodes)),
        "fallback_tolerance_met": float(met),
    }


def static_segments(parent: Variant, cfg: QuantizeConfig, ctx: StageContext, out: Path) -> Produced:
    """Static INT8 of an early-exit variant: each segment graph made static as a whole graph is, calibrated on what
    reaches it at inference (the calibration texts for the first; the previous static segment's hidden states for
    the rest), then chained again. Nodes are named `<segment>:<node>` (e.g. `segment_01:Attention_0`), in
    exclude_nodes and in the fallback, which ranks the nodes of every segment together, scores the chained graph,
    and makes a segment again (and those after it, whose calibration inputs it changes) when a node of it falls back."""
    import onnx
    import onnxruntime as ort

    from ..early_exit import write_exit_graph

    names = json.loads((Path(parent.path) / EARLY_EXIT_FILE).read_text())["segments"]
    segments = [Path(parent.path) / SEGMENTS_DIR / name for name in names]
    graphs = [onnx.load(str(segment)).graph for segment in segments]
    quantizable = [f"{s.stem}:{n.name}" for s, g in zip(segments, graphs) for n in g.node if n.op_type in QUANTIZABLE]
    if unknown := [name for name in cfg.exclude_nodes if name not in quantizable]:
        raise ModelError(
            f"quantize.exclude_nodes: {unknown} are not MatMul or Attention nodes of {parent.id}'s segments, named "
            f"<segment>:<node> ({len(quantizable)} are, e.g. {quantizable[:2]})"
        )
    splits = load_splits(ctx.data, ctx.num_labels)
    calibration = calibration_texts(splits.train, cfg, ctx.seed)
    validation = validation_split(splits, ctx, out)
    copy_tokenizer(parent.path, out)
    (out / SEGMENTS_DIR).mkdir()
    shutil.copy2(Path(parent.path) / EARLY_EXIT_FILE, out / EARLY_EXIT_FILE)
    inputs = [encoded(parent.path, calibration, [i.name for i in graphs[0].input])]  # what reaches each segment
    noise: dict[int, dict[str, float]] = {}

    def build(in_float: list[str], first: int = 0) -> None:
        """Makes segments `first`... static, keeping the nodes `in_float` in float, and chains them again."""
        for k in range(first, len(segments)):
            int8 = out / SEGMENTS_DIR / segments[k].name
            ort_dynamic(
                segments[k],
                int8,
                cfg,
                [node for segment, node in map(segment_node, in_float) if segment == segments[k].stem],
            )
            ranges, noise[k] = calibrated_ranges(int8, inputs[k], calibration_method(cfg))
            static_activations(int8, ranges)
            if k + 1 < len(segments):
                session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
                hidden = [
                    {"hidden_states": session.run(["hidden_out"], feed)[0], "attention_mask": feed["attention_mask"]}
                    for feed in inputs[k]
                ]
                inputs[k + 1 :] = [hidden]  # later segments are all made again after this one
        write_exit_graph(out)

    excluded = list(cfg.exclude_nodes)
    build(excluded)
    if cfg.accuracy_tolerance is None:
        return Produced({}, {"excluded_nodes": excluded})

    def score() -> float:
        return onnx_accuracy(out, *validation, "onnx-exit")

    def rebuild(now: list[str]) -> float:
        added = {segment_node(name)[0] for name in now if name not in excluded}
        build(now, first=min(k for k, segment in enumerate(segments) if segment.stem in added))
        excluded[:] = now
        return score()

    scores = {
        f"{s.stem}:{name}": v
        for k, (s, g) in enumerate(zip(segments, graphs))
        for name, v in sensitivity(g, noise[k], cfg).items()
    }
    parent_accuracy = onnx_accuracy(Path(parent.path), *validation, "onnx-exit")
    kept, metrics = fall_back(parent, scores, list(excluded), score(), parent_accuracy, rebuild, cfg)
    return Produced(metrics, {"excluded_nodes": kept})


def segment_node(name: str) -> tuple[str, str]:
    """`segment_01:Attention_0` -> ("segment_01", "Attention_0")."""
    segment, _, node = name.partition(":")
    return segment, node
