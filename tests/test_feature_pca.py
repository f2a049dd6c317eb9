"""Attention-weighted per-image PCA of feature maps (core/feature_pca.py)."""

from __future__ import annotations

import pytest
import torch

from cim_plugin.core.feature_pca import code_bytes, decode, encode, position_cosine


def low_rank_maps(b=4, c=32, h=6, w=6, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(b, c, rank, generator=g)
    coeffs = torch.randn(b, rank, h * w, generator=g)
    offset = torch.randn(b, c, 1, generator=g)
    return (basis @ coeffs + offset).reshape(b, c, h, w)


def test_maps_of_rank_k_come_back_up_to_8_bit_quantisation():
    maps = low_rank_maps(rank=3)
    code = encode(maps, None, k=3)
    back = decode(code)
    assert back.shape == maps.shape
    assert (position_cosine(maps, back) > 0.99).all()
    assert (position_cosine(maps, decode(encode(maps, None, k=1))) < position_cosine(maps, back)).all()


def test_bytes_are_the_analytic_size():
    code = encode(low_rank_maps(c=32, h=6, w=6), None, k=5)
    stored = code.mean[0].numel() + code.basis[0].numel() + code.coeffs[0].numel() + code.ranges[0].numel() * 2
    assert code.nbytes_per_image() == stored == code_bytes(32, 36, 5) == 32 + 5 * 32 + 5 * 36 + 11 * 4
    assert code.mean.dtype == code.basis.dtype == code.coeffs.dtype == torch.uint8
    assert code.ranges.dtype == torch.float16


def test_weights_decide_which_positions_the_directions_serve():
    """Two groups of positions in different subspaces; k = 1 follows the weighted group."""
    c, h, w = 8, 4, 4
    maps = torch.zeros(1, c, h, w)
    maps[0, 0, :2] = torch.linspace(-1, 1, 8).reshape(2, 4)  # rows 0-1 vary along channel 0
    maps[0, 1, 2:] = torch.linspace(-1, 1, 8).reshape(2, 4) * 0.9  # rows 2-3 along channel 1
    top = torch.zeros(1, h, w)
    top[0, :2] = 1.0
    bottom = 1.0 - top
    err_top = (decode(encode(maps, top, 1)) - maps)[0, :, :2].abs().mean()
    err_bottom = (decode(encode(maps, bottom, 1)) - maps)[0, :, :2].abs().mean()
    assert err_top < 0.05 < err_bottom


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="k must lie"):
        encode(torch.zeros(1, 4, 2, 2), None, k=5)
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        encode(torch.zeros(4, 2, 2), None, k=1)
    flat = decode(encode(torch.ones(2, 4, 3, 3), torch.zeros(2, 3, 3), k=1))  # constant maps, zero weights
    assert torch.allclose(flat, torch.ones(2, 4, 3, 3), atol=1e-2)
