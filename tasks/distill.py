"""Distillation: a smaller student initialised from chosen teacher layers (DistilBERT-style), trained on the
teacher's soft targets (+ labels, + optional hidden-state and attention matching, TinyBERT/MiniLM-style)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

import numpy as np
from prefect import task
from pydantic import Field, model_validator

from .augment import AugmentConfig, augment_texts, word_neighbours
from .base import TORCH_LOCK, ModelError, Planned, Stage, StageBase, StrictModel
from .data import load_splits
from .families import layout_of
from .training import (
    UNLABELLED,
    LongTextPass,
    TrainConfig,
    accuracy_on,
    average_weights,
    cross_entropy,
    kd_loss,
    long_text_indices,
    predict_logits,
    sample_indices,
    soup_figures,
    train,
)
from .variant import StageContext, Variant, content_hash, derive, exclusive, intact, making, save_hf_variant, seal

log = logging.getLogger("squeezeflow.distill")


class StudentShape(StrictModel):
    num_layers: int | None = Field(
        None, ge=1, description="Keep this many teacher layers, evenly spaced (first and last included)."
    )
    layers: list[int] | None = Field(
        None, min_length=1, description="Or: the exact teacher layer indices to keep, in order."
    )
    intermediate_size: int | None = Field(
        None, ge=1, description="A smaller FFN width; those weights start from scratch."
    )
    hidden_size: int | None = Field(
        None, ge=8, description="A smaller hidden size; the whole student then starts from scratch."
    )
    family: Literal["distilbert"] | None = Field(
        None,
        description="Build the student as a model of another family (distilbert: no token types, a lighter "
        "embedding), its layers copied from a BERT teacher's part by part; None: the teacher's family.",
    )

    @model_validator(mode="after")
    def _one_depth(self) -> StudentShape:
        if (self.num_layers is None) == (self.layers is None):
            raise ValueError("give exactly one of num_layers or layers")
        return self

    def teacher_layers(self, teacher_depth: int) -> list[int]:
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < teacher_depth]
            if bad:
                raise ModelError(f"distill.students: layers {bad} do not exist in a {teacher_depth}-layer teacher")
            return list(self.layers)
        k = self.num_layers
        if k > teacher_depth:
            raise ModelError(f"distill.students: num_layers {k} is more than the teacher's {teacher_depth} layers")
        return [round(i * (teacher_depth - 1) / (k - 1)) for i in range(k)] if k > 1 else [teacher_depth - 1]

    def token(self, teacher_depth: int) -> str:
        parts = [f"L{len(self.teacher_layers(teacher_depth))}"]
        parts += [f"H{self.hidden_size}"] if self.hidden_size else []
        parts += [f"I{self.intermediate_size}"] if self.intermediate_size else []
        parts += [self.family] if self.family else []
        return f"distill[{'-'.join(parts)}]"


class DistillConfig(StageBase):
    kind: Literal["distill"] = "distill"
    students: list[StudentShape] = Field(description="Student shapes; each becomes a variant.", min_length=1)
    training: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=3.0, learning_rate=1e-4, batch_size=32),
        description="The students' training budget.",
    )
    temperature: float = Field(
        2.0, gt=0, description="Softmax temperature of the soft targets (the loss is scaled by T²)."
    )
    soft_weight: float = Field(
        0.7, ge=0, le=1, description="Weight of the soft-target KL; 1 − this goes to the label cross-entropy."
    )
    hidden_weight: float = Field(
        0.0, ge=0, description="Weight of the hidden-state MSE (student layer i vs its teacher layer, per real token)."
    )
    attention_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the attention-distribution KL (same layer map, same head count; per head and real "
        "token). "
        "The student then trains with attention dropout off.",
    )
    layer_map: list[int] | None = Field(
        None, description="Teacher layer matched by each student layer; default: the layers it was initialised from."
    )
    best_on_validation: bool = Field(
        True,
        description="Score the student on the validation split before training and after each epoch, and keep the "
        "best weights (false: keep the last).",
    )
    from_labels_only: bool = Field(
        False, description="Train on labels only (no teacher): the baseline that shows what KD adds."
    )
    augment: AugmentConfig | None = Field(
        None,
        description="Also train on augmented copies of the training texts (words swapped for their neighbours), "
        "which learn from the teacher's soft targets alone.",
    )
    soup: int = Field(
        1,
        ge=1,
        le=16,
        description="Train this many copies of each student from the same initial weights, each on the training data "
        "in "
        "another order (seeds seed, seed + 1, …), and make their average weights the student (n× the training time).",
    )
    long_text_pass: LongTextPass | None = Field(
        None,
        description="Then train the student once more, gently, on the long training texts only (same loss; augmented "
        "copies left out): for training sets of short phrases served full sentences.",
    )

    @model_validator(mode="after")
    def _augment_needs_teacher(self) -> DistillConfig:
        if self.augment is not None and self.from_labels_only:
            raise ValueError(
                "augment: augmented texts have no labels, so they need the teacher (from_labels_only is true)"
            )
        return self


def build_student(teacher_dir: str | Path, shape: StudentShape, *, attention_dropout: float | None = None):
    """A classifier of the teacher's family with the student's shape, initialised from the teacher where shapes agree.
    `attention_dropout` replaces the teacher's attention-probability dropout in the student."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    config = AutoConfig.from_pretrained(teacher_dir)
    if shape.family:
        return _student_of_another_family(teacher, shape, attention_dropout)
    layout = layout_of(config.model_type)  # DistilBERT names its layers and config fields its own way
    if attention_dropout is not None:
        setattr(config, layout.attention_dropout, attention_dropout)
    depth = config.num_hidden_layers
    chosen = shape.teacher_layers(depth)
    config.num_hidden_layers = len(chosen)
    if shape.intermediate_size:
        setattr(config, layout.ffn_width, shape.intermediate_size)
    if shape.hidden_size:
        config.hidden_size = shape.hidden_size
    student = AutoModelForSequenceClassification.from_config(config)
    if shape.hidden_size:
        return student, teacher, chosen  # nothing in the teacher has the student's width
    source = teacher.state_dict()
    prefix = f"{teacher.base_model_prefix}.{layout.layers}."
    # one layer per depth (ALBERT's one shared layer serves every depth: it is copied as it is)
    per_depth = len(getattr(teacher, teacher.base_model_prefix).get_submodule(layout.layers)) == depth
    mapped = {}
    for key in student.state_dict():
        if key.startswith(prefix) and per_depth:
            index, rest = key[len(prefix) :].split(".", 1)
            mapped[key] = source.get(f"{prefix}{chosen[int(index)]}.{rest}")
        else:
            mapped[key] = source.get(key)
    own = student.state_dict()
    loadable = {k: v for k, v in mapped.items() if v is not None and v.shape == own[k].shape}
    student.load_state_dict(loadable, strict=False)
    log.info("student %s: %d/%d tensors from teacher layers %s", shape.token(depth), len(loadable), len(own), chosen)
    return student, teacher, chosen


def _student_of_another_family(teacher, shape: StudentShape, attention_dropout: float | None):
    """A DistilBERT student of a BERT teacher: the same width, the chosen teacher layers copied part by part (the
    token-type embedding BERT adds to every token folded into the word embeddings); the head's dense layer starts
    from the pooler's, under DistilBERT's ReLU, so distillation re-learns it."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    tc = teacher.config
    if tc.model_type != "bert":
        raise ModelError(
            f"distill.students: family {shape.family} students are made from BERT teachers; this one is {tc.model_type}"
        )
    chosen = shape.teacher_layers(tc.num_hidden_layers)
    config = DistilBertConfig(
        vocab_size=tc.vocab_size,
        max_position_embeddings=tc.max_position_embeddings,
        n_layers=len(chosen),
        n_heads=tc.num_attention_heads,
        dim=tc.hidden_size,
        hidden_dim=shape.intermediate_size or tc.intermediate_size,
        dropout=tc.hidden_dropout_prob,
        attention_dropout=tc.attention_probs_dropout_prob if attention_dropout is None else attention_dropout,
        activation=tc.hidden_act,
        seq_classif_dropout=tc.hidden_dropout_prob,
        pad_token_id=tc.pad_token_id,
        num_labels=tc.num_labels,
        id2label=tc.id2label,
        label2id=tc.label2id,
    )
    student = DistilBertForSequenceClassification(config)
    source, target = layout_of("bert"), layout_of("distilbert")
    t_base, s_base = teacher.bert, student.distilbert
    with torch.no_grad():
        s_base.embeddings.word_embeddings.weight.copy_(
            t_base.embeddings.word_embeddings.weight + t_base.embeddings.token_type_embeddings.weight[0]
        )
        s_base.embeddings.position_embeddings.weight.copy_(t_base.embeddings.position_embeddings.weight)
        s_base.embeddings.LayerNorm.load_state_dict(t_base.embeddings.LayerNorm.state_dict())
        t_layers, s_layers = t_base.get_submodule(source.layers), s_base.get_submodule(target.layers)
        for s_layer, index in zip(s_layers, chosen):
            for name in source.PARTS:
                s_part, t_part = target.part(s_layer, name), source.part(t_layers[index], name)
                if s_part.weight.shape == t_part.weight.shape:  # a smaller FFN starts from scratch
                    s_part.load_state_dict(t_part.state_dict())
        student.pre_classifier.load_state_dict(t_base.pooler.dense.state_dict())
        student.classifier.load_state_dict(teacher.classifier.state_dict())
    log.info("student %s: a DistilBERT from teacher layers %s", shape.token(tc.num_hidden_layers), chosen)
    return student, teacher, chosen


def teacher_logits(teacher_dir: str | Path, texts: list[str], max_length: int, cache_dir: Path) -> np.ndarray:
    """The teacher's logits on `texts`, computed once and cached as .npy, keyed by teacher and inputs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    key = hashlib.sha256(json.dumps([content_hash(teacher_dir), max_length, texts]).encode()).hexdigest()[:24]
    path = cache_dir / f"teacher-logits-{key}.npy"
    with exclusive(path):
        if intact(path):
            return np.load(path, allow_pickle=False)
        model = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
        logits = predict_logits(model, AutoTokenizer.from_pretrained(teacher_dir), texts, max_length)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, logits, allow_pickle=False)
        tmp.rename(path)
        seal(path)
    return logits


def validation_truth(
    validation, teacher_dir: str | Path, max_length: int, cache_dir: Path
) -> tuple[list[str], np.ndarray]:
    """The validation texts and what a model should predict on them: their labels, or where the split has none (a
    slice of an unlabelled train file), the teacher's labels."""
    if validation.labels is not None:
        return validation.texts, np.asarray(validation.labels)
    return validation.texts, teacher_logits(teacher_dir, validation.texts, max_length, cache_dir).argmax(-1)


def layer_matching_loss(
    student_out, teacher_out, attention_mask, layer_map: list[int], *, hidden_weight: float, attention_weight: float
):
    """TinyBERT/MiniLM-style terms for each student layer and its teacher layer: the MSE between their hidden states
    and the KL from the teacher's attention distributions to the student's, both averaged over the real (not padding)
    tokens, and the KL over heads too. A padding position's attention row is ignored: it attends to nothing real."""
    import torch.nn.functional as F

    mask = attention_mask.float()
    tokens = mask.sum()
    total = 0.0
    for s_index, t_index in enumerate(layer_map):
        if hidden_weight:
            diff = (
                student_out.hidden_states[s_index + 1].float() - teacher_out.hidden_states[t_index + 1].float()
            ) ** 2
            total = total + hidden_weight * (diff.mean(-1) * mask).sum() / tokens
        if attention_weight:
            s_att, t_att = student_out.attentions[s_index].float(), teacher_out.attentions[t_index].float()
            kl = F.kl_div(s_att.clamp_min(1e-9).log(), t_att, reduction="none").sum(-1)  # per head and query
            total = total + attention_weight * (kl.mean(1) * mask).sum() / tokens
    return total


def _loss(cfg: DistillConfig, teacher, layer_map: list[int]):
    import torch

    def loss(outputs, batch):
        if cfg.from_labels_only:
            return cross_entropy(outputs, batch)
        total = kd_loss(
            outputs.logits,
            batch["teacher_logits"],
            batch.get("labels"),
            temperature=cfg.temperature,
            soft_weight=cfg.soft_weight,
        )
        if cfg.hidden_weight or cfg.attention_weight:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            teacher.to(batch["input_ids"].device)  # where the student trains (a no-op once it is there)
            with torch.no_grad():
                t_out = teacher(**inputs, output_hidden_states=True, output_attentions=bool(cfg.attention_weight))
            total = total + layer_matching_loss(
                outputs,
                t_out,
                batch["attention_mask"],
                layer_map,
                hidden_weight=cfg.hidden_weight,
                attention_weight=cfg.attention_weight,
            )
        return total

    return loss


def student_record(
    parent: Variant, shape: StudentShape, cfg: DistillConfig, ctx: StageContext, out_root: Path
) -> Variant:
    """The record (id, path) of the student `distill` makes from these knobs, before it is made."""
    from transformers import AutoConfig

    if parent.format != "hf":
        raise ModelError(f"distill: the teacher must be a PyTorch variant, {parent.id} is {parent.format}")
    token = shape.token(AutoConfig.from_pretrained(parent.path).num_hidden_layers)
    # augment and soup only when set: students made before they existed keep their ids
    unset = (["augment"] if cfg.augment is None else []) + (["soup"] if cfg.soup == 1 else [])
    unset += ["long_text_pass"] if cfg.long_text_pass is None else []
    knobs = {"student": shape.model_dump(exclude_none=True), **cfg.knobs("students", *unset)}
    return derive(
        parent, stage="distill", token=token, params=knobs, format="hf", out_root=out_root, data=ctx.data_fingerprint
    )


def validation_accuracy(variant: Variant, ctx: StageContext) -> float:
    """A PyTorch variant's accuracy on the validation split (the teacher's labels where the split has none)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    splits = load_splits(ctx.data, ctx.num_labels)
    texts, truth = validation_truth(splits.validation, ctx.teacher.path, ctx.max_length, ctx.cache_dir)
    model = AutoModelForSequenceClassification.from_pretrained(variant.path)
    return accuracy_on(model, AutoTokenizer.from_pretrained(variant.path), texts, truth, ctx.max_length)


def distill(parent: Variant, shape: StudentShape, cfg: DistillConfig, ctx: StageContext, out_root: Path) -> Variant:
    from transformers import AutoTokenizer

    child = student_record(parent, shape, cfg, ctx, out_root)
    token = child.token
    with making(child) as done:
        if done:
            return done
        cache_dir = ctx.cache_dir or Path(out_root) / ".cache"
        splits = load_splits(ctx.data, ctx.num_labels)
        train_split = splits.train
        if train_split.labels is None and cfg.from_labels_only:
            raise ModelError("distill.from_labels_only needs a labelled train split")
        # the attentions a model returns in training are the ones after dropout, zeros and all: matching them needs it
        # off
        student, teacher, chosen = build_student(
            parent.path, shape, attention_dropout=0.0 if cfg.attention_weight else None
        )
        tokenizer = AutoTokenizer.from_pretrained(parent.path)
        if not layout_of(student.config.model_type).token_types:  # the student (and its saved copy) takes none
            names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
            tokenizer = AutoTokenizer.from_pretrained(parent.path, model_input_names=names)
        layer_map = cfg.layer_map or chosen
        if len(layer_map) != student.config.num_hidden_layers:
            raise ModelError(
                f"distill.layer_map has {len(layer_map)} entries for a {student.config.num_hidden_layers}-layer student"
            )
        if cfg.attention_weight and student.config.num_attention_heads != teacher.config.num_attention_heads:
            raise ModelError("distill.attention_weight needs the student and teacher to have the same number of heads")

        # sample before computing teacher logits, so only the examples actually trained on are scored
        fit = sample_indices(len(train_split), cfg.training.max_examples, ctx.seed)
        texts = [train_split.texts[i] for i in fit]
        labels = [train_split.labels[i] for i in fit] if train_split.labels is not None else None
        targets = None if cfg.from_labels_only else teacher_logits(parent.path, texts, ctx.max_length, cache_dir)
        # checked before the main training, so that a min_words no text reaches fails at once
        long_texts = (
            long_text_indices(texts, cfg.long_text_pass, "distill.long_text_pass") if cfg.long_text_pass else None
        )
        if cfg.augment is not None:
            neighbours = word_neighbours(
                teacher, tokenizer, {w for text in texts for w in text.split()}, cfg.augment.neighbours
            )
            copies = augment_texts(texts, neighbours, cfg.augment, ctx.seed)
            log.info(
                "augmented: %d copies of %d texts (%d words have neighbours)", len(copies), len(texts), len(neighbours)
            )
            targets = np.concatenate([targets, teacher_logits(parent.path, copies, ctx.max_length, cache_dir)])
            labels = labels + [UNLABELLED] * len(copies) if labels is not None else None
            texts = texts + copies
        validation, val_truth = validation_truth(splits.validation, parent.path, ctx.max_length, cache_dir)

        wants = {"output_hidden_states": bool(cfg.hidden_weight), "output_attentions": bool(cfg.attention_weight)}
        budget = cfg.training.model_copy(update={"max_examples": None})

        def fit(model, seed: int, keep: list[int] | None = None, budget: TrainConfig = budget) -> dict[str, float]:
            keep = list(range(len(texts))) if keep is None else keep
            return train(
                model,
                tokenizer,
                [texts[i] for i in keep],
                [labels[i] for i in keep] if labels is not None else None,
                budget,
                max_length=ctx.max_length,
                seed=seed,
                loss_fn=_loss(cfg, teacher, layer_map),
                targets=targets[keep] if targets is not None else None,
                model_kwargs={k: v for k, v in wants.items() if v},
                evaluate=(lambda: accuracy_on(model, tokenizer, validation, val_truth, ctx.max_length))
                if cfg.best_on_validation
                else None,
            )

        log.info("distilling %s from %s on %d examples (%d validation)", token, parent.id, len(texts), len(validation))
        initial = copy.deepcopy(student) if cfg.soup > 1 else None
        figures, others = [fit(student, ctx.seed)], []
        for i in range(1, cfg.soup):
            log.info("soup: distilling copy %d of %d (seed %d)", i + 1, cfg.soup, ctx.seed + i)
            others.append(copy.deepcopy(initial))
            figures.append(fit(others[-1], ctx.seed + i))
        if others:
            average_weights(student, others)
        figures = soup_figures(figures) if others else figures[0]
        if long_texts is not None:  # indices among the original texts: augmented copies come after them
            log.info("long-text pass: %d training texts have %d+ words", len(long_texts), cfg.long_text_pass.min_words)
            figures |= {
                f"long_text_pass_{k}": v for k, v in fit(student, ctx.seed, long_texts, cfg.long_text_pass).items()
            }
        # later fine-tuning of the saved student (QAT, exits) gets the teacher's usual attention dropout back
        field = layout_of(teacher.config.model_type).attention_dropout
        setattr(student.config, field, getattr(teacher.config, field))
        return save_hf_variant(
            child.model_copy(update={"metrics": {f"distill_{k}": v for k, v in figures.items()}}), student, tokenizer
        )


@task(name="distill")
def distill_task(
    parent: Variant, shape: StudentShape, cfg: DistillConfig, ctx: StageContext, out_root: Path
) -> Variant:
    # whole-stage lock: a from_pretrained in another thread switches torch to the meta device mid-step
    with TORCH_LOCK:
        return distill(parent, shape, cfg, ctx, out_root)


def plan(parent: Variant, cfg: DistillConfig, ctx: StageContext, out_root: Path, made: dict) -> Planned:
    return [(f"distill[{s.model_dump(exclude_none=True)}]", (parent, s, cfg, ctx, out_root)) for s in cfg.students]


STAGE = Stage(DistillConfig, ("hf",), "Teacher → smaller students (knowledge distillation).", plan, distill_task)
