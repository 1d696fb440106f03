"""Quantization-aware training: fake-quantized Linear layers fine-tuned with distillation from the teacher, then
exported and quantized the way they were simulated (static or dynamic activations)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..base import TORCH_LOCK, ModelError
from ..data import load_splits
from ..export import ExportConfig, copy_tokenizer, export_onnx
from ..families import layout_of
from ..variant import StageContext, Variant
from .activations import static_activations, uint8_scale_zero
from .codec4 import dequantized_blocks
from .config import Produced, QuantizeConfig
from .dynamic import ort_dynamic
from .static import calibrated_ranges, calibration_method, calibration_texts, encoded


def fake_quant_linear(
    linear, per_channel: bool, reduce_range: bool, activation_range: tuple[float, float] | None = None
):
    """Wraps an nn.Linear so training sees what ORT's INT8 kernels compute: uint8 activations with a per-batch
    range (dynamic) or the fixed `activation_range` (static), int8 symmetric weights, per tensor or per output
    channel, 7-bit with `reduce_range` (straight-through gradients)."""
    import torch

    levels = 64.0 if reduce_range else 127.0  # ORT's symmetric int8 range: [-127, 127], reduced [-64, 64]
    fixed = None if activation_range is None else uint8_scale_zero(*activation_range)

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


def swap_linears(module, cfg: QuantizeConfig | None, ranges: dict[str, tuple[float, float]] | None = None) -> None:
    """With a config, wraps every Linear under `module` in fake quantization matching it (with `ranges`, each
    Linear's input range by its name under `module`, fixed); without, unwraps them."""
    import torch

    if cfg is None:
        found = [(name, m.inner) for name, m in module.named_modules() if m.__class__.__name__ == "FakeQuantLinear"]
    else:
        found = [
            (name, fake_quant_linear(m, cfg.per_channel, cfg.reduce_range, None if ranges is None else ranges[name]))
            for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear)
        ]
    for name, replacement in found:
        owner, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(owner), attribute, replacement)


def linear_input_ranges(module, model, tokenizer, texts: list[str]) -> dict[str, tuple[float, float]]:
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


def freeze_on_four_bit_grid(embeddings, block_size: int) -> None:
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
        return qat_fine_tune(parent, source, cfg, ctx, out)


def qat_fine_tune(
    parent: Variant, source: Variant | None, cfg: QuantizeConfig, ctx: StageContext, out: Path
) -> Produced:
    import onnx
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..distill import teacher_logits, validation_truth
    from ..training import TrainConfig, accuracy_on, kd_loss, sample_indices, train

    if source is None or ctx.teacher is None:
        raise ModelError(f"QAT of {parent.id} needs its PyTorch source model and the teacher")
    splits = load_splits(ctx.data, ctx.num_labels)
    train_split, q = splits.train, cfg.qat
    pick = sample_indices(len(train_split), q.max_examples, ctx.seed)
    texts = [train_split.texts[i] for i in pick]
    labels = [train_split.labels[i] for i in pick] if train_split.labels is not None else None
    model = AutoModelForSequenceClassification.from_pretrained(source.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    base = getattr(model, model.base_model_prefix)
    # the encoder below the embeddings: BERT's `encoder`, DistilBERT's `transformer`
    encoder = base.get_submodule(layout_of(model.config.model_type).layers.split(".")[0])
    if cfg.four_bit_embeddings:
        freeze_on_four_bit_grid(base.embeddings, cfg.embedding_block_size)
    ranges = calibration = None
    if q.activations == "static":
        calibration = calibration_texts(train_split, cfg, ctx.seed)  # the static mode's examples
        ranges = linear_input_ranges(encoder, model, tokenizer, calibration)
    swap_linears(encoder, cfg, ranges)  # the encoder's Linears are what ORT quantizes (MatMul / Attention)
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
    swap_linears(encoder, None)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "hf")
        tokenizer.save_pretrained(Path(tmp) / "hf")
        export_onnx(Path(tmp) / "hf", Path(tmp) / "onnx", ExportConfig(**parent.params))
        ort_dynamic(Path(tmp) / "onnx" / "model.onnx", out / "model.onnx", cfg)
        if calibration is not None:  # the ranges of the fine-tuned model, calibrated as the static mode does
            feeds = encoded(parent.path, calibration, [i.name for i in onnx.load(str(out / "model.onnx")).graph.input])
            static_activations(
                out / "model.onnx", calibrated_ranges(out / "model.onnx", feeds, calibration_method(cfg))[0]
            )
    copy_tokenizer(parent.path, out)
    metrics = {"qat_train_seconds": figures["train_seconds"], "qat_train_loss": figures["train_loss"]}
    if q.best_on_validation:  # the fake-quant model on the validation split, before fine-tuning (PTQ) and as exported
        metrics |= {
            "qat_initial_validation_accuracy": figures["initial_validation_score"],
            "qat_validation_accuracy": figures["best_validation_score"],
        }
    return Produced(metrics, {})
