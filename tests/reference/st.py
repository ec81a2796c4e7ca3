"""Minimal safetensors reader and writer in pure Python.

Why it exists: the test suites and the example-model generator must write and
read weight files the daemon memory-maps, without depending on the
`safetensors` package. Writing works with the standard library alone (struct
and array), because deploy/gen_models.py runs where numpy may be missing;
reading into numpy arrays needs numpy, reading into flat lists does not.

File layout (https://github.com/huggingface/safetensors): an 8-byte
little-endian header length n, then n bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
then the byte buffer the offsets point into. We pad the header with spaces to
a multiple of 8, so the buffer starts 8-byte aligned in the file, and lay the
tensors out contiguously, little-endian, in name order within each element
size, larger elements first (as the safetensors library does): every tensor
then starts aligned to its own element size, which a memory-mapping reader
relies on. A file of one dtype is simply in name order.

Public API:
    save(path, tensors, metadata=None)
        tensors: {name: numpy array} or {name: (dtype_str, shape, data)} where
        data is bytes (already little-endian, exactly the right size) or a
        flat sequence of numbers.
    save_lists(path, {name: (dtype_str, shape, flat_list)}, metadata=None)
        the numpy-free form; same file as save() would write.
    load(path) -> {name: numpy array}               (needs numpy; BF16 -> float32)
    load_lists(path) -> {name: (dtype_str, shape, flat_list)}   (no numpy; no BF16)
    load_raw(path) -> (header_dict, {name: (dtype_str, shape, bytes)})
    read_metadata(path) -> {str: str}
"""

import array
import json
import math
import os
import struct
import sys

# dtype string -> (array/struct typecode or None, item size in bytes)
DTYPES = {
    "F64": ("d", 8),
    "F32": ("f", 4),
    "F16": ("e", 2),
    "BF16": (None, 2),
    "I64": ("q", 8),
    "I32": ("i", 4),
    "I16": ("h", 2),
    "I8": ("b", 1),
    "U8": ("B", 1),
    "BOOL": ("?", 1),
}

_NUMPY_NAMES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}

_HEADER_LIMIT = 100 * 1024 * 1024


def _count(shape):
    n = 1
    for s in shape:
        if not isinstance(s, int) or s < 0:
            raise ValueError("shape %r: dimensions must be non-negative integers" % (shape,))
        n *= s
    return n


def _pack_flat(dtype, values):
    """Flat sequence of numbers -> little-endian bytes of dtype (no numpy)."""
    if dtype not in DTYPES:
        raise ValueError("dtype %r: expected one of %s" % (dtype, ", ".join(sorted(DTYPES))))
    code, _ = DTYPES[dtype]
    if code is None:  # BF16: round-to-nearest-even from float32 bits
        out = bytearray()
        for v in values:
            (bits,) = struct.unpack("<I", struct.pack("<f", float(v)))
            if math.isnan(v):
                h = 0x7FC0
            else:
                h = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            out += struct.pack("<H", h & 0xFFFF)
        return bytes(out)
    if code in ("e", "?"):  # array has no half/bool typecode
        return struct.pack("<%d%s" % (len(values), code), *values)
    a = array.array(code, values)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def _unpack_flat(dtype, data):
    code, size = DTYPES[dtype]
    if code is None:
        raise ValueError("BF16 tensors need numpy: use load()")
    n = len(data) // size
    if code in ("e", "?"):
        return list(struct.unpack("<%d%s" % (n, code), data))
    a = array.array(code)
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


def _entry_from_numpy(name, arr):
    import numpy as np

    arr = np.asarray(arr)
    for dt, npname in _NUMPY_NAMES.items():
        if arr.dtype == np.dtype(npname):
            data = np.ascontiguousarray(arr, dtype=np.dtype(npname).newbyteorder("<")).tobytes()
            return dt, list(arr.shape), data
    raise ValueError("tensor %r: numpy dtype %s has no safetensors name here" % (name, arr.dtype))


def _normalise(name, value):
    """Any accepted tensor form -> (dtype_str, shape list, little-endian bytes)."""
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[0], str):
        dtype, shape, data = value
        shape = [int(s) for s in shape]
        if dtype not in DTYPES:
            raise ValueError("tensor %r: dtype %r unknown (expected one of %s)"
                             % (name, dtype, ", ".join(sorted(DTYPES))))
        n = _count(shape)
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
        else:
            if hasattr(data, "tolist") and not isinstance(data, (list, array.array)):
                data = data.reshape(-1).tolist()  # numpy array given as data
            if len(data) != n:
                raise ValueError("tensor %r: shape %r holds %d values, got %d"
                                 % (name, shape, n, len(data)))
            data = _pack_flat(dtype, data)
        if len(data) != n * DTYPES[dtype][1]:
            raise ValueError("tensor %r: shape %r of %s needs %d bytes, got %d"
                             % (name, shape, dtype, n * DTYPES[dtype][1], len(data)))
        return dtype, shape, data
    return _entry_from_numpy(name, value)


def save(path, tensors, metadata=None):
    """Write tensors (see module comment for the accepted forms) to path.

    The file is written beside path and renamed over it, so a reader never sees
    a half-written file."""
    if "__metadata__" in tensors:
        raise ValueError("'__metadata__' is reserved; pass metadata= instead")
    norm = {name: _normalise(name, value) for name, value in tensors.items()}
    order = sorted(norm, key=lambda name: (-DTYPES[norm[name][0]][1], name))
    entries = {name: norm[name] for name in order}
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, (dtype, shape, data) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((-len(hjson)) % 8)
    tmp = "%s.tmp%d" % (path, os.getpid())
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for dtype, shape, data in entries.values():
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_lists(path, tensors, metadata=None):
    """save() for {name: (dtype_str, shape, flat list of numbers)}; no numpy."""
    for name, value in tensors.items():
        if not (isinstance(value, tuple) and len(value) == 3):
            raise ValueError("tensor %r: expected (dtype_str, shape, flat_list)" % name)
    save(path, tensors, metadata)


def load_raw(path):
    """-> (header without __metadata__, {name: (dtype_str, shape, bytes)})."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError("%s: too short for a safetensors file (%d bytes)" % (path, len(blob)))
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _HEADER_LIMIT or 8 + n > len(blob):
        raise ValueError("%s: header length %d does not fit the file of %d bytes"
                         % (path, n, len(blob)))
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError("%s: header is not valid JSON (%s)" % (path, e))
    if not isinstance(header, dict):
        raise ValueError("%s: header is not a JSON object" % path)
    header.pop("__metadata__", None)
    buf = blob[8 + n:]
    out = {}
    for name, info in header.items():
        dtype = info.get("dtype")
        if dtype not in DTYPES:
            raise ValueError("%s: tensor %r has unknown dtype %r" % (path, name, dtype))
        shape = info.get("shape")
        begin, end = info.get("data_offsets", [None, None])
        if not isinstance(shape, list) or not isinstance(begin, int) or not isinstance(end, int):
            raise ValueError("%s: tensor %r has a malformed entry %r" % (path, name, info))
        if not (0 <= begin <= end <= len(buf)):
            raise ValueError("%s: tensor %r offsets [%d, %d] outside the %d-byte buffer"
                             % (path, name, begin, end, len(buf)))
        if end - begin != _count(shape) * DTYPES[dtype][1]:
            raise ValueError("%s: tensor %r of shape %r %s needs %d bytes, offsets give %d"
                             % (path, name, shape, dtype, _count(shape) * DTYPES[dtype][1],
                                end - begin))
        out[name] = (dtype, shape, buf[begin:end])
    return header, out


def read_metadata(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _HEADER_LIMIT:
            raise ValueError("%s: header length %d is implausible" % (path, n))
        header = json.loads(f.read(n).decode("utf-8"))
    return dict(header.get("__metadata__", {}))


def load_lists(path):
    """-> {name: (dtype_str, shape, flat list)}; no numpy needed (BF16 refused)."""
    _, raw = load_raw(path)
    return {name: (dt, shape, _unpack_flat(dt, data)) for name, (dt, shape, data) in raw.items()}


def load(path):
    """-> {name: numpy array} (copies, writable). BF16 is widened to float32."""
    import numpy as np

    _, raw = load_raw(path)
    out = {}
    for name, (dtype, shape, data) in raw.items():
        if dtype == "BF16":
            bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(data, dtype=_NUMPY_NAMES[dtype])
        out[name] = arr.reshape(shape).copy()
    return out
