"""Structured pruning with torch-pruning (DepGraph): whole attention heads and FFN channels are removed from the
weights, the same number in every layer, so the result is a normal HF model (`pruned_heads` and a smaller
`intermediate_size` in its config) that reloads with `from_pretrained` and exports with optimum. Recovery
fine-tuning distils from the root teacher."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from prefect import task
from pydantic import Field, field_validator

from .base import StageBase, TORCH_LOCK, ModelError
from .data import load_splits
from .distill import teacher_logits
from .training import TrainConfig, kd_loss, sample_indices, train
from .variant import StageContext, Variant, derive, finished, save_hf_variant

log = logging.getLogger("squeezeflow.prune")


def magnitude_importance():
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2)


def taylor_importance():
    import torch_pruning as tp

    return tp.importance.GroupTaylorImportance()


# criterion name -> (importance factory, whether it needs gradients from training batches)
CRITERIA: dict[str, tuple[Callable, bool]] = {
    "magnitude": (magnitude_importance, False),
    "taylor": (taylor_importance, True),
}


class PruneConfig(StageBase):
    kind: Literal["prune"] = "prune"
    ratios: list[float] = Field(description="Share of heads and FFN channels to remove; each ratio is a variant.", min_length=1)
    heads: bool = Field(True, description="Remove whole attention heads (the same number in every layer).")
    ffn: bool = Field(True, description="Remove FFN intermediate channels (the same number in every layer).")
    criterion: Literal["magnitude", "taylor"] = Field(
        "taylor", description="Importance: magnitude (L2 norm of the weights) or taylor (|weight × gradient| on training batches)."
    )
    taylor_batches: int = Field(8, ge=1, le=1000, description="Training batches whose gradients feed the Taylor criterion.")
    iterative_steps: int = Field(1, ge=1, le=20, description="Prune in this many steps, recovering between them.")
    recovery: TrainConfig | None = Field(
        default_factory=lambda: TrainConfig(epochs=1.0, learning_rate=5e-5, batch_size=32, max_examples=4000),
        description="Fine-tuning after each pruning step, distilled from the root teacher; null: no recovery.",
    )
    temperature: float = Field(2.0, gt=0, description="Temperature of the recovery distillation.")
    soft_weight: float = Field(0.7, ge=0, le=1, description="Weight of the teacher's soft targets in the recovery loss.")

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, ratios: list[float]) -> list[float]:
        bad = [r for r in ratios if not 0.0 < r < 1.0]
        if bad:
            raise ValueError(f"each ratio must be between 0 and 1 (exclusive), got {bad}")
        return ratios


def encoder_layers(model):
    base = getattr(model, model.base_model_prefix, None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None or not hasattr(layers[0], "attention") or not hasattr(layers[0].attention, "self"):
        raise ModelError(f"prune: {type(model).__name__} is not a BERT-family encoder (no encoder.layer[i].attention.self)")
    return base, layers


def prune_model(model, tokenizer, ratio: float, cfg: PruneConfig, texts: list[str], labels: list[int] | None,
                max_length: int, recover: Callable[[int], None] | None = None) -> dict[int, list[int]]:
    """Prunes `model` in place by `ratio` (heads and/or FFN channels, uniformly per layer) and returns the heads
    removed per layer, in the original numbering. `recover(step)` runs after each pruning step."""
    import torch
    import torch_pruning as tp

    base, layers = encoder_layers(model)
    model.eval()
    head_dim = layers[0].attention.self.attention_head_size
    batch = dict(tokenizer(texts[:8], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    # The residual stream keeps its width: every layer that writes to it is left whole; so are the heads' owners
    # when only FFN channels go, and the FFN when only heads go.
    ignored = [base.embeddings, *(m for m in (getattr(base, "pooler", None), getattr(model, "classifier", None)) if m is not None)]
    value_layer = {}
    for index, layer in enumerate(layers):
        attention = layer.attention.self
        ignored += [layer.attention.output.dense, layer.output.dense]
        value_layer[attention.value] = index
        if not cfg.ffn:
            ignored.append(layer.intermediate.dense)
        if not cfg.heads:
            ignored += [attention.query, attention.key, attention.value]
    make_importance, needs_gradients = CRITERIA[cfg.criterion]
    heads0, width0 = layers[0].attention.self.num_attention_heads, layers[0].intermediate.dense.out_features
    # head indices are renumbered after each step: map back to the original numbering for the config
    remaining = {i: list(range(heads0)) for i in range(len(layers))}
    removed: dict[int, list[int]] = {i: [] for i in remaining}
    for step in range(cfg.iterative_steps):
        # one pruner per step, sized from the current shapes (the library's own iterative mode keeps the
        # initial head count and mis-slices heads after the first step)
        share = ratio * (step + 1) / cfg.iterative_steps
        heads_now, width_now = len(remaining[0]), layers[0].intermediate.dense.out_features
        head_ratio = _step_ratio(heads_now, max(1, heads0 - round(heads0 * share))) if cfg.heads else 0.0
        ffn_ratio = _step_ratio(width_now, max(1, width0 - round(width0 * share))) if cfg.ffn else 0.0
        num_heads = {}
        for layer in layers:
            attention = layer.attention.self
            for linear in (attention.query, attention.key, attention.value):
                num_heads[linear] = attention.num_attention_heads
        if needs_gradients:
            _accumulate_gradients(model, tokenizer, texts, labels, cfg.taylor_batches, max_length)
        pruner = tp.pruner.MetaPruner(
            model, batch, importance=make_importance(), global_pruning=False,
            pruning_ratio=ffn_ratio if cfg.ffn else head_ratio, head_pruning_ratio=head_ratio,
            num_heads=num_heads, prune_num_heads=cfg.heads, prune_head_dims=False,
            ignored_layers=ignored, output_transform=lambda out: out.logits.sum(),
        )
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                index = value_layer.get(dep.target.module)
                if index is not None and dep.handler == tp.prune_linear_out_channels:
                    gone = sorted({i // head_dim for i in idxs})
                    removed[index] += [remaining[index][h] for h in gone]
                    remaining[index] = [h for j, h in enumerate(remaining[index]) if j not in gone]
            group.prune()
        model.zero_grad(set_to_none=True)
        for index, layer in enumerate(layers):
            attention = layer.attention.self
            attention.num_attention_heads = attention.query.out_features // head_dim
            attention.all_head_size = attention.query.out_features
            layer.attention.pruned_heads = set(removed[index])
        widths = {layer.intermediate.dense.out_features for layer in layers}
        heads = {layer.attention.self.num_attention_heads for layer in layers}
        if len(widths) != 1 or len(heads) != 1:
            raise ModelError(f"prune: layers ended up with different shapes (heads {heads}, FFN {widths})")
        model.config.intermediate_size = widths.pop()
        model.config.pruned_heads = {i: sorted(h) for i, h in removed.items() if h}
        log.info("prune step %d/%d: %d heads, FFN %d per layer", step + 1, cfg.iterative_steps, heads.pop(), model.config.intermediate_size)
        if recover is not None:
            with torch.enable_grad():
                recover(step)
    return model.config.pruned_heads


def _step_ratio(current: int, target: int) -> float:
    """The ratio that takes `current` units down to `target` under the pruner's int() rounding."""
    return max(0.0, 1.0 - (target + 0.5) / current) if target < current else 0.0


def _accumulate_gradients(model, tokenizer, texts, labels, batches: int, max_length: int) -> None:
    """Gradients of the task loss on a few training batches (labels, or the model's own predictions when the
    data has none), for the Taylor criterion."""
    import torch
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    size = 16
    for start in range(0, min(len(texts), batches * size), size):
        inputs = tokenizer(texts[start : start + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.enable_grad():
            logits = model(**inputs).logits
            target = torch.tensor(labels[start : start + size]) if labels is not None else logits.argmax(-1).detach()
            F.cross_entropy(logits, target).backward()


def prune(parent: Variant, ratio: float, cfg: PruneConfig, ctx: StageContext, out_root: Path) -> Variant:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if parent.format != "hf":
        raise ModelError(f"prune: variant {parent.id} is {parent.format}; pruning works on PyTorch variants")
    knobs = {"ratio": ratio, **cfg.model_dump(exclude={"kind", "ratios", "retries"})}
    child = derive(parent, stage="prune", token=f"prune[{ratio:g}]", params=knobs, format="hf", out_root=out_root)
    if done := finished(child):
        return done
    # eager attention: the pruner traces the graph, and SDPA hides the per-head reshapes from it
    model = AutoModelForSequenceClassification.from_pretrained(parent.path, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(parent.path)
    params_before = sum(p.numel() for p in model.parameters())
    train_split, _ = load_splits(ctx.data, ctx.num_labels)
    limit = cfg.recovery.max_examples if cfg.recovery else 16 * cfg.taylor_batches
    pick = sample_indices(len(train_split), limit, ctx.seed)
    texts = [train_split.texts[i] for i in pick]
    labels = [train_split.labels[i] for i in pick] if train_split.labels is not None else None
    figures: dict[str, float] = {}

    recover = None
    if cfg.recovery is not None:
        teacher = ctx.teacher or parent
        cache_dir = ctx.cache_dir or Path(out_root) / ".cache"
        targets = teacher_logits(teacher.path, texts, ctx.max_length, cache_dir)

        def loss(outputs, batch):
            return kd_loss(outputs.logits, batch["teacher_logits"], batch.get("labels"), temperature=cfg.temperature, soft_weight=cfg.soft_weight)

        def recover(step: int) -> None:
            budget = cfg.recovery.model_copy(update={"epochs": cfg.recovery.epochs / cfg.iterative_steps, "max_examples": None})
            result = train(model, tokenizer, texts, labels, budget, max_length=ctx.max_length, seed=ctx.seed + step,
                           loss_fn=loss, targets=targets)
            figures["recovery_seconds"] = figures.get("recovery_seconds", 0.0) + result["train_seconds"]

    prune_model(model, tokenizer, ratio, cfg, texts, labels, ctx.max_length, recover)
    params_after = sum(p.numel() for p in model.parameters())
    figures |= {
        "params_before_m": params_before / 1e6,
        "params_after_m": params_after / 1e6,
        "heads_per_layer": float(encoder_layers(model)[1][0].attention.self.num_attention_heads),
        "intermediate_size": float(model.config.intermediate_size),
    }
    log.info("pruned %s by %g: %.2fM -> %.2fM parameters", parent.id, ratio, params_before / 1e6, params_after / 1e6)
    return save_hf_variant(child.model_copy(update={"metrics": {f"prune_{k}": v for k, v in figures.items()}}), model, tokenizer)


@task(name="prune")
def prune_task(parent: Variant, ratio: float, cfg: PruneConfig, ctx: StageContext, out_root: Path) -> Variant:
    with TORCH_LOCK:
        return prune(parent, ratio, cfg, ctx, out_root)
