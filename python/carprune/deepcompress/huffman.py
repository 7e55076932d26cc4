"""Canonical Huffman coding of integer symbol streams (Han et al. 2015, section 4).

bitarray does the coding in C (``canonical_huffman``, ``bitarray.encode``,
``canonical_decode``); this module only adds a compact serialisation of the canonical table:
a canonical code is fully described by the number of codes of each length and the symbols in
canonical order, so no code words are stored.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode, canonical_huffman


@dataclass(frozen=True)
class HuffmanTable:
    """Canonical Huffman table: ``counts[L]`` codes of length L (``counts[0] == 0``) and the
    symbols in canonical order. Empty for an empty stream."""

    counts: tuple[int, ...]
    symbols: tuple[int, ...]

    def to_bytes(self) -> bytes:
        """``u8 max_len | u8 widths | counts[1..max_len] | symbols``; ``widths`` holds the byte
        width (1, 2 or 4) of the symbols in its low and of the counts in its high nibble, each
        the smallest that fits, so an 8-bit codebook's table costs ~1 byte per symbol."""
        if not self.symbols:
            return b""
        max_len = len(self.counts) - 1
        sw, cw = _width(max(self.symbols)), _width(max(self.counts))
        head = struct.pack("<BB", max_len, sw | cw << 4)
        counts = np.asarray(self.counts[1:], dtype=f"<u{cw}").tobytes()
        return head + counts + np.asarray(self.symbols, dtype=f"<u{sw}").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, alphabet_size: int) -> HuffmanTable:
        """Inverse of :meth:`to_bytes`; ``ValueError`` on a table that cannot be a canonical
        Huffman code over symbols ``< alphabet_size``."""
        if not data:
            return cls((), ())
        if len(data) < 2:
            raise ValueError("Huffman table header is truncated")
        max_len, widths = data[0], data[1]
        sw, cw = widths & 15, widths >> 4
        if max_len == 0 or sw not in (1, 2, 4) or cw not in (1, 2, 4):
            raise ValueError(f"Huffman table header is invalid ({max_len=}, {widths=:#x})")
        head = 2 + cw * max_len
        if len(data) < head:
            raise ValueError("Huffman table is truncated inside its counts")
        counts = (0, *np.frombuffer(data, dtype=f"<u{cw}", count=max_len, offset=2).tolist())
        n = sum(counts)
        if len(data) != head + n * sw:
            raise ValueError(
                f"Huffman table holds {len(data) - head} symbol bytes, expected {n * sw}"
            )
        symbols = np.frombuffer(data, dtype=f"<u{sw}", offset=head)
        if n == 0 or int(symbols.max()) >= alphabet_size:
            raise ValueError(f"Huffman table has no symbol or one >= {alphabet_size}")
        if len(np.unique(symbols)) != n:
            raise ValueError("Huffman table lists a symbol twice")
        kraft = sum(c * 2.0**-length for length, c in enumerate(counts))
        if kraft > 1.0:
            raise ValueError("Huffman table code lengths violate the Kraft inequality")
        return cls(counts, tuple(symbols.tolist()))


def _width(value: int) -> int:
    """Bytes (1, 2 or 4) of the smallest unsigned type holding ``value``."""
    return 1 if value < 1 << 8 else 2 if value < 1 << 16 else 4


def huffman_encode(symbols: np.ndarray) -> tuple[HuffmanTable, bitarray]:
    """Canonical Huffman code built from the symbol frequencies, and the coded stream."""
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size == 0:
        return HuffmanTable((), ()), bitarray(endian="big")
    values, freq = np.unique(symbols, return_counts=True)
    code, counts, ordered = canonical_huffman(
        dict(zip(values.tolist(), freq.tolist(), strict=True))
    )
    bits = bitarray(endian="big")
    bits.encode(code, symbols.tolist())
    return HuffmanTable(tuple(counts), tuple(ordered)), bits


def huffman_decode(table: HuffmanTable, bits: bitarray, n: int) -> np.ndarray:
    """Decode exactly ``n`` symbols that use up all of ``bits``; ``ValueError`` otherwise."""
    if n == 0:
        if len(bits):
            raise ValueError(f"{len(bits)} bits left over for an empty stream")
        return np.zeros(0, dtype=np.int64)
    if not table.symbols:
        raise ValueError(f"no Huffman table for a stream of {n} symbols")
    it = canonical_decode(bits, list(table.counts), list(table.symbols))
    try:
        out = np.fromiter(it, dtype=np.int64, count=n)
    except ValueError as e:
        raise ValueError(f"Huffman stream ends early or holds an invalid code ({e})") from None
    if next(it, None) is not None:
        raise ValueError(f"Huffman stream holds more than the {n} expected symbols")
    return out


def code_lengths(table: HuffmanTable) -> dict[int, int]:
    """Code length of each symbol (for size accounting and tests)."""
    out: dict[int, int] = {}
    i = 0
    for length, c in enumerate(table.counts):
        for s in table.symbols[i : i + c]:
            out[s] = length
        i += c
    return out
