"""Structured pruning with torch-pruning (DepGraph): whole attention heads and FFN channels are removed from the
weights, the same number in every layer, so the result is a normal HF model (`pruned_heads` and a smaller
`intermediate_size` in its config) that reloads with `from_pretrained` and exports with optimum. Recovery
fine-tuning distils from the root teacher."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import Field, field_validator, model_validator

from .base import TORCH_LOCK, ModelError, Planned, Stage, StageBase
from .data import load_splits
from .distill import teacher_logits
from .families import layout_of
from .training import TrainConfig, kd_loss, sample_indices, train
from .variant import StageContext, Variant, derive, making, save_hf_variant

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
    ratios: list[float] = Field(
        description="Share of heads and FFN channels to remove; each ratio is a variant (0: only the vocabulary is "
        "pruned).",
        min_length=1,
    )
    heads: bool = Field(True, description="Remove whole attention heads (the same number in every layer).")
    ffn: bool = Field(True, description="Remove FFN intermediate channels (the same number in every layer).")
    criterion: Literal["magnitude", "taylor"] = Field(
        "taylor",
        description="Importance: magnitude (L2 norm of the weights) or taylor (|weight × gradient| on training "
        "batches).",
    )
    taylor_batches: int = Field(
        8, ge=1, le=1000, description="Training batches whose gradients feed the Taylor criterion."
    )
    iterative_steps: int = Field(1, ge=1, le=20, description="Prune in this many steps, recovering between them.")
    recovery: TrainConfig | None = Field(
        default_factory=lambda: TrainConfig(epochs=1.0, learning_rate=5e-5, batch_size=32, max_examples=4000),
        description="Fine-tuning after each pruning step, distilled from the root teacher; null: no recovery.",
    )
    vocabulary: Literal["full", "task"] | int = Field(
        "full",
        description="full: keep the tokenizer's vocabulary; task: keep only the tokens the training data uses; "
        "a number N: keep the N most frequent of those (rarer words become [UNK]). Shrinks the word embedding.",
    )
    temperature: float = Field(2.0, gt=0, description="Temperature of the recovery distillation.")
    soft_weight: float = Field(
        0.7, ge=0, le=1, description="Weight of the teacher's soft targets in the recovery loss."
    )

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, ratios: list[float]) -> list[float]:
        bad = [r for r in ratios if not 0.0 <= r < 1.0]
        if bad:
            raise ValueError(f"each ratio must be at least 0 and below 1, got {bad}")
        return ratios

    @field_validator("vocabulary")
    @classmethod
    def _vocabulary_size(cls, vocabulary):
        if isinstance(vocabulary, int) and vocabulary < 1:
            raise ValueError(f"a vocabulary size must be at least 1, got {vocabulary}")
        return vocabulary

    @model_validator(mode="after")
    def _something_to_prune(self) -> PruneConfig:
        if 0.0 in self.ratios and self.vocabulary == "full":
            raise ValueError("ratio 0 prunes nothing unless vocabulary is 'task' or a number")
        return self

    def token(self, ratio: float) -> str:
        parts = [f"{ratio:g}"] if ratio else []
        parts += [] if self.vocabulary == "full" else [f"vocab{'' if self.vocabulary == 'task' else self.vocabulary}"]
        return f"prune[{'+'.join(parts) or '0'}]"


def encoder_layers(model):
    """The base model and its list of layers, where the model's family keeps them (see families.py)."""
    layout = layout_of(model.config.model_type)
    base = getattr(model, model.base_model_prefix, None)
    try:
        layers = base.get_submodule(layout.layers)
        for name in ("query", "key", "value", "attention_out", "ffn_in", "ffn_out", "heads"):
            layout.part(layers[0], name)
    except (AttributeError, IndexError, TypeError):
        raise ModelError(
            f"prune: {type(model).__name__} does not have its family's layout ({layout.layers}[i].{layout.value})"
        ) from None
    return base, layers


def prune_model(
    model,
    tokenizer,
    ratio: float,
    cfg: PruneConfig,
    texts: list[str],
    labels: list[int] | None,
    max_length: int,
    recover: Callable[[int], None] | None = None,
) -> dict[int, list[int]]:
    """Prunes `model` in place by `ratio` (heads and/or FFN channels, uniformly per layer) and returns the heads
    removed per layer, in the original numbering. `recover(step)` runs after each pruning step."""
    import torch
    import torch_pruning as tp

    base, layers = encoder_layers(model)
    layout = layout_of(model.config.model_type)
    at = layout.part  # where each part sits in a layer of this family
    model.eval()
    head_dim = at(layers[0], "heads").attention_head_size
    batch = dict(tokenizer(texts[:8], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    # The residual stream keeps its width: every layer that writes to it is left whole; so are the heads' owners
    # when only FFN channels go, and the FFN when only heads go.
    # (so is everything outside the layers: embeddings, pooler, every family's head, e.g. DistilBERT's pre_classifier)
    ignored = [m for m in model.children() if m is not base]
    node = base
    for name in layout.layers.split("."):  # and, on the way down to the layers, every module beside that path
        ignored += [m for n, m in node.named_children() if n != name]
        node = node.get_submodule(name)
    value_layer = {}
    for index, layer in enumerate(layers):
        ignored += [at(layer, "attention_out"), at(layer, "ffn_out")]
        value_layer[at(layer, "value")] = index
        if not cfg.ffn:
            ignored.append(at(layer, "ffn_in"))
        if not cfg.heads:
            ignored += [at(layer, "query"), at(layer, "key"), at(layer, "value")]
    make_importance, needs_gradients = CRITERIA[cfg.criterion]
    count, width = layout.head_count, layout.heads_width
    heads0, width0 = getattr(at(layers[0], "heads"), count), at(layers[0], "ffn_in").out_features
    # head indices are renumbered after each step: map back to the original numbering for the config
    remaining = {i: list(range(heads0)) for i in range(len(layers))}
    removed: dict[int, list[int]] = {i: [] for i in remaining}
    for step in range(cfg.iterative_steps):
        # one pruner per step, sized from the current shapes (the library's own iterative mode keeps the
        # initial head count and mis-slices heads after the first step)
        share = ratio * (step + 1) / cfg.iterative_steps
        heads_now, width_now = len(remaining[0]), at(layers[0], "ffn_in").out_features
        head_ratio = _step_ratio(heads_now, max(1, heads0 - round(heads0 * share))) if cfg.heads else 0.0
        ffn_ratio = _step_ratio(width_now, max(1, width0 - round(width0 * share))) if cfg.ffn else 0.0
        num_heads = {}
        for layer in layers:
            for name in ("query", "key", "value"):
                num_heads[at(layer, name)] = getattr(at(layer, "heads"), count)
        if needs_gradients:
            _accumulate_gradients(model, tokenizer, texts, labels, cfg.taylor_batches, max_length)
        pruner = tp.pruner.MetaPruner(
            model,
            batch,
            importance=make_importance(),
            global_pruning=False,
            pruning_ratio=ffn_ratio if cfg.ffn else head_ratio,
            head_pruning_ratio=head_ratio,
            num_heads=num_heads,
            prune_num_heads=cfg.heads,
            prune_head_dims=False,
            ignored_layers=ignored,
            output_transform=lambda out: out.logits.sum(),
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
            kept = at(layer, "query").out_features
            setattr(at(layer, "heads"), count, kept // head_dim)
            setattr(at(layer, "heads"), width, kept)
            layer.attention.pruned_heads = set(removed[index])
        widths = {at(layer, "ffn_in").out_features for layer in layers}
        heads = {getattr(at(layer, "heads"), count) for layer in layers}
        if len(widths) != 1 or len(heads) != 1:
            raise ModelError(f"prune: layers ended up with different shapes (heads {heads}, FFN {widths})")
        setattr(model.config, layout.ffn_width, widths.pop())
        model.config.pruned_heads = {i: sorted(h) for i, h in removed.items() if h}
        log.info(
            "prune step %d/%d: %d heads, FFN %d per layer",
            step + 1,
            cfg.iterative_steps,
            heads.pop(),
            getattr(model.config, layout.ffn_width),
        )
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
        inputs = tokenizer(
            texts[start : start + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        with torch.enable_grad():
            logits = model(**inputs).logits
            target = torch.tensor(labels[start : start + size]) if labels is not None else logits.argmax(-1).detach()
            F.cross_entropy(logits, target).backward()


def prune(parent: Variant, ratio: float, cfg: PruneConfig, ctx: StageContext, out_root: Path) -> Variant:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if parent.format != "hf":
        raise ModelError(f"prune: variant {parent.id} is {parent.format}; pruning works on PyTorch variants")
    knobs = {"ratio": ratio, **cfg.knobs("ratios")}
    child = derive(
        parent,
        stage="prune",
        token=cfg.token(ratio),
        params=knobs,
        format="hf",
        out_root=out_root,
        data=ctx.data_fingerprint,
    )
    with making(child) as done:
        if done:
            return done
        # eager attention: the pruner traces the graph, and SDPA hides the per-head reshapes from it
        model = AutoModelForSequenceClassification.from_pretrained(parent.path, attn_implementation="eager")
        layout = layout_of(model.config.model_type)
        tokenizer = AutoTokenizer.from_pretrained(parent.path)
        params_before = sum(p.numel() for p in model.parameters())
        splits = load_splits(ctx.data, ctx.num_labels)
        train_split = splits.train
        limit = cfg.recovery.max_examples if cfg.recovery else 16 * cfg.taylor_batches
        pick = sample_indices(len(train_split), limit, ctx.seed)
        texts = [train_split.texts[i] for i in pick]
        labels = [train_split.labels[i] for i in pick] if train_split.labels is not None else None
        figures: dict[str, float] = {}

        recover = None
        if cfg.recovery is not None and ratio > 0:
            teacher = ctx.teacher or parent
            cache_dir = ctx.cache_dir or Path(out_root) / ".cache"
            targets = teacher_logits(teacher.path, texts, ctx.max_length, cache_dir)

            def loss(outputs, batch):
                return kd_loss(
                    outputs.logits,
                    batch["teacher_logits"],
                    batch.get("labels"),
                    temperature=cfg.temperature,
                    soft_weight=cfg.soft_weight,
                )

            def recover(step: int) -> None:
                budget = cfg.recovery.model_copy(
                    update={"epochs": cfg.recovery.epochs / cfg.iterative_steps, "max_examples": None}
                )
                result = train(
                    model,
                    tokenizer,
                    texts,
                    labels,
                    budget,
                    max_length=ctx.max_length,
                    seed=ctx.seed + step,
                    loss_fn=loss,
                    targets=targets,
                )
                figures["recovery_seconds"] = figures.get("recovery_seconds", 0.0) + result["train_seconds"]

        if ratio > 0:
            prune_model(model, tokenizer, ratio, cfg, texts, labels, ctx.max_length, recover)
        if cfg.vocabulary != "full":
            kept = task_vocabulary(tokenizer, train_split.texts, None if cfg.vocabulary == "task" else cfg.vocabulary)
            before = unknown_rate(tokenizer, splits.validation.texts)
            tokenizer = shrink_vocabulary(model, tokenizer, kept)
            figures |= {
                "vocabulary_size": float(len(kept)),
                "unk_rate_validation_before": before,
                "unk_rate_validation": unknown_rate(tokenizer, splits.validation.texts),
            }
        params_after = sum(p.numel() for p in model.parameters())
        figures |= {
            "params_before_m": params_before / 1e6,
            "params_after_m": params_after / 1e6,
            "heads_per_layer": float(getattr(layout.part(encoder_layers(model)[1][0], "heads"), layout.head_count)),
            "intermediate_size": float(getattr(model.config, layout.ffn_width)),
        }
        log.info(
            "pruned %s by %g: %.2fM -> %.2fM parameters", parent.id, ratio, params_before / 1e6, params_after / 1e6
        )
        return save_hf_variant(
            child.model_copy(update={"metrics": {f"prune_{k}": v for k, v in figures.items()}}), model, tokenizer
        )


def task_vocabulary(tokenizer, texts: list[str], limit: int | None) -> list[int]:
    """Ids of the special tokens plus the tokens `texts` use (the `limit` most frequent, when given), in id order."""
    from collections import Counter

    counts = Counter(i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids)
    special = set(tokenizer.all_special_ids)
    used = [i for i, _ in counts.most_common() if i not in special]
    return sorted(special | set(used[:limit] if limit is not None else used))


def unknown_rate(tokenizer, texts: list[str]) -> float:
    """Share of the word pieces of `texts` that are [UNK]."""
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    return sum(i == tokenizer.unk_token_id for i in ids) / max(1, len(ids))


def shrink_vocabulary(model, tokenizer, kept: list[int]):
    """Keeps only the `kept` rows of the word embedding and rewrites the (fast, WordPiece) tokenizer to the new
    ids; returns the new tokenizer. Words the smaller vocabulary cannot spell become [UNK]."""
    import json
    import tempfile

    import torch
    from transformers import AutoTokenizer

    remap = {old: new for new, old in enumerate(kept)}
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        spec = json.loads(Path(scratch, "tokenizer.json").read_text(encoding="utf-8"))
        if spec["model"].get("type") != "WordPiece":
            raise ModelError(
                f"prune.vocabulary: only WordPiece tokenizers can be pruned, this one is {spec['model'].get('type')}"
            )
        spec["model"]["vocab"] = {t: remap[i] for t, i in spec["model"]["vocab"].items() if i in remap}
        for token in spec.get("added_tokens", []):
            token["id"] = remap[token["id"]]
        for special in (spec.get("post_processor") or {}).get("special_tokens", {}).values():
            special["ids"] = [remap[i] for i in special["ids"]]
        if spec.get("padding"):
            spec["padding"]["pad_id"] = remap[spec["padding"]["pad_id"]]
        Path(scratch, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        by_id = {i: t for t, i in spec["model"]["vocab"].items()}
        Path(scratch, "vocab.txt").write_text("".join(by_id[i] + "\n" for i in range(len(kept))), encoding="utf-8")
        settings_file = Path(scratch, "tokenizer_config.json")
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
        settings["added_tokens_decoder"] = {
            str(remap[int(i)]): v for i, v in settings.get("added_tokens_decoder", {}).items()
        }
        settings_file.write_text(json.dumps(settings, indent=2), encoding="utf-8")
        smaller = AutoTokenizer.from_pretrained(scratch)
    old = model.get_input_embeddings()
    pad = remap.get(old.padding_idx) if old.padding_idx is not None else None
    new = torch.nn.Embedding(len(kept), old.embedding_dim, padding_idx=pad)
    with torch.no_grad():
        new.weight.copy_(old.weight[torch.tensor(kept)])
    model.set_input_embeddings(new)
    model.config.vocab_size = len(kept)
    if model.config.pad_token_id is not None:
        model.config.pad_token_id = remap.get(model.config.pad_token_id, 0)
    return smaller


@task(name="prune")
def prune_task(parent: Variant, ratio: float, cfg: PruneConfig, ctx: StageContext, out_root: Path) -> Variant:
    with TORCH_LOCK:
        return prune(parent, ratio, cfg, ctx, out_root)


def plan(parent: Variant, cfg: PruneConfig, ctx: StageContext, out_root: Path, made: dict) -> Planned:
    return [(cfg.token(ratio), (parent, ratio, cfg, ctx, out_root)) for ratio in cfg.ratios]


STAGE = Stage(PruneConfig, ("hf",), "Remove attention heads, FFN channels or vocabulary.", plan, prune_task)
