"""Model families as data: for each supported encoder family, which stages (and quantize modes) work on it, and for
those that do not yet, why and what to do instead. Preflight reads this table, so an unsupported stage is a one-line
error before anything is trained, never a traceback after the teacher's fine-tune. Every cell is backed by a test
(tests/test_families.py) that runs the stage on a tiny random model of the family."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import ModelError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values
    refused: dict[str, str] = field(default_factory=dict)  # stage kind, or "quantize:<mode>" -> why, and the way out
    layers: str = "encoder.layer"  # where the list of layers sits in the base model
    attention_dropout: str = "attention_probs_dropout_prob"  # the config field of the attention-probability dropout
    ffn_width: str = "intermediate_size"  # the config field of the feed-forward width
    # inside a layer: the attention's projections, the FFN's two Linears, and the module that counts the heads
    query: str = "attention.self.query"
    key: str = "attention.self.key"
    value: str = "attention.self.value"
    attention_out: str = "attention.output.dense"
    ffn_in: str = "intermediate.dense"
    ffn_out: str = "output.dense"
    heads: str = "attention.self"
    head_count: str = "num_attention_heads"  # its attribute holding the number of heads ...
    heads_width: str = "all_head_size"  # ... and the one holding heads x head size
    attention_norm: str = "attention.output.LayerNorm"  # the LayerNorm after attention ...
    output_norm: str = "output.LayerNorm"  # ... and the one after the FFN
    token_types: bool = True  # whether its embeddings take token_type_ids
    # what a layer is called with besides the hidden states: the additive mask (0 / -inf), the 0/1 mask, or what
    # DeBERTa's encoder computes for each layer (a pairwise mask, relative positions and their embeddings)
    layer_inputs: str = "additive_mask"  # "additive_mask" | "binary_mask" | "deberta"

    # a layer's parts, each a module with a weight and a bias: what a student of another family copies from its teacher
    PARTS = ("query", "key", "value", "attention_out", "attention_norm", "ffn_in", "ffn_out", "output_norm")

    def part(self, layer, name: str):
        """The module at this family's path `name` (a field above, e.g. "value") in `layer`."""
        return layer.get_submodule(getattr(self, name))


FAMILIES = (
    Family("BERT", ("bert",)),
    Family(
        "DistilBERT",
        ("distilbert",),
        {},
        layers="transformer.layer",
        attention_dropout="attention_dropout",
        ffn_width="hidden_dim",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attention_out="attention.out_lin",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        heads="attention",
        head_count="n_heads",
        heads_width="dim",
        attention_norm="sa_layer_norm",
        output_norm="output_layer_norm",
        token_types=False,
        layer_inputs="binary_mask",
    ),
    Family("RoBERTa", ("roberta",)),
    Family("XLM-RoBERTa", ("xlm-roberta",)),
    Family("ELECTRA", ("electra",)),
    Family(
        "ALBERT",
        ("albert",),
        {
            "early_exit": "runs each layer as its own graph, so ALBERT's one shared layer would be copied into every "
            "graph (its size times its depth); use distill and quantize",
        },
        # one group of one shared layer, as ALBERT's released models are: pruning it prunes every application
        layers="encoder.albert_layer_groups.0.albert_layers",
        query="attention.query",
        key="attention.key",
        value="attention.value",
        attention_out="attention.dense",
        attention_norm="attention.LayerNorm",
        ffn_in="ffn",
        ffn_out="ffn_output",
        output_norm="full_layer_layer_norm",
        heads="attention",
    ),
    Family(
        "DeBERTa-v2",
        ("deberta-v2",),
        {
            "prune:heads": "rebuilds its attention output at full width when it loads, so heads cannot be removed; "
            "set heads: false to remove FFN channels only",
        },
        query="attention.self.query_proj",
        key="attention.self.key_proj",
        value="attention.self.value_proj",
        layer_inputs="deberta",
    ),
)
# the cells of the support table: a stage, or a stage and what it removes or how it quantizes
CELLS = (
    "distill",
    "prune:heads",
    "prune:ffn",
    "early_exit",
    "export",
    "quantize:dynamic",
    "quantize:static",
    "quantize:qat",
)
_UNKNOWN = "squeezeflow knows its layout only for " + ", ".join(f.name for f in FAMILIES)
# what works on a model of an unknown family: export and the quantize modes that only read the ONNX graph
_GRAPH_ONLY = {"export", "quantize:dynamic", "quantize:static", "quantize:torch-dynamic"}


def family_of(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def layout_of(model_type: str) -> Family:
    """The family whose layout fields (layers, config field names) apply to `model_type`; BERT's for an unknown one."""
    return family_of(model_type) or FAMILIES[0]


def refusal(model_type: str, stage: str, mode: str | None = None) -> str | None:
    """Why `stage` (with quantize `mode`) cannot run on a model of `model_type`, or None when it can."""
    key = f"{stage}:{mode}" if mode else stage
    family = family_of(model_type)
    if family is None:
        return None if key in _GRAPH_ONLY else f"{_UNKNOWN}; export and quantize (dynamic, static) work on any"
    return family.refused.get(key) or (family.refused.get(stage) if mode else None)


def check_stages(model_type: str, stages: list) -> None:
    """Preflight: raises a one-line ModelError for the first stage (or quantize mode) of the recipe that this model's
    family does not support."""
    family = family_of(model_type)
    name = family.name if family else f"model_type {model_type!r}"
    for i, stage in enumerate(stages):
        for mode in _modes(stage):
            if reason := refusal(model_type, stage.kind, mode):
                what = f"{stage.kind} {'of' if stage.kind == 'prune' else 'mode'} {mode}" if mode else stage.kind
                raise ModelError(f"stages.{i}: {what} does not support {name} models: it {reason}")


def _modes(stage) -> list[str | None]:
    """What a stage does that a family may not support: quantize's modes; what prune removes (when a ratio is set)."""
    if stage.kind == "prune":
        removes = [part for part in ("heads", "ffn") if getattr(stage, part, False)]
        return removes if any(r > 0 for r in getattr(stage, "ratios", [])) and removes else [None]
    return getattr(stage, "modes", None) or [None]
