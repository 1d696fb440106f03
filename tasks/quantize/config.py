"""The quantize stage's knobs and what each mode reads of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..base import DataError, StageBase, StrictModel
from ..variant import StageContext, Variant

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


# the knobs each mode reads: a variant's id and logged params hold only these, so that changing, say, the QAT
# budget does not make the dynamic and static variants (calibration, fallback) anew
WEIGHT_KNOBS = ("per_channel", "reduce_range")
EMBEDDING_KNOBS = ("quantize_embeddings", "embedding_bits", "embedding_block_size")
CALIBRATION_KNOBS = (
    "calibration_examples",
    "calibration_method",
    "exclude_nodes",
    "accuracy_tolerance",
    "max_fallback_nodes",
)
MODE_KNOBS: dict[str, tuple[str, ...]] = {
    "dynamic": WEIGHT_KNOBS + EMBEDDING_KNOBS,
    "static": WEIGHT_KNOBS + EMBEDDING_KNOBS + CALIBRATION_KNOBS,
    "qat": WEIGHT_KNOBS + EMBEDDING_KNOBS + ("calibration_examples", "calibration_method", "qat"),
    "torch-dynamic": (),
}

EXIT_MODES = ("dynamic", "static")  # the modes that also take an early-exit variant (its segments quantized one by one)
