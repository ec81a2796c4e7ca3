#!/usr/bin/env python3
"""Writes small, valid safetensors files that seed the safetensors fuzzer.

The files are built here with the standard library only, following the
reference implementation's layout (8-byte little-endian header length, compact
JSON header with "__metadata__" first, tensors ordered by decreasing element
size then name, header padded with spaces to a multiple of 8), so they double
as an independent check of tallyd's reader. A last seed deliberately places a
tensor at an unaligned offset, which the format allows.

    python3 tests/fuzz/make_st_seeds.py [OUT_DIR]
"""
import json
import os
import struct
import sys

SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4,
         "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
PACK = {"F64": "d", "I64": "q", "U64": "Q", "F32": "f", "I32": "i", "U32": "I",
        "F16": "e", "I16": "h", "U16": "H", "I8": "b", "U8": "B", "BOOL": "?"}


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def pack(dtype, values):
    if dtype == "BF16":  # the top half of an F32, truncated (values are exact here)
        return b"".join(struct.pack("<f", v)[2:] for v in values)
    return struct.pack("<%d%s" % (len(values), PACK[dtype]), *values)


def encode(tensors, metadata=None, order=None):
    """tensors: {name: (dtype, shape, values)}. order: names in buffer order
    (default: the reference order, which keeps every tensor aligned)."""
    if order is None:
        order = sorted(tensors, key=lambda n: (-SIZES[tensors[n][0]], n))
    header, blobs, at = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name in order:
        dtype, shape, values = tensors[name]
        assert len(values) == numel(shape), name
        blob = pack(dtype, values)
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [at, at + len(blob)]}
        blobs.append(blob)
        at += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def seeds():
    yield "empty", encode({})
    yield "metadata_only", encode({}, {"format": "pt", "note": "caf\u00e9"})
    yield "mlp", encode({
        "layers.0.weight": ("F32", [3, 2], [0.5, -1.0, 0.25, 2.0, -0.75, 1.5]),
        "layers.0.bias": ("F32", [3], [0.1, 0.0, -0.1]),
        "layers.1.weight": ("F32", [1, 3], [1.0, -2.0, 0.5]),
        "layers.1.bias": ("F32", [1], [0.25]),
    }, {"format": "pt"})
    yield "dtypes", encode({
        "f64": ("F64", [2], [1.5, -2.25]),
        "i64": ("I64", [2], [-7, 2**62]),
        "u64": ("U64", [1], [2**63]),
        "i32": ("I32", [], [-123456]),
        "u32": ("U32", [1], [4000000000]),
        "f16": ("F16", [2, 1], [1.0, -2.0]),
        "bf16": ("BF16", [3], [1.0, 3.140625, -123.5]),
        "i16": ("I16", [1], [-300]),
        "u16": ("U16", [1], [60000]),
        "i8": ("I8", [2], [-128, 127]),
        "u8": ("U8", [3], [0, 1, 255]),
        "flag": ("BOOL", [2], [True, False]),
    })
    yield "zero_size", encode({
        "empty": ("F32", [0, 4], []),
        "w": ("F32", [2], [1.0, 2.0]),
        "none": ("I8", [3, 0], []),
    })
    yield "misaligned", encode({
        "b": ("U8", [1], [9]),
        "x": ("F32", [3], [1.25, -0.5, 1e30]),
        "d": ("F64", [1], [0.1]),
    }, order=["b", "x", "d"])


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "corpus", "safetensors")
    os.makedirs(out, exist_ok=True)
    for name, data in seeds():
        with open(os.path.join(out, name + ".safetensors"), "wb") as f:
            f.write(data)
        print("%s.safetensors: %d bytes" % (name, len(data)))


if __name__ == "__main__":
    main()
