"""INT8 quantization. Each mode is a small strategy chosen by name from the config:

- `dynamic`: ONNX Runtime dynamic quantization of the (fused) ONNX parent: MatMul and Attention → integer kernels.
- `static`: the same integer kernels as `dynamic`, with every activation's uint8 scale and zero point fixed
  by calibration on training examples (minmax / percentile / entropy), and an accuracy-aware fallback that
  keeps the most quantization-sensitive MatMul / Attention nodes in float until the drop versus the fp32
  parent is within tolerance.
- `qat`: fake-quant fine-tuning of the PyTorch source with distillation from the teacher, then exported and
  quantized the way it was simulated: by default with activation ranges fixed by calibration (the static graph),
  or measured on every call (the dynamic graph).
- `torch-dynamic`: PyTorch `quantize_dynamic` of the source's Linear layers (the optimisation guide's method).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import Field, field_validator

from .base import TORCH_LOCK, DataError, ModelError, StageBase, StrictModel, quiet
from .data import load_splits
from .export import ExportConfig, copy_tokenizer, export_onnx, replace_node
from .runtime import EARLY_EXIT_FILE, FOUR_BIT_CODES, SEGMENTS_DIR, TORCH_DYNAMIC_MARKER
from .variant import StageContext, Variant, derive, making, save_record, staged_dir

log = logging.getLogger("squeezeflow.quantize")

Mode = Literal["dynamic", "static", "qat", "torch-dynamic"]
QUANTIZABLE = (
    "MatMul",
    "Attention",
)  # the fp32 ops static INT8 runs on integer kernels (and the fallback keeps in float)


class QATConfig(StrictModel):
    epochs: float = Field(1.0, gt=0, description="Fake-quant fine-tuning passes over the (sampled) training data.")
    learning_rate: float = Field(2e-5, gt=0, lt=1, description="Peak AdamW learning rate.")
    batch_size: int = Field(16, ge=1, description="Examples per step.")
    max_examples: int | None = Field(2000, ge=1, description="Training examples used (seeded sample); None = all.")
    temperature: float = Field(2.0, gt=0, description="Distillation temperature.")
    soft_weight: float = Field(0.5, ge=0, le=1, description="Weight of the teacher's soft targets vs the labels.")
    best_on_validation: bool = Field(
        True,
        description="Score the fake-quant model on the validation split before and after fine-tuning, and export "
        "the better weights (false: always the fine-tuned ones).",
    )
    activations: Literal["static", "dynamic"] = Field(
        "static",
        description="static: each Linear's input is fake-quantized with a fixed uint8 range, its min and max over "
        "the calibration examples (calibration_examples), and the fine-tuned model is exported as the static INT8 "
        "graph, "
        "calibrated anew (calibration_method); dynamic: ranges measured on every batch, exported as the dynamic INT8 "
        "graph.",
    )


class QuantizeConfig(StageBase):
    kind: Literal["quantize"] = "quantize"
    modes: list[Mode] = Field(["dynamic"], min_length=1, description="INT8 modes; each becomes a variant.")
    per_channel: bool = Field(False, description="Per-output-channel weight scales.")
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI where 8-bit can saturate.")
    quantize_embeddings: bool = Field(
        False, description="ONNX Runtime modes: also store the word-embedding Gather in INT8 (smaller file)."
    )
    embedding_bits: Literal[8, 4] = Field(
        8,
        description="With quantize_embeddings: 8 (fused QEmbedLayerNormalization) or 4 (the word and position tables "
        "stored in 4 bits, about half the bytes of 8, in blocks that each keep a scale and zero point; ONNX Runtime "
        "decodes "
        "them to float once, when the session is created).",
    )
    embedding_block_size: int = Field(
        64, ge=16, le=1024, description="4-bit embeddings: values per scale (a power of two)."
    )
    calibration_examples: int = Field(
        128, ge=1, description="static (and QAT with static activations): training examples used for calibration."
    )
    calibration_method: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax", description="static (and QAT with static activations): how activation ranges are chosen."
    )
    exclude_nodes: list[str] = Field(
        [],
        description="static: MatMul / Attention node names (of the ONNX parent) to keep in float; of an early-exit "
        "parent, "
        "SEGMENT:NODE (e.g. `segment_01:Attention_0`).",
    )
    accuracy_tolerance: float | None = Field(
        0.005,
        ge=0,
        le=1,
        description="static: largest accepted accuracy drop vs the fp32 parent before nodes fall back to float (None: "
        "no fallback).",
    )
    max_fallback_nodes: int = Field(
        16, ge=0, description="static: at most this many MatMul / Attention nodes are kept in float by the fallback."
    )
    qat: QATConfig = Field(default_factory=QATConfig, description="qat: the fake-quant fine-tuning budget.")

    @field_validator("embedding_block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two (16, 32, 64, ...), got {value}")
        return value

    @property
    def four_bit_embeddings(self) -> bool:
        return self.quantize_embeddings and self.embedding_bits == 4

    @property
    def calibrates(self) -> bool:
        return "static" in self.modes or ("qat" in self.modes and self.qat.activations == "static")

    def preflight(self, train_examples: int) -> None:
        if self.calibrates and self.calibration_examples > train_examples:
            raise DataError(
                f"quantize.calibration_examples is {self.calibration_examples} but the train split has only "
                f"{train_examples} examples"
            )


@dataclass(frozen=True)
class Produced:
    """What a strategy made besides the files: extra metrics and params to log on the variant."""

    metrics: dict[str, float]
    params: dict


Strategy = Callable[[Variant, Variant | None, QuantizeConfig, StageContext, Path], Produced]


def _ort_dynamic(src: Path, dst: Path, cfg: QuantizeConfig, exclude: list[str] | None = None) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the word embedding sits in a Gather, or inside the fused EmbedLayerNormalization (-> QEmbedLayerNormalization)
    eight_bit_embeddings = cfg.quantize_embeddings and not cfg.four_bit_embeddings
    op_types = ["MatMul", "Attention"] + (["Gather", "EmbedLayerNormalization"] if eight_bit_embeddings else [])
    # ORT writes <input>-inferred.onnx beside its input and deletes it afterwards: two modes quantizing one parent at
    # once raced on that file (FileNotFoundError), so each quantizes a private copy next to its own output
    with tempfile.TemporaryDirectory(dir=dst.parent) as private:
        local = Path(private) / src.name
        shutil.copyfile(src, local)
        # ORT suggests shape pre-processing, which the fused graph (com.microsoft ops) does not admit
        with quiet("root", "Please consider to run pre-processing before quantization"):
            quantize_dynamic(
                local,
                dst,
                op_types_to_quantize=op_types,
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude or [],
                # shape inference cannot type the outputs of fused com.microsoft ops; they are all float
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    if cfg.four_bit_embeddings:
        _four_bit_embeddings(dst, cfg.embedding_block_size)


def four_bit_blocks(table, block_size: int):
    """Asymmetric 4-bit quantization of a [rows, width] float table in blocks of `block_size` along each row:
    (codes 0..15 as uint8 [rows, width], float32 scales [rows, blocks], zero points uint8 [rows, blocks])."""
    import numpy as np

    rows, width = table.shape
    if width % block_size:
        raise ModelError(f"quantize.embedding_block_size: {block_size} does not divide the embedding width {width}")
    blocks = table.reshape(rows, width // block_size, block_size)
    low, high = np.minimum(blocks.min(axis=2), 0), np.maximum(blocks.max(axis=2), 0)
    scales = ((high - low) / 15).astype(np.float32)
    scales[scales == 0] = 1
    zero = np.clip(np.round(-low / scales), 0, 15)
    codes = np.clip(np.round(blocks / scales[..., None]) + zero[..., None], 0, 15)
    return codes.reshape(rows, width).astype(np.uint8), scales, zero.astype(np.uint8)


def dequantized_blocks(table, block_size: int):
    """`table` as its 4-bit blocks read back (what the quantized graph computes with)."""
    codes, scales, zero = four_bit_blocks(table, block_size)
    rows, width = table.shape
    blocks = codes.reshape(rows, width // block_size, block_size).astype("float32") - zero[..., None]
    return (blocks * scales[..., None]).reshape(rows, width)


def _two_per_byte(codes):
    import numpy as np

    if codes.shape[1] % 2:
        codes = np.pad(codes, ((0, 0), (0, 1)))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def _unpacked(packed: str, rows: int, pairs: int, width: int, prefix: str):
    """Nodes turning `packed` ([rows, pairs] uint8, two 4-bit codes per byte, low nibble first) into float
    `prefix + "codes"` [rows, width] (width <= 2 * pairs); returns (nodes, constants)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    constants = {
        "sixteen": np.array(16, np.int32),
        "half_shape": np.array([rows, pairs, 1], np.int64),
        "shape": np.array([rows, 2 * pairs], np.int64),
    }
    c = {name: f"{prefix}{name}" for name in constants}
    nodes = [
        helper.make_node("Cast", [packed], [prefix + "int"], to=TensorProto.INT32),
        helper.make_node("Div", [prefix + "int", c["sixteen"]], [prefix + "high"]),
        helper.make_node("Mul", [prefix + "high", c["sixteen"]], [prefix + "high_x16"]),
        helper.make_node("Sub", [prefix + "int", prefix + "high_x16"], [prefix + "low"]),
        helper.make_node("Reshape", [prefix + "low", c["half_shape"]], [prefix + "low_3d"]),
        helper.make_node("Reshape", [prefix + "high", c["half_shape"]], [prefix + "high_3d"]),
        helper.make_node("Concat", [prefix + "low_3d", prefix + "high_3d"], [prefix + "pairs"], axis=2),
        helper.make_node("Reshape", [prefix + "pairs", c["shape"]], [prefix + "codes_int"]),
    ]
    if width < 2 * pairs:  # an odd width was padded with one code per row
        constants["kept"] = np.arange(width, dtype=np.int64)
        c["kept"] = prefix + "kept"
        nodes.append(helper.make_node("Gather", [prefix + "codes_int", c["kept"]], [prefix + "codes_kept"], axis=1))
    nodes.append(helper.make_node("Cast", [nodes[-1].output[0]], [prefix + "codes"], to=TensorProto.FLOAT))
    for node in nodes:
        node.name = node.output[0]
    return nodes, [numpy_helper.from_array(value, c[name]) for name, value in constants.items()]


def _four_bit_embeddings(path: Path, block_size: int) -> None:
    """The word and position tables of the model at `path` in 4 bits, in place. Each is stored as two codes per
    byte with a scale and zero point per block of `block_size` values (`<table>` + FOUR_BIT_CODES, its other
    constants under `<table>` + FOUR_BIT_CODES + "/"), and decoded back to float by standard ops on those
    constants alone. ONNX Runtime's constant folding runs them once, when a session is created (at any graph
    optimisation level but disabled), so the file holds 4-bit tables while the fused EmbedLayerNormalization reads
    a float table on every call, as in the float model (a 4-bit Gather per call, GatherBlockQuantized, made the
    3-layer student 2-4 % slower; the float tables cost memory instead). The token-type table (a couple of rows)
    stays float; a graph without embedding tables (an inner early-exit segment) is left as it is."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    tables = {
        t.name: t
        for t in graph.initializer
        if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT and t.dims[0] >= 16
    }
    read = [
        (node, slot)
        for node in graph.node
        for slot, name in enumerate(node.input)
        if name in tables
        and (
            (node.op_type == "Gather" and slot == 0)
            or (node.op_type == "EmbedLayerNormalization" and slot in (2, 3, 4))
        )
    ]
    if not read:
        return
    first_reader = min(list(graph.node).index(node) for node, _ in read)
    decoders = []
    for name in sorted({node.input[slot] for node, slot in read}):
        table = numpy_helper.to_array(tables[name])
        rows, width = table.shape
        codes, scales, zero = four_bit_blocks(table, block_size)
        blocks = width // block_size
        packed, p = name + FOUR_BIT_CODES, name + FOUR_BIT_CODES + "/"
        code_nodes, code_constants = _unpacked(packed, rows, (width + 1) // 2, width, p + "codes/")
        zero_nodes, zero_constants = _unpacked(p + "zero_points", rows, (blocks + 1) // 2, blocks, p + "zero_points/")
        graph.initializer.remove(tables[name])
        graph.initializer.extend(
            [
                numpy_helper.from_array(_two_per_byte(codes), packed),
                numpy_helper.from_array(_two_per_byte(zero), p + "zero_points"),
                numpy_helper.from_array(scales[..., None], p + "scales"),
                numpy_helper.from_array(np.array([rows, blocks, block_size], np.int64), p + "blocked_shape"),
                numpy_helper.from_array(np.array([rows, blocks, 1], np.int64), p + "block_shape"),
                numpy_helper.from_array(np.array([rows, width], np.int64), p + "table_shape"),
                *code_constants,
                *zero_constants,
            ]
        )
        decoded = name + "_decoded"
        decoders += (
            code_nodes
            + zero_nodes
            + [
                helper.make_node(
                    "Reshape", [p + "codes/codes", p + "blocked_shape"], [p + "blocked"], name=p + "blocked"
                ),
                helper.make_node(
                    "Reshape", [p + "zero_points/codes", p + "block_shape"], [p + "zero"], name=p + "zero"
                ),
                helper.make_node("Sub", [p + "blocked", p + "zero"], [p + "centred"], name=p + "centred"),
                helper.make_node("Mul", [p + "centred", p + "scales"], [p + "values"], name=p + "values"),
                helper.make_node("Reshape", [p + "values", p + "table_shape"], [decoded], name=decoded),
            ]
        )
        for node, slot in read:
            if node.input[slot] == name:
                node.input[slot] = decoded
    for offset, node in enumerate(decoders):
        graph.node.insert(first_reader + offset, node)
    onnx.save(model, str(path))


def dynamic(parent: Variant, source: Variant | None, cfg: QuantizeConfig, ctx: StageContext, out: Path) -> Produced:
    """The parent's model.onnx; for an early-exit variant, each segment, then chained again into model.onnx."""
    copy_tokenizer(parent.path, out)
    if parent.format != "onnx-exit":
        _ort_dynamic(Path(parent.path) / "model.onnx", out / "model.onnx", cfg)
        return Produced({}, {})
    from .early_exit import write_exit_graph

    (out / SEGMENTS_DIR).mkdir()
    for graph in sorted((Path(parent.path) / SEGMENTS_DIR).glob("*.onnx")):
        _ort_dynamic(graph, out / SEGMENTS_DIR / graph.name, cfg)
    shutil.copy2(Path(parent.path) / EARLY_EXIT_FILE, out / EARLY_EXIT_FILE)
    write_exit_graph(out)
    return Produced({}, {})


# ---------------------------------------------------------------------------------------------- static


def _encoded(tokenizer_dir: str | Path, texts: list[str], input_names: list[str]) -> list[dict]:
    from .runtime import TextEncoder

    # one row per feed, all padded to the longest text (ORT's QDQ debugging concatenates the feeds)
    columns = TextEncoder(Path(tokenizer_dir))(texts)
    return [{name: columns[name][row : row + 1] for name in input_names} for row in range(len(texts))]


def _reader(feeds: list[dict]):
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    return Feeds()


def _validation(splits, ctx: StageContext, out: Path) -> tuple[list[str], list[int]]:
    """The validation texts and what the fallback scores them against (labels, or the teacher's if it has none)."""
    from .distill import validation_truth

    if splits.validation.labels is None and ctx.teacher is None:
        raise ModelError("quantize static: the validation split has no labels and there is no teacher to label it")
    teacher = ctx.teacher.path if ctx.teacher else None
    texts, truth = validation_truth(splits.validation, teacher, ctx.max_length, ctx.cache_dir or out.parent / ".cache")
    return texts, list(truth)


def _accuracy(model_dir: Path, texts: list[str], labels: list[int], fmt: str = "onnx") -> float:
    from .runtime import load_predictor

    predictor = load_predictor(model_dir, fmt, threads=2)
    hits = sum(
        int(p == y)
        for i in range(0, len(texts), 32)
        for p, y in zip(predictor.logits(texts[i : i + 32]).argmax(-1), labels[i : i + 32])
    )
    return hits / len(texts)


def _uint8_scale_zero(low: float, high: float):
    """(zero point, scale) of uint8 activations covering [low, high] and 0, as DynamicQuantizeLinear sets them."""
    import numpy as np
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    return compute_scale_zp(np.float32(min(low, 0.0)), np.float32(max(high, 0.0)), np.uint8(0), np.uint8(255))


def _static_activations(path: Path, ranges: dict[str, tuple[float, float]]) -> None:
    """Turns the dynamic INT8 graph at `path` static, in place: each DynamicQuantizeLinear (which measures its
    input's range on every call) becomes a QuantizeLinear with the calibrated scale and zero point, and each
    MatMulInteger -> Cast -> Mul(scales) (-> Add(bias)) chain becomes one MatMulIntegerToFloat. ONNX Runtime only
    fuses that chain itself when the activation scale is computed at run time, and unfused it costs more than it
    saves."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    for node in [n for n in graph.node if n.op_type == "DynamicQuantizeLinear"]:
        tensor = node.input[0]
        if tensor not in ranges:
            raise ModelError(f"static INT8: no calibrated range for {tensor!r} (read by {node.name})")
        low, high = ranges[tensor]
        zero, scale = _uint8_scale_zero(low, high)
        quantized, scale_name, zero_name = node.output
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.asarray(scale, dtype=np.float32), scale_name),
                numpy_helper.from_array(np.asarray(zero, dtype=np.uint8), zero_name),
            ]
        )
        replace_node(
            graph,
            node,
            [
                helper.make_node(
                    "QuantizeLinear", [tensor, scale_name, zero_name], [quantized], name=node.name + "_static"
                )
            ],
        )
    producer = {out: n for n in graph.node for out in n.output}
    widths = {t.name: t.dims[-1] for t in graph.initializer if t.dims}
    vectors = {t.name: t.dims[0] for t in graph.initializer if len(t.dims) == 1}  # a bias: one value per output column
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def only_consumer(tensor: str, op_type: str):
        found = consumers.get(tensor, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    for matmul in [n for n in graph.node if n.op_type == "MatMulInteger"]:
        cast = only_consumer(matmul.output[0], "Cast")
        scale = cast and only_consumer(cast.output[0], "Mul")
        product = scale and producer.get(next(i for i in scale.input if i != cast.output[0]))
        if product is None or product.op_type != "Mul":
            continue  # not the chain ORT's quantizer writes: leave it unfused
        inputs = [matmul.input[0], matmul.input[1], *product.input, *(list(matmul.input[2:4]) + ["", ""])[:2]]
        fused = helper.make_node(
            "MatMulIntegerToFloat", inputs, [scale.output[0]], name=matmul.name + "_to_float", domain="com.microsoft"
        )
        # the bias Add after it goes into the kernel too, as ORT fuses it into the dynamic graph's
        # DynamicQuantizeMatMul:
        # (profiled on the 3-layer student, the Adds took 122 µs a call in the static graph, 53 in the dynamic one)
        add = only_consumer(scale.output[0], "Add")
        bias = add and next((i for i in add.input if i != scale.output[0]), None)
        if bias in vectors and vectors[bias] == widths.get(matmul.input[1]):
            fused.input.append(bias)
            fused.output[0] = add.output[0]
            graph.node.remove(add)
        replace_node(graph, matmul, [fused])
        graph.node.remove(cast)
        graph.node.remove(scale)
        if len(consumers[product.output[0]]) == 1:
            graph.node.remove(product)
    onnx.save(model, str(path))


def _weight_sqnr(weight, cfg: QuantizeConfig) -> float:
    """Signal-to-quantization-noise ratio (dB) of a MatMul weight [in, out] stored as ORT's dynamic quantizer
    stores it: symmetric int8 ([-127, 127], or [-64, 64] with reduce_range), one scale per output column with
    per_channel, else one for the tensor."""
    import numpy as np
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

    levels = 64.0 if cfg.reduce_range else 127.0
    peak = np.abs(weight).max(axis=0 if cfg.per_channel else None, keepdims=True)
    scale = np.maximum(peak / levels, 1e-12)
    return float(compute_signal_to_quantization_noice_ratio(weight, np.round(weight / scale) * scale))


def _calibrated_ranges(
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
        calibrator.collect_data(_reader(feeds))
        data = calibrator.compute_data()
        ranges = {t: tuple(float(np.asarray(v).item()) for v in data[t].range_value) for t in tensors}
        model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
        onnx.save(model, str(typed))
        session = ort.InferenceSession(str(typed), providers=["CPUExecutionProvider"])
        samples = [session.run(tensors, feed) for feed in feeds[:32]]
    noise = {}
    for i, tensor in enumerate(tensors):
        low, high = ranges[tensor]
        zero, scale = _uint8_scale_zero(low, high)
        values = [s[i] for s in samples]
        restored = [(np.clip(np.round(v / scale) + zero, 0, 255) - zero) * scale for v in values]
        noise[tensor] = float(compute_signal_to_quantization_noice_ratio(values, restored))
    return ranges, noise


def _calibration_texts(train, cfg: QuantizeConfig, seed: int) -> list[str]:
    if cfg.calibration_examples > len(train):
        raise DataError(
            f"quantize.calibration_examples is {cfg.calibration_examples} but the train split ({train.path}) has only "
            f"{len(train)} examples"
        )
    return random.Random(seed).sample(train.texts, cfg.calibration_examples)


def _calibration_method(cfg: QuantizeConfig):
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
        return _static_segments(parent, cfg, ctx, out)
    splits = load_splits(ctx.data, ctx.num_labels)
    calibration = _calibration_texts(splits.train, cfg, ctx.seed)
    validation = _validation(splits, ctx, out)
    fp32 = Path(parent.path) / "model.onnx"
    graph = onnx.load(str(fp32)).graph
    quantizable = sorted(n.name for n in graph.node if n.op_type in QUANTIZABLE)
    if unknown := [name for name in cfg.exclude_nodes if name not in quantizable]:
        raise ModelError(
            f"quantize.exclude_nodes: {unknown} are not MatMul or Attention nodes of {parent.id}'s graph "
            f"({len(quantizable)} are, e.g. {quantizable[:2]})"
        )
    feeds = _encoded(parent.path, calibration, [i.name for i in graph.input])
    copy_tokenizer(parent.path, out)

    excluded = list(cfg.exclude_nodes)
    _ort_dynamic(fp32, out / "model.onnx", cfg, excluded)
    ranges, activation_sqnr = _calibrated_ranges(out / "model.onnx", feeds, _calibration_method(cfg))

    def attempt() -> float:
        """Makes the dynamic INT8 graph in out/model.onnx static and scores it."""
        _static_activations(out / "model.onnx", ranges)
        return _accuracy(out, *validation)

    accuracy = attempt()
    if cfg.accuracy_tolerance is None:
        return Produced({}, {"excluded_nodes": excluded})

    def rebuild(now: list[str]) -> float:
        _ort_dynamic(fp32, out / "model.onnx", cfg, now)
        return attempt()

    scores = _sensitivity(graph, activation_sqnr, cfg)
    excluded, metrics = _fall_back(
        parent, scores, excluded, accuracy, _accuracy(Path(parent.path), *validation), rebuild, cfg
    )
    return Produced(metrics, {"excluded_nodes": excluded})


def _sensitivity(graph, activation_sqnr: dict[str, float], cfg: QuantizeConfig) -> dict[str, float]:
    """Each quantized MatMul / Attention node's score, lower = more sensitive: its worse signal-to-quantization-noise
    ratio, activation (static range) or weight. Outliers in either are how per-tensor INT8 breaks a layer; the
    worst go back to float first."""
    import onnx

    weights = {t.name: t for t in graph.initializer}
    return {
        n.name: min(activation_sqnr[n.input[0]], _weight_sqnr(onnx.numpy_helper.to_array(weights[n.input[1]]), cfg))
        for n in graph.node
        if n.op_type in QUANTIZABLE and n.input[0] in activation_sqnr and n.input[1] in weights
    }


def _fall_back(
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


def _static_segments(parent: Variant, cfg: QuantizeConfig, ctx: StageContext, out: Path) -> Produced:
    """Static INT8 of an early-exit variant: each segment graph made static as a whole graph is, calibrated on what
    reaches it at inference (the calibration texts for the first; the previous static segment's hidden states for
    the rest), then chained again. Nodes are named `<segment>:<node>` (e.g. `segment_01:Attention_0`), in
    exclude_nodes and in the fallback, which ranks the nodes of every segment together, scores the chained graph,
    and makes a segment again (and those after it, whose calibration inputs it changes) when a node of it falls back."""
    import onnx
    import onnxruntime as ort

    from .early_exit import write_exit_graph

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
    calibration = _calibration_texts(splits.train, cfg, ctx.seed)
    validation = _validation(splits, ctx, out)
    copy_tokenizer(parent.path, out)
    (out / SEGMENTS_DIR).mkdir()
    shutil.copy2(Path(parent.path) / EARLY_EXIT_FILE, out / EARLY_EXIT_FILE)
    inputs = [_encoded(parent.path, calibration, [i.name for i in graphs[0].input])]  # what reaches each segment
    noise: dict[int, dict[str, float]] = {}

    def build(in_float: list[str], first: int = 0) -> None:
        """Makes segments `first`... static, keeping the nodes `in_float` in float, and chains them again."""
        for k in range(first, len(segments)):
            int8 = out / SEGMENTS_DIR / segments[k].name
            _ort_dynamic(
                segments[k],
                int8,
                cfg,
                [node for segment, node in map(_segment_node, in_float) if segment == segments[k].stem],
            )
            ranges, noise[k] = _calibrated_ranges(int8, inputs[k], _calibration_method(cfg))
            _static_activations(int8, ranges)
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
        return _accuracy(out, *validation, "onnx-exit")

    def rebuild(now: list[str]) -> float:
        added = {_segment_node(name)[0] for name in now if name not in excluded}
        build(now, first=min(k for k, segment in enumerate(segments) if segment.stem in added))
        excluded[:] = now
        return score()

    scores = {
        f"{s.stem}:{name}": v
        for k, (s, g) in enumerate(zip(segments, graphs))
        for name, v in _sensitivity(g, noise[k], cfg).items()
    }
    parent_accuracy = _accuracy(Path(parent.path), *validation, "onnx-exit")
    kept, metrics = _fall_back(parent, scores, list(excluded), score(), parent_accuracy, rebuild, cfg)
    return Produced(metrics, {"excluded_nodes": kept})


def _segment_node(name: str) -> tuple[str, str]:
    """`segment_01:Attention_0` -> ("segment_01", "Attention_0")."""
    segment, _, node = name.partition(":")
    return segment, node


# ---------------------------------------------------------------------------------------------- QAT


def _fake_quant_linear(
    linear, per_channel: bool, reduce_range: bool, activation_range: tuple[float, float] | None = None
):
    """Wraps an nn.Linear so training sees what ORT's INT8 kernels compute: uint8 activations with a per-batch
    range (dynamic) or the fixed `activation_range` (static), int8 symmetric weights, per tensor or per output
    channel, 7-bit with `reduce_range` (straight-through gradients)."""
    import torch

    levels = 64.0 if reduce_range else 127.0  # ORT's symmetric int8 range: [-127, 127], reduced [-64, 64]
    fixed = None if activation_range is None else _uint8_scale_zero(*activation_range)

    class FakeQuantLinear(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if fixed is not None:
                xq = torch.fake_quantize_per_tensor_affine(x, float(fixed[1]), int(fixed[0]), 0, 255)
            else:
                lo = torch.clamp(x.detach().min(), max=0.0)
                hi = torch.clamp(x.detach().max(), min=0.0)
                scale = torch.clamp((hi - lo) / 255.0, min=1e-8)
                zero = torch.clamp(torch.round(-lo / scale), 0, 255).to(torch.int32)
                xq = torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)
            w = self.inner.weight
            if per_channel:  # one scale per output feature: a row of the Linear's weight, a column of ORT's MatMul
                w_scale = torch.clamp(w.detach().abs().amax(dim=1) / levels, min=1e-8)
                zeros = torch.zeros(w.shape[0], dtype=torch.int32)
                wq = torch.fake_quantize_per_channel_affine(w, w_scale, zeros, 0, -int(levels), int(levels))
            else:  # approximate inside fused Attention, where Q, K and V share one scale; per channel is exact
                w_scale = torch.clamp(w.detach().abs().max() / levels, min=1e-8)
                wq = torch.fake_quantize_per_tensor_affine(
                    w, w_scale, torch.zeros((), dtype=torch.int32), -int(levels), int(levels)
                )
            return torch.nn.functional.linear(xq, wq, self.inner.bias)

    return FakeQuantLinear(linear)


def _swap_linears(module, cfg: QuantizeConfig | None, ranges: dict[str, tuple[float, float]] | None = None) -> None:
    """With a config, wraps every Linear under `module` in fake quantization matching it (with `ranges`, each
    Linear's input range by its name under `module`, fixed); without, unwraps them."""
    import torch

    if cfg is None:
        found = [(name, m.inner) for name, m in module.named_modules() if m.__class__.__name__ == "FakeQuantLinear"]
    else:
        found = [
            (name, _fake_quant_linear(m, cfg.per_channel, cfg.reduce_range, None if ranges is None else ranges[name]))
            for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear)
        ]
    for name, replacement in found:
        owner, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(owner), attribute, replacement)


def _linear_input_ranges(module, model, tokenizer, texts: list[str]) -> dict[str, tuple[float, float]]:
    """The min and max of every Linear input under `module` (by name) over `texts`, one text per call, as the
    static mode calibrates its graph."""
    import torch

    ranges: dict[str, tuple[float, float]] = {}

    def observe(name: str):
        def hook(_, args):
            low, high = float(args[0].min()), float(args[0].max())
            seen = ranges.get(name, (low, high))
            ranges[name] = (min(seen[0], low), max(seen[1], high))

        return hook

    hooks = [
        m.register_forward_pre_hook(observe(name))
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        with torch.inference_mode():
            for text in texts:
                model(**tokenizer([text], truncation=True, return_tensors="pt"))
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def _freeze_on_four_bit_grid(embeddings, block_size: int) -> None:
    """The word and position tables snapped to the 4-bit values they will be stored as, and frozen, so the
    fine-tuning adapts the encoder to them (storing them again in 4 bits reproduces the same values)."""
    import torch

    for name in ("word_embeddings", "position_embeddings"):
        if (module := getattr(embeddings, name, None)) is None:
            continue
        table = module.weight
        with torch.no_grad():
            table.copy_(torch.from_numpy(dequantized_blocks(table.detach().numpy(), block_size)))
        table.requires_grad_(False)


def qat(parent: Variant, source: Variant | None, cfg: QuantizeConfig, ctx: StageContext, out: Path) -> Produced:
    with TORCH_LOCK:
        return _qat(parent, source, cfg, ctx, out)


def _qat(parent: Variant, source: Variant | None, cfg: QuantizeConfig, ctx: StageContext, out: Path) -> Produced:
    import onnx
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .distill import teacher_logits, validation_truth
    from .training import TrainConfig, accuracy_on, kd_loss, sample_indices, train

    if source is None or ctx.teacher is None:
        raise ModelError(f"QAT of {parent.id} needs its PyTorch source model and the teacher")
    splits = load_splits(ctx.data, ctx.num_labels)
    train_split, q = splits.train, cfg.qat
    pick = sample_indices(len(train_split), q.max_examples, ctx.seed)
    texts = [train_split.texts[i] for i in pick]
    labels = [train_split.labels[i] for i in pick] if train_split.labels is not None else None
    model = AutoModelForSequenceClassification.from_pretrained(source.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    encoder = getattr(model, model.base_model_prefix)
    if cfg.four_bit_embeddings:
        _freeze_on_four_bit_grid(encoder.embeddings, cfg.embedding_block_size)
    ranges = calibration = None
    if q.activations == "static":
        calibration = _calibration_texts(train_split, cfg, ctx.seed)  # the static mode's examples
        ranges = _linear_input_ranges(encoder.encoder, model, tokenizer, calibration)
    _swap_linears(encoder.encoder, cfg, ranges)  # the encoder's Linears are what ORT quantizes (MatMul / Attention)
    # the teacher's logits come from its own tokenizer: the source's may differ (a pruned vocabulary)
    cache_dir = ctx.cache_dir or out.parent / ".cache"
    targets = teacher_logits(ctx.teacher.path, texts, ctx.max_length, cache_dir)
    validation, val_truth = validation_truth(splits.validation, ctx.teacher.path, ctx.max_length, cache_dir)
    figures = train(
        model,
        tokenizer,
        texts,
        labels,
        # fp32: the fake quantization must see the values ORT's integer kernels will see, not bf16 roundings of them
        TrainConfig(
            epochs=q.epochs, learning_rate=q.learning_rate, batch_size=q.batch_size, warmup_ratio=0.1, precision="fp32"
        ),
        max_length=ctx.max_length,
        seed=ctx.seed,
        targets=targets,
        loss_fn=lambda outputs, batch: kd_loss(
            outputs.logits,
            batch["teacher_logits"],
            batch.get("labels"),
            temperature=q.temperature,
            soft_weight=q.soft_weight,
        ),
        evaluate=(lambda: accuracy_on(model, tokenizer, validation, val_truth, ctx.max_length))
        if q.best_on_validation
        else None,
    )
    _swap_linears(encoder.encoder, None)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "hf")
        tokenizer.save_pretrained(Path(tmp) / "hf")
        export_onnx(Path(tmp) / "hf", Path(tmp) / "onnx", ExportConfig(**parent.params))
        _ort_dynamic(Path(tmp) / "onnx" / "model.onnx", out / "model.onnx", cfg)
        if calibration is not None:  # the ranges of the fine-tuned model, calibrated as the static mode does
            feeds = _encoded(parent.path, calibration, [i.name for i in onnx.load(str(out / "model.onnx")).graph.input])
            _static_activations(
                out / "model.onnx", _calibrated_ranges(out / "model.onnx", feeds, _calibration_method(cfg))[0]
            )
    copy_tokenizer(parent.path, out)
    metrics = {"qat_train_seconds": figures["train_seconds"], "qat_train_loss": figures["train_loss"]}
    if q.best_on_validation:  # the fake-quant model on the validation split, before fine-tuning (PTQ) and as exported
        metrics |= {
            "qat_initial_validation_accuracy": figures["initial_validation_score"],
            "qat_validation_accuracy": figures["best_validation_score"],
        }
    return Produced(metrics, {})


# ---------------------------------------------------------------------------------------------- torch


def torch_dynamic(
    parent: Variant, source: Variant | None, cfg: QuantizeConfig, ctx: StageContext, out: Path
) -> Produced:
    """The weights stay fp32 safetensors on disk (a quantized PyTorch module has no safe serialisation); the
    marker file tells the runtime to apply `torch.ao.quantization.quantize_dynamic` on load."""
    for file in Path(parent.path).iterdir():
        if file.is_file():
            shutil.copy2(file, out / file.name)
    (out / TORCH_DYNAMIC_MARKER).write_text(json.dumps({"modules": ["Linear"], "dtype": "qint8"}))
    return Produced({}, {})


# the knobs each mode reads: a variant's id and logged params hold only these, so that changing, say, the QAT
# budget does not make the dynamic and static variants (calibration, fallback) anew
_WEIGHT_KNOBS = ("per_channel", "reduce_range")
_EMBEDDING_KNOBS = ("quantize_embeddings", "embedding_bits", "embedding_block_size")
_CALIBRATION_KNOBS = (
    "calibration_examples",
    "calibration_method",
    "exclude_nodes",
    "accuracy_tolerance",
    "max_fallback_nodes",
)
MODE_KNOBS: dict[str, tuple[str, ...]] = {
    "dynamic": _WEIGHT_KNOBS + _EMBEDDING_KNOBS,
    "static": _WEIGHT_KNOBS + _EMBEDDING_KNOBS + _CALIBRATION_KNOBS,
    "qat": _WEIGHT_KNOBS + _EMBEDDING_KNOBS + ("calibration_examples", "calibration_method", "qat"),
    "torch-dynamic": (),
}

EXIT_MODES = ("dynamic", "static")  # the modes that also take an early-exit variant (its segments quantized one by one)

# mode -> (lineage token, output format, which parent it takes, strategy)
MODES: dict[str, tuple[str, str, str, Strategy]] = {
    "dynamic": ("int8-dynamic", "onnx", "onnx", dynamic),
    "static": ("int8-static", "onnx", "onnx", static),
    "qat": ("int8-qat", "onnx", "onnx", qat),
    "torch-dynamic": ("torch-int8-dynamic", "hf", "hf", torch_dynamic),
}


def quantize(
    parent: Variant, mode: Mode, cfg: QuantizeConfig, ctx: StageContext, out_root: Path, source: Variant | None = None
) -> Variant:
    """`parent` is the variant the mode works on (ONNX for ORT modes, PyTorch for torch-dynamic); `source` is the
    PyTorch model an ONNX parent was exported from (QAT fine-tunes it)."""
    token, fmt, parent_format, strategy = MODES[mode]
    if mode in EXIT_MODES and parent.format == "onnx-exit":  # each segment graph is quantized
        parent_format = fmt = "onnx-exit"
    if parent.format != parent_format:
        raise ModelError(f"quantize {mode}: needs a {parent_format} variant, {parent.id} is {parent.format}")
    knobs = {"mode": mode, **{k: v for k, v in cfg.knobs("modes").items() if k in MODE_KNOBS[mode]}}
    reads_data = mode in ("static", "qat")  # calibration, the fallback and QAT read the data; the others do not
    child = derive(
        parent,
        stage="quantize",
        token=token,
        params=knobs,
        format=fmt,
        out_root=out_root,
        data=ctx.data_fingerprint if reads_data else None,
    )
    with making(child) as done:
        if done:
            return done
        with staged_dir(Path(child.path)) as scratch:
            produced = strategy(parent, source, cfg, ctx, scratch)
            child = save_record(
                scratch,
                child.model_copy(update={"metrics": produced.metrics, "params": {**child.params, **produced.params}}),
            )
        log.info("quantized %s (%s) -> %s", parent.id, mode, child.id)
        return child


@task(name="quantize")
def quantize_task(
    parent: Variant, mode: Mode, cfg: QuantizeConfig, ctx: StageContext, out_root: Path, source: Variant | None = None
) -> Variant:
    return quantize(parent, mode, cfg, ctx, out_root, source)
