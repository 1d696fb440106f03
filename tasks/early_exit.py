"""Dynamic pruning by early exit: a classifier after every encoder layer (and optionally one on the embeddings),
trained by self-distillation from the final layer; at inference each input stops at the first exit that is confident
enough (entropy) or stable enough (patience). The runtime is per-segment ONNX run by ONNX Runtime
(see runtime.EarlyExitPredictor)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import numpy as np
from prefect import task
from pydantic import Field, model_validator

from .base import TORCH_LOCK, ModelError, StageBase
from .data import load_splits
from .distill import teacher_logits
from .export import copy_tokenizer, fuse
from .prune import encoder_layers
from .runtime import EARLY_EXIT_FILE, EXIT_RULES, SEGMENTS_DIR
from .training import TrainConfig, kd_loss, sample_indices, train
from .variant import StageContext, Variant, derive, exclusive, intact, making, save_record, seal, staged_dir, variant_id

log = logging.getLogger("squeezeflow.early_exit")

HEADS_FILE = "exit_heads.safetensors"


class EarlyExitConfig(StageBase):
    kind: Literal["early_exit"] = "early_exit"
    criterion: Literal["entropy", "patience"] = Field(
        "entropy",
        description="entropy: leave when an exit's normalised entropy is below the threshold; patience: when this "
        "many successive exits agree.",
    )
    thresholds: list[float] = Field(
        min_length=1,
        description="Exit thresholds; each is a variant. entropy: 0..1 (0 never exits early); patience: an integer ≥ "
        "1.",
    )
    train_backbone: bool = Field(False, description="Train the encoder with the exits (joint) instead of freezing it.")
    pooling: Literal["mean", "cls"] = Field(
        "mean",
        description="What an exit reads: the mean of the layer's token states (what sentence encoders such as "
        "MiniLM are trained for; early layers' [CLS] carries little), or the [CLS] state like the final pooler.",
    )
    embedding_exit: bool = Field(
        False,
        description="Also an exit on the mean of the token embeddings, before the first layer: a bag-of-words "
        "guess that lets inputs it is sure of skip every layer (layer 0 in exit_layer and mean_exit_layer). Needs "
        "pooling: mean.",
    )
    training: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=2.0, learning_rate=5e-4, batch_size=32, max_examples=8000),
        description="Training of the exit classifiers (and the backbone when train_backbone).",
    )
    temperature: float = Field(2.0, gt=0, description="Temperature of the self-distillation from the final layer.")
    soft_weight: float = Field(
        0.7, ge=0, le=1, description="Weight of the final layer's soft targets; 1 − this goes to the labels."
    )
    opset: int = Field(18, ge=14, le=21, description="ONNX opset of the segment graphs.")
    optimize: Literal["none", "fusion"] = Field("fusion", description="ORT transformer fusion of each segment.")

    @model_validator(mode="after")
    def _thresholds_in_range(self) -> EarlyExitConfig:
        if self.embedding_exit and self.pooling != "mean":
            raise ValueError("embedding_exit needs pooling: mean (the [CLS] embedding is the same for every input)")
        if self.criterion == "entropy":
            bad = [t for t in self.thresholds if not 0.0 <= t <= 1.0]
            if bad:
                raise ValueError(f"entropy thresholds must lie in [0, 1], got {bad}")
        else:
            bad = [t for t in self.thresholds if t < 1 or t != int(t)]
            if bad:
                raise ValueError(f"patience thresholds must be whole numbers ≥ 1, got {bad}")
        return self

    def token(self, threshold: float) -> str:
        return f"early_exit[{int(threshold) if self.criterion == 'patience' else threshold:g}]"

    def training_knobs(self) -> dict:
        return self.knobs("thresholds", "criterion")


def _torch_modules():
    """The exit head and the segment wrappers, defined lazily so importing this module does not import torch."""
    import torch
    from torch import nn

    class ExitHead(nn.Module):
        """Pooler-shaped head (dense + tanh + classifier, started from the model's own) on the [CLS] state or on
        the mean of the unmasked token states."""

        def __init__(self, pooler_dense: nn.Linear, classifier: nn.Linear, pooling: str):
            super().__init__()
            self.pooling = pooling
            self.dense = nn.Linear(pooler_dense.in_features, pooler_dense.out_features)
            self.classifier = nn.Linear(classifier.in_features, classifier.out_features)
            self.dense.load_state_dict(pooler_dense.state_dict())
            self.classifier.load_state_dict(classifier.state_dict())

        def forward(self, hidden, attention_mask):
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                # mask / token count, applied as one [1, T] x [T, H] product per row: the weights depend on the mask
                # alone, which the chained graph computes once for every exit (write_exit_graph)
                weights = attention_mask[:, None, :].to(hidden.dtype)
                weights = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)
                pooled = torch.matmul(weights, hidden).squeeze(1)
            return self.classifier(torch.tanh(self.dense(pooled)))

    class FinalHead(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.pooler, self.classifier = encoder_layers(model)[0].pooler, model.classifier

        def forward(self, hidden, attention_mask):
            return self.classifier(self.pooler(hidden))

    def additive_mask(attention_mask, dtype):
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    class EntrySegment(nn.Module):
        def __init__(self, embeddings, layer, head):
            super().__init__()
            self.embeddings, self.layer, self.head = embeddings, layer, head

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            hidden = self.layer(hidden, attention_mask=additive_mask(attention_mask, hidden.dtype))[0]
            return hidden, self.head(hidden, attention_mask)

    class EmbeddingSegment(nn.Module):
        def __init__(self, embeddings, head):
            super().__init__()
            self.embeddings, self.head = embeddings, head

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            return hidden, self.head(hidden, attention_mask)

    class InnerSegment(nn.Module):
        def __init__(self, layer, head):
            super().__init__()
            self.layer, self.head = layer, head

        def forward(self, hidden_states, attention_mask):
            hidden = self.layer(hidden_states, attention_mask=additive_mask(attention_mask, hidden_states.dtype))[0]
            return hidden, self.head(hidden, attention_mask)

    class ExitModel(nn.Module):
        """The classifier plus its exit heads; forward gives the final logits and every exit's logits."""

        def __init__(self, model, heads, train_backbone: bool, embedding_exit: bool):
            super().__init__()
            self.model, self.heads, self.train_backbone = model, nn.ModuleList(heads), train_backbone
            self.embedding_exit = embedding_exit  # heads[0] then reads the embeddings, before the first layer
            for p in model.parameters():
                p.requires_grad_(train_backbone)

        def train(self, mode: bool = True):
            super().train(mode)
            if not self.train_backbone:
                self.model.eval()  # a frozen encoder gives its exits the features they will see at inference
            return self

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                output_hidden_states=True,
            )
            hidden_states = out.hidden_states[:-1] if self.embedding_exit else out.hidden_states[1:-1]
            exits = [head(hidden, attention_mask) for head, hidden in zip(self.heads, hidden_states)]
            return SimpleNamespace(logits=out.logits, exit_logits=exits)

    return SimpleNamespace(
        ExitHead=ExitHead,
        FinalHead=FinalHead,
        EntrySegment=EntrySegment,
        EmbeddingSegment=EmbeddingSegment,
        InnerSegment=InnerSegment,
        ExitModel=ExitModel,
    )


def build_exit_model(
    model_dir: str | Path, train_backbone: bool = False, pooling: str = "mean", embedding_exit: bool = False
):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager")
    base, layers = encoder_layers(model)
    if getattr(base, "pooler", None) is None or not hasattr(model, "classifier"):
        raise ModelError(f"early_exit: {model_dir} has no pooler + classifier head to copy into the exits")
    modules = _torch_modules()
    heads = [
        modules.ExitHead(base.pooler.dense, model.classifier, pooling) for _ in range(len(layers) - 1 + embedding_exit)
    ]
    return modules.ExitModel(model, heads, train_backbone, embedding_exit)


def load_exit_model(trained_dir: Path):
    from safetensors.torch import load_file

    made = json.loads((trained_dir / EARLY_EXIT_FILE).read_text())
    exit_model = build_exit_model(trained_dir, pooling=made["pooling"], embedding_exit=made["embedding_exit"])
    exit_model.heads.load_state_dict(load_file(str(trained_dir / HEADS_FILE)))
    return exit_model.eval()


def reference_logits(exit_model, inputs: dict, criterion: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """What early exit predicts, computed the slow way in PyTorch (every layer, then the rule applied row by
    row): the reference the ONNX segments are checked against. Returns (logits, exit layers: 1-based, 0 for
    the embedding exit)."""
    import torch

    with torch.inference_mode():
        out = exit_model(**inputs)
    per_layer = [e.float().numpy() for e in out.exit_logits] + [out.logits.float().numpy()]
    rows = per_layer[0].shape[0]
    rule = EXIT_RULES[criterion](threshold)
    rule.reset(rows)
    fired = [rule.fires(layer) for layer in per_layer[:-1]] + [np.ones(rows, dtype=bool)]
    exit_of = np.argmax(np.stack(fired), axis=0)
    return np.stack([per_layer[k][r] for r, k in enumerate(exit_of)]), exit_of + (0 if exit_model.embedding_exit else 1)


def export_segments(exit_model, out_dir: Path, opset: int, optimize: str) -> list[str]:
    """One ONNX graph per exit: the first takes token ids, the rest take the previous hidden states; each returns
    its hidden states and its exit's logits (the last: the model's own head). With the embedding exit the first
    graph holds only the embeddings and their exit, and each layer is a graph of its own."""
    import torch

    modules = _torch_modules()
    model = exit_model.model.eval()
    base, layers = encoder_layers(model)
    heads = list(exit_model.heads) + [modules.FinalHead(model)]
    ids = torch.ones(1, 8, dtype=torch.long)
    mask = torch.ones(1, 8, dtype=torch.long)
    hidden = torch.zeros(1, 8, model.config.hidden_size)
    batch_seq = {0: "batch", 1: "sequence"}
    entry_args, entry_inputs = (ids, mask, torch.zeros_like(ids)), ["input_ids", "attention_mask", "token_type_ids"]
    if exit_model.embedding_exit:
        entry, inner_layers = modules.EmbeddingSegment(base.embeddings, heads[0]), layers
    else:
        entry, inner_layers = modules.EntrySegment(base.embeddings, layers[0], heads[0]), layers[1:]
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
    used = {x for node in kept for x in node.input} | {o.name for o in graph.output}
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
    return nodes, {o.name: rename.get(o.name, f"s{k}/{o.name}") for o in graph.output}


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
