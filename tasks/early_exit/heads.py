"""The exit heads: a classifier after every encoder layer (and optionally one on the embeddings) of any
supported model, the PyTorch model that runs them, and the reference of which exit each input leaves at."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..base import ModelError
from ..prune import encoder_layers
from ..runtime import EARLY_EXIT_FILE, EXIT_RULES
from .config import HEADS_FILE

log = logging.getLogger("squeezeflow.early_exit")


def torch_modules():
    """The exit head and the segment wrappers, defined lazily so importing this module does not import torch."""
    import torch
    from torch import nn

    class ExitHead(nn.Module):
        """The model's own head shape (dense + activation + classifier, started from its weights) on the [CLS] state
        or on the mean of the unmasked token states."""

        def __init__(self, dense: nn.Linear, activation: nn.Module, classifier: nn.Linear, pooling: str):
            super().__init__()
            self.pooling, self.activation = pooling, activation
            self.dense = nn.Linear(dense.in_features, dense.out_features)
            self.classifier = nn.Linear(classifier.in_features, classifier.out_features)
            self.dense.load_state_dict(dense.state_dict())
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
            return self.classifier(self.activation(self.dense(pooled)))

    class FinalHead(nn.Module):
        """The model's own head on the last layer's states: a pooler then the classifier (BERT), or a classifier
        that reads the sequence itself (RoBERTa, ELECTRA)."""

        def __init__(self, model):
            super().__init__()
            self.pooler, self.classifier = pooler_of(model), model.classifier
            self.pre_classifier = getattr(model, "pre_classifier", None)  # DistilBERT's head on the first token

        def forward(self, hidden, attention_mask):
            if self.pre_classifier is not None:
                return self.classifier(torch.relu(self.pre_classifier(hidden[:, 0])))
            return self.classifier(hidden if self.pooler is None else self.pooler(hidden))

    class Layer(nn.Module):
        """One encoder layer, given the attention mask (and what else it reads) as its family's encoder gives them."""

        def __init__(self, layer, encoder, inputs: str):
            super().__init__()
            self.layer, self.inputs = layer, inputs
            self.encoder = encoder if inputs == "deberta" else None  # its helpers make each layer's inputs

        def forward(self, hidden, attention_mask):
            if self.inputs == "binary_mask":
                return self.layer(hidden, attention_mask)[0]
            if self.inputs == "deberta":
                e = self.encoder
                return self.layer(
                    hidden,
                    e.get_attention_mask(attention_mask),
                    relative_pos=e.get_rel_pos(hidden),
                    rel_embeddings=e.get_rel_embedding(),
                )[0]
            additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
            return self.layer(hidden, additive)[0]

    class Embeddings(nn.Module):
        """The encoder's input: the embeddings, then ELECTRA's projection to the hidden size where it has one."""

        def __init__(self, base, inputs: str):
            super().__init__()
            self.embeddings = base.embeddings
            self.project = getattr(base, "embeddings_project", None) or nn.Identity()
            self.takes_mask = inputs == "deberta"  # DeBERTa's embeddings zero the padding themselves

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            if token_type_ids is None:  # a family without token types (DistilBERT)
                return self.project(self.embeddings(input_ids))
            if self.takes_mask:
                return self.project(
                    self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=attention_mask)
                )
            return self.project(self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids))

    class EntrySegment(nn.Module):
        def __init__(self, base, layer, head):
            super().__init__()
            self.embeddings, self.layer, self.head = Embeddings(base, layer.inputs), layer, head

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            hidden = self.layer(self.embeddings(input_ids, attention_mask, token_type_ids), attention_mask)
            return hidden, self.head(hidden, attention_mask)

    class EmbeddingSegment(nn.Module):
        def __init__(self, base, head, inputs: str):
            super().__init__()
            self.embeddings, self.head = Embeddings(base, inputs), head

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            hidden = self.embeddings(input_ids, attention_mask, token_type_ids)
            return hidden, self.head(hidden, attention_mask)

    class InnerSegment(nn.Module):
        def __init__(self, layer, head):
            super().__init__()
            self.layer, self.head = layer, head

        def forward(self, hidden_states, attention_mask):
            hidden = self.layer(hidden_states, attention_mask)
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
            types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}  # DistilBERT takes none
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **types)
            hidden_states = out.hidden_states[:-1] if self.embedding_exit else out.hidden_states[1:-1]
            exits = [head(hidden, attention_mask) for head, hidden in zip(self.heads, hidden_states)]
            return SimpleNamespace(logits=out.logits, exit_logits=exits)

    return SimpleNamespace(
        ExitHead=ExitHead,
        FinalHead=FinalHead,
        Layer=Layer,
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
    if getattr(getattr(base, "encoder", None), "conv", None) is not None:
        raise ModelError(
            f"early_exit: {model_dir} adds a convolution to its first layer's output (DeBERTa-v2 conv_kernel_size), "
            "which the per-layer graphs do not carry; leave early exit out for this model (DeBERTa-v3 has none)"
        )
    if len(layers) - 1 + embedding_exit < 1:
        raise ModelError(
            f"early_exit: {model_dir} has one layer, so there is no layer to exit after; set early_exit.embedding_exit "
            "to true (an exit on the embeddings) or leave early exit out for this model"
        )
    modules = torch_modules()
    dense, activation, classifier = head_parts(model)
    heads = [modules.ExitHead(dense, activation, classifier, pooling) for _ in range(len(layers) - 1 + embedding_exit)]
    return modules.ExitModel(model, heads, train_backbone, embedding_exit)


def head_parts(model):
    """(dense, activation, output layer) of the model's classification head, which every exit starts from: BERT's
    pooler + classifier, DistilBERT's pre_classifier + classifier, or the dense + out_proj head of RoBERTa,
    XLM-RoBERTa and ELECTRA."""
    from torch import nn
    from transformers.activations import ACT2FN

    head = getattr(model, "classifier", None)
    pooler = pooler_of(model)
    if isinstance(getattr(model, "pre_classifier", None), nn.Linear):  # DistilBERT: pre_classifier, ReLU, classifier
        return model.pre_classifier, nn.ReLU(), head
    if pooler is not None and hasattr(pooler, "dense") and isinstance(head, nn.Linear):
        # BERT's pooler holds its tanh; DeBERTa's ContextPooler applies the config's pooler_hidden_act
        return pooler.dense, getattr(pooler, "activation", None) or ACT2FN[model.config.pooler_hidden_act], head
    if hasattr(head, "dense") and hasattr(head, "out_proj"):  # ELECTRA's head has an activation; RoBERTa's is tanh
        return head.dense, getattr(head, "activation", None) or nn.Tanh(), head.out_proj
    raise ModelError(f"early_exit: {type(model).__name__} has no classification head that exits can start from")


def pooler_of(model):
    """The pooler the classification head reads: in the base model (BERT) or beside it (DeBERTa's ContextPooler)."""
    base = getattr(model, model.base_model_prefix)
    return getattr(base, "pooler", None) or getattr(model, "pooler", None)


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
