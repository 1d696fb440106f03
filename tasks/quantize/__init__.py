"""The quantize stage: INT8 variants of ONNX (and PyTorch) variants, one per mode, each a small strategy in its own
module:

- `dynamic` (dynamic.py): ONNX Runtime dynamic quantization of the fused ONNX parent: MatMul and Attention run on
  integer kernels, activation ranges measured on every call.
- `static` (static.py): the same kernels with every activation's uint8 scale and zero point fixed by calibration on
  training texts, and an accuracy-aware fallback that keeps the most sensitive nodes in float (on validation).
- `qat` (qat.py): fake-quant fine-tuning of the PyTorch source with distillation from the teacher, then exported and
  quantized the way it was simulated.
- `torch-dynamic` (torch_dynamic.py): PyTorch `quantize_dynamic` of the source's Linear layers.

The 4-bit embedding codec is codec4.py; the graph rewrite that fixes activation ranges is activations.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task

from ..base import ModelError, Planned, Stage
from ..variant import StageContext, Variant, derive, making, save_record, staged_dir
from .config import EXIT_MODES, MODE_KNOBS, Mode, QATConfig, QuantizeConfig, Strategy
from .dynamic import dynamic
from .qat import qat
from .static import static
from .torch_dynamic import torch_dynamic

__all__ = ["EXIT_MODES", "MODES", "MODE_KNOBS", "STAGE", "QATConfig", "QuantizeConfig", "quantize", "quantize_task"]

log = logging.getLogger("squeezeflow.quantize")


# mode -> (lineage token, output format, which parent it takes, strategy)
MODES: dict[str, tuple[str, str, str, Strategy]] = {
    "dynamic": ("int8-dynamic", "onnx", "onnx", dynamic),
    "static": ("int8-static", "onnx", "onnx", static),
    "qat": ("int8-qat", "onnx", "onnx", qat),
    "torch-dynamic": ("torch-int8-dynamic", "hf", "hf", torch_dynamic),
}


def quantize(
    parent: Variant, mode: Mode, cfg: QuantizeConfig, ctx: StageContext, out_root: Path, source: Variant | None = None
) -> Variant:
    """`parent` is the variant the mode works on (ONNX for ORT modes, PyTorch for torch-dynamic); `source` is the
    PyTorch model an ONNX parent was exported from (QAT fine-tunes it)."""
    token, fmt, parent_format, strategy = MODES[mode]
    if mode in EXIT_MODES and parent.format == "onnx-exit":  # each segment graph is quantized
        parent_format = fmt = "onnx-exit"
    if parent.format != parent_format:
        raise ModelError(f"quantize {mode}: needs a {parent_format} variant, {parent.id} is {parent.format}")
    knobs = {"mode": mode, **{k: v for k, v in cfg.knobs("modes").items() if k in MODE_KNOBS[mode]}}
    reads_data = mode in ("static", "qat")  # calibration, the fallback and QAT read the data; the others do not
    child = derive(
        parent,
        stage="quantize",
        token=token,
        params=knobs,
        format=fmt,
        out_root=out_root,
        data=ctx.data_fingerprint if reads_data else None,
    )
    with making(child) as done:
        if done:
            return done
        with staged_dir(Path(child.path)) as scratch:
            produced = strategy(parent, source, cfg, ctx, scratch)
            child = save_record(
                scratch,
                child.model_copy(update={"metrics": produced.metrics, "params": {**child.params, **produced.params}}),
            )
        log.info("quantized %s (%s) -> %s", parent.id, mode, child.id)
        return child


@task(name="quantize")
def quantize_task(
    parent: Variant, mode: Mode, cfg: QuantizeConfig, ctx: StageContext, out_root: Path, source: Variant | None = None
) -> Variant:
    return quantize(parent, mode, cfg, ctx, out_root, source)


def plan(parent: Variant, cfg: QuantizeConfig, ctx: StageContext, out_root: Path, made: dict) -> Planned:
    """ORT modes quantize the ONNX parent (QAT fine-tunes its PyTorch source first); torch-dynamic quantizes that
    PyTorch source itself; dynamic and static also quantize an early-exit variant, segment by segment."""
    source = made.get(parent.parent_id) if parent.format == "onnx" else None
    planned = []
    for mode in cfg.modes:
        token, _, wants, _ = MODES[mode]
        if parent.format == "onnx-exit" and mode in EXIT_MODES:
            wants = "onnx-exit"
        target = parent if wants == parent.format else source if source is not None and wants == source.format else None
        if target is not None:
            planned.append((token, (target, mode, cfg, ctx, out_root, source if target is parent else None)))
    return planned


STAGE = Stage(
    QuantizeConfig,
    ("onnx", "onnx-exit"),
    "INT8: dynamic, static (calibrated), QAT, torch-dynamic.",
    plan,
    quantize_task,
)
