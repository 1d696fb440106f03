"""ONNX export with optimum, then ONNX Runtime's transformer graph fusion (attention, LayerNorm, GELU)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import Field

from .base import TORCH_LOCK, ModelError, Planned, Stage, StageBase, quiet
from .variant import StageContext, Variant, derive, making, save_record, staged_dir

log = logging.getLogger("squeezeflow.export")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json")


class ExportConfig(StageBase):
    kind: Literal["export"] = "export"
    opset: int = Field(18, ge=14, le=21, description="ONNX opset of the exported graph.")
    optimize: Literal["none", "fusion"] = Field(
        "fusion",
        description="fusion: ORT transformer fusions (EmbedLayerNorm, Attention, BiasGelu; residual LayerNorms "
        "kept as Add + LayerNormalization, faster on CPU); none: the plain export.",
    )


def copy_tokenizer(src: str | Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, dst / name)


def fuse(onnx_path: Path, num_heads: int, hidden_size: int) -> None:
    """ONNX Runtime's BERT fusions (EmbedLayerNormalization, Attention, BiasGelu), in place, with each residual
    LayerNorm then split again (`split_skip_layer_norms`)."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(
        str(onnx_path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0
    )
    split_skip_layer_norms(optimized.model)
    if fuse_lone_embeddings(optimized.model):
        optimized.prune_graph()
    optimized.save_model_to_file(str(onnx_path))


def fuse_lone_embeddings(model) -> bool:
    """ONNX Runtime's fusion makes EmbedLayerNormalization only where attention follows the embeddings. A graph
    that holds the embeddings without a layer after them (an early-exit graph's embedding exit) gets it here: the
    word, token-type and position lookups, their sum and its LayerNormalization become the one fused node, which
    numbers positions 0..T-1 as BERT does. Only position ids made from the input's shape and constants qualify (not,
    e.g., RoBERTa's, counted from the token ids). Returns whether it fused (the old nodes' leftovers are then dead)."""
    from onnx import TensorProto, helper

    graph = model.graph
    inputs = {i.name for i in graph.input}
    made_by = {out: node for node in graph.node for out in node.output}
    weights = {t.name for t in graph.initializer}

    def lookup(value: str):
        node = made_by.get(value)
        return node if node is not None and node.op_type == "Gather" and node.input[0] in weights else None

    def reads_input_values(value: str) -> bool:
        node = made_by.get(value)
        if node is None:
            return value in inputs
        return node.op_type != "Shape" and any(reads_input_values(x) for x in node.input if x)

    for norm in [n for n in graph.node if n.op_type == "LayerNormalization"]:
        total = made_by.get(norm.input[0])
        if total is None or total.op_type != "Add" or len(norm.input) < 3:
            continue
        inner = next((made_by[x] for x in total.input if x in made_by and made_by[x].op_type == "Add"), None)
        position = next(
            (g for g in map(lookup, total.input) if g is not None and not reads_input_values(g.input[1])), None
        )
        if inner is None or position is None:
            continue
        by_input = {g.input[1]: g for g in map(lookup, inner.input) if g is not None}
        if set(by_input) != {"input_ids", "token_type_ids"} or not inputs >= set(by_input):
            continue
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-12)
        p = norm.name or norm.output[0]
        fused = [
            helper.make_node("Cast", ["input_ids"], [p + "/input_ids_int32"], name=p + "/ids", to=TensorProto.INT32),
            helper.make_node(
                "Cast", ["token_type_ids"], [p + "/token_type_ids_int32"], name=p + "/types", to=TensorProto.INT32
            ),
            helper.make_node(
                "EmbedLayerNormalization",
                [
                    p + "/input_ids_int32",
                    p + "/token_type_ids_int32",
                    by_input["input_ids"].input[0],
                    position.input[0],
                    by_input["token_type_ids"].input[0],
                    norm.input[1],
                    norm.input[2],
                ],
                [norm.output[0], p + "/mask_index"],
                name=p + "/embed",
                domain="com.microsoft",
                epsilon=epsilon,
            ),
        ]
        replace_node(graph, norm, fused)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return True
    return False


def split_skip_layer_norms(model) -> None:
    """Each SkipLayerNormalization becomes Add (+ Add of its bias) + LayerNormalization, in place. ONNX Runtime's
    CPU kernel for the fused op took 34.5 µs for 25 rows of 384 where the pair took 15 µs (2 threads); six of them
    were ~0.13 ms of a 3-layer INT8 student's 0.92 ms. Sessions made by `runtime.ort_session` keep ONNX Runtime
    from fusing the pair back when it loads the model."""
    from onnx import helper

    graph = model.graph
    for fused in [n for n in graph.node if n.op_type == "SkipLayerNormalization"]:
        x, skip, gamma, beta, bias = (list(fused.input) + [""] * 5)[:5]
        out, mean, inv_std, total = (list(fused.output) + [""] * 4)[:4]
        epsilon = next((a.f for a in fused.attribute if a.name == "epsilon"), 1e-12)
        p = (fused.name or out) + "/"
        nodes = []
        if bias:
            nodes.append(helper.make_node("Add", [x, bias], [p + "biased"], name=p + "biased"))
            x = p + "biased"
        total = total or p + "sum"
        nodes += [
            helper.make_node("Add", [x, skip], [total], name=p + "sum"),
            helper.make_node(
                "LayerNormalization",
                [total, gamma] + ([beta] if beta else []),
                [out, mean, inv_std] if inv_std else [out, mean] if mean else [out],
                name=p + "norm",
                axis=-1,
                epsilon=epsilon,
            ),
        ]
        replace_node(graph, fused, nodes)


def replace_node(graph, old, new_nodes: list) -> None:
    """`new_nodes` where `old` was, in order (the graph's node list stays topologically sorted)."""
    at = list(graph.node).index(old)
    graph.node.remove(old)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(at + offset, node)


def export_onnx(model_dir: str | Path, out_dir: Path, cfg: ExportConfig) -> None:
    """Writes `out_dir/model.onnx` (dynamic batch and sequence axes) and the tokenizer for a saved HF model."""
    from transformers import AutoConfig

    with TORCH_LOCK:
        # imported under the lock too: optimum's lazy module, imported by two threads at once, can come out half-made
        from optimum.exporters.onnx import main_export
        from torch.jit import TracerWarning

        # optimum passes transformers' old `torch_dtype` argument, and tracing notes constants it is right to fold
        with quiet("transformers.configuration_utils", "`torch_dtype` is deprecated", warning=TracerWarning):
            main_export(
                str(model_dir),
                out_dir,
                task="text-classification",
                opset=cfg.opset,
                local_files_only=True,
                do_validation=False,
                library_name="transformers",
            )
        config = AutoConfig.from_pretrained(model_dir)
    if cfg.optimize == "fusion":
        # pruned heads: 0 lets the fusion read the head count and width from the graph itself
        pruned = bool(getattr(config, "pruned_heads", None))
        fuse(out_dir / "model.onnx", 0 if pruned else config.num_attention_heads, 0 if pruned else config.hidden_size)
    copy_tokenizer(model_dir, out_dir)


def export(parent: Variant, cfg: ExportConfig, out_root: Path) -> Variant:
    """Exports an `hf` variant to an `onnx` variant."""
    if parent.format != "hf":
        raise ModelError(f"export: variant {parent.id} is already ONNX")
    child = derive(parent, stage="export", token="onnx", params=cfg.knobs(), format="onnx", out_root=out_root)
    with making(child) as done:
        if done:
            return done
        with staged_dir(Path(child.path)) as scratch:
            export_onnx(parent.path, scratch, cfg)
            child = save_record(scratch, child)
        log.info("exported %s -> %s", parent.id, child.id)
        return child


@task(name="export")
def export_task(parent: Variant, cfg: ExportConfig, out_root: Path) -> Variant:
    return export(parent, cfg, out_root)


def plan(parent: Variant, cfg: ExportConfig, ctx: StageContext, out_root: Path, made: dict) -> Planned:
    return [("onnx", (parent, cfg, out_root))]


STAGE = Stage(ExportConfig, ("hf",), "ONNX export with ONNX Runtime's transformer fusions.", plan, export_task)
