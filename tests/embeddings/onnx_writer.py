"""Write tiny ONNX models without the ``onnx`` package (not installed; torch.onnx.export needs it).

An ONNX file is a protobuf ``ModelProto``; the few messages needed here are encoded by hand in the protobuf wire
format, field numbers from onnx/onnx.proto (IR version 8, opset 13, where ReduceMean still takes ``axes`` as an
attribute).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

FLOAT, UINT8 = 1, 2  # TensorProto.DataType
_ATTR_INT, _ATTR_INTS = 2, 7  # AttributeProto.AttributeType


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields: negative values in two's complement
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _msg(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _str(field: int, text: str) -> bytes:
    return _msg(field, text.encode())


def tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims=1, data_type=2, name=8, raw_data=9 (little-endian float32)."""
    arr = np.ascontiguousarray(array, dtype="<f4")
    return b"".join(_int(1, d) for d in arr.shape) + _int(2, FLOAT) + _str(8, name) + _msg(9, arr.tobytes())


def value_info(name: str, elem_type: int, dims: Sequence[int | str]) -> bytes:
    """ValueInfoProto(name=1, type=2: TypeProto(tensor_type=1: (elem_type=1, shape=2: dim=1 (value=1|param=2))))."""
    shape = b"".join(_msg(1, _int(1, d) if isinstance(d, int) else _str(2, d)) for d in dims)
    return _str(1, name) + _msg(2, _msg(1, _int(1, elem_type) + _msg(2, shape)))


def node(op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: int | Sequence[int]) -> bytes:
    """NodeProto: input=1, output=2, op_type=4, attribute=5 (name=1, i=3, ints=8, type=20)."""
    out = b"".join(_str(1, i) for i in inputs) + b"".join(_str(2, o) for o in outputs) + _str(4, op)
    for key, value in attrs.items():
        if isinstance(value, int):
            attr = _str(1, key) + _int(3, value) + _int(20, _ATTR_INT)
        else:
            attr = _str(1, key) + b"".join(_int(8, v) for v in value) + _int(20, _ATTR_INTS)
        out += _msg(5, attr)
    return out


def write_model(
    path: Path,
    nodes: Sequence[bytes],
    inputs: Sequence[bytes],
    outputs: Sequence[bytes],
    initializers: Sequence[bytes] = (),
) -> Path:
    """ModelProto(ir_version=1, producer_name=2, graph=7, opset_import=8) with GraphProto(node=1, name=2,
    initializer=5, input=11, output=12)."""
    graph = (
        b"".join(_msg(1, n) for n in nodes)
        + _str(2, "g")
        + b"".join(_msg(5, t) for t in initializers)
        + b"".join(_msg(11, i) for i in inputs)
        + b"".join(_msg(12, o) for o in outputs)
    )
    model = _int(1, 8) + _str(2, "lvdkit-tests") + _msg(7, graph) + _msg(8, _str(1, "") + _int(2, 13))
    path.write_bytes(model)
    return path


def float_conv_model(path: Path, weight: np.ndarray, bias: np.ndarray, size: int, batch: int | str) -> Path:
    """float ``x [batch, 3, size, size]`` -> Conv(weight, bias) -> mean over H, W -> ``y [batch, D]``."""
    d = weight.shape[0]
    return write_model(
        path,
        nodes=[node("Conv", ["x", "w", "b"], ["c"]), node("ReduceMean", ["c"], ["y"], axes=[2, 3], keepdims=0)],
        inputs=[value_info("x", FLOAT, [batch, 3, size, size])],
        outputs=[value_info("y", FLOAT, [batch, d])],
        initializers=[tensor("w", weight), tensor("b", bias)],
    )


def uint8_color_model(path: Path, weight: np.ndarray) -> Path:
    """uint8 ``image [b, h, w, 3]`` (any size) -> float -> mean colour ``[b, 3]`` -> MatMul(weight [3, D])."""
    return write_model(
        path,
        nodes=[
            node("Cast", ["image"], ["f"], to=FLOAT),
            node("ReduceMean", ["f"], ["m"], axes=[1, 2], keepdims=0),
            node("MatMul", ["m", "w"], ["embedding"]),
        ],
        inputs=[value_info("image", UINT8, ["batch", "height", "width", 3])],
        outputs=[value_info("embedding", FLOAT, ["batch", weight.shape[1]])],
        initializers=[tensor("w", weight)],
    )
