"""CRC32 helpers beyond zlib's."""

from __future__ import annotations

import zlib


def crc32(data: bytes) -> int:
    return zlib.crc32(data)


# crc32_combine (Python's zlib lacks it), the method of zlib >= 1.2.12: polynomials over
# GF(2) in reflected bit order; _X2N[k] = x^(2^k) mod P. It lets a file's CRC32 be folded
# from its items' CRC32s instead of a second pass over every byte.
_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32 of A + B from crc32(A), crc32(B) and len(B)."""
    p, k, n = 1 << 31, 3, len2  # x^0; a byte is x^8 = x^(2^3)
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2
