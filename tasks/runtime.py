"""Running a variant on raw texts: one small predictor per format (PyTorch `hf`, ONNX Runtime `onnx`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import TORCH_LOCK, ModelError

TORCH_DYNAMIC_MARKER = "squeezeflow-torch-dynamic.json"  # written by the quantize stage's torch-dynamic mode

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


class OrtPredictor:
    def __init__(self, path: str | Path, threads: int):
        import onnxruntime as ort

        path = Path(path)
        self.tokenizer = fast_tokenizer(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types for unreadable models
            raise ModelError(f"{path / 'model.onnx'}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def logits(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        feed = {name: np.asarray(columns[name], dtype=np.int64) for name in self.input_names}
        return self.session.run(None, feed)[0]


def load_predictor(path: str | Path, fmt: str, threads: int = 1) -> TorchPredictor | OrtPredictor:
    if fmt == "hf":
        return TorchPredictor(path, threads)
    if fmt == "onnx":
        return OrtPredictor(path, threads)
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
