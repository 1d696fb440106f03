"""Running a variant on raw texts: one small predictor per format (PyTorch `hf`, ONNX Runtime `onnx`)."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import numpy as np

from .base import TORCH_LOCK, ModelError

TORCH_DYNAMIC_MARKER = "squeezeflow-torch-dynamic.json"  # written by the quantize stage's torch-dynamic mode
EARLY_EXIT_FILE = "early_exit.json"  # written by the early_exit stage: the exit rule and the segment files
SEGMENTS_DIR = "segments"  # an early-exit variant's per-layer graphs, what its model.onnx is chained from
FOUR_BIT_CODES = "_q4"  # suffix of a 4-bit embedding table's packed codes; its decoding constants sit under "<codes>/"

# torch and transformers are imported only by the PyTorch predictor, so that an ONNX variant is served (and
# its memory measured) without them: that is part of what an ONNX variant buys.


class TorchPredictor:
    def __init__(self, path: str | Path, threads: int):
        import inspect

        import torch
        from transformers import AutoModelForSequenceClassification

        self._torch = torch
        torch.set_num_threads(threads)
        self.encoder = TextEncoder(Path(path))  # the ONNX predictors' own: engines compared on the same ids
        with TORCH_LOCK:
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if (Path(path) / TORCH_DYNAMIC_MARKER).exists():
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        accepted = inspect.signature(self.model.forward).parameters
        self.input_names = [name for name in MODEL_INPUTS if name in accepted]

    def logits(self, texts: list[str]) -> np.ndarray:
        columns = self.encoder(texts)
        with self._torch.inference_mode():
            batch = {name: self._torch.from_numpy(columns[name]) for name in self.input_names}
            return self.model(**batch).logits.float().numpy()


def fast_tokenizer(path: Path):
    """The `tokenizers` tokenizer saved beside the model, set to truncate and pad like the PyTorch one."""
    from tokenizers import Tokenizer

    settings = (
        json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
    )
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    max_length = int(settings.get("model_max_length") or 512)
    tokenizer.enable_truncation(max_length=min(max_length, 512))
    pad_token = settings.get("pad_token") or "[PAD]"
    pad_token = pad_token["content"] if isinstance(pad_token, dict) else pad_token
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token) or 0, pad_token=pad_token)
    return tokenizer


def ort_session(file: Path, threads: int, defaults: bool = False):
    """An ONNX Runtime session on `threads` threads; with `defaults`, every other option is ONNX Runtime's own (how a
    user of another tool runs its graph), else squeezeflow's."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if defaults:
        try:
            return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types for unreadable models
            raise ModelError(f"{file}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from None
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        # ORT would fuse each residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel is
        # 2-3x slower per row here (export.split_skip_layer_norms); graphs that already hold it keep it
        return ort.InferenceSession(
            str(file), options, providers=["CPUExecutionProvider"], disabled_optimizers=["SkipLayerNormFusion"]
        )
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types for unreadable models
        raise ModelError(f"{file}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from None


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def library_encode(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    # one text (how a served model is called): `encode` skips the batch machinery, ~4 % of a 0.7-ms model's call
    encodings = [tokenizer.encode(texts[0])] if len(texts) == 1 else tokenizer.encode_batch(texts)
    return {
        "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.asarray([e.type_ids for e in encodings], dtype=np.int64),
    }


class PlainWordPiece:
    """The ids a BERT tokenizer (BERT normaliser and pre-tokenizer, WordPiece, `[CLS] text [SEP]`, right-side
    truncation) gives a text of printable ASCII, computed in plain Python. For such a text the normaliser only
    lower-cases and the pre-tokenizer splits at spaces and punctuation; the rest is greedy longest-match WordPiece."""

    def __init__(self, spec: dict, max_length: int | None):
        model = spec["model"]
        self.lowercase = spec["normalizer"].get("lowercase", True)
        self.vocab = model["vocab"]
        prefix = model["continuing_subword_prefix"]
        self.continuation = {piece[len(prefix) :]: i for piece, i in self.vocab.items() if piece.startswith(prefix)}
        self.unk, self.max_chars = self.vocab[model["unk_token"]], model["max_input_chars_per_word"]
        self.cls, self.sep = _bert_specials(spec["post_processor"])
        self.max_pieces = None if max_length is None else max_length - 2
        self.added = [t["content"] for t in spec.get("added_tokens", [])]
        punctuation = re.escape(string.punctuation)  # what BERT calls punctuation, within ASCII
        self.words = re.compile(f"[^\\s{punctuation}]+|[{punctuation}]").findall

    @classmethod
    def for_tokenizer(cls, tokenizer) -> PlainWordPiece | None:
        """None unless the tokenizer is of that usual BERT form."""
        spec = json.loads(tokenizer.to_str())
        padding, truncation = tokenizer.padding or {}, tokenizer.truncation
        usual = (
            (spec.get("normalizer") or {}).get("type") == "BertNormalizer"
            and spec.get("pre_tokenizer") == {"type": "BertPreTokenizer"}
            and spec["model"].get("type") == "WordPiece"
            and _bert_specials(spec.get("post_processor")) is not None
            and (truncation is None or truncation.get("direction", "right").lower() == "right")
            and padding.get("direction", "right").lower() == "right"
            and padding.get("pad_type_id", 0) == 0
            and padding.get("length") is None
            and padding.get("pad_to_multiple_of") is None
        )
        return cls(spec, truncation and truncation["max_length"]) if usual else None

    def handles(self, text: str) -> bool:
        if not (text.isascii() and text.isprintable()):
            return False
        lowered = text.lower()  # the library finds added tokens in the raw text and, for some, in the normalised one
        return not any(t in text or t in lowered for t in self.added)

    def __call__(self, text: str) -> list[int]:
        ids = []
        for word in self.words(text.lower() if self.lowercase else text):
            whole = self.vocab.get(word)
            ids.extend([whole] if whole is not None else self._pieces(word))
        if self.max_pieces is not None:
            del ids[self.max_pieces :]
        return [self.cls, *ids, self.sep]

    def _pieces(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.unk]
        pieces, start, table = [], 0, self.vocab
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = table.get(word[start:end])
                if piece is not None:
                    break
            else:
                return [self.unk]  # a word with an unmatchable rest is one unknown piece, as in WordPiece
            pieces.append(piece)
            start, table = end, self.continuation
        return pieces


def _bert_specials(post_processor: dict | None) -> tuple[int, int] | None:
    """([CLS] id, [SEP] id) of a post-processor writing `[CLS] text [SEP]`, all type 0; else None."""
    if not post_processor:
        return None
    if post_processor.get("type") == "BertProcessing":
        return post_processor["cls"][1], post_processor["sep"][1]
    if post_processor.get("type") != "TemplateProcessing":
        return None
    single = post_processor["single"]
    shape = [next(iter(part)) for part in single]
    if shape != ["SpecialToken", "Sequence", "SpecialToken"] or any(
        next(iter(p.values()))["type_id"] != 0 for p in single
    ):
        return None
    ids = [post_processor["special_tokens"][part["SpecialToken"]["id"]]["ids"] for part in (single[0], single[2])]
    return (ids[0][0], ids[1][0]) if all(len(i) == 1 for i in ids) else None


class TextEncoder:
    """Model inputs for raw texts, with the ids the variant's saved tokenizer gives. Texts of printable ASCII (99.3 %
    of SST-2) go through PlainWordPiece when the tokenizer is the usual BERT one: same ids, without the library's
    per-text Encoding (offsets, token strings) that costs ~100 µs a sentence between model calls."""

    def __init__(self, path: Path):
        self.tokenizer = fast_tokenizer(path)
        self.plain = PlainWordPiece.for_tokenizer(self.tokenizer)
        self.pad_id = (self.tokenizer.padding or {}).get("pad_id", 0)

    def plain_share(self, texts: list[str]) -> float:
        """The share of `texts` this encoder turns into ids with PlainWordPiece (the rest go through `tokenizers`)."""
        return 0.0 if self.plain is None else sum(map(self.plain.handles, texts)) / max(1, len(texts))

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self.plain is None or not all(self.plain.handles(t) for t in texts):
            return library_encode(self.tokenizer, texts)
        rows = [self.plain(t) for t in texts]
        if len(rows) == 1:
            ids = np.array(rows, dtype=np.int64)
            mask = np.ones_like(ids)
        else:
            ids = np.full((len(rows), max(map(len, rows))), self.pad_id, dtype=np.int64)
            mask = np.zeros_like(ids)
            for r, row in enumerate(rows):
                ids[r, : len(row)], mask[r, : len(row)] = row, 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


class OrtPredictor:
    def __init__(self, path: str | Path, threads: int, ort_defaults: bool = False):
        path = Path(path)
        self.encoder = TextEncoder(path)
        self.session = ort_session(path / "model.onnx", threads, ort_defaults)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def logits(self, texts: list[str]) -> np.ndarray:
        columns = self.encoder(texts)
        return self.session.run(None, {name: columns[name] for name in self.input_names})[0]


def normalized_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy of softmax(logits) divided by log(classes): 0 = certain, 1 = uniform."""
    p = softmax(logits.astype(np.float64))
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(-1) / np.log(logits.shape[-1])


class EntropyRule:
    """Exit when the exit classifier's normalised entropy is below the threshold (0 never exits early)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def reset(self, rows: int) -> None:
        pass

    def fires(self, logits: np.ndarray) -> np.ndarray:
        return normalized_entropy(logits) < self.threshold


class PatienceRule:
    """Exit once the exits' predicted label has stayed the same for `patience` consecutive layers (PABEE)."""

    def __init__(self, threshold: float):
        self.patience = int(threshold)

    def reset(self, rows: int) -> None:
        self.previous, self.streak = None, np.zeros(rows, dtype=np.int64)

    def fires(self, logits: np.ndarray) -> np.ndarray:
        predicted = logits.argmax(-1)
        if self.previous is not None:
            self.streak = np.where(predicted == self.previous, self.streak + 1, 0)
        self.previous = predicted
        return self.streak >= self.patience


EXIT_RULES = {"entropy": EntropyRule, "patience": PatienceRule}


class EarlyExitPredictor:
    """An early-exit variant's model.onnx: the per-layer segments chained by If nodes, so ONNX Runtime stops at
    the first exit that fires. Rows are run one at a time (each input leaves at its own layer);
    `last_exit_layers` holds the layer each row of the last call left at (1-based; 0: the embedding exit)."""

    def __init__(self, path: str | Path, threads: int):
        path = Path(path)
        self.encoder = TextEncoder(path)
        self.session = ort_session(path / "model.onnx", threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.last_exit_layers = np.zeros(0, dtype=np.int64)

    def logits(self, texts: list[str]) -> np.ndarray:
        runs = []
        for text in texts:
            columns = self.encoder([text])
            runs.append(self.session.run(None, {name: columns[name] for name in self.input_names}))
        self.last_exit_layers = np.concatenate([layers for _, layers in runs]).astype(np.int64, copy=False)
        return runs[0][0] if len(runs) == 1 else np.concatenate([logits for logits, _ in runs])


def load_predictor(
    path: str | Path, fmt: str, threads: int = 1, ort_defaults: bool = False
) -> TorchPredictor | OrtPredictor | EarlyExitPredictor:
    """`ort_defaults`: an ONNX graph runs with ONNX Runtime's default session options (a peer, as its users run it)."""
    if fmt == "hf":
        return TorchPredictor(path, threads)
    if fmt == "onnx":
        return OrtPredictor(path, threads, ort_defaults)
    if fmt == "onnx-exit":
        return EarlyExitPredictor(path, threads)
    raise ValueError(f"unknown variant format {fmt!r}")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def peak_rss_probe() -> None:
    """`python -m squeezeflow.tasks.runtime` reads {path, format, threads, texts} on stdin, serves the texts
    one at a time in this fresh process, and prints its peak resident memory in MB as JSON."""
    import sys

    request = json.load(sys.stdin)
    predictor = load_predictor(request["path"], request["format"], request["threads"])
    for text in request["texts"]:
        predictor.logits([text])
    # VmHWM, not getrusage's ru_maxrss: the latter survives fork+exec and would report the parent's peak
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    print(json.dumps({"peak_rss_mb": peak_kb / 1024}))


if __name__ == "__main__":
    peak_rss_probe()
