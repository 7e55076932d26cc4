"""The ``.cpz`` container: a Deep-Compressed model in one checksummed file.

Layout (all integers little-endian)::

    preamble   b"CPZ\\0" | u16 format version
    section*   u16 name length | name (utf-8) | u64 payload length | payload | u32 crc32
               (the crc covers everything from the name length to the end of the payload)

The first section, ``header``, is JSON: format version, architecture name, and per compressed
layer its shape, dtype, bit widths, entry counts and exact bit lengths of the two streams; it
also lists the uncompressed tensors and (version 2) ``structure``: for a network `surgery`
pruned, `surgery.pruned_structure` (what `save_pruned` writes to structure.json: the original
positions each narrowed module keeps), else null, so the network can be rebuilt from its
original architecture. Version 1 files (no ``structure``) are still read. Then, per layer, five
sections ``<layer>/codebook`` (float32 shared values), ``<layer>/weights.huffman`` and
``<layer>/weights`` (cluster indices), ``<layer>/indices.huffman`` and ``<layer>/indices``
(relative index differences); finally ``rest``: every other state_dict tensor as raw bytes.
The header fixes the expected sequence of sections, so truncation, alteration, reordering or
trailing bytes all raise a :class:`CorruptFileError` naming the section instead of yielding
wrong weights.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from bitarray import bitarray

from ..io import atomic_open
from ..surgery import check_structure
from .huffman import HuffmanTable, huffman_decode, huffman_encode
from .sparse import decode_relative, encode_relative

MAGIC = b"CPZ\x00"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no pruned structure in the header
PREAMBLE = MAGIC + struct.pack("<H", FORMAT_VERSION)
LAYER_SECTIONS = ("codebook", "weights.huffman", "weights", "indices.huffman", "indices")

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


class CorruptFileError(ValueError):
    """A ``.cpz`` file is truncated, altered or not a ``.cpz`` file; ``section`` names where."""

    def __init__(self, section: str, problem: str):
        super().__init__(f"corrupt .cpz file, section {section!r}: {problem}")
        self.section = section


def section_overhead(name: str) -> int:
    """Bytes of framing around a section payload (name length, name, length, crc)."""
    return 2 + len(name.encode()) + 8 + 4


def _dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}") from None


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _key(layer: str, attr: str) -> str:
    return f"{layer}.{attr}" if layer else attr


@dataclass
class EncodedLayer:
    """One compressed weight tensor: codebook, Huffman tables and bitstreams."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    bits: int
    index_bits: int
    nonzeros: int
    entries: int  # nonzeros + filler entries
    codebook: np.ndarray  # float32 [2**bits]
    weight_table: HuffmanTable
    weight_stream: bitarray
    index_table: HuffmanTable
    index_stream: bitarray
    _decoded: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def filler(self) -> int:
        """Weight symbol of a filler entry (one past the codebook)."""
        return 1 << self.bits

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def encode(
        cls,
        name: str,
        kind: str,
        weight: torch.Tensor,
        positions: np.ndarray,
        codebook: torch.Tensor,
        labels: np.ndarray,
        bits: int,
        index_bits: int,
    ) -> EncodedLayer:
        """Encode a layer whose weights are ``codebook[labels]`` at flat ``positions``, else 0."""
        cb = codebook.detach().cpu().to(torch.float32).numpy()
        if cb.shape != (1 << bits,):
            raise ValueError(
                f"layer {name!r}: codebook has {cb.size} entries, expected {1 << bits}"
            )
        diff, sym = encode_relative(positions, labels, index_bits, filler=1 << bits)
        wt, ws = huffman_encode(sym)
        it, ist = huffman_encode(diff)
        return cls(
            name=name,
            kind=kind,
            shape=tuple(weight.shape),
            dtype=str(weight.dtype)[6:],
            bits=bits,
            index_bits=index_bits,
            nonzeros=int(len(positions)),
            entries=int(diff.size),
            codebook=cb.copy(),
            weight_table=wt,
            weight_stream=ws,
            index_table=it,
            index_stream=ist,
        )

    def decode(self) -> torch.Tensor:
        """The weight tensor (CPU), bit for bit the quantised weights that were encoded.

        A stream that does not decode to exactly ``entries`` valid symbols raises
        :class:`CorruptFileError` naming its section.
        """
        if self._decoded is None:
            streams = {}
            for s, table, bits in (
                ("weights", self.weight_table, self.weight_stream),
                ("indices", self.index_table, self.index_stream),
            ):
                try:
                    streams[s] = huffman_decode(table, bits, self.entries)
                except ValueError as e:
                    raise CorruptFileError(f"{self.name}/{s}", str(e)) from None
            try:
                positions, labels = decode_relative(
                    streams["indices"], streams["weights"], self.filler, self.numel
                )
            except ValueError as e:
                raise CorruptFileError(f"{self.name}/indices", str(e)) from None
            self._decoded = self.scatter(positions, labels)
        return self._decoded.clone()

    def scatter(self, positions: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        flat = torch.zeros(self.numel, dtype=_dtype(self.dtype))
        values = torch.from_numpy(self.codebook)[torch.from_numpy(labels)]
        flat[torch.from_numpy(positions)] = values.to(flat.dtype)
        return flat.reshape(self.shape)

    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "bits": self.bits,
            "index_bits": self.index_bits,
            "nonzeros": self.nonzeros,
            "entries": self.entries,
            "weight_nbits": len(self.weight_stream),
            "index_nbits": len(self.index_stream),
        }

    def sections(self) -> list[tuple[str, bytes]]:
        """The five (name, payload) sections of this layer, in file order."""
        payloads = (
            self.codebook.astype("<f4").tobytes(),
            self.weight_table.to_bytes(),
            self.weight_stream.tobytes(),
            self.index_table.to_bytes(),
            self.index_stream.tobytes(),
        )
        return [(f"{self.name}/{s}", p) for s, p in zip(LAYER_SECTIONS, payloads, strict=True)]


@dataclass
class CompressedModel:
    """Everything a ``.cpz`` file holds: the encoded layers and the other tensors as they are."""

    arch: str
    layers: list[EncodedLayer]
    rest: dict[str, torch.Tensor] = field(default_factory=dict)
    # `surgery.pruned_structure` of a network surgery pruned; None: not pruned (or version 1)
    structure: dict[str, Any] | None = None
    version: int = FORMAT_VERSION  # of the file it was read from (written: always the current)

    def header(self) -> dict[str, Any]:
        return {
            "format": "carprune-cpz",
            "version": FORMAT_VERSION,
            "arch": self.arch,
            "layers": [layer.meta() for layer in self.layers],
            "rest": [[k, str(t.dtype)[6:], list(t.shape)] for k, t in self.rest.items()],
            "structure": self.structure,
        }

    def sections(self) -> list[tuple[str, bytes]]:
        """All (name, payload) sections in file order."""
        head = json.dumps(self.header(), separators=(",", ":"), sort_keys=True).encode()
        out = [("header", head)]
        for layer in self.layers:
            out += layer.sections()
        out.append(("rest", b"".join(_tensor_bytes(t) for t in self.rest.values())))
        return out

    def to_bytes(self) -> bytes:
        parts = [PREAMBLE]
        for name, payload in self.sections():
            frame = struct.pack("<H", len(name.encode())) + name.encode()
            frame += struct.pack("<Q", len(payload)) + payload
            parts += [frame, struct.pack("<I", zlib.crc32(frame))]
        return b"".join(parts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Decoded weights of the compressed layers plus the other tensors."""
        out = {_key(layer.name, "weight"): layer.decode() for layer in self.layers}
        out.update(self.rest)
        return out

    @classmethod
    def from_bytes(cls, data: bytes) -> CompressedModel:
        """Parse and verify a ``.cpz`` image; :class:`CorruptFileError` names the bad section."""
        return _Reader(memoryview(data)).read()


@dataclass(frozen=True)
class SectionInfo:
    """Where one section lies in a ``.cpz`` file and its checksum (verified when read)."""

    name: str
    offset: int  # of the frame (name length field)
    payload_bytes: int
    frame_bytes: int  # name length, name, length, payload and crc
    crc32: int


def read_sections(data: bytes) -> tuple[CompressedModel, list[SectionInfo]]:
    """Parse and verify a ``.cpz`` image like :meth:`CompressedModel.from_bytes` (every crc,
    every stream decoded), and also list its sections in file order."""
    reader = _Reader(memoryview(data))
    cm = reader.read()
    return cm, reader.seen


class _Reader:
    def __init__(self, data: memoryview):
        self.data = data
        self.pos = 0
        self.seen: list[SectionInfo] = []

    def section(self, expected: str) -> bytes:
        d, start = self.data, self.pos
        if start + 2 > len(d):
            raise CorruptFileError(expected, "missing (file truncated)")
        (name_len,) = struct.unpack_from("<H", d, start)
        p = start + 2 + name_len
        if p + 8 > len(d):
            raise CorruptFileError(expected, "truncated (file ends inside the section frame)")
        (size,) = struct.unpack_from("<Q", d, p)
        end = p + 8 + size
        if end + 4 > len(d):
            raise CorruptFileError(
                expected,
                f"truncated or corrupt length ({size} payload bytes "
                f"announced, {max(len(d) - p - 12, 0)} present)",
            )
        (crc,) = struct.unpack_from("<I", d, end)
        if zlib.crc32(d[start:end]) != crc:
            raise CorruptFileError(expected, "checksum mismatch (data altered)")
        name = bytes(d[start + 2 : start + 2 + name_len]).decode("utf-8", "replace")
        if name != expected:
            raise CorruptFileError(expected, f"found section {name!r} in its place")
        self.pos = end + 4
        self.seen.append(SectionInfo(name, start, size, end + 4 - start, crc))
        return bytes(d[p + 8 : end])

    def read(self) -> CompressedModel:
        d = self.data
        if len(d) < len(PREAMBLE) or bytes(d[:4]) != MAGIC:
            raise CorruptFileError("preamble", "not a carprune .cpz file (bad magic)")
        (version,) = struct.unpack_from("<H", d, 4)
        if version not in READABLE_VERSIONS:
            raise CorruptFileError(
                "preamble",
                f"unsupported format version {version} (this carprune reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; a newer carprune wrote it?)",
            )
        self.pos = len(PREAMBLE)
        try:
            header = json.loads(self.section("header"))
            if header.get("format") != "carprune-cpz" or header.get("version") != version:
                raise ValueError("format name or version differs from the preamble")
            layer_meta = header["layers"]
            rest_meta = header["rest"]
            structure = header["structure"] if version >= 2 else None
            if structure is not None:
                check_structure(structure, "its pruned structure")
        except CorruptFileError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptFileError("header", f"malformed ({e})") from None

        layers = [self._layer(meta) for meta in layer_meta]
        rest = self._rest(rest_meta)
        if self.pos != len(d):
            raise CorruptFileError(
                "rest", f"{len(d) - self.pos} unexpected bytes after the last section"
            )
        return CompressedModel(arch=str(header.get("arch", "")), layers=layers, rest=rest,
                               structure=structure, version=version)

    def _layer(self, meta: dict[str, Any]) -> EncodedLayer:
        try:
            name = str(meta["name"])
            bits, index_bits = int(meta["bits"]), int(meta["index_bits"])
            shape = tuple(int(s) for s in meta["shape"])
            _dtype(meta["dtype"])
            if not (1 <= bits <= 16 and 1 <= index_bits <= 16):
                raise ValueError(f"bit widths {bits}/{index_bits} out of range")
            entries, nw, ni = (
                int(meta["entries"]),
                int(meta["weight_nbits"]),
                int(meta["index_nbits"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError("header", f"malformed layer entry {meta!r} ({e})") from None
        raw = {s: self.section(f"{name}/{s}") for s in LAYER_SECTIONS}
        cb_bytes = raw["codebook"]
        if len(cb_bytes) != 4 << bits:
            raise CorruptFileError(
                f"{name}/codebook", f"{len(cb_bytes)} bytes, expected {4 << bits}"
            )
        streams = {}
        for s, nbits in (("weights", nw), ("indices", ni)):
            if len(raw[s]) != (nbits + 7) // 8:
                raise CorruptFileError(f"{name}/{s}", f"{len(raw[s])} bytes for {nbits} bits")
            b = bitarray(endian="big")
            b.frombytes(raw[s])
            streams[s] = b[:nbits]
        tables = {}
        for s, alphabet in (("weights", (1 << bits) + 1), ("indices", 1 << index_bits)):
            try:
                tables[s] = HuffmanTable.from_bytes(raw[f"{s}.huffman"], alphabet)
            except ValueError as e:
                raise CorruptFileError(f"{name}/{s}.huffman", str(e)) from None
        layer = EncodedLayer(
            name=name,
            kind=str(meta.get("kind", "")),
            shape=shape,
            dtype=str(meta["dtype"]),
            bits=bits,
            index_bits=index_bits,
            nonzeros=int(meta.get("nonzeros", 0)),
            entries=entries,
            codebook=np.frombuffer(cb_bytes, dtype="<f4").astype(np.float32),
            weight_table=tables["weights"],
            weight_stream=streams["weights"],
            index_table=tables["indices"],
            index_stream=streams["indices"],
        )
        layer.decode()  # decode now, so a bad stream is reported with its section
        return layer

    def _rest(self, meta: list[Any]) -> dict[str, torch.Tensor]:
        payload = self.section("rest")
        out, off = {}, 0
        try:
            for key, dtype_name, shape in meta:
                dtype = _dtype(dtype_name)
                n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                if off + n > len(payload):
                    raise ValueError(f"tensor {key!r} runs past the end of the section")
                out[str(key)] = _tensor_from_bytes(payload[off : off + n], dtype, list(shape))
                off += n
        except (ValueError, TypeError) as e:
            raise CorruptFileError("rest", str(e)) from None
        if off != len(payload):
            raise CorruptFileError(
                "rest", f"{len(payload) - off} bytes not described by the header"
            )
        return out


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` through a temp file renamed into place: ``path`` never holds half a file."""
    with atomic_open(path, "wb") as f:
        f.write(data)
