"""Augmented training texts for distillation: words swapped for their nearest neighbours in the teacher's
input-embedding space (TinyBERT-style augmentation, without a masked-language-model head). The teacher labels
the new texts, so a swap that flips the meaning ("good" -> "bad") still teaches the student something true."""

from __future__ import annotations

import random

from pydantic import Field

from .base import StrictModel


class AugmentConfig(StrictModel):
    copies: int = Field(
        1, ge=1, le=20, description="Augmented copies made of each training text (a copy equal to its text is dropped)."
    )
    replace_prob: float = Field(
        0.3, gt=0, le=1, description="Chance that each word with neighbours is swapped in a copy."
    )
    neighbours: int = Field(
        8,
        ge=1,
        le=100,
        description="Swap candidates per word: the whole words nearest to it by the cosine of the teacher's input "
        "embeddings.",
    )


def word_neighbours(model, tokenizer, words: set[str], k: int) -> dict[str, list[str]]:
    """For each of `words` that the tokenizer keeps as one alphabetic vocabulary piece: the `k` alphabetic
    pieces whose input embeddings are closest to it by cosine. Other words (split into pieces, numbers,
    punctuation) get no entry and are never swapped."""
    import torch

    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    pool = [i for i, piece in enumerate(vocab) if len(piece) >= 2 and piece.isalpha()]
    row_of = {vocab_id: row for row, vocab_id in enumerate(pool)}
    ordered = sorted(words)
    pieces = tokenizer(ordered, add_special_tokens=False)["input_ids"]
    queries = [(word, ids[0]) for word, ids in zip(ordered, pieces) if len(ids) == 1 and ids[0] in row_of]
    if not queries:
        return {}
    with torch.no_grad():
        table = torch.nn.functional.normalize(model.get_input_embeddings().weight.float()[pool], dim=-1)
        found: dict[str, list[str]] = {}
        for start in range(0, len(queries), 2048):
            chunk = queries[start : start + 2048]
            rows = torch.tensor([row_of[vocab_id] for _, vocab_id in chunk])
            similarity = table[rows] @ table.T
            similarity[torch.arange(len(chunk)), rows] = -2.0  # a word is not its own neighbour
            nearest = similarity.topk(min(k, len(pool) - 1), dim=-1).indices.tolist()
            found.update({word: [vocab[pool[j]] for j in row] for (word, _), row in zip(chunk, nearest)})
    return found


def augment_texts(texts: list[str], neighbours: dict[str, list[str]], cfg: AugmentConfig, seed: int) -> list[str]:
    """`cfg.copies` passes over `texts`, each word with neighbours swapped for a random one of them with
    probability `cfg.replace_prob`; copies identical to their text are left out. Seeded."""
    rng = random.Random(seed)
    copies = []
    for _ in range(cfg.copies):
        for text in texts:
            words = text.split()
            swapped = [
                rng.choice(neighbours[w]) if w in neighbours and rng.random() < cfg.replace_prob else w for w in words
            ]
            if swapped != words:
                copies.append(" ".join(swapped))
    return copies
