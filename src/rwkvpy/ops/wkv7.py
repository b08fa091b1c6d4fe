"""The RWKV-7 WKV operator ("generalized delta rule"), recurrent and chunked.

Glossary (RWKV-7 paper, arXiv 2503.14456; BlinkDL's x070 code; names in brackets), per head
of size N, all vectors (N,):

    S_t        the state, a matrix (N_v, N_k): values by keys        [S: (B, H, N, N)]
    r_t        receptance, what the output reads from the state     [r]
    w_t        decay per key channel, in (e^-0.6065, 1)              [log_w = log w_t < 0]
    k_t, v_t   key and value written at step t                       [k, v]
    alpha_t    removal direction, -kk_t (kk: the normalized key)     [alpha]
    beta_t     replacement weights, kk_t * a_t (a: in-context rate)  [beta]

    S_t = S_{t-1} (diag(w_t) + alpha_t beta_t^T) + v_t k_t^T,      y_t = S_t r_t

Forms, all ``(r, log_w, k, v, alpha, beta) of shape (B, T, H, N), S (B, H, N, N) -> (y, S)``:

    wkv7_step       one token (tensors (B, H, N)): the decode path
    wkv7_recurrent  the step in a loop over T, for tests (use float64)
    wkv7_chunked    the parallel form: within a chunk of L tokens the product of transitions is
                    written in WY form, diag(Gamma_t) (I + sum_s z_s (beta_s / Gamma_s)^T), its
                    vectors found by one unit-lower-triangular solve per chunk; all chunks at
                    once, then two small products per chunk carry the state (O(L N^2) each,
                    never an N x N by N x N product).

The cumulative decays Gamma_t = prod_{i<=t} w_i appear only as ratios Gamma_t / Gamma_s with
s <= t (<= 1), each computed as exp(c_t - m) exp(m - c_s) with m the log-decay at the middle of
the chunk, so no factor exceeds e^(0.6065 L / 2): fp32 neither overflows nor underflows for
L <= 128. Arithmetic runs in the dtype of ``r`` (fp32 or fp64; never half precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def wkv7_step(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
              S: Tensor) -> tuple[Tensor, Tensor]:
    """One token: tensors (B, H, N), S (B, H, N, N) -> y (B, H, N), new S."""
    S = (S * torch.exp(log_w).unsqueeze(-2)
         + torch.matmul(S, alpha.unsqueeze(-1)) * beta.unsqueeze(-2)
         + v.unsqueeze(-1) * k.unsqueeze(-2))
    return torch.matmul(S, r.unsqueeze(-1)).squeeze(-1), S


def wkv7_recurrent(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                   S: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence token by token (the reference the other forms are tested against)."""
    ys = []
    for t in range(r.shape[1]):
        y, S = wkv7_step(r[:, t], log_w[:, t], k[:, t], v[:, t], alpha[:, t], beta[:, t], S)
        ys.append(y)
    return torch.stack(ys, 1), S


def _chunks(x: Tensor, L: int, pad: int) -> Tensor:
    """(B, T, H, N) -> (B, H, n, L, N), zero-padded at the end (a zero step is the identity:
    log_w = 0, k = v = alpha = beta = 0 leave the state as it is)."""
    B, T, H, N = x.shape
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.view(B, (T + pad) // L, L, H, N).permute(0, 3, 1, 2, 4).contiguous()  # one copy, not one per use


def wkv7_chunked(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                 S: Tensor, chunk_len: int = 32) -> tuple[Tensor, Tensor]:
    """The parallel form: chunks of ``chunk_len`` tokens (any T; the last chunk is padded with
    identity steps). Differentiable by autograd (triangular solve and products)."""
    B, T, H, N = r.shape
    L = max(1, min(chunk_len, T))
    pad = -T % L
    r, log_w, k, v, alpha, beta = (_chunks(x, L, pad) for x in (r, log_w, k, v, alpha, beta))
    c = torch.cumsum(log_w, dim=-2)  # log Gamma_t, inclusive                  (B, H, n, L, N)
    c_prev = c - log_w  # log Gamma_{t-1}
    m = c[..., (L - 1) // 2: (L - 1) // 2 + 1, :]  # reference point inside the chunk
    c_end = c[..., -1:, :]
    inv = torch.exp(m - c)  # 1 / Gamma_s, relative to m
    beta_inv, k_inv = beta * inv, k * inv
    alpha_dec = alpha * torch.exp(c_prev)  # Gamma_{t-1} alpha_t (true scale, <= |alpha|)
    alpha_rel = alpha * torch.exp(c_prev - m)
    r_dec = r * torch.exp(c)  # Gamma_t r_t
    r_rel = r * torch.exp(c - m)

    ones = torch.ones(L, L, dtype=torch.bool, device=r.device)
    strict, incl = torch.tril(ones, -1), torch.tril(ones)
    zero = r.new_zeros(())
    # M_ts = (Gamma_{t-1} alpha_t) . (beta_s / Gamma_s) for s < t, and the same with k_s
    M = torch.where(strict, alpha_rel @ beta_inv.transpose(-1, -2), zero)
    Mk = torch.where(strict, alpha_rel @ k_inv.transpose(-1, -2), zero)
    Qb = torch.where(incl, r_rel @ beta_inv.transpose(-1, -2), zero)
    Qk = torch.where(incl, r_rel @ k_inv.transpose(-1, -2), zero)
    # h_t = S_{t-1} alpha_t for every t: H = (I - M)^-1 (alpha_dec S0^T + Mk V) = W S0^T + U
    eye = torch.eye(L, dtype=r.dtype, device=r.device)
    rhs = torch.cat([alpha_dec, Mk @ v], dim=-1)
    WU = torch.linalg.solve_triangular(eye - M, rhs, upper=False, unitriangular=True)
    W, U = WU[..., :N], WU[..., N:]
    # y = E S0^T + Fy;  S_end = S0 diag(Gamma_L) + H^T (beta Gamma_L / Gamma) + V^T (k Gamma_L / Gamma)
    E = r_dec + Qb @ W
    Fy = Qb @ U + Qk @ v
    to_end = torch.exp(c_end - c)  # Gamma_L / Gamma_s <= 1
    beta_end = beta * to_end
    J = v.transpose(-1, -2) @ (k * to_end)  # (B, H, n, N_v, N_k)
    EW = torch.cat([E, W], dim=-2)  # one product with S per chunk gives y and H
    decay_end = torch.exp(c_end)  # (B, H, n, 1, N_k): scales the state's key columns

    ys = []
    for i in range(E.shape[2]):
        yh = EW[:, :, i] @ S.transpose(-1, -2)  # (B, H, 2L, N_v)
        ys.append(yh[..., :L, :])
        h = yh[..., L:, :] + U[:, :, i]  # h_t = S_{t-1} alpha_t, (B, H, L, N_v)
        S = S * decay_end[:, :, i] + h.transpose(-1, -2) @ beta_end[:, :, i] + J[:, :, i]
    y = torch.stack(ys, 2) + Fy  # (B, H, n, L, N)
    y = y.permute(0, 2, 3, 1, 4).reshape(B, -1, H, N)
    return (y[:, :T] if pad else y), S
