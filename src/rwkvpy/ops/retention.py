"""Retention (RetNet, arXiv 2307.08621) in its three forms, one signature.

Glossary (the paper's symbols; code names in brackets), per head:

    q_n, k_n   query and key of token n (rotated by position, k scaled by d_k^-0.5)  [q, k: (B, T, H, d_k)]
    v_n        value of token n                                                        [v: (B, T, H, d_v)]
    gamma      the head's decay per step, 0 < gamma < 1                               [log_gamma: (H,)]
    S_n        the state, sum_{m<=n} gamma^(n-m) k_m^T v_m, a (d_k x d_v) matrix       [S: (B, H, d_k, d_v)]

    recurrent   S_n = gamma S_{n-1} + k_n^T v_n,   o_n = q_n S_n
    parallel    O = (Q K^T * D) V + (Q S_0) * gamma^(n+1),  D_nm = gamma^(n-m) for n >= m, else 0
    chunkwise   the parallel form inside chunks of L tokens; across chunks
                R_i = K_[i]^T (V_[i] * gamma^(L-1-j)) + gamma^L R_{i-1}

S_0 is the state carried in (zero for a new sequence); every form returns the state after its
last token, so calls continue each other. Retention is canonical here: no data-dependent
rescaling (the reference code's row-sum normalisation cannot be carried by a fixed-size
state). The paper's optional 1/sqrt(sum_i gamma^i) scaling depends only on the global
position and is applied outside (:func:`position_scale`). Powers of gamma are exp(t log gamma)
with t >= 0: nothing overflows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def retention_step(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor,
                   S: Tensor | None, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token: q, k (B, H, d_k), v (B, H, d_v) -> o (B, H, d_v), new S (``S=None``: zero).
    q S as a broadcast product summed over keys, not B H batched products: 15-25% faster at
    8-32 streams (as for RWKV-7's step, where the gap is larger). ``out`` (no autograd): the
    new S is written there (its layer's slice of the next state: no stacking afterwards)."""
    write = k.unsqueeze(-1) * v.unsqueeze(-2)
    if S is None:
        S = write if out is None else out.copy_(write)
    else:
        S = torch.addcmul(write, S, torch.exp(log_gamma)[:, None, None], out=out)
    return (q.unsqueeze(-1) * S).sum(-2), S


def retention_recurrent(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence token by token (the reference for tests)."""
    outs = []
    for t in range(q.shape[1]):
        o, S = retention_step(q[:, t], k[:, t], v[:, t], log_gamma, S)
        outs.append(o)
    return torch.stack(outs, 1), S


def _powers(log_gamma: Tensor, n: int, offset: int = 0) -> Tensor:
    """gamma^(offset + t) for t = 0..n-1, (H, n)."""
    t = torch.arange(offset, offset + n, dtype=log_gamma.dtype, device=log_gamma.device)
    return torch.exp(log_gamma[:, None] * t)


def retention_parallel(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, S: Tensor | None,
                       state_out: bool = True) -> tuple[Tensor, Tensor | None]:
    """All T tokens at once: O(T^2) products (training on windows). ``S=None`` is a zero state
    in and ``state_out=False`` returns None for the state: training needs neither, and skips
    their products (forward and backward)."""
    T = q.shape[1]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, d)
    t = torch.arange(T, dtype=q.dtype, device=q.device)
    diff = t[:, None] - t[None, :]
    D = torch.where(diff >= 0, torch.exp(log_gamma[:, None, None] * diff.clamp_min(0)), q.new_zeros(()))
    o = (qh @ kh.transpose(-1, -2) * D) @ vh  # (B, H, T, d_v)
    if S is not None:
        o = o + (qh @ S) * _powers(log_gamma, T, 1)[..., None]  # the carried state, decayed to each n
    if state_out:
        to_end = _powers(log_gamma, T).flip(-1)[..., None]  # gamma^(T-1-m)
        new = kh.transpose(-1, -2) @ (vh * to_end)
        S = new if S is None else S * torch.exp(log_gamma * T)[:, None, None] + new
    return o.transpose(1, 2), (S if state_out else None)


def retention_chunkwise(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, S: Tensor | None,
                        chunk_len: int = 64) -> tuple[Tensor, Tensor]:
    """Chunks of ``chunk_len`` (any T: a shorter last chunk runs in the parallel form): inside
    each chunk the parallel form, all chunks at once; the state carried across chunks
    (``S=None``: zero)."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    if S is None:
        S = q.new_zeros(B, H, dk, dv)
    L = max(1, min(chunk_len, T))
    n = T // L
    outs = []
    if n:
        full = n * L
        qc = q[:, :full].reshape(B, n, L, H, dk).permute(0, 3, 1, 2, 4)  # (B, H, n, L, dk)
        kc = k[:, :full].reshape(B, n, L, H, dk).permute(0, 3, 1, 2, 4)
        vc = v[:, :full].reshape(B, n, L, H, dv).permute(0, 3, 1, 2, 4)
        t = torch.arange(L, dtype=q.dtype, device=q.device)
        diff = t[:, None] - t[None, :]
        lg = log_gamma[:, None, None, None]
        D = torch.where(diff >= 0, torch.exp(lg * diff.clamp_min(0)), q.new_zeros(()))  # (H, 1, L, L)
        inner = (qc @ kc.transpose(-1, -2) * D) @ vc  # (B, H, n, L, dv)
        zeta = _powers(log_gamma, L, 1)[:, None, :, None]  # gamma^(j+1): the state's decay to row j
        xi = _powers(log_gamma, L).flip(-1)[:, None, :, None]  # gamma^(L-1-j)
        chunk_states = kc.transpose(-1, -2) @ (vc * xi)  # each chunk's own contribution (B, H, n, dk, dv)
        decay = torch.exp(log_gamma * L)[:, None, None]
        cross = []
        for i in range(n):
            cross.append(qc[:, :, i] @ S)  # rows of chunk i read the state before it
            S = S * decay + chunk_states[:, :, i]
        o = inner + torch.stack(cross, 2) * zeta
        outs.append(o.permute(0, 2, 3, 1, 4).reshape(B, full, H, dv))
    if T % L:
        o, S = retention_parallel(q[:, n * L:], k[:, n * L:], v[:, n * L:], log_gamma, S)
        outs.append(o)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), S


def position_scale(pos: Tensor, log_gamma: Tensor) -> Tensor:
    """The paper's 1/sqrt(sum_{i<=n} gamma^i) for global positions ``pos`` (B, T): (B, T, H, 1)."""
    gamma = torch.exp(log_gamma)
    total = -torch.expm1(log_gamma * (pos[..., None].to(log_gamma.dtype) + 1)) / (1 - gamma)
    return torch.rsqrt(total)[..., None]


def decays(n_head: int, kind: str = "reference", dtype=torch.float64) -> Tensor:
    """log gamma per head: ``reference`` 1 - 2^(-5-i) (torchscale), ``log`` log-spaced from
    1 - 1/32 to 1 - 1/512 (the paper)."""
    if kind == "reference":
        gamma = 1 - torch.pow(2.0, -5.0 - torch.arange(n_head, dtype=torch.float64))
    elif kind == "log":
        gamma = 1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), n_head, dtype=torch.float64))
    else:
        raise ValueError(f"unknown decay kind {kind!r}; choose reference or log")
    return torch.log(gamma).to(dtype)


def rotation(pos: Tensor, d: int, dtype, base: float = 10000.0) -> Tensor:
    """The reference "theta shift" at global positions ``pos`` (B, T): pair i of a d-wide head
    turns by pos * base^(-i / (d/2 - 1)), as unit complex numbers (B, T, 1, d/2) (complex64, or
    complex128 for float64); computed once per call and shared by every layer."""
    angle = 1.0 / base ** torch.linspace(0, 1, d // 2, dtype=torch.float64, device=pos.device)
    theta = pos[..., None].double() * angle
    turn = torch.polar(torch.ones_like(theta), theta)[:, :, None, :]
    return turn if dtype == torch.float64 else turn.to(torch.complex64)


def rotate(x: Tensor, pos_or_rotation: Tensor, base: float = 10000.0) -> Tensor:
    """x (B, T, H, d) with its pairs (2i, 2i+1) rotated, by :func:`rotation` of positions (B, T)
    or by a precomputed rotation. A pair is one complex number (x_2i + i x_2i+1), so the turn
    is one complex product (fused, forward and backward; half-precision x turns in fp32)."""
    turn = pos_or_rotation
    if not turn.is_complex():
        turn = rotation(turn, x.shape[-1], x.dtype, base)
    xw = x if x.dtype in (torch.float32, torch.float64) else x.float()
    pairs = torch.view_as_complex(xw.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)
