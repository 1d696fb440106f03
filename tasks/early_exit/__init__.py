"""The early-exit stage (dynamic pruning): a classifier after every encoder layer (and optionally one on the
embeddings), trained by self-distillation from the final layer; at inference each input stops at the first exit
that is confident enough (entropy) or stable enough (patience). The heads are heads.py; the ONNX graph that chains
the per-layer segments with `If` nodes is graph.py; ONNX Runtime runs it (runtime.EarlyExitPredictor)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from prefect import task

from ..base import TORCH_LOCK, ModelError, Planned, Stage
from ..data import load_splits
from ..distill import teacher_logits
from ..export import copy_tokenizer
from ..runtime import EARLY_EXIT_FILE, SEGMENTS_DIR
from ..training import kd_loss, sample_indices, train
from ..variant import (
    StageContext,
    Variant,
    derive,
    exclusive,
    intact,
    making,
    save_record,
    seal,
    staged_dir,
    variant_id,
)
from .config import HEADS_FILE, EarlyExitConfig
from .graph import export_segments, write_exit_graph
from .heads import build_exit_model, load_exit_model, reference_logits

__all__ = [
    "HEADS_FILE",
    "STAGE",
    "EarlyExitConfig",
    "early_exit",
    "early_exit_task",
    "exits_dir",
    "load_exit_model",
    "reference_logits",
    "train_exits",
    "write_exit_graph",
]

log = logging.getLogger("squeezeflow.early_exit")


def _self_distillation(cfg: EarlyExitConfig):
    import torch.nn.functional as F

    def loss(outputs, batch):
        labels = batch.get("labels")
        final = outputs.logits
        target = final.detach()
        total = sum(
            kd_loss(e, target, labels, temperature=cfg.temperature, soft_weight=cfg.soft_weight)
            for e in outputs.exit_logits
        )
        total = total / max(1, len(outputs.exit_logits))
        if cfg.train_backbone:  # the final layer keeps learning from the teacher (or the labels)
            if "teacher_logits" in batch:
                total = total + kd_loss(
                    final, batch["teacher_logits"], labels, temperature=cfg.temperature, soft_weight=cfg.soft_weight
                )
            elif labels is not None:
                total = total + F.cross_entropy(final, labels)
        return total

    return loss


def exits_dir(parent: Variant, cfg: EarlyExitConfig, ctx: StageContext, out_root: Path) -> Path:
    """Where the exits of `parent` trained with these knobs live (every threshold reuses them)."""
    key = variant_id(
        f"{parent.lineage}>exits", cfg.training_knobs(), parent.id, made_by="early_exit", data=ctx.data_fingerprint
    )
    return Path(out_root) / key


def train_exits(parent: Variant, cfg: EarlyExitConfig, ctx: StageContext, out_root: Path) -> Path:
    """Trains the exits once per parent and training knobs and exports the segments; returns the directory
    holding the backbone, the heads and the segment graphs. Hold `exclusive(exits_dir(...))` around it."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    trained = exits_dir(parent, cfg, ctx, out_root)
    if intact(trained):
        return trained
    exit_model = build_exit_model(parent.path, cfg.train_backbone, cfg.pooling, cfg.embedding_exit)
    tokenizer = AutoTokenizer.from_pretrained(parent.path)
    train_split = load_splits(ctx.data, ctx.num_labels).train
    pick = sample_indices(len(train_split), cfg.training.max_examples, ctx.seed)
    texts = [train_split.texts[i] for i in pick]
    labels = [train_split.labels[i] for i in pick] if train_split.labels is not None else None
    targets = None
    if cfg.train_backbone and ctx.teacher is not None:
        targets = teacher_logits(ctx.teacher.path, texts, ctx.max_length, ctx.cache_dir or Path(out_root) / ".cache")
    log.info(
        "training %d exits of %s on %d examples (backbone %s)",
        len(exit_model.heads),
        parent.id,
        len(texts),
        "trained" if cfg.train_backbone else "frozen",
    )
    figures = train(
        exit_model,
        tokenizer,
        texts,
        labels,
        cfg.training.model_copy(update={"max_examples": None}),
        max_length=ctx.max_length,
        seed=ctx.seed,
        loss_fn=_self_distillation(cfg),
        targets=targets,
    )
    exit_model.eval()
    with staged_dir(trained) as scratch:
        exit_model.model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        save_file({k: v.contiguous() for k, v in exit_model.heads.state_dict().items()}, str(scratch / HEADS_FILE))
        (scratch / SEGMENTS_DIR).mkdir()
        segments = export_segments(exit_model, scratch / SEGMENTS_DIR, cfg.opset, cfg.optimize)
        (scratch / EARLY_EXIT_FILE).write_text(
            json.dumps(
                {
                    "segments": segments,
                    "pooling": cfg.pooling,
                    "embedding_exit": cfg.embedding_exit,
                    "train_seconds": figures["train_seconds"],
                }
            )
        )
    seal(trained)
    return trained


def early_exit(parent: Variant, threshold: float, cfg: EarlyExitConfig, ctx: StageContext, out_root: Path) -> Variant:
    if parent.format != "hf":
        raise ModelError(f"early_exit: variant {parent.id} is {parent.format}; exits are trained on PyTorch variants")
    knobs = {"threshold": threshold, "criterion": cfg.criterion, **cfg.training_knobs()}
    child = derive(
        parent,
        stage="early_exit",
        token=cfg.token(threshold),
        params=knobs,
        format="onnx-exit",
        out_root=out_root,
        data=ctx.data_fingerprint,
    )
    with making(child) as done:
        if done:
            return done
        with exclusive(exits_dir(parent, cfg, ctx, out_root)), TORCH_LOCK:
            trained = train_exits(parent, cfg, ctx, out_root)
        made = json.loads((trained / EARLY_EXIT_FILE).read_text())
        with staged_dir(Path(child.path)) as scratch:
            (scratch / SEGMENTS_DIR).mkdir()
            for name in made["segments"]:
                shutil.copy2(trained / SEGMENTS_DIR / name, scratch / SEGMENTS_DIR / name)
            copy_tokenizer(trained, scratch)
            spec = {
                "criterion": cfg.criterion,
                "threshold": threshold,
                "segments": made["segments"],
                "embedding_exit": made["embedding_exit"],
            }
            (scratch / EARLY_EXIT_FILE).write_text(json.dumps(spec, indent=2))
            write_exit_graph(scratch)
            layers = len(made["segments"]) - made["embedding_exit"]
            metrics = {"early_exit_train_seconds": made["train_seconds"], "early_exit_layers": float(layers)}
            child = save_record(scratch, child.model_copy(update={"metrics": metrics}))
        log.info("early exit %s at %s %g -> %s", parent.id, cfg.criterion, threshold, child.id)
        return child


@task(name="early_exit")
def early_exit_task(
    parent: Variant, threshold: float, cfg: EarlyExitConfig, ctx: StageContext, out_root: Path
) -> Variant:
    return early_exit(parent, threshold, cfg, ctx, out_root)


def plan(parent: Variant, cfg: EarlyExitConfig, ctx: StageContext, out_root: Path, made: dict) -> Planned:
    return [(cfg.token(t), (parent, t, cfg, ctx, out_root)) for t in cfg.thresholds]


STAGE = Stage(EarlyExitConfig, ("hf",), "Exits after each layer; easy inputs leave early.", plan, early_exit_task)
