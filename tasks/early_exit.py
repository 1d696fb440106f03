"""Dynamic pruning by early exit: a classifier after every encoder layer, trained by self-distillation from the
final layer; at inference each input stops at the first layer whose exit is confident enough (entropy) or
stable enough (patience). The runtime is per-segment ONNX run by ONNX Runtime (see runtime.EarlyExitPredictor)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import numpy as np
from prefect import task
from pydantic import Field, model_validator

from .base import StageBase, TORCH_LOCK, ModelError
from .data import load_splits
from .distill import teacher_logits
from .export import copy_tokenizer, fuse
from .prune import encoder_layers
from .runtime import EARLY_EXIT_FILE, EXIT_RULES
from .training import TrainConfig, kd_loss, sample_indices, train
from .variant import StageContext, Variant, derive, exclusive, finished, save_record, staged_dir, variant_id

log = logging.getLogger("squeezeflow.early_exit")

HEADS_FILE = "exit_heads.safetensors"


class EarlyExitConfig(StageBase):
    kind: Literal["early_exit"] = "early_exit"
    criterion: Literal["entropy", "patience"] = Field(
        "entropy", description="entropy: leave when an exit's normalised entropy is below the threshold; patience: when this many successive exits agree."
    )
    thresholds: list[float] = Field(
        min_length=1, description="Exit thresholds; each is a variant. entropy: 0..1 (0 never exits early); patience: an integer ≥ 1."
    )
    train_backbone: bool = Field(False, description="Train the encoder with the exits (joint) instead of freezing it.")
    training: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=2.0, learning_rate=5e-4, batch_size=32, max_examples=8000),
        description="Training of the exit classifiers (and the backbone when train_backbone).",
    )
    temperature: float = Field(2.0, gt=0, description="Temperature of the self-distillation from the final layer.")
    soft_weight: float = Field(0.7, ge=0, le=1, description="Weight of the final layer's soft targets; 1 − this goes to the labels.")
    opset: int = Field(18, ge=14, le=21, description="ONNX opset of the segment graphs.")
    optimize: Literal["none", "fusion"] = Field("fusion", description="ORT transformer fusion of each segment.")

    @model_validator(mode="after")
    def _thresholds_in_range(self) -> EarlyExitConfig:
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


def _torch_modules():
    """The exit head and the segment wrappers, defined lazily so importing this module does not import torch."""
    import torch
    from torch import nn

    class ExitHead(nn.Module):
        """Pooler-shaped head on the [CLS] state (dense + tanh + classifier), started from the model's own."""

        def __init__(self, pooler_dense: nn.Linear, classifier: nn.Linear):
            super().__init__()
            self.dense = nn.Linear(pooler_dense.in_features, pooler_dense.out_features)
            self.classifier = nn.Linear(classifier.in_features, classifier.out_features)
            self.dense.load_state_dict(pooler_dense.state_dict())
            self.classifier.load_state_dict(classifier.state_dict())

        def forward(self, hidden):
            return self.classifier(torch.tanh(self.dense(hidden[:, 0])))

    class FinalHead(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.pooler, self.classifier = encoder_layers(model)[0].pooler, model.classifier

        def forward(self, hidden):
            return self.classifier(self.pooler(hidden))

    def additive_mask(attention_mask, dtype):
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    class EntrySegment(nn.Module):
        def __init__(self, embeddings, layer, head):
            super().__init__()
            self.embeddings, self.layer, self.head = embeddings, layer, head

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            hidden = self.layer(hidden, attention_mask=additive_mask(attention_mask, hidden.dtype))[0]
            return hidden, self.head(hidden)

    class InnerSegment(nn.Module):
        def __init__(self, layer, head):
            super().__init__()
            self.layer, self.head = layer, head

        def forward(self, hidden_states, attention_mask):
            hidden = self.layer(hidden_states, attention_mask=additive_mask(attention_mask, hidden_states.dtype))[0]
            return hidden, self.head(hidden)

    class ExitModel(nn.Module):
        """The classifier plus its exit heads; forward gives the final logits and every exit's logits."""

        def __init__(self, model, heads, train_backbone: bool):
            super().__init__()
            self.model, self.heads, self.train_backbone = model, nn.ModuleList(heads), train_backbone
            for p in model.parameters():
                p.requires_grad_(train_backbone)

        def train(self, mode: bool = True):
            super().train(mode)
            if not self.train_backbone:
                self.model.eval()  # a frozen encoder gives its exits the features they will see at inference
            return self

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, output_hidden_states=True)
            exits = [head(hidden) for head, hidden in zip(self.heads, out.hidden_states[1:-1])]
            return SimpleNamespace(logits=out.logits, exit_logits=exits)

    return SimpleNamespace(ExitHead=ExitHead, FinalHead=FinalHead, EntrySegment=EntrySegment, InnerSegment=InnerSegment, ExitModel=ExitModel)


def build_exit_model(model_dir: str | Path, train_backbone: bool = False):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager")
    base, layers = encoder_layers(model)
    if getattr(base, "pooler", None) is None or not hasattr(model, "classifier"):
        raise ModelError(f"early_exit: {model_dir} has no pooler + classifier head to copy into the exits")
    modules = _torch_modules()
    heads = [modules.ExitHead(base.pooler.dense, model.classifier) for _ in range(len(layers) - 1)]
    return modules.ExitModel(model, heads, train_backbone)


def load_exit_model(trained_dir: Path):
    from safetensors.torch import load_file

    exit_model = build_exit_model(trained_dir)
    exit_model.heads.load_state_dict(load_file(str(trained_dir / HEADS_FILE)))
    return exit_model.eval()


def reference_logits(exit_model, inputs: dict, criterion: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """What early exit predicts, computed the slow way in PyTorch (every layer, then the rule applied row by
    row): the reference the ONNX segments are checked against. Returns (logits, 1-based exit layers)."""
    import torch

    with torch.inference_mode():
        out = exit_model(**inputs)
    per_layer = [e.float().numpy() for e in out.exit_logits] + [out.logits.float().numpy()]
    rows = per_layer[0].shape[0]
    rule = EXIT_RULES[criterion](threshold)
    rule.reset(rows)
    fired = [rule.fires(layer) for layer in per_layer[:-1]] + [np.ones(rows, dtype=bool)]
    layer_of = np.argmax(np.stack(fired), axis=0)
    return np.stack([per_layer[k][r] for r, k in enumerate(layer_of)]), layer_of + 1


def export_segments(exit_model, out_dir: Path, opset: int, optimize: str) -> list[str]:
    """One ONNX graph per layer: the first takes token ids, the rest take the previous hidden states; each
    returns its hidden states and its exit's logits (the last: the model's own head)."""
    import torch

    modules = _torch_modules()
    model = exit_model.model.eval()
    base, layers = encoder_layers(model)
    heads = list(exit_model.heads) + [modules.FinalHead(model)]
    ids = torch.ones(1, 8, dtype=torch.long)
    mask = torch.ones(1, 8, dtype=torch.long)
    hidden = torch.zeros(1, 8, model.config.hidden_size)
    batch_seq = {0: "batch", 1: "sequence"}
    names = []
    for k, (layer, head) in enumerate(zip(layers, heads)):
        name = f"segment_{k:02d}.onnx"
        if k == 0:
            segment, args, inputs = modules.EntrySegment(base.embeddings, layer, head), (ids, mask, torch.zeros_like(ids)), ["input_ids", "attention_mask", "token_type_ids"]
        else:
            segment, args, inputs = modules.InnerSegment(layer, head), (hidden, mask), ["hidden_states", "attention_mask"]
        axes = {n: batch_seq for n in inputs} | {"hidden_out": batch_seq, "logits": {0: "batch"}}
        torch.onnx.export(
            segment.eval(), args, str(out_dir / name), input_names=inputs, output_names=["hidden_out", "logits"],
            dynamic_axes=axes, opset_version=opset, dynamo=False,
        )
        if optimize == "fusion":
            fuse(out_dir / name, 0, 0)  # 0, 0: the fusion reads head count and width from the graph
        names.append(name)
    return names


def _self_distillation(cfg: EarlyExitConfig):
    import torch.nn.functional as F

    def loss(outputs, batch):
        labels = batch.get("labels")
        final = outputs.logits
        target = final.detach()
        total = sum(kd_loss(e, target, labels, temperature=cfg.temperature, soft_weight=cfg.soft_weight) for e in outputs.exit_logits)
        total = total / max(1, len(outputs.exit_logits))
        if cfg.train_backbone:  # the final layer keeps learning from the teacher (or the labels)
            if "teacher_logits" in batch:
                total = total + kd_loss(final, batch["teacher_logits"], labels, temperature=cfg.temperature, soft_weight=cfg.soft_weight)
            elif labels is not None:
                total = total + F.cross_entropy(final, labels)
        return total

    return loss


def exits_dir(parent: Variant, cfg: EarlyExitConfig, out_root: Path) -> Path:
    """Where the exits of `parent` trained with these knobs live (every threshold reuses them)."""
    return Path(out_root) / variant_id(f"{parent.lineage}>exits", cfg.training_knobs(), parent.id)


def train_exits(parent: Variant, cfg: EarlyExitConfig, ctx: StageContext, out_root: Path) -> Path:
    """Trains the exits once per parent and training knobs and exports the segments; returns the directory
    holding the backbone, the heads and the segment graphs. Hold `exclusive(exits_dir(...))` around it."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    trained = exits_dir(parent, cfg, out_root)
    if (trained / EARLY_EXIT_FILE).is_file():
        return trained
    exit_model = build_exit_model(parent.path, cfg.train_backbone)
    tokenizer = AutoTokenizer.from_pretrained(parent.path)
    train_split, _ = load_splits(ctx.data, ctx.num_labels)
    pick = sample_indices(len(train_split), cfg.training.max_examples, ctx.seed)
    texts = [train_split.texts[i] for i in pick]
    labels = [train_split.labels[i] for i in pick] if train_split.labels is not None else None
    targets = None
    if cfg.train_backbone and ctx.teacher is not None:
        targets = teacher_logits(ctx.teacher.path, texts, ctx.max_length, ctx.cache_dir or Path(out_root) / ".cache")
    log.info("training %d exits of %s on %d examples (backbone %s)", len(exit_model.heads), parent.id, len(texts),
             "trained" if cfg.train_backbone else "frozen")
    figures = train(exit_model, tokenizer, texts, labels, cfg.training.model_copy(update={"max_examples": None}),
                    max_length=ctx.max_length, seed=ctx.seed, loss_fn=_self_distillation(cfg), targets=targets)
    exit_model.eval()
    with staged_dir(trained) as scratch:
        exit_model.model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        save_file({k: v.contiguous() for k, v in exit_model.heads.state_dict().items()}, str(scratch / HEADS_FILE))
        (scratch / "segments").mkdir()
        segments = export_segments(exit_model, scratch / "segments", cfg.opset, cfg.optimize)
        (scratch / EARLY_EXIT_FILE).write_text(json.dumps({"segments": segments, "train_seconds": figures["train_seconds"]}))
    return trained


def early_exit(parent: Variant, threshold: float, cfg: EarlyExitConfig, ctx: StageContext, out_root: Path) -> Variant:
    if parent.format != "hf":
        raise ModelError(f"early_exit: variant {parent.id} is {parent.format}; exits are trained on PyTorch variants")
    knobs = {"threshold": threshold, "criterion": cfg.criterion, **cfg.training_knobs()}
    child = derive(parent, stage="early_exit", token=cfg.token(threshold), params=knobs, format="onnx-exit", out_root=out_root)
    if done := finished(child):
        return done
    with exclusive(exits_dir(parent, cfg, out_root)), TORCH_LOCK:
        trained = train_exits(parent, cfg, ctx, out_root)
    made = json.loads((trained / EARLY_EXIT_FILE).read_text())
    with staged_dir(Path(child.path)) as scratch:
        for name in made["segments"]:
            shutil.copy2(trained / "segments" / name, scratch / name)
        copy_tokenizer(trained, scratch)
        spec = {"criterion": cfg.criterion, "threshold": threshold, "segments": made["segments"]}
        (scratch / EARLY_EXIT_FILE).write_text(json.dumps(spec, indent=2))
        metrics = {"early_exit_train_seconds": made["train_seconds"], "early_exit_layers": float(len(made["segments"]))}
        child = save_record(scratch, child.model_copy(update={"metrics": metrics}))
    log.info("early exit %s at %s %g -> %s", parent.id, cfg.criterion, threshold, child.id)
    return child


@task(name="early_exit")
def early_exit_task(parent: Variant, threshold: float, cfg: EarlyExitConfig, ctx: StageContext, out_root: Path) -> Variant:
    return early_exit(parent, threshold, cfg, ctx, out_root)
