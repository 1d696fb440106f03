"""The early-exit stage's knobs."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, model_validator

from ..base import StageBase
from ..training import TrainConfig

log = logging.getLogger("squeezeflow.early_exit")


HEADS_FILE = "exit_heads.safetensors"


class EarlyExitConfig(StageBase):
    kind: Literal["early_exit"] = "early_exit"
    criterion: Literal["entropy", "patience"] = Field(
        "entropy",
        description="entropy: leave when an exit's normalised entropy is below the threshold; patience: when this "
        "many successive exits agree.",
    )
    thresholds: list[float] = Field(
        min_length=1,
        description="Exit thresholds; each is a variant. entropy: 0..1 (0 never exits early); patience: an integer ≥ "
        "1.",
    )
    train_backbone: bool = Field(False, description="Train the encoder with the exits (joint) instead of freezing it.")
    pooling: Literal["mean", "cls"] = Field(
        "mean",
        description="What an exit reads: the mean of the layer's token states (what sentence encoders such as "
        "MiniLM are trained for; early layers' [CLS] carries little), or the [CLS] state like the final pooler.",
    )
    embedding_exit: bool = Field(
        False,
        description="Also an exit on the mean of the token embeddings, before the first layer: a bag-of-words "
        "guess that lets inputs it is sure of skip every layer (layer 0 in exit_layer and mean_exit_layer). Needs "
        "pooling: mean.",
    )
    training: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=2.0, learning_rate=5e-4, batch_size=32, max_examples=8000),
        description="Training of the exit classifiers (and the backbone when train_backbone).",
    )
    temperature: float = Field(2.0, gt=0, description="Temperature of the self-distillation from the final layer.")
    soft_weight: float = Field(
        0.7, ge=0, le=1, description="Weight of the final layer's soft targets; 1 − this goes to the labels."
    )
    opset: int = Field(18, ge=14, le=21, description="ONNX opset of the segment graphs.")
    optimize: Literal["none", "fusion"] = Field("fusion", description="ORT transformer fusion of each segment.")

    @model_validator(mode="after")
    def _thresholds_in_range(self) -> EarlyExitConfig:
        if self.embedding_exit and self.pooling != "mean":
            raise ValueError("embedding_exit needs pooling: mean (the [CLS] embedding is the same for every input)")
        if self.criterion == "entropy":
            bad = [t for t in self.thresholds if not 0.0 <= t <= 1.0]
            if bad:
                raise ValueError(f"entropy thresholds must lie in [0, 1], got {bad}")
        else:
            bad = [t for t in self.thresholds if t < 1 or t != int(t)]
            if bad:
                raise ValueError(f"patience thresholds must be whole numbers ≥ 1, got {bad}")
        return self

    def token(self, threshold: float) -> str:
        return f"early_exit[{int(threshold) if self.criterion == 'patience' else threshold:g}]"

    def training_knobs(self) -> dict:
        return self.knobs("thresholds", "criterion")
