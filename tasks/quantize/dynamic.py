"""Dynamic INT8: ONNX Runtime's integer kernels with activation ranges measured on every call."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..base import quiet
from ..export import copy_tokenizer
from ..runtime import EARLY_EXIT_FILE, SEGMENTS_DIR
from ..variant import StageContext, Variant
from .codec4 import four_bit_embeddings
from .config import Produced, QuantizeConfig


def ort_dynamic(src: Path, dst: Path, cfg: QuantizeConfig, exclude: list[str] | None = None) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the word embedding sits in a Gather, or inside the fused EmbedLayerNormalization (-> QEmbedLayerNormalization)
    eight_bit_embeddings = cfg.quantize_embeddings and not cfg.four_bit_embeddings
    op_types = ["MatMul", "Attention"] + (["Gather", "EmbedLayerNormalization"] if eight_bit_embeddings else [])
    # ORT writes <input>-inferred.onnx beside its input and deletes it afterwards: two modes quantizing one parent at
    # once raced on that file (FileNotFoundError), so each quantizes a private copy next to its own output
    with tempfile.TemporaryDirectory(dir=dst.parent) as private:
        local = Path(private) / src.name
        shutil.copyfile(src, local)
        # ORT suggests shape pre-processing, which the fused graph (com.microsoft ops) does not admit
        with quiet("root", "Please consider to run pre-processing before quantization"):
            quantize_dynamic(
                local,
                dst,
                op_types_to_quantize=op_types,
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude or [],
                # shape inference cannot type the outputs of fused com.microsoft ops; they are all float
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    if cfg.four_bit_embeddings:
        four_bit_embeddings(dst, cfg.embedding_block_size)


def dynamic(parent: Variant, source: Variant | None, cfg: QuantizeConfig, ctx: StageContext, out: Path) -> Produced:
    """The parent's model.onnx; for an early-exit variant, each segment, then chained again into model.onnx."""
    copy_tokenizer(parent.path, out)
    if parent.format != "onnx-exit":
        ort_dynamic(Path(parent.path) / "model.onnx", out / "model.onnx", cfg)
        return Produced({}, {})
    from ..early_exit import write_exit_graph

    (out / SEGMENTS_DIR).mkdir()
    for graph in sorted((Path(parent.path) / SEGMENTS_DIR).glob("*.onnx")):
        ort_dynamic(graph, out / SEGMENTS_DIR / graph.name, cfg)
    shutil.copy2(Path(parent.path) / EARLY_EXIT_FILE, out / EARLY_EXIT_FILE)
    write_exit_graph(out)
    return Produced({}, {})
