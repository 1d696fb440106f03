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
    modules = torch_modules()
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
