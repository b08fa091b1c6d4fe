"""The RWKV-4 WKV operator in three forms that compute the same function.

Glossary (RWKV paper, arXiv 2305.13048, eq. 14-16 and appendix; code names in brackets):

    k_t, v_t   key and value of token t, one scalar per channel      [k, v: (B, T, C)]
    w          per-channel log-decay per step, w = -exp(time_decay)  [w: (C,)], always < 0
    u          per-channel bonus for the current token = time_first [u: (C,)]

    wkv_t = (a_{t-1} + e^{u + k_t} v_t) / (b_{t-1} + e^{u + k_t})
    a_t   = e^{w} a_{t-1} + e^{k_t} v_t,     b_t = e^{w} b_{t-1} + e^{k_t}

The state (a, b) grows like e^{k}, so it is kept as ``a = num * e^{max}``,
``b = den * e^{max}`` (the official ``aa, bb, pp``). In every form ``max`` is the exact
log of the largest term in the sums, i.e. ``max_t = max(max_{t-1} + w, k_t)``; the forms
therefore return directly comparable states, not just equivalent ones. Every exponent
evaluated is <= 0, so nothing overflows in fp32 whatever the length.

Forms, all ``(w, u, k, v, state) -> (out, new_state)`` with ``k, v`` of shape (B, T, C):

    wkv_reference  O(T^2) straight from the definition, for tests (use float64)
    wkv_chunked    the parallel form: exact within chunks of ``chunk_len`` tokens (all chunks
                   at once); the state entering each chunk in closed form from the chunks'
                   summaries; groups of chunks follow each other; autograd-safe
    wkv_matmul     the parallel form as matrix products with one scale per row and channel
                   (training: its backward is a few products); falls back to wkv_chunked when
                   keys span too many nats for that scale
    wkv_step       the recurrent form, one token at a time (``wkv_token``: the decode path)

Arithmetic happens in the dtype of ``k`` (callers pass fp32 or fp64; never half precision).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Log of an empty sum. Finite (not -inf) so that `max - max` never produces NaN.
EMPTY_LOG = -1e38

# Chunks processed together are capped at this many (t, i, c) weights per batch row so that
# memory stays bounded whatever T is.
_MAX_WEIGHTS_PER_GROUP = 1 << 23


class WkvState(NamedTuple):
    """(num, den, max), each (B, C): a = num * e^max, b = den * e^max."""

    num: Tensor
    den: Tensor
    max: Tensor

    @staticmethod
    def zeros(batch: int, channels: int, *, dtype=torch.float32, device=None) -> "WkvState":
        z = torch.zeros(batch, channels, dtype=dtype, device=device)
        return WkvState(z, z.clone(), torch.full_like(z, EMPTY_LOG))


def _initial(state: WkvState | None, k: Tensor) -> WkvState:
    if state is None:
        return WkvState.zeros(k.shape[0], k.shape[2], dtype=k.dtype, device=k.device)
    return state if state.num.dtype == k.dtype else WkvState(*(s.to(k.dtype) for s in state))


def wkv_token(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WkvState) -> tuple[Tensor, WkvState]:
    """One token: k, v (B, C) -> out (B, C), state after the token (the official update)."""
    num, den, mx = state
    uk = u + k
    p = torch.maximum(mx, uk)
    e1, e2 = torch.exp(mx - p), torch.exp(uk - p)
    out = torch.addcmul(e1 * num, e2, v) / torch.addcmul(e2, e1, den)
    decayed = mx + w
    p = torch.maximum(decayed, k)
    e1, e2 = torch.exp(decayed - p), torch.exp(k - p)
    return out, WkvState(torch.addcmul(e1 * num, e2, v), torch.addcmul(e2, e1, den), p)


def wkv_step(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WkvState | None = None):
    """Recurrent form: :func:`wkv_token` applied token by token."""
    s = _initial(state, k)
    outs = []
    for t in range(k.shape[1]):
        out, s = wkv_token(w, u, k[:, t], v[:, t], s)
        outs.append(out)
    return torch.stack(outs, dim=1), s


def wkv_reference(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WkvState | None = None):
    """O(T^2) form written from the definition: every output sums over every past token.

    Log-weights of token i in output t (i < t): (t - 1 - i) w + k_i; of the current token:
    u + k_t; of the incoming state: max_0 + t w.
    """
    s0 = _initial(state, k)
    B, T, C = k.shape
    t = torch.arange(T, device=k.device, dtype=k.dtype)
    lag = (t[:, None] - 1 - t[None, :])[..., None]  # (T, T, 1): t - 1 - i
    logw = lag * w + k[:, None, :, :]  # (B, T, T, C)
    diag = torch.eye(T, dtype=torch.bool, device=k.device)[..., None]
    logw = torch.where(diag, (u + k)[:, None, :, :], logw)
    future = (lag < -1).expand(T, T, 1)
    logw = logw.masked_fill(future, float("-inf"))
    log_state = s0.max[:, None, :] + t[None, :, None] * w  # (B, T, C)
    p = torch.maximum(logw.amax(dim=2), log_state)
    ew, es = torch.exp(logw - p[:, :, None]), torch.exp(log_state - p)
    out = (es * s0.num[:, None] + (ew * v[:, None]).sum(2)) / (es * s0.den[:, None] + ew.sum(2))
    return out, _final_state(w, k, v, s0)


def _chunk_group(w: Tensor, u: Tensor, k: Tensor, v: Tensor, s: WkvState):
    """N consecutive chunks of equal length L: k, v (B, N, L, C) -> out (B, N, L, C), state."""
    B, N, L, C = k.shape
    t = torch.arange(L, device=k.device, dtype=k.dtype)
    lag = (t[:, None] - 1 - t[None, :])[..., None]  # (L, L, 1): t - 1 - i
    # One additive term gives the current token its bonus (u instead of -w) and hides the future.
    bonus = torch.where(lag == -1, u + w, torch.where(lag < -1, float("-inf"), 0.0))  # (L, L, C)

    # Within each chunk: output t sums tokens i <= t of the same chunk.
    logw = (lag * w + bonus) + k[:, :, None]  # (B, N, L, L, C)
    # The stabiliser only rescales numerator and denominator alike: no gradient through it.
    p_in = logw.amax(dim=3).detach()  # (B, N, L, C)
    ew = torch.exp(logw - p_in[:, :, :, None])
    num_in = (ew * v[:, :, None]).sum(3)
    den_in = ew.sum(3)

    # Each chunk's own contribution to the state at its end ...
    logs = (L - 1 - t)[:, None] * w + k  # (B, N, L, C)
    m_c = logs.amax(dim=2)  # (B, N, C)
    ec = torch.exp(logs - m_c[:, :, None])
    num_c, den_c = (ec * v).sum(2), ec.sum(2)
    # ... and the state entering chunk n = 0..N (N: the final state), in closed form:
    # chunk m < n contributes with log-weight (n - 1 - m) L w + m_c[m], the old state n L w + max.
    n = torch.arange(N + 1, device=k.device, dtype=k.dtype)
    chunk_lag = (n[:, None] - 1 - n[None, :N])[..., None]  # (N+1, N, 1)
    log_c = torch.where(chunk_lag >= 0, chunk_lag * (L * w), float("-inf")) + m_c[:, None]  # (B, N+1, N, C)
    log_0 = s.max[:, None] + n[:, None] * (L * w)  # (B, N+1, C)
    m_enter = torch.maximum(log_c.amax(dim=2), log_0)
    e_c, e_0 = torch.exp(log_c - m_enter[:, :, None]), torch.exp(log_0 - m_enter)
    num_enter = e_0 * s.num[:, None] + (e_c * num_c[:, None]).sum(2)
    den_enter = e_0 * s.den[:, None] + (e_c * den_c[:, None]).sum(2)

    # Combine: the state entering chunk n reaches its token t decayed by t steps.
    log_state = m_enter[:, :N, None] + t[:, None] * w  # (B, N, L, C)
    p = torch.maximum(p_in, log_state).detach()
    e_in, e_st = torch.exp(p_in - p), torch.exp(log_state - p)
    out = (e_st * num_enter[:, :N, None] + e_in * num_in) / (e_st * den_enter[:, :N, None] + e_in * den_in)
    return out, WkvState(num_enter[:, N], den_enter[:, N], m_enter[:, N])


def wkv_chunked(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WkvState | None = None, chunk_len: int = 4
):
    """Parallel form: chunks of ``chunk_len`` tokens, exact within a chunk, O(T * chunk_len * C)."""
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    s = _initial(state, k)
    B, T, C = k.shape
    L = min(chunk_len, T)
    # Chunks per group N: within-chunk work is N L^2 C and the closed-form prefix N^2 C, so
    # N = L^2 balances them; memory caps N too. Groups follow each other carrying the state.
    group = max(1, min(max(4, L * L), _MAX_WEIGHTS_PER_GROUP // (L * L * C)))
    outs = []
    pos = 0
    while pos < T:
        n = min(group, (T - pos) // L)
        length = L if n > 0 else T - pos  # the tail: one shorter chunk
        n = max(n, 1)
        end = pos + n * length
        kk = k[:, pos:end].reshape(B, n, length, C)
        vv = v[:, pos:end].reshape(B, n, length, C)
        out, s = _chunk_group(w, u, kk, vv, s)
        outs.append(out.reshape(B, n * length, C))
        pos = end
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0], s


def _decay_matrix(w: Tensor, n: int, step: int = 1) -> Tensor:
    """(C, n, n): e^{(t - 1 - i) step w} where i < t, else 0 (the strictly causal decays)."""
    t = torch.arange(n, device=w.device, dtype=w.dtype)
    lag = t[:, None] - 1 - t[None, :]  # (n, n)
    logd = torch.where(lag >= 0, lag * (step * w[:, None, None]), float("-inf"))
    return torch.exp(logd)


def wkv_matmul(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WkvState | None = None, chunk_len: int = 64
):
    """Parallel form as matrix products: one scale per row and channel instead of one per term.

    With m = max_t (k_t + max(u, 0)) over the whole sequence (and the state's max), every term
    e^{(t-1-i) w + k_i - m} factors into a decay e^{(t-1-i) w} <= 1 and e^{k_i - m} <= 1, so the
    sums become products of a (C, L, L) decay matrix with the sequence (chunks of ``chunk_len``;
    chunk to chunk the same with an (N, N) matrix). Nothing overflows; if a denominator falls
    below the normal range (keys spanning more than ~80 nats within one sequence) the result
    comes from :func:`wkv_chunked` instead. The final state is exact, as in every form.
    """
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    s = _initial(state, k)
    B, T, C = k.shape
    L = min(chunk_len, T)
    N = -(-T // L)
    m = torch.maximum(k.amax(1) + u.clamp_min(0), s.max).detach()  # (B, C)
    ek = torch.exp(k - m[:, None])
    z = torch.stack([ek * v, ek])  # (2, B, T, C)
    if N * L != T:
        z = torch.nn.functional.pad(z, (0, 0, 0, N * L - T))
    # Channels first, so each channel's decays multiply all its rows at once: (C, L, N * 2B).
    zc = z.view(2 * B, N, L, C).permute(3, 2, 1, 0).reshape(C, L, N * 2 * B)
    within = torch.bmm(_decay_matrix(w, L), zc)  # (C, L, N * 2B)
    # State entering each chunk: the summaries of earlier chunks and the initial state, decayed.
    t = torch.arange(L, device=k.device, dtype=k.dtype)
    to_end = torch.exp((L - 1 - t) * w[:, None])[:, None]  # (C, 1, L)
    summary = torch.bmm(to_end, zc).view(C, N, 2 * B)
    z0 = (torch.exp(s.max - m)[None] * torch.stack([s.num, s.den])).reshape(2 * B, C).t()  # (C, 2B)
    n = torch.arange(N, device=k.device, dtype=k.dtype)
    enter = torch.bmm(_decay_matrix(w, N, L), summary) + torch.exp(n * (L * w[:, None]))[..., None] * z0[:, None]
    from_start = torch.exp(t * w[:, None])[:, :, None, None]  # (C, L, 1, 1)
    total = within.view(C, L, N, 2 * B) + from_start * enter[:, None]  # (C, L, N, 2B)
    total = total.permute(3, 2, 1, 0).reshape(2, B, N * L, C)[:, :, :T]
    eu = torch.exp(u + k - m[:, None])
    den = total[1] + eu
    if not torch.compiler.is_compiling() and bool((den < torch.finfo(k.dtype).tiny * 1e8).any()):
        return wkv_chunked(w, u, k, v, state, chunk_len=4)
    out = (total[0] + eu * v) / den
    return out, _final_state(w, k, v, s)


def _final_state(w: Tensor, k: Tensor, v: Tensor, s: WkvState) -> WkvState:
    """The state after the whole sequence, scaled by the exact log of its largest term: terms
    (T - 1 - i) w + k_i for every token, and max_0 + T w for the incoming state."""
    T = k.shape[1]
    lag = torch.arange(T - 1, -1, -1, device=k.device, dtype=k.dtype)[:, None]  # T - 1 - i
    logs = lag * w + k  # (B, T, C)
    log_old = s.max + T * w
    p = torch.maximum(logs.amax(1), log_old)
    e, e0 = torch.exp(logs - p[:, None]), torch.exp(log_old - p)
    return WkvState(e0 * s.num + (e * v).sum(1), e0 * s.den + e.sum(1), p)
