"""INT8 quantization of ONNX variants. Each mode is a small strategy chosen by name from the config."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import Field

from .base import StrictModel
from .export import copy_tokenizer
from .variant import Variant, derive, staged_dir

log = logging.getLogger("squeezeflow.quantize")

Mode = Literal["dynamic"]


class QuantizeConfig(StrictModel):
    kind: Literal["quantize"] = "quantize"
    modes: list[Mode] = Field(["dynamic"], min_length=1, description="INT8 modes; each becomes a variant.")
    per_channel: bool = Field(False, description="Per-output-channel weight scales (more accurate, slightly slower).")
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI where 8-bit can saturate.")
    quantize_embeddings: bool = Field(False, description="Also store the word-embedding Gather in INT8 (smaller file).")


def _dynamic(src: Path, dst: Path, cfg: QuantizeConfig) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    op_types = ["MatMul", "Attention"] + (["Gather"] if cfg.quantize_embeddings else [])
    quantize_dynamic(
        src, dst, op_types_to_quantize=op_types, per_channel=cfg.per_channel,
        reduce_range=cfg.reduce_range, weight_type=QuantType.QInt8,
        # shape inference cannot type the outputs of fused com.microsoft ops; they are all float
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


MODES: dict[str, tuple[str, Callable[[Path, Path, QuantizeConfig], None]]] = {
    "dynamic": ("int8-dynamic", _dynamic),
}


def quantize(parent: Variant, mode: Mode, cfg: QuantizeConfig, out_root: Path) -> Variant:
    token, run = MODES[mode]
    params = {"mode": mode, **cfg.model_dump(exclude={"kind", "modes"})}
    child = derive(parent, stage="quantize", token=token, params=params, format="onnx", out_root=out_root)
    with staged_dir(Path(child.path)) as scratch:
        run(Path(parent.path) / "model.onnx", scratch / "model.onnx", cfg)
        copy_tokenizer(parent.path, scratch)
    log.info("quantized %s (%s) -> %s", parent.id, mode, child.id)
    return child


@task(name="quantize")
def quantize_task(parent: Variant, mode: Mode, cfg: QuantizeConfig, out_root: Path) -> Variant:
    return quantize(parent, mode, cfg, out_root)
