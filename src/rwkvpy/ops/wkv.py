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
    wkv_matmul     the parallel form as matrix products with one scale per row and channel,
                   worked channels first; its backward is written out (the same products
                   transposed, and with the decays' derivatives for w): training and CPU
                   prefill, for keys that pass :func:`own_terms_may_underflow`
    wkv_step       the recurrent form, one token at a time (``wkv_token``: the decode path)

Arithmetic happens in the dtype of ``k`` (callers pass fp32 or fp64; never half precision).
"""

from __future__ import annotations

import functools
import math
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


class TokenTerms(NamedTuple):
    """What :func:`wkv_token` adds, per channel, to compute the output and the update as one
    (2, B, C) pass: row 0 the output's exponents, row 1 the new state's."""

    decay: Tensor  # (2, 1, C): [0, w], added to max
    bonus: Tensor  # (2, 1, C): [u, 0], added to k


def token_terms(w: Tensor, u: Tensor) -> TokenTerms:
    """The constants of :func:`wkv_token` for a layer (a decoding model keeps them)."""
    zero = torch.zeros_like(w)
    return TokenTerms(torch.stack((zero, w))[:, None], torch.stack((u, zero))[:, None])


def wkv_token(terms: TokenTerms, k: Tensor, v: Tensor, state: WkvState) -> tuple[Tensor, WkvState]:
    """One token: k, v (B, C) -> out (B, C), state after the token (the official update).
    Output and update are the same arithmetic on different exponents: with p the larger of
    max + [0, w] and k + [u, 0], row 0 is out's numerator and denominator, row 1 the new
    num, den and max."""
    num, den, mx = state
    a = mx + terms.decay
    b = k + terms.bonus
    p = torch.maximum(a, b)
    e1, e2 = torch.exp(a - p), torch.exp(b - p)
    n = torch.addcmul(e1 * num, e2, v)
    d = torch.addcmul(e2, e1, den)
    return n[0] / d[0], WkvState(n[1], d[1], p[1])


def wkv_step(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WkvState | None = None):
    """Recurrent form: :func:`wkv_token` applied token by token."""
    s = _initial(state, k)
    terms = token_terms(w, u)
    outs = []
    for t in range(k.shape[1]):
        out, s = wkv_token(terms, k[:, t], v[:, t], s)
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


class _Decays(NamedTuple):
    """Decay factors of N chunks of L tokens, channels first (every exponent is <= 0), and the
    derivatives in w (lag e^{lag w}) that the backward needs, marked d_. Names say what carries
    where: within e^{(t-1-i) w} (token i to token t > i of one chunk; the current token, i = t,
    gets its bonus e^u; else 0), to_end e^{(L-1-i) w}, from_start e^{t w}, across
    e^{(n-1-j) L w} (the end of chunk j to the start of chunk n > j), chunk_start e^{n L w}.
    Factors that bring a term to an output (within, from_start) also carry e^{-max(u, 0)}, a
    common scale of every output's numerator and denominator that keeps the bonus <= 1."""

    within: Tensor  # (C, L, L), [t, i]
    d_within: Tensor  # (C, L, L)
    totals: Tensor  # (C, 2, L): to_end, d_to_end (a chunk's total at its end and its derivative)
    adjoint_totals: Tensor  # (C, 2, L): from_start, d_from_start (the adjoint's, from its start)
    across: Tensor  # (C, N, N), [n, j]
    d_across: Tensor  # (C, N, N)
    chunk_start: Tensor  # (C, 1, N)
    d_chunk_start: Tensor  # (C, 1, N)


@functools.lru_cache(maxsize=64)
def _decay_table(L: int, N: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """For :func:`_decays`: the distinct exponents as rows (lag, scaled, bonus) of a (3, J)
    matrix, exponent = lag w - scaled max(u, 0) + bonus u (a last column 'none' gives 0), the
    index into them of every factor, flat, and per index its weight: the lag for a derivative
    (d/dw e^{lag w} = lag e^{lag w}), else 1."""
    t, n = torch.arange(L), torch.arange(N)
    zeros, ones = torch.zeros(L), torch.ones(L)
    #          scaled lags 0..L-1 | bonus | lags 0..L-1 | lags n L, n < N | none
    lag = torch.cat([t, torch.zeros(1), t, n * L, torch.zeros(1)])
    scaled = torch.cat([ones, torch.ones(1), zeros, torch.zeros(N + 1)])
    bonus = torch.cat([zeros, torch.ones(1), zeros, torch.zeros(N + 1)])
    BONUS, PLAIN, CHUNKS, NONE = L, L + 1, 2 * L + 1, 2 * L + 1 + N
    t_lag, chunk_lag = t[:, None] - 1 - t, n[:, None] - 1 - n  # [t, i], [n, j]
    within = torch.where(t_lag >= 0, t_lag, torch.where(t_lag == -1, BONUS, NONE))
    across = torch.where(chunk_lag >= 0, CHUNKS + chunk_lag, NONE)
    to_end, from_start, chunk_start = PLAIN + (L - 1 - t), t, CHUNKS + n
    parts = [  # (indices, derivative?) in the order of _Decays
        (within, False), (within, True), (to_end, False), (to_end, True), (from_start, False),
        (from_start, True), (across, False), (across, True), (chunk_start, False), (chunk_start, True)]
    index = torch.cat([i.reshape(-1) for i, _ in parts])
    weight = torch.cat([lag[i.reshape(-1)] if d else torch.ones(i.numel()) for i, d in parts])
    rows = torch.stack([lag, scaled, bonus])[:, :-1]  # 'none' is the zero padded on
    return rows.to(device, dtype), index.to(device), weight.to(device, dtype)


def _decays(w: Tensor, u: Tensor, L: int, N: int) -> _Decays:
    """All factors from one exp over the distinct exponents and one gather."""
    rows, index, weight = _decay_table(L, N, w.device, w.dtype)
    exponents = torch.mm(torch.stack([w, -u.clamp_min(0), u], 1), rows)  # (C, J)
    flat = torch.constant_pad_nd(exponents.exp_(), (0, 1)).index_select(1, index).mul_(weight)
    parts, offset, row = [], 0, flat.shape[1]
    for a, b in ((L, L), (L, L), (2, L), (2, L), (N, N), (N, N), (1, N), (1, N)):
        parts.append(flat.as_strided((w.shape[0], a, b), (row, b, 1), offset))  # one op per part
        offset += a * b
    return _Decays(*parts)


def _decayed_sums(d: _Decays, z: Tensor, z0: Tensor | None, L: int, adjoint: bool):
    """The causal decayed sums and their adjoint, for sequences z (C, X, N * L), z0 (C, X).

    sums:    s_t = D_tt z_t + sum_{i<t} D_ti z_i + (decay) z0  -> s (C, X, N * L); per chunk
             (C, X, N): its total at its end, that total's derivative in w, and what enters it
    adjoint: s_i = D_ii z_i + sum_{t>i} D_ti z_t               -> s; per chunk: its total seen
             from its start, that total's derivative in w, and what reaches its end from later
             chunks
    with D the factors of :class:`_Decays` (the bonus on the diagonal, e^{-max(u,0)} on every
    factor that reaches an output). Within chunks a product with the (L, L) decay matrix; chunk
    to chunk with the (N, N) one; the adjoint uses the transposed matrices and swaps the chunk's
    entry and exit decays.
    """
    C, X, T = z.shape
    N = T // L
    zl = z.view(C, X * N, L)
    within = torch.bmm(zl, d.within if adjoint else d.within.transpose(1, 2)).view(C, X, N, L)
    totals = torch.bmm(d.adjoint_totals if adjoint else d.totals, zl.transpose(1, 2))  # (C, 2, X N)
    total, d_total = totals.view(C, 2, X, N).unbind(1)
    if adjoint:  # from later chunks, at each chunk's end
        carried, decay = torch.bmm(total, d.across), d.totals[:, :1]
    else:  # entering each chunk
        carried, decay = torch.bmm(total, d.across.transpose(1, 2)), d.adjoint_totals[:, :1]
        if z0 is not None:
            carried = torch.addcmul(carried, z0.unsqueeze(2), d.chunk_start)
    within.addcmul_(carried.unsqueeze(3), decay.unsqueeze(1))
    return within.view(C, X, T), total, d_total, carried


class _WkvMatmul(torch.autograd.Function):
    """y = A_t / B_t with (A, B) the decayed sums of (e^{k-m} v, e^{k-m}), the current token
    included with its bonus e^u, and the scaled state z0; work happens channels first, (C, B, T).

    Backward, with p = g / B and q = -p y, and (P, Q) the adjoint sums of (p, q) (the same
    products with the decay matrices transposed): gv = e^{k-m} P, gk = e^{k-m} (v P + Q),
    gu = sum_{b,t} e^u (p, q)_t . (e^{k-m} v, e^{k-m})_t (the diagonal of the product below),
    gw = sum_t (p, q)_t . d(A, B)_t / dw: the same sums with every decay factor replaced by its
    derivative lag e^{lag w}. (The identity gw = gu - sum_i (i + 1) gk_i also holds, but it
    cancels: in fp32 fast-decay channels were off by up to 70x.)
    """

    @staticmethod
    def forward(ctx, w, u, k, v, m, z0, L: int):
        B, T, C = k.shape
        N = -(-T // L)
        kc, vc = k.permute(2, 0, 1), v.permute(2, 0, 1)  # views (C, B, T)
        z = k.new_empty(C, 2, B, N * L)
        if N * L != T:
            z[..., T:] = 0
        ek = torch.sub(kc, m.t().unsqueeze(2), out=z[:, 1, :, :T]).exp_()  # e^{k-m} <= 1
        torch.mul(ek, vc, out=z[:, 0, :, :T])
        d = _decays(w, u, L, N)
        s, total, d_total, enter = _decayed_sums(d, z.view(C, 2 * B, N * L), z0, L, adjoint=False)
        s = s.view(C, 2, B, N * L)[..., :T]
        y = torch.empty_like(k)  # k's memory layout: channels first if k is
        torch.div(s[:, 0], s[:, 1], out=y.permute(2, 0, 1))
        ctx.save_for_backward(v, z, s[:, 1], y, total, d_total, enter, z0, *d)
        ctx.L = L
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        v, z, den, y, total, d_total, enter, z0, *d = ctx.saved_tensors
        d = _Decays(*d)
        L = ctx.L
        C, B, T = den.shape
        N = -(-T // L)
        r = g.new_empty(C, 2, B, N * L)
        if N * L != T:
            r[..., T:] = 0
        p = torch.div(g.permute(2, 0, 1), den, out=r[:, 0, :, :T])
        torch.addcmul(g.new_zeros(()), p, y.permute(2, 0, 1), value=-1, out=r[:, 1, :, :T])
        s, total_r, d_total_r, leave = _decayed_sums(d, r.view(C, 2 * B, N * L), None, L, adjoint=True)
        P, Q = s.view(C, 2, B, N * L)[..., :T].unbind(1)
        ek = z[:, 1, :, :T]
        gv = torch.empty_like(v)
        torch.mul(ek, P, out=gv.permute(2, 0, 1))
        gk = torch.empty_like(v)
        torch.mul(torch.addcmul(Q, v.permute(2, 0, 1), P), ek, out=gk.permute(2, 0, 1))
        rz = torch.bmm(r.view(C, -1, L).transpose(1, 2), z.view(C, -1, L))  # (C, L, L): sum_x r_t z_i
        gu = rz.diagonal(dim1=1, dim2=2).sum(1).mul_(d.within[:, 0, 0])  # the bonus's own derivative
        # gw: every product above again with each decay factor replaced by its derivative in w.
        across = torch.bmm(total_r, d.d_across).mul_(total)
        across.addcmul_(d_total_r, enter).addcmul_(d_total, leave)
        gw = rz.mul_(d.d_within).sum((1, 2)).add_(across.sum((1, 2)))  # within chunks, across them
        g0 = None
        if z0 is not None:
            g0 = (total_r * d.chunk_start).sum(2)
            gw += (z0 * (total_r * d.d_chunk_start).sum(2)).sum(1)
        return gw, gu, gk, gv, None, g0, None


def own_terms_may_underflow(k: Tensor, u: Tensor, state_max: Tensor | None = None) -> bool:
    """Whether :func:`wkv_matmul` cannot take these keys: its one scale per row and channel,
    m = max(max_t k_t, state max), leaves a token's own term e^{u+k-m-max(u,0)} (a lower bound
    of its denominator) below 1e8 times the smallest normal number. Checked from k alone (a
    reduction over k costs a fifth of one over the denominators). Callers then take
    :func:`wkv_chunked`, which scales every term."""
    m = k.amax(1)
    if state_max is not None:
        m = torch.maximum(m, state_max.to(k.dtype))
    own = (k.amin(1) - m) + (u - u.clamp_min(0))
    return bool(own.amin() < math.log(torch.finfo(k.dtype).tiny * 1e8))


def wkv_matmul(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WkvState | None = None, chunk_len: int = 64,
    final_state: bool = True,
):
    """Parallel form as matrix products: one scale per row and channel instead of one per term.

    With m = max_t k_t over the whole sequence (and the state's max), every term
    e^{(t-1-i) w + k_i - m} factors into a decay e^{(t-1-i) w} <= 1 and e^{k_i - m} <= 1, so the
    sums become products of a (C, L, L) decay matrix with the sequence (chunks of ``chunk_len``;
    the current token's bonus e^u on its diagonal; chunk to chunk the same with an (N, N)
    matrix). Every factor also carries e^{-max(u, 0)}, so nothing overflows. A denominator is at
    least its own token's term; where that could leave the normal range (some key more than ~69
    nats below the row's largest) this form cannot serve: callers check
    :func:`own_terms_may_underflow` first and take :func:`wkv_chunked` then. The backward is written out (:class:`_WkvMatmul`). Fastest with k and v stored channels first
    (memory (C, B, T)); the output takes k's layout.
    The final state is exact, as in every form; ``final_state=False`` skips it (None instead).
    """
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    B, T, C = k.shape
    m = k.detach().amax(1)  # (B, C); a scale only, so no gradient
    s = z0 = None
    if state is not None:
        s = _initial(state, k)
        m = torch.maximum(m, s.max.detach())
    if s is not None:
        z0 = (torch.exp(s.max - m) * torch.stack([s.num, s.den])).permute(2, 0, 1).reshape(C, 2 * B)
    with torch.autocast(k.device.type, enabled=False):  # else its products would run in half precision
        out = _WkvMatmul.apply(w, u, k, v, m, z0, min(chunk_len, T))
    return out, _final_state(w, k, v, s if s is not None else _initial(None, k)) if final_state else None


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
