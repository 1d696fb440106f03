"""torch-dynamic: PyTorch's `quantize_dynamic` of the Linear layers (the optimisation guide's method), as a variant."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..runtime import TORCH_DYNAMIC_MARKER
from ..variant import StageContext, Variant
from .config import Produced, QuantizeConfig


def torch_dynamic(
    parent: Variant, source: Variant | None, cfg: QuantizeConfig, ctx: StageContext, out: Path
) -> Produced:
    """The weights stay fp32 safetensors on disk (a quantized PyTorch module has no safe serialisation); the
    marker file tells the runtime to apply `torch.ao.quantization.quantize_dynamic` on load."""
    for file in Path(parent.path).iterdir():
        if file.is_file():
            shutil.copy2(file, out / file.name)
    (out / TORCH_DYNAMIC_MARKER).write_text(json.dumps({"modules": ["Linear"], "dtype": "qint8"}))
    return Produced({}, {})
