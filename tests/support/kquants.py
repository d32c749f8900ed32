"""Plain K-quant encoders (Q4_K, Q5_K, Q6_K) for test files: gguf-py can only dequantize these types.

Simple min/max rounding, not llama.cpp's searched scales: the tests need valid blocks whose
dequantization is close to the input, and test_quant.py checks that gguf-py decodes them so.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

QK_K = 256  # weights per super-block


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """[n] float -> [n, 2] little-endian float16 bytes"""
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and minimums per super-block -> 12 bytes (the inverse of gguf's Q4_K.get_scale_min)."""
    lo = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    mid = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


def _asymmetric_k(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Super-blocks [n, 256] -> header (d, dmin, packed scales: [n, 16] bytes) and codes [n, 8, 32] in 0..levels."""
    sub = blocks.reshape(-1, 8, 32)
    low = np.minimum(sub.min(axis=2), 0)  # the form is q * scale - minimum, minimum >= 0
    scale = (sub.max(axis=2) - low) / levels
    d = np.maximum(scale.max(axis=1), 1e-12) / 63
    dmin = np.maximum(-low.min(axis=1), 1e-12) / 63
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-low / dmin[:, None]), 0, 63).astype(np.uint8)
    eff_scale = (d[:, None] * sc)[..., None]
    eff_min = (dmin[:, None] * m)[..., None]
    q = np.clip(np.round((sub + eff_min) / eff_scale), 0, levels).astype(np.uint8)
    header = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min(sc, m)], axis=1)
    return header, q


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    header, q = _asymmetric_k(blocks, 15)
    pairs = q.reshape(-1, 4, 2, 32)  # run r: sub-block 2r in the low nibbles, 2r+1 in the high ones
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([header, qs], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    header, q = _asymmetric_k(blocks, 31)
    low = q & 0x0F
    pairs = low.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4).astype(np.uint8)  # [n, 8, 32]: bit j of qh byte i is the fifth bit of sub-block j, weight i
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate([header, qh, qs], axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    sub = blocks.reshape(-1, 16, 16)
    scale = np.abs(sub).max(axis=2) / 31
    d = (np.maximum(np.abs(scale).max(axis=1), 1e-12) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[:, None]), 1, 127).astype(np.int8)
    q = np.clip(np.round(sub / (d[:, None] * sc)[..., None]), -32, 31).astype(np.int16) + 32
    q = q.reshape(-1, 2, 128).astype(np.uint8)  # two halves of 128 weights
    # Low 4 bits: half h, weight r -> ql byte h*64 + r%64, nibble r//64;
    # high 2 bits -> qh byte h*32 + r%32, bits 2*(r//32).
    low = q & 0x0F
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)


_ENCODERS = {QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k}


def quantize_k(a: np.ndarray, qtype: QT) -> np.ndarray:
    """float [rows, cols] (cols a multiple of 256) -> uint8 [rows, bytes per row] of `qtype` blocks."""
    rows, cols = a.shape
    if cols % QK_K:
        raise ValueError(f"K-quants need rows of a multiple of {QK_K} weights, got {cols}")
    blocks = _ENCODERS[qtype](a.astype(np.float32).reshape(-1, QK_K))
    return blocks.reshape(rows, -1)
