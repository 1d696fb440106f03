"""Running a variant on raw texts: one small predictor per format (PyTorch `hf`, ONNX Runtime `onnx`)."""

from __future__ import annotations

import json
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
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._torch = torch
        torch.set_num_threads(threads)
        with TORCH_LOCK:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if (Path(path) / TORCH_DYNAMIC_MARKER).exists():
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)

    def logits(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with self._torch.inference_mode():
            return self.model(**batch).logits.float().numpy()


def fast_tokenizer(path: Path):
    """The `tokenizers` tokenizer saved beside the model, set to truncate and pad like the PyTorch one."""
    from tokenizers import Tokenizer

    settings = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    max_length = int(settings.get("model_max_length") or 512)
    tokenizer.enable_truncation(max_length=min(max_length, 512))
    pad_token = settings.get("pad_token") or "[PAD]"
    pad_token = pad_token["content"] if isinstance(pad_token, dict) else pad_token
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token) or 0, pad_token=pad_token)
    return tokenizer


def ort_session(file: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        # ORT would fuse each residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel is
        # 2-3x slower per row here (export.split_skip_layer_norms); graphs that already hold it keep it
        return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"], disabled_optimizers=["SkipLayerNormFusion"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types for unreadable models
        raise ModelError(f"{file}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from None


def encode(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    # one text (how a served model is called): `encode` skips the batch machinery, ~4 % of a 0.7-ms model's call
    encodings = [tokenizer.encode(texts[0])] if len(texts) == 1 else tokenizer.encode_batch(texts)
    return {
        "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.asarray([e.type_ids for e in encodings], dtype=np.int64),
    }


class OrtPredictor:
    def __init__(self, path: str | Path, threads: int):
        path = Path(path)
        self.tokenizer = fast_tokenizer(path)
        self.session = ort_session(path / "model.onnx", threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def logits(self, texts: list[str]) -> np.ndarray:
        columns = encode(self.tokenizer, texts)
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
    `last_exit_layers` holds the 1-based layer each row of the last call left at."""

    def __init__(self, path: str | Path, threads: int):
        path = Path(path)
        self.tokenizer = fast_tokenizer(path)
        self.session = ort_session(path / "model.onnx", threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.last_exit_layers = np.zeros(0, dtype=np.int64)

    def logits(self, texts: list[str]) -> np.ndarray:
        rows, layers = [], []
        for text in texts:
            columns = encode(self.tokenizer, [text])
            logits, exit_layer = self.session.run(None, {name: columns[name] for name in self.input_names})
            rows.append(logits[0])
            layers.append(int(exit_layer[0]))
        self.last_exit_layers = np.asarray(layers, dtype=np.int64)
        return np.stack(rows)


def load_predictor(path: str | Path, fmt: str, threads: int = 1) -> TorchPredictor | OrtPredictor | EarlyExitPredictor:
    if fmt == "hf":
        return TorchPredictor(path, threads)
    if fmt == "onnx":
        return OrtPredictor(path, threads)
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
