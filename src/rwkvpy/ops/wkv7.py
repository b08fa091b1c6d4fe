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
                    vectors found with the inverse of one unit-lower-triangular matrix per
                    chunk; all chunks at once, then two small products per chunk carry the
                    state (O(L N^2) each, never an N x N by N x N product). Its backward is
                    written out (the same products transposed, in reverse through the chunks,
                    and the inverse's transpose); the log-decays' gradient is sum_x (+-) x dx over the
                    inputs each decay factor scales, then a reverse cumulative sum.

The cumulative decays Gamma_t = prod_{i<=t} w_i appear only as ratios Gamma_t / Gamma_s with
s <= t (<= 1), each computed as exp(c_t - m) exp(m - c_s) with m the log-decay at the middle of
the chunk, so no factor exceeds e^(0.6065 L / 2): fp32 neither overflows nor underflows for
L <= 128. Arithmetic runs in fp64 for fp64 inputs, else in fp32 (never half precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def wkv7_step(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
              S: Tensor | None, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token: tensors (B, H, N), S (B, H, N, N) -> y (B, H, N), new S (``S=None``: zero).

    The matrix-vector products S alpha and S r are broadcast products summed over keys, and the
    update two fused multiply-adds into the new state: as batched products (``matmul``, i.e.
    B H separate 64 x 64 products) the step took 3-4x longer at 8-32 streams and 2x at one.
    ``out`` (no autograd): the new S is written there, e.g. its layer's slice of the next state,
    which then needs no stacking (a copy of the whole state, 17% of a 32-stream step)."""
    write = v.unsqueeze(-1) * k.unsqueeze(-2)
    if S is None:
        S = write if out is None else out.copy_(write)
    else:
        removed = (S * alpha.unsqueeze(-2)).sum(-1, keepdim=True)  # S alpha, (B, H, N, 1)
        S = torch.addcmul(write, S, torch.exp(log_w).unsqueeze(-2), out=out).addcmul_(removed, beta.unsqueeze(-2))
    return (S * r.unsqueeze(-2)).sum(-1), S


def wkv7_recurrent(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                   S: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence token by token (the reference the other forms are tested against)."""
    ys = []
    for t in range(r.shape[1]):
        y, S = wkv7_step(r[:, t], log_w[:, t], k[:, t], v[:, t], alpha[:, t], beta[:, t], S)
        ys.append(y)
    return torch.stack(ys, 1), S


def _into(out: Tensor, op, *args) -> Tensor:
    """``op(*args)`` written into ``out``, a slice of a larger buffer: with ``out=`` in eager (no
    temporary); torch.compile cannot trace ``out=`` into a non-contiguous tensor, so there it is
    a copy into the slice, which inductor fuses with the op."""
    if torch.compiler.is_compiling():
        return out.copy_(op(*args))
    return op(*args, out=out)


def _chunks(x: Tensor, L: int, pad: int) -> Tensor:
    """(B, T, H, N) -> (B, H, n, L, N), zero-padded at the end (a zero step is the identity:
    log_w = 0, k = v = alpha = beta = 0 leave the state as it is)."""
    B, T, H, N = x.shape
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.view(B, (T + pad) // L, L, H, N).permute(0, 3, 1, 2, 4).contiguous()  # one copy, not one per use


def _chunk_terms(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, L: int):
    """Everything about the chunks that does not depend on the state carried in, all chunks at
    once (inputs (B, H, n, L, N)). ``rel`` factors are relative to the chunk's middle m (the
    products they enter cancel m exactly). The true-scale factors (<= 1) are those times one
    factor per chunk and channel: Gamma_{t-1} = rel_prev e^m, Gamma_t = rel e^m and
    Gamma_L / Gamma_s = inv e^(c_L - m), so three exponentials over the chunks, not six."""
    c = torch.cumsum(log_w, dim=-2)  # log Gamma_t, inclusive
    c_prev = c - log_w  # log Gamma_{t-1}
    m = c[..., (L - 1) // 2: (L - 1) // 2 + 1, :]  # reference point inside the chunk
    c_end = c[..., -1:, :]
    e = dict(rel_prev=torch.exp(c_prev - m), rel=torch.exp(c - m), inv=torch.exp(m - c),  # relative to m
             m=torch.exp(m), end=torch.exp(c_end - m))  # (.., 1, N): back to true scale
    B, H, n, _, N = r.shape
    # [a_rel; r_rel] and [b_inv; k_inv], written in place: one product of the two gives the four
    # L x L interactions (Gamma_{t-1} alpha_t or Gamma_t r_t) . (beta_s or k_s) / Gamma_s.
    ar, bk = r.new_empty(B, H, n, 2 * L, N), r.new_empty(B, H, n, 2 * L, N)
    _into(ar[..., :L, :], torch.mul, alpha, e["rel_prev"])  # Gamma_{t-1} alpha_t, relative to m
    _into(ar[..., L:, :], torch.mul, r, e["rel"])  # Gamma_t r_t
    _into(bk[..., :L, :], torch.mul, beta, e["inv"])  # beta_s / Gamma_s
    _into(bk[..., L:, :], torch.mul, k, e["inv"])  # k_s / Gamma_s
    P = ar @ bk.transpose(-1, -2)
    ones = torch.ones(L, L, dtype=torch.bool, device=r.device)
    strict, incl = torch.tril(ones, -1), torch.tril(ones)  # alpha, beta: s < t;  r: s <= t
    P.masked_fill_(~torch.cat([strict.repeat(1, 2), incl.repeat(1, 2)]), 0)
    t = dict(e=e, inputs=(r, alpha, beta, k), v=v, ar=ar, bk=bk, P=P, M=P[..., :L, :L], Mk=P[..., :L, L:], Qb=P[..., L:, :L], Qk=P[..., L:, L:],
             strict=strict, incl=incl,
             b_end=bk[..., :L, :] * e["end"], k_end=bk[..., L:, :] * e["end"],  # Gamma_L / Gamma_s, true scale
             decay_end=e["m"] * e["end"])  # Gamma_L (.., 1, N_k): scales the state's key columns
    # h_t = S_{t-1} alpha_t for every t: H = (I - M)^-1 (a_dec S0^T + Mk V) = W S0^T + U,
    # a_dec = Gamma_{t-1} alpha_t (true scale)
    rhs = r.new_empty(B, H, n, L, 2 * N)
    _into(rhs[..., :N], torch.mul, ar[..., :L, :], e["m"])
    rhs[..., N:] = t["Mk"] @ v  # (a product's out= into these strided columns ran 3x slower)
    # (I - M)^-1 from a solve against I, then one product: a solve against [a_dec, Mk V] (L x 2N)
    # took twice as long (LAPACK's right-hand sides go column-major: two strided copies), and
    # the backward reuses the inverse where it would solve again.
    eye = torch.eye(L, dtype=r.dtype, device=r.device).expand_as(t["M"])
    t["inv"] = torch.linalg.solve_triangular(eye - t["M"], eye, upper=False, unitriangular=True)
    t["WU"] = WU = t["inv"] @ rhs
    t["W"], t["U"] = WU[..., :N], WU[..., N:]
    # y = E S0^T + Fy, E = Gamma_t r_t + Qb W;  S_end = S0 diag(Gamma_L) + H^T b_end + V^T k_end
    t["EW"] = EW = r.new_empty(B, H, n, 2 * L, N)  # one product with S per chunk gives y and H
    t["E"] = _into(EW[..., :L, :], torch.addcmul, t["Qb"] @ t["W"], ar[..., L:, :], e["m"])
    EW[..., L:, :] = t["W"]
    t["Fy"] = t["Qb"] @ t["U"] + t["Qk"] @ v
    t["J"] = v.transpose(-1, -2) @ t["k_end"]  # (B, H, n, N_v, N_k)
    return t


def _carry(t: dict, S: Tensor | None) -> tuple[Tensor, Tensor, list, list]:
    """The state through the chunks one after another (``S=None``: zero, and no products with
    it): y (B, H, n, L, N), the last state, and each chunk's incoming state and h (kept for the
    backward)."""
    L, EW, U = t["E"].shape[-2], t["EW"], t["U"]
    y = t["Fy"]  # made for this call: the state's part is added in place
    states, hs = [], []
    for i in range(EW.shape[2]):
        states.append(S)
        if S is None:
            h = U[:, :, i]
            S = h.transpose(-1, -2) @ t["b_end"][:, :, i] + t["J"][:, :, i]
        else:
            yh = EW[:, :, i] @ S.transpose(-1, -2)  # (B, H, 2L, N_v)
            y[:, :, i] += yh[..., :L, :]
            h = yh[..., L:, :] + U[:, :, i]  # h_t = S_{t-1} alpha_t, (B, H, L, N_v)
            S = S * t["decay_end"][:, :, i] + h.transpose(-1, -2) @ t["b_end"][:, :, i] + t["J"][:, :, i]
        hs.append(h)
    return y, S, states, hs


def _unchunk(y: Tensor, T: int) -> Tensor:
    B, H, n, L, N = y.shape
    return y.permute(0, 2, 3, 1, 4).reshape(B, n * L, H, N)[:, :T]


class _WKV7Chunked(torch.autograd.Function):
    """The chunked form with its backward written out (the same products, transposed, and one
    product with the inverse's transpose), instead of autograd's graph of ~40 small ops per chunk."""

    @staticmethod
    def forward(ctx, r, log_w, k, v, alpha, beta, S, L):
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None, and is skipped
        B, T, H, N = r.shape
        pad = -T % L
        t = _chunk_terms(*(_chunks(x, L, pad) for x in (r, log_w, k, v, alpha, beta)), L)
        y, S_end, ctx.states, ctx.hs = _carry(t, S)
        ctx.T, ctx.t = T, t
        return _unchunk(y, T), S_end

    @staticmethod
    def backward(ctx, dy, dS):
        t, T, states, hs = ctx.t, ctx.T, ctx.states, ctx.hs
        B, H, n, L, N = t["v"].shape
        dy = _chunks(dy, L, n * L - T) if dy is not None else t["v"].new_zeros(B, H, n, L, N)
        # The carry, backwards: S_{i+1} = S_i diag(D_i) + h_i^T b_end_i + J_i, h_i = W_i S_i^T + U_i,
        # y_i = E_i S_i^T + Fy_i. Per chunk, written in place: [dy; dh] (2L, N_v), [dE; dW] (2L, N_k),
        # dJ, d b_end, dD. A zero state in (None) has no products; an unused state out has dS None.
        EW = t["EW"]
        dyh, dEW = dy.new_empty(B, H, n, 2 * L, N), dy.new_empty(B, H, n, 2 * L, N)
        dyh[..., :L, :] = dy
        dJ, db_end, dD = dy.new_empty(B, H, n, N, N), dy.new_empty(B, H, n, L, N), dy.new_empty(B, H, n, 1, N)
        for i in reversed(range(n)):
            S_i = states[i]
            if dS is None:
                for buf in (dJ, db_end, dD, dyh[..., L:, :]):
                    buf[:, :, i] = 0
            else:
                dJ[:, :, i] = dS
                dyh[:, :, i, L:] = t["b_end"][:, :, i] @ dS.transpose(-1, -2)  # dh
                db_end[:, :, i] = hs[i] @ dS
                if S_i is None:
                    dD[:, :, i] = 0
                else:
                    _into(dD[:, :, i], torch.sum, dS * S_i, -2, True)
            if S_i is None:
                dEW[:, :, i] = 0
                dS = None
                continue
            dEW[:, :, i] = dyh[:, :, i] @ S_i
            dS_prev = dyh[:, :, i].transpose(-1, -2) @ EW[:, :, i]
            dS = dS_prev if dS is None else dS * t["decay_end"][:, :, i] + dS_prev
        dE, dU = dEW[..., :L, :], dyh[..., L:, :]
        v, W, U, Qb, Qk, Mk = t["v"], t["W"], t["U"], t["Qb"], t["Qk"], t["Mk"]
        # J = V^T k_end
        dv = t["k_end"] @ dJ.transpose(-1, -2)
        dk_end = v @ dJ
        # Fy = Qb U + Qk V;  E = r_dec + Qb W
        dQb = dy @ U.transpose(-1, -2) + dE @ W.transpose(-1, -2)
        dWU = dy.new_empty(B, H, n, L, 2 * N)
        _into(dWU[..., :N], torch.add, dEW[..., L:, :], Qb.transpose(-1, -2) @ dE)
        _into(dWU[..., N:], torch.add, dU, Qb.transpose(-1, -2) @ dy)
        dQk = dy @ v.transpose(-1, -2)
        dv = dv + Qk.transpose(-1, -2) @ dy
        # [W, U] = (I - M)^-1 [a_dec, Mk V]
        G = t["inv"].transpose(-1, -2) @ dWU
        da_dec, dMkV = G[..., :N], G[..., N:]
        zero = v.new_zeros(())
        dP = torch.empty_like(t["P"])  # [dM, dMk; dQb, dQk], the blocks written in place
        _into(dP[..., :L, :L], torch.where, t["strict"], G @ t["WU"].transpose(-1, -2), zero)
        _into(dP[..., :L, L:], torch.where, t["strict"], dMkV @ v.transpose(-1, -2), zero)
        _into(dP[..., L:, :L], torch.where, t["incl"], dQb, zero)
        _into(dP[..., L:, L:], torch.where, t["incl"], dQk, zero)
        dv = dv + Mk.transpose(-1, -2) @ dMkV
        # [M, Mk; Qb, Qk] = [a_rel; r_rel] [b_inv; k_inv]^T
        d_ar = dP @ t["bk"]
        d_bk = dP.transpose(-1, -2) @ t["ar"]
        da_rel, dr_rel = d_ar[..., :L, :], d_ar[..., L:, :]
        db_inv, dk_inv = d_bk[..., :L, :], d_bk[..., L:, :]
        # back to the inputs through the decay factors. Each input x enters as x e^(+-c...), so
        # the log-decays' gradient is x dx summed with signs (m cancels: no gradient).
        e, (r, alpha, beta, k) = t["e"], t["inputs"]
        dalpha = torch.addcmul(da_rel, da_dec, e["m"]).mul_(e["rel_prev"])
        dr = torch.addcmul(dr_rel, dE, e["m"]).mul_(e["rel"])
        dbeta = torch.addcmul(db_inv, db_end, e["end"]).mul_(e["inv"])
        dk = torch.addcmul(dk_inv, dk_end, e["end"]).mul_(e["inv"])
        dc_prev = alpha * dalpha  # through c_prev = c - log_w
        dc = torch.addcmul(dc_prev, r, dr).addcmul_(beta, dbeta, value=-1).addcmul_(k, dk, value=-1)
        dc[..., -1:, :] += (db_end * t["b_end"] + dk_end * t["k_end"]).sum(-2, keepdim=True) + dD * t["decay_end"]
        dlog_w = torch.flip(torch.cumsum(torch.flip(dc, [-2]), -2), [-2]) - dc_prev  # c = cumsum(log_w)
        grads = (_unchunk(x, T) for x in (dr, dlog_w, dk, dv, dalpha, dbeta))
        return (*grads, dS, None)


def wkv7_chunked(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                 S: Tensor | None, chunk_len: int = 32) -> tuple[Tensor, Tensor]:
    """The parallel form: chunks of ``chunk_len`` tokens (any T; the last chunk is padded with
    identity steps; ``S=None``: a zero state). Differentiable, with a written-out backward
    (an unused state out costs no backward products). Half-precision inputs (bf16
    autocast training) are widened: the arithmetic and y and S come out in fp32."""
    B, T, H, N = r.shape
    L = max(1, min(chunk_len, T))
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    x = [t.to(dtype) for t in (r, log_w, k, v, alpha, beta)] + [None if S is None else S.to(dtype)]
    with torch.autocast(r.device.type, enabled=False):  # else its products would run in half precision
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in x):
            return _WKV7Chunked.apply(*x, L)
        t = _chunk_terms(*(_chunks(t, L, -T % L) for t in x[:-1]), L)
        y, S, _, _ = _carry(t, x[-1])
        return _unchunk(y, T), S
