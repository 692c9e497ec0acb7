"""2-bit packing of ternary weights, 4 values per byte, in transformers' BitNet layout.

A (rows, cols) ternary matrix becomes a (R, cols) uint8 matrix with R = ceil(rows / 4). Row r of block i (the
rows i·R ... i·R + R − 1) sits in bits 2i and 2i+1 of packed row r, stored as W_q + 1 ∈ {0, 1, 2}. So
``transformers.integrations.bitnet.unpack_weights`` gives back our tensor, and a transformers ``BitLinear`` takes
the packed buffer as it is. When rows is not a multiple of 4 the last block is padded with zero bits (which
unpack to −1, as in transformers); ``unpack`` cuts them off by the row count it is given.
"""

from __future__ import annotations

import torch

VALUES_PER_BYTE = 4


def packed_rows(rows: int) -> int:
    return (rows + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE


def pack(w_q: torch.Tensor) -> torch.Tensor:
    """Ternary int tensor (rows, ...) in {−1, 0, 1} -> uint8 (ceil(rows/4), ...)."""
    if w_q.is_floating_point():
        raise TypeError(f"pack() takes integer ternary weights, got {w_q.dtype}")
    if w_q.numel() and (int(w_q.min()) < -1 or int(w_q.max()) > 1):
        raise ValueError(f"pack() takes values in {{-1, 0, 1}}, got range [{int(w_q.min())}, {int(w_q.max())}]")
    rows = w_q.shape[0]
    R = packed_rows(rows)
    codes = (w_q.to(torch.int16) + 1).to(torch.uint8)
    padded = torch.zeros((R * VALUES_PER_BYTE, *w_q.shape[1:]), dtype=torch.uint8, device=w_q.device)
    padded[:rows] = codes
    blocks = padded.view(VALUES_PER_BYTE, R, *w_q.shape[1:])
    out = torch.zeros((R, *w_q.shape[1:]), dtype=torch.uint8, device=w_q.device)
    for i in range(VALUES_PER_BYTE):
        out |= blocks[i] << (2 * i)
    return out


def unpack(packed: torch.Tensor, rows: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """uint8 (R, ...) -> ternary (rows, ...) in ``dtype``; the inverse of ``pack``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack() takes uint8, got {packed.dtype}")
    if not (packed.shape[0] - 1) * VALUES_PER_BYTE < rows <= packed.shape[0] * VALUES_PER_BYTE:
        raise ValueError(f"{packed.shape[0]} packed rows cannot hold {rows} rows")
    codes = torch.cat([(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)])[:rows]
    return codes.to(dtype) - 1
