"""The 4-bit embedding codec: tables stored as 4-bit codes in blocks, each block with its own scale and zero point,
decoded in the graph by standard ops on constants (folded once when ONNX Runtime creates the session)."""

from __future__ import annotations

from pathlib import Path

from ..base import ModelError
from ..runtime import FOUR_BIT_CODES


def four_bit_blocks(table, block_size: int):
    """Asymmetric 4-bit quantization of a [rows, width] float table in blocks of `block_size` along each row:
    (codes 0..15 as uint8 [rows, width], float32 scales [rows, blocks], zero points uint8 [rows, blocks])."""
    import numpy as np

    rows, width = table.shape
    if width % block_size:
        raise ModelError(f"quantize.embedding_block_size: {block_size} does not divide the embedding width {width}")
    blocks = table.reshape(rows, width // block_size, block_size)
    low, high = np.minimum(blocks.min(axis=2), 0), np.maximum(blocks.max(axis=2), 0)
    scales = ((high - low) / 15).astype(np.float32)
    scales[scales == 0] = 1
    zero = np.clip(np.round(-low / scales), 0, 15)
    codes = np.clip(np.round(blocks / scales[..., None]) + zero[..., None], 0, 15)
    return codes.reshape(rows, width).astype(np.uint8), scales, zero.astype(np.uint8)


def dequantized_blocks(table, block_size: int):
    """`table` as its 4-bit blocks read back (what the quantized graph computes with)."""
    codes, scales, zero = four_bit_blocks(table, block_size)
    rows, width = table.shape
    blocks = codes.reshape(rows, width // block_size, block_size).astype("float32") - zero[..., None]
    return (blocks * scales[..., None]).reshape(rows, width)


def two_per_byte(codes):
    import numpy as np

    if codes.shape[1] % 2:
        codes = np.pad(codes, ((0, 0), (0, 1)))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def unpacked(packed: str, rows: int, pairs: int, width: int, prefix: str):
    """Nodes turning `packed` ([rows, pairs] uint8, two 4-bit codes per byte, low nibble first) into float
    `prefix + "codes"` [rows, width] (width <= 2 * pairs); returns (nodes, constants)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    constants = {
        "sixteen": np.array(16, np.int32),
        "half_shape": np.array([rows, pairs, 1], np.int64),
        "shape": np.array([rows, 2 * pairs], np.int64),
    }
    c = {name: f"{prefix}{name}" for name in constants}
    nodes = [
        helper.make_node("Cast", [packed], [prefix + "int"], to=TensorProto.INT32),
        helper.make_node("Div", [prefix + "int", c["sixteen"]], [prefix + "high"]),
        helper.make_node("Mul", [prefix + "high", c["sixteen"]], [prefix + "high_x16"]),
        helper.make_node("Sub", [prefix + "int", prefix + "high_x16"], [prefix + "low"]),
        helper.make_node("Reshape", [prefix + "low", c["half_shape"]], [prefix + "low_3d"]),
        helper.make_node("Reshape", [prefix + "high", c["half_shape"]], [prefix + "high_3d"]),
        helper.make_node("Concat", [prefix + "low_3d", prefix + "high_3d"], [prefix + "pairs"], axis=2),
        helper.make_node("Reshape", [prefix + "pairs", c["shape"]], [prefix + "codes_int"]),
    ]
    if width < 2 * pairs:  # an odd width was padded with one code per row
        constants["kept"] = np.arange(width, dtype=np.int64)
        c["kept"] = prefix + "kept"
        nodes.append(helper.make_node("Gather", [prefix + "codes_int", c["kept"]], [prefix + "codes_kept"], axis=1))
    nodes.append(helper.make_node("Cast", [nodes[-1].output[0]], [prefix + "codes"], to=TensorProto.FLOAT))
    for node in nodes:
        node.name = node.output[0]
    return nodes, [numpy_helper.from_array(value, c[name]) for name, value in constants.items()]


def four_bit_embeddings(path: Path, block_size: int) -> None:
    """The word and position tables of the model at `path` in 4 bits, in place. Each is stored as two codes per
    byte with a scale and zero point per block of `block_size` values (`<table>` + FOUR_BIT_CODES, its other
    constants under `<table>` + FOUR_BIT_CODES + "/"), and decoded back to float by standard ops on those
    constants alone. ONNX Runtime's constant folding runs them once, when a session is created (at any graph
    optimisation level but disabled), so the file holds 4-bit tables while the fused EmbedLayerNormalization reads
    a float table on every call, as in the float model (a 4-bit Gather per call, GatherBlockQuantized, made the
    3-layer student 2-4 % slower; the float tables cost memory instead). The token-type table (a couple of rows)
    stays float; a graph without embedding tables (an inner early-exit segment) is left as it is."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    tables = {
        t.name: t
        for t in graph.initializer
        if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT and t.dims[0] >= 16
    }
    read = [
        (node, slot)
        for node in graph.node
        for slot, name in enumerate(node.input)
        if name in tables
        and (
            (node.op_type == "Gather" and slot == 0)
            or (node.op_type == "EmbedLayerNormalization" and slot in (2, 3, 4))
        )
    ]
    if not read:
        return
    first_reader = min(list(graph.node).index(node) for node, _ in read)
    decoders = []
    for name in sorted({node.input[slot] for node, slot in read}):
        table = numpy_helper.to_array(tables[name])
        rows, width = table.shape
        codes, scales, zero = four_bit_blocks(table, block_size)
        blocks = width // block_size
        packed, p = name + FOUR_BIT_CODES, name + FOUR_BIT_CODES + "/"
        code_nodes, code_constants = unpacked(packed, rows, (width + 1) // 2, width, p + "codes/")
        zero_nodes, zero_constants = unpacked(p + "zero_points", rows, (blocks + 1) // 2, blocks, p + "zero_points/")
        graph.initializer.remove(tables[name])
        graph.initializer.extend(
            [
                numpy_helper.from_array(two_per_byte(codes), packed),
                numpy_helper.from_array(two_per_byte(zero), p + "zero_points"),
                numpy_helper.from_array(scales[..., None], p + "scales"),
                numpy_helper.from_array(np.array([rows, blocks, block_size], np.int64), p + "blocked_shape"),
                numpy_helper.from_array(np.array([rows, blocks, 1], np.int64), p + "block_shape"),
                numpy_helper.from_array(np.array([rows, width], np.int64), p + "table_shape"),
                *code_constants,
                *zero_constants,
            ]
        )
        decoded = name + "_decoded"
        decoders += (
            code_nodes
            + zero_nodes
            + [
                helper.make_node(
                    "Reshape", [p + "codes/codes", p + "blocked_shape"], [p + "blocked"], name=p + "blocked"
                ),
                helper.make_node(
                    "Reshape", [p + "zero_points/codes", p + "block_shape"], [p + "zero"], name=p + "zero"
                ),
                helper.make_node("Sub", [p + "blocked", p + "zero"], [p + "centred"], name=p + "centred"),
                helper.make_node("Mul", [p + "centred", p + "scales"], [p + "values"], name=p + "values"),
                helper.make_node("Reshape", [p + "values", p + "table_shape"], [decoded], name=decoded),
            ]
        )
        for node, slot in read:
            if node.input[slot] == name:
                node.input[slot] = decoded
    for offset, node in enumerate(decoders):
        graph.node.insert(first_reader + offset, node)
    onnx.save(model, str(path))
