"""The one supervised training loop every stage uses (teacher fine-tuning now; distillation and recovery reuse it)."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from .base import DataError, StrictModel, quiet
from .intervals import accuracy
from .progress import advance, making_now

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("squeezeflow.training")

# loss_fn(model_outputs, batch) -> scalar loss; the default is cross-entropy on the batch labels.
LossFn = Callable[[object, dict[str, "torch.Tensor"]], "torch.Tensor"]
# The label of a training text that has none of its own (an augmented copy): the KD loss gives it the soft term only.
UNLABELLED = -100


class TrainConfig(StrictModel):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak AdamW learning rate.")
    batch_size: int = Field(16, ge=1, le=1024, description="Examples per optimisation step.")
    max_examples: int | None = Field(None, ge=1, description="Use at most this many training examples (seeded sample).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps with linear learning-rate warm-up.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    group_by_length: bool = Field(
        False,
        description="Batch texts of similar length together (less padding: faster on short, varied texts).",
    )
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        le=1024,
        description="Batches whose gradients are summed before each optimizer step: an effective batch of "
        "batch_size × this, in the memory of one batch.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Forward and backward in mixed precision (weights and optimizer stay fp32). auto: on a GPU, bf16 "
        "(fp16 where it has no bf16); on a CPU, bf16 where it has AMX-BF16 units, which run it about twice as fast, "
        "fp32 elsewhere, where bf16 is emulated and slower.",
    )

    def uses_mixed_precision(self) -> bool:
        import torch

        return self.precision == "bf16" or (
            self.precision == "auto" and (torch.cuda.is_available() or cpu_has_amx_bf16())
        )


class LongTextPass(TrainConfig):
    """A second, gentler pass over only the training texts of at least `min_words` words, after the main training.
    Where the training set is mostly short phrases and the inputs served are full sentences (SST-2: 67k phrases,
    22 % of them 15+ words; dev sentences 19.5 words on average), it ends training on what the model will see."""

    min_words: int = Field(15, ge=1, description="Train on the texts with at least this many (space-separated) words.")
    learning_rate: float = Field(2e-5, gt=0, lt=1, description="Peak AdamW learning rate (below the main training's).")
    batch_size: int = Field(32, ge=1, le=1024, description="Examples per optimisation step.")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of steps with linear learning-rate warm-up.")


def long_text_indices(texts: list[str], pass_cfg: LongTextPass, field: str) -> list[int]:
    """The indices of the texts with at least `pass_cfg.min_words` words; a clear error naming `field` if none has."""
    keep = [i for i, text in enumerate(texts) if len(text.split()) >= pass_cfg.min_words]
    if not keep:
        raise DataError(
            f"{field}.min_words: none of the {len(texts)} training texts has {pass_cfg.min_words} or more words"
        )
    return keep


def cpu_has_amx_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and " amx_bf16" in cpuinfo.read_text()


def accelerator_for(cfg: TrainConfig):
    """An accelerate Accelerator for one training: the device it finds (CUDA when present, else the CPU), mixed
    precision on or off as `cfg` says, and its gradient accumulation. The process's mixed-precision type is set once
    (accelerate keeps one per process), so each training switches autocast on or off rather than changing it.
    Started by `accelerate launch` or `torchrun` with several processes, it trains data-parallel (NCCL between GPUs,
    gloo between CPU processes)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs

    if torch.cuda.is_available():
        kind = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        kind = "bf16"
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # accelerate forms a CPU process group only when told it is on the CPU
        mixed_precision=kind,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        kwargs_handlers=[AutocastKwargs(enabled=cfg.uses_mixed_precision())],
    )


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """A seeded, order-preserving sample of at most `limit` of `n` example indices."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def accuracy_on(model, tokenizer, texts: list[str], truth: np.ndarray, max_length: int) -> float:
    """The PyTorch model's accuracy on `texts` against `truth`."""
    return accuracy(predict_logits(model, tokenizer, texts, max_length), truth)


def predict_logits(model, tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    """The model's logits on `texts`, in their order. Texts run in batches of 64 of similar length: on short,
    varied texts (SST-2's phrases) that pads little and runs several times faster than batches in text order."""
    import numpy as np
    import torch

    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
    logits = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    device = next(model.parameters()).device  # e.g. scored on the GPU it trains on
    model.eval()
    # padding ids already made is what pad() is for; transformers' hint to tokenize and pad in one call is not
    with torch.inference_mode(), quiet("transformers.tokenization_utils_base", "with a fast tokenizer, using the"):
        for i in range(0, len(texts), 64):
            rows = order[i : i + 64]
            batch = tokenizer.pad({k: [column[r] for r in rows] for k, column in encoded.items()}, return_tensors="pt")
            logits[rows] = model(**batch.to(device)).logits.float().cpu().numpy()
    return logits


def batch_order(
    order: list[int], texts: list[str], batch_size: int, group_by_length: bool, generator
) -> list[list[int]]:
    """`order` cut into batches. Grouped by length: chunks of 64 batches are each sorted by text length before
    cutting, then the batches are shuffled, so a batch pads to a similar length and the order stays random."""
    import torch

    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    chunk = batch_size * 64
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(texts[i]))
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]


def cross_entropy(outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"])


def train(
    model: torch.nn.Module,
    tokenizer,
    texts: list[str],
    labels: list[int] | None,
    cfg: TrainConfig,
    *,
    max_length: int,
    seed: int,
    loss_fn: LossFn = cross_entropy,
    targets: np.ndarray | None = None,
    model_kwargs: dict | None = None,
    evaluate: Callable[[], float] | None = None,
    progress: Callable[[str], None] = log.info,
    learning_rates: dict[str, float] | None = None,
) -> dict[str, float]:
    """Trains `model` in place with AdamW, linear warm-up/decay and gradient clipping, on the device accelerate
    finds (the model comes back on the CPU), with its mixed precision and gradient accumulation.

    `learning_rates` gives some parameters (by name) their own peak rate; the rest use cfg.learning_rate.
    `labels` may be None (unlabelled data: the loss must use `targets`); `targets` (e.g. cached teacher logits)
    are aligned with `texts` and reach the loss as batch["teacher_logits"]. With `evaluate` (higher is
    better), the model is scored before training and after each epoch, and the best of those weights are kept
    (so fine-tuning that makes the model worse on held-out data is undone).
    Returns a few figures: final loss, steps, seconds, and the best score when evaluated."""
    import copy

    import torch

    seed_everything(seed)
    progress_key = f"train-{id(model)}-{time.perf_counter()}"
    keep = sample_indices(len(texts), cfg.max_examples, seed)
    accelerator = accelerator_for(cfg)
    # data parallel: process k takes batches k, k + N, ... of the same seeded order; every process steps as often
    # (the gradients are averaged at each step), so the epoch's leftover batches are dropped
    processes, rank = accelerator.num_processes, accelerator.process_index
    batches_per_epoch = math.ceil(len(keep) / cfg.batch_size)
    if processes > 1:
        batches_per_epoch //= processes
        if batches_per_epoch == 0:
            raise DataError(
                f"{len(keep)} training examples make fewer batches of {cfg.batch_size} than the {processes} processes "
                "training them; train on more examples or in fewer processes"
            )
        progress = progress if accelerator.is_main_process else (lambda message: None)
    accumulate = cfg.gradient_accumulation_steps
    total_steps = max(1, math.ceil(batches_per_epoch * cfg.epochs / accumulate))  # optimizer steps
    warmup = int(total_steps * cfg.warmup_ratio)

    groups: dict[tuple[float, float], list] = {}  # (peak rate, weight decay) -> parameters
    for name, param in model.named_parameters():
        if param.requires_grad:
            rate = (learning_rates or {}).get(name, cfg.learning_rate)
            groups.setdefault((rate, 0.0 if param.ndim < 2 else cfg.weight_decay), []).append(param)
    model.to(accelerator.device)  # before the optimizer is built: fused AdamW steps on its parameters' device
    # fused: one kernel per step instead of one per parameter tensor (~5x faster steps on CPU, same update)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr": rate, "weight_decay": decay} for (rate, decay), ps in groups.items()],
        lr=cfg.learning_rate,
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            (step + 1) / max(1, warmup)
            if step < warmup
            else max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        ),
    )
    # the scheduler stays ours: accelerate's would step N times per step in N processes, but total_steps already
    # counts the steps of one process
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(seed)
    figures: dict[str, float] = {}
    best_score, best_state = -math.inf, None
    try:
        if evaluate is not None:
            model.eval()
            best_score, best_state = evaluate(), copy.deepcopy(model.state_dict())
            progress(f"before training: validation score {best_score:.4f}")
            figures["initial_validation_score"] = best_score
        started, step, batches, running, epoch = time.perf_counter(), 0, 0, 0.0, 0
        while step < total_steps:
            model.train()
            order = [keep[i] for i in torch.randperm(len(keep), generator=generator).tolist()]
            for k, idx in enumerate(batch_order(order, texts, cfg.batch_size, cfg.group_by_length, generator)):
                if step >= total_steps:
                    break
                if k % processes != rank:
                    continue
                inputs = tokenizer(
                    [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
                )
                inputs = dict(inputs.to(accelerator.device))
                batch = dict(inputs)
                if labels is not None:
                    batch["labels"] = torch.tensor([labels[i] for i in idx], device=accelerator.device)
                if targets is not None:
                    batch["teacher_logits"] = torch.as_tensor(targets[idx], dtype=torch.float32).to(accelerator.device)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        outputs = model(**inputs, **(model_kwargs or {}))
                        loss = loss_fn(outputs, batch)  # autocast runs the cross-entropy and KL losses in fp32
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:  # the optimizer stepped
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                batches += 1
                if batches % accumulate:
                    continue
                step += 1
                advance(progress_key, f"training {making_now.get() or 'a model'}", step, total_steps)
                running = loss.item() if step == 1 else 0.9 * running + 0.1 * loss.item()
                if step % max(1, total_steps // 10) == 0 or step == total_steps:
                    progress(f"step {step}/{total_steps} loss {running:.4f} ({time.perf_counter() - started:.0f}s)")
            epoch += 1
            model.eval()
            if evaluate is not None:
                score = evaluate()
                progress(f"epoch {epoch}: validation score {score:.4f}")
                if score > best_score:
                    best_score, best_state = score, copy.deepcopy(model.state_dict())
        if best_state is not None:
            model.load_state_dict(best_state)
            figures["best_validation_score"] = best_score
    finally:
        # the caller's model object, as it came: its own forward (not the autocast wrapper), on the CPU
        accelerator.unwrap_model(model, keep_fp32_wrapper=False).to("cpu")
        accelerator.free_memory()
    model.eval()
    return {
        **figures,
        "train_loss": running,
        "train_steps": float(total_steps),
        "train_seconds": time.perf_counter() - started,
        "train_mixed_precision": float(cfg.uses_mixed_precision()),
        "train_device_cuda": float(accelerator.device.type == "cuda"),
        "train_processes": float(processes),
    }


def average_weights(into: torch.nn.Module, others: list[torch.nn.Module]) -> None:
    """Sets `into`'s floating-point weights to the mean of its own and those of `others` (same architecture): a uniform
    model soup. Copies fine-tuned from one starting point stay in one basin of the loss, so their mean is a model
    too."""
    total = {k: v.detach().clone() for k, v in into.state_dict().items() if v.is_floating_point()}
    for other in others:
        for key, value in other.state_dict().items():
            if key in total:
                total[key] += value
    into.load_state_dict({k: v / (1 + len(others)) for k, v in total.items()}, strict=False)


def soup_figures(per_copy: list[dict[str, float]]) -> dict[str, float]:
    """The figures of the copies in a soup, as copy1_…, copy2_…, and their total training time as train_seconds."""
    figures = {f"copy{i}_{k}": v for i, one in enumerate(per_copy, 1) for k, v in one.items()}
    return figures | {"train_seconds": sum(one["train_seconds"] for one in per_copy)}


def kd_loss(student_logits, teacher_logits, labels, *, temperature: float, soft_weight: float):
    """Hinton distillation: soft_weight · T² · KL(teacher_T ‖ student_T) + (1 − soft_weight) · CE(labels).
    The T² factor keeps the soft term's gradients on the scale of the hard term's as T grows. Rows labelled
    UNLABELLED (augmented texts) learn from the soft term alone, as a batch without labels does."""
    import torch
    import torch.nn.functional as F

    # autocast leaves log_softmax in bf16, which would blur the soft targets
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    soft = (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            reduction="none",
            log_target=True,
        ).sum(-1)
        * temperature**2
    )
    if soft_weight >= 1.0 or labels is None:
        return soft.mean()
    labelled = labels != UNLABELLED
    hard = F.cross_entropy(student_logits, labels, ignore_index=UNLABELLED, reduction="none")
    return torch.where(labelled, soft_weight * soft + (1.0 - soft_weight) * hard, soft).mean()
