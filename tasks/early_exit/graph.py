"""The early-exit ONNX graph: the model exported as one graph per segment (embeddings + first layer, each later
layer), chained by ONNX `If` nodes with each exit's rule computed in the graph, so ONNX Runtime runs only the
layers an input needs, in one session."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..base import ModelError
from ..export import fuse
from ..families import layout_of
from ..prune import encoder_layers
from ..runtime import EARLY_EXIT_FILE, SEGMENTS_DIR
from .heads import torch_modules

log = logging.getLogger("squeezeflow.early_exit")


def export_segments(exit_model, out_dir: Path, opset: int, optimize: str) -> list[str]:
    """One ONNX graph per exit: the first takes token ids, the rest take the previous hidden states; each returns
    its hidden states and its exit's logits (the last: the model's own head). With the embedding exit the first
    graph holds only the embeddings and their exit, and each layer is a graph of its own."""
    import torch

    modules = torch_modules()
    model = exit_model.model.eval()
    base, layers = encoder_layers(model)
    heads = list(exit_model.heads) + [modules.FinalHead(model)]
    ids = torch.ones(1, 8, dtype=torch.long)
    mask = torch.ones(1, 8, dtype=torch.long)
    hidden = torch.zeros(1, 8, model.config.hidden_size)
    batch_seq = {0: "batch", 1: "sequence"}
    family = layout_of(model.config.model_type)
    entry_args, entry_inputs = (ids, mask), ["input_ids", "attention_mask"]
    if family.token_types:
        entry_args, entry_inputs = (*entry_args, torch.zeros_like(ids)), [*entry_inputs, "token_type_ids"]
    stack = base.get_submodule(family.layers.rpartition(".")[0])
    layers = [modules.Layer(layer, stack, family.layer_inputs) for layer in layers]
    if exit_model.embedding_exit:
        entry, inner_layers = modules.EmbeddingSegment(base, heads[0], family.layer_inputs), layers
    else:
        entry, inner_layers = modules.EntrySegment(base, layers[0], heads[0]), layers[1:]
    parts = [entry] + [modules.InnerSegment(layer, head) for layer, head in zip(inner_layers, heads[1:])]
    names = []
    for k, segment in enumerate(parts):
        name = f"segment_{k:02d}.onnx"
        args, inputs = (entry_args, entry_inputs) if k == 0 else ((hidden, mask), ["hidden_states", "attention_mask"])
        axes = {n: batch_seq for n in inputs} | {"hidden_out": batch_seq, "logits": {0: "batch"}}
        torch.onnx.export(
            segment.eval(),
            args,
            str(out_dir / name),
            input_names=inputs,
            output_names=["hidden_out", "logits"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
        if optimize == "fusion":
            fuse(out_dir / name, 0, 0)  # 0, 0: the fusion reads head count and width from the graph
        names.append(name)
    return names


def _copied_node(node, name: str, inputs: list[str], outputs: list[str]):
    """A copy of `node` (op, domain, attributes) under a new name, reading `inputs` and writing `outputs`."""
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name, copy.input[:], copy.output[:] = name, inputs, outputs
    return copy


def _renamed_segment(k: int, graph, feeds: dict[str, str], initializers: list, shared: dict[str, str]):
    """Segment k's nodes with every value renamed `s{k}/...` (one namespace for the chained model), its graph
    inputs wired to `feeds`; the nodes computing values in `shared` are left out and those values read under
    their shared names. Its initializers still in use are appended to `initializers`.
    Returns (nodes, outputs by name)."""
    import onnx

    rename = {i.name: feeds[i.name] for i in graph.input} | shared
    kept = [node for node in graph.node if not all(x in shared for x in node.output if x)]
    used = {x for node in kept for x in _reads(node)} | {o.name for o in graph.output}
    kept = [
        node for node in kept if node.op_type != "Constant" or node.output[0] in used
    ]  # those only the mask work read
    for init in graph.initializer:
        if init.name not in used:
            continue
        moved = onnx.TensorProto()
        moved.CopyFrom(init)
        moved.name = rename[init.name] = f"s{k}/{init.name}"
        initializers.append(moved)
    nodes = []
    for i, node in enumerate(kept):
        inputs = [rename.get(x, f"s{k}/{x}") if x else "" for x in node.input]
        outputs = [rename.setdefault(x, f"s{k}/{x}") if x else "" for x in node.output]
        nodes.append(_copied_node(node, f"s{k}/{i}/{node.name}", inputs, outputs))
        _rename_subgraphs(nodes[-1], lambda x: rename.get(x, f"s{k}/{x}"))
    return nodes, {o.name: rename.get(o.name, f"s{k}/{o.name}") for o in graph.output}


def _subgraphs(node) -> list:
    """The graphs held in a node's attributes (an If's branches, a Loop's body)."""
    import onnx

    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def _reads(node) -> set[str]:
    """The values a node reads, those its subgraphs read from the enclosing graph included (e.g. DeBERTa's
    relative-position code exports as an If whose branches read the segment's values)."""
    return {x for x in node.input if x} | {x for g in _subgraphs(node) for inner in g.node for x in _reads(inner)}


def _rename_subgraphs(node, renamed) -> None:
    """Every value named in the node's subgraphs, renamed in place by `renamed` as the segment's own values are."""
    for g in _subgraphs(node):
        for value in (*g.input, *g.output, *g.value_info, *g.initializer):
            value.name = renamed(value.name)
        for inner in g.node:
            inner.input[:] = [renamed(x) if x else "" for x in inner.input]
            inner.output[:] = [renamed(x) if x else "" for x in inner.output]
            inner.name = renamed(inner.name)
            _rename_subgraphs(inner, renamed)


def _mask_work(segments):
    """What every segment computes from the attention mask alone (its casts, the sums the fused attention and the
    mean pooling read, the clipped token count): the same values in every segment, so each is computed once, in
    the scope of the first segment that needs it, where the later (nested) segments read it too.
    Returns, per segment, {value name: shared name} and the nodes and constants to add to that segment's scope."""
    import hashlib

    from onnx import numpy_helper

    def digest(*parts) -> str:
        return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]

    placed: set[str] = set()
    per_segment = []
    for graph in segments:
        small = {i.name: i for i in graph.initializer if np.prod(i.dims, dtype=np.int64) <= 64}
        constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and not n.input}
        keys = {"attention_mask": "mask"}  # value name -> what it computes, for the mask's values and their constants
        for name, init in small.items():
            value = numpy_helper.to_array(init)
            keys[name] = digest("init", value.dtype.str, value.shape, value.tobytes())
        for name, node in constants.items():
            keys[name] = digest("constant", [a.SerializeToString() for a in node.attribute])
        shared, nodes, added = {}, [], []
        for node in graph.node:
            inputs = [x for x in node.input if x]
            if (
                not inputs
                or not all(x in keys for x in inputs)
                or not any(x == "attention_mask" or x in shared for x in inputs)
            ):
                continue
            key = digest(
                node.domain,
                node.op_type,
                sorted(a.SerializeToString() for a in node.attribute),
                [keys.get(x) for x in node.input],
            )
            outputs = [f"mask/{key}/{j}" for j in range(len(node.output))]
            for x in inputs:  # the constants it reads, under shared names too
                if x != "attention_mask" and x not in shared and f"mask/{keys[x]}" not in placed:
                    placed.add(f"mask/{keys[x]}")
                    if x in small:
                        added.append(
                            numpy_helper.from_array(numpy_helper.to_array(small[x]), f"mask/{keys[x]}")
                        )  # a renamed copy
                    else:
                        nodes.append(_copied_node(constants[x], f"mask/{keys[x]}", [], [f"mask/{keys[x]}"]))
            if key not in placed:
                placed.add(key)
                reads = [x if x in ("", "attention_mask") else shared.get(x, f"mask/{keys[x]}") for x in node.input]
                nodes.append(_copied_node(node, f"mask/{key}", reads, outputs))
            for x, out in zip(node.output, outputs):
                keys[x], shared[x] = out, out
        per_segment.append((shared, nodes, added))
    return per_segment


def _exit_rule_nodes(k: int, logits: str, criterion: str):
    """Nodes deciding whether segment k's exit fires for every row of the batch; returns (nodes, condition)."""
    from onnx import helper

    p = f"s{k}/rule/"
    if criterion == "entropy":
        # normalised entropy H / log(classes) below the threshold, for every row: min over rows of -H above
        # -threshold * log(classes), a constant (rule/neg_entropy_bound). Few ops: they run at every exit
        return [
            helper.make_node("Softmax", [logits], [p + "probs"], axis=-1),
            helper.make_node("LogSoftmax", [logits], [p + "log_probs"], axis=-1),
            helper.make_node("Mul", [p + "probs", p + "log_probs"], [p + "terms"]),
            helper.make_node("ReduceSum", [p + "terms", "rule/last_axis"], [p + "neg_entropy"], keepdims=0),
            helper.make_node("ReduceMin", [p + "neg_entropy"], [p + "least_neg_entropy"], keepdims=0),
            helper.make_node("Greater", [p + "least_neg_entropy", "rule/neg_entropy_bound"], [p + "exit"]),
        ], p + "exit"
    # patience: the predicted label has stayed the same for `threshold` successive exits
    nodes = [helper.make_node("ArgMax", [logits], [p + "label"], axis=-1, keepdims=0)]
    if k == 0:
        nodes.append(helper.make_node("Sub", [p + "label", p + "label"], [p + "streak"]))
    else:
        before = f"s{k - 1}/rule/"
        nodes += [
            helper.make_node("Equal", [p + "label", before + "label"], [p + "same"]),
            helper.make_node("Add", [before + "streak", "rule/one"], [p + "longer"]),
            helper.make_node("Where", [p + "same", p + "longer", "rule/zero"], [p + "streak"]),
        ]
    # the whole batch leaves together (ONNX control flow is per graph, not per row): served at batch 1
    nodes += [
        helper.make_node("ReduceMin", [p + "streak"], [p + "least_streak"], keepdims=0),
        helper.make_node("GreaterOrEqual", [p + "least_streak", "rule/patience"], [p + "exit"]),
    ]
    return nodes, p + "exit"


def write_exit_graph(variant_dir: Path) -> None:
    """Chains `segments/*.onnx` into one `model.onnx` that stops at the first exit whose rule fires: each
    segment's exit decides an If whose else-branch holds the rest of the network, so ONNX Runtime runs only the
    layers an input needs, in one session with one thread pool. Outputs: logits and exit_layer (1-based; 0: the
    embedding exit)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    variant_dir = Path(variant_dir)
    spec = json.loads((variant_dir / EARLY_EXIT_FILE).read_text())
    segments = [onnx.load(str(variant_dir / SEGMENTS_DIR / name)) for name in spec["segments"]]
    if spec["criterion"] == "entropy":
        logits = next(o for o in segments[0].graph.output if o.name == "logits")
        classes = logits.type.tensor_type.shape.dim[-1].dim_value
        if classes < 2:
            raise ModelError(
                f"{variant_dir}: the first segment's logits have no fixed number of classes (got "
                f"{classes or 'a symbolic size'})"
            )
        constants = {
            "last_axis": np.array([-1], dtype=np.int64),
            "neg_entropy_bound": np.array(-spec["threshold"] * np.log(classes), dtype=np.float32),
        }
    else:
        constants = {
            "patience": np.array(int(spec["threshold"]), dtype=np.int64),
            "one": np.array(1, dtype=np.int64),
            "zero": np.array(0, dtype=np.int64),
        }
    initializers = [numpy_helper.from_array(value, f"rule/{name}") for name, value in constants.items()]

    mask_work = _mask_work([segment.graph for segment in segments])
    first_layer = 0 if spec.get("embedding_exit") else 1  # what exit_layer reports for the first segment's exit

    # each segment's weights live in the (sub)graph that uses them: ONNX Runtime pre-packs MatMul weights only
    # for initializers of the node's own graph, and outer-scope weights ran ~50 % slower
    def level(k: int, hidden: str | None):
        feeds = (
            {i.name: i.name for i in segments[0].graph.input}
            if k == 0
            else {"hidden_states": hidden, "attention_mask": "attention_mask"}
        )
        shared, mask_nodes, mask_constants = mask_work[k]
        weights = list(mask_constants)
        nodes, outputs = _renamed_segment(k, segments[k].graph, feeds, weights, shared)
        nodes = mask_nodes + nodes
        result = ("logits", "exit_layer") if k == 0 else (f"s{k}/result_logits", f"s{k}/result_layer")
        layer = numpy_helper.from_array(np.array([k + first_layer], dtype=np.int64))
        if k == len(segments) - 1:
            return (
                nodes
                + [
                    helper.make_node("Identity", [outputs["logits"]], [result[0]]),
                    helper.make_node("Constant", [], [result[1]], value=layer),
                ],
                weights,
                result,
            )
        rule, condition = _exit_rule_nodes(k, outputs["logits"], spec["criterion"])
        then_branch = helper.make_graph(
            [
                helper.make_node("Identity", [outputs["logits"]], [f"s{k}/exit_logits"]),
                helper.make_node("Constant", [], [f"s{k}/exit_layer"], value=layer),
            ],
            f"exit_{k + 1}",
            [],
            [
                helper.make_tensor_value_info(f"s{k}/exit_logits", TensorProto.FLOAT, None),
                helper.make_tensor_value_info(f"s{k}/exit_layer", TensorProto.INT64, None),
            ],
        )
        rest, rest_weights, rest_result = level(k + 1, outputs["hidden_out"])
        else_branch = helper.make_graph(
            rest,
            f"after_{k + 1}",
            [],
            [
                helper.make_tensor_value_info(rest_result[0], TensorProto.FLOAT, None),
                helper.make_tensor_value_info(rest_result[1], TensorProto.INT64, None),
            ],
            initializer=rest_weights,
        )
        branch = helper.make_node(
            "If", [condition], list(result), name=f"s{k}/exit", then_branch=then_branch, else_branch=else_branch
        )
        return nodes + rule + [branch], weights, result

    nodes, weights, _ = level(0, None)
    graph = helper.make_graph(
        nodes,
        "early_exit",
        list(segments[0].graph.input),
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("exit_layer", TensorProto.INT64, None),
        ],
        initializer=initializers + weights,
    )
    opsets = {}
    for segment in segments:
        for entry in segment.opset_import:
            opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = segments[0].ir_version
    onnx.save(model, str(variant_dir / "model.onnx"))
