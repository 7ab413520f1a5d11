"""Patch-prototype cosine similarity and nearest-prototype search, in torch and as Triton kernels.

``patch_prototype_similarity(x [N, D], prototypes [K, D])`` -> cosine scores [N, K], optionally
softmax(scores / temperature) over K, fused: the kernel scales each dot-product tile by the inverse row
norms (two small vectors computed first), so no normalised copy of either operand is ever written.
Differentiable: the backward recomputes the torch reference under autograd (cheap next to a ViT's backward).

``nearest_prototype(x, prototypes)`` -> (index [N] int64, score [N]): the argmax over K, streamed over
tiles of K inside each program, so the N x K matrix never exists. Ties go to the lowest index, as in
``torch.argmax``. k-means assignment and segmentation call it at N above one million.

On a GPU, fp32 operands go through ``tl.dot`` in TF32 (about 1e-3 relative error on the scores, like
torch with ``allow_tf32``); bf16/fp16 operands stay in their type; accumulation is always fp32.
"""
# No `from __future__ import annotations` in kernel files: the interpreter of Triton 3.0 and 3.1 knows a
# tl.constexpr parameter only by its evaluated annotation, and a string "tl.constexpr" is not one.
import functools

import torch
import torch.nn.functional as F

from ..errors import LeopartError
from .backend import LAUNCH_OPTIONS, interpreting, on_input_device, resolve

NORM_EPS = 1e-12  # as F.normalize


def _check(x: torch.Tensor, prototypes: torch.Tensor):
    if x.ndim != 2 or prototypes.ndim != 2 or x.shape[1] != prototypes.shape[1]:
        raise LeopartError(f"expected x [N, D] and prototypes [K, D], got {tuple(x.shape)} and "
                           f"{tuple(prototypes.shape)}")
    if prototypes.shape[0] == 0:
        raise LeopartError("need at least one prototype")


# --------------------------------------------------------------------- torch
def similarity_torch(x: torch.Tensor, prototypes: torch.Tensor, normalize: bool = True,
                     temperature: float | None = None) -> torch.Tensor:
    """Reference: (normalised) x @ prototypes^T in fp32, optional softmax(scores / temperature)."""
    x, p = x.float(), prototypes.float()
    if normalize:
        x, p = F.normalize(x, dim=1, eps=NORM_EPS), F.normalize(p, dim=1, eps=NORM_EPS)
    scores = x @ p.T
    return scores if temperature is None else torch.softmax(scores / temperature, dim=1)


def chunk_rows(device: torch.device) -> int:
    """Rows per chunk for work streamed over N x K scores. On the CPU a few MB of temporaries per chunk: fresh
    allocations of hundreds of MB are page-faulted in anew each time (glibc maps them from the kernel), which
    took 2.4 s of a 4.5 s k-means assignment of 1.1M x 384 features to 500 centroids in chunks of 65,536 rows;
    in chunks of 2,048 it takes 2.4 s in all. On a GPU big chunks keep kernel launches few."""
    return 2048 if device.type == "cpu" else 65536


def nearest_torch(x: torch.Tensor, prototypes: torch.Tensor, normalize: bool = True,
                  chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference / CPU path: matmul then argmax, in chunks of rows to bound memory (``chunk_rows`` by default)."""
    chunk = chunk or chunk_rows(x.device)
    p = prototypes.float()
    if normalize:
        p = F.normalize(p, dim=1, eps=NORM_EPS)
    index = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    score = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk].float()
        s = xs @ p.T
        best, idx = s.max(dim=1)
        if normalize:
            best = best / xs.norm(dim=1).clamp_min(NORM_EPS)
        index[start:start + chunk], score[start:start + chunk] = idx, best
    return index, score


# -------------------------------------------------------------------- triton
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _configs(interpret: bool):
    if interpret:  # large tiles: few interpreted steps; no benchmarking in the interpreter
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 128}, num_warps=4)]
    # The autotuner measures them all. The last two are the ones that compile without register spills for
    # all three kernels in fp32 and bf16 on sm_90 (`python -m leopart.kernels.compile_check`); the others
    # spill, the softmax kernel most (up to 9 KB per thread at 128 x 64 x 64).
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bn, bk, bd, w, s in [(128, 64, 64, 4, 3), (64, 64, 64, 4, 3), (128, 128, 32, 8, 3),
                                 (64, 128, 64, 4, 3), (32, 64, 128, 4, 2), (64, 128, 32, 8, 3), (64, 64, 64, 8, 3)]
    ]


if triton is not None:

    @triton.jit
    def _cosine_tile(x_ptr, p_ptr, inv_x, inv_p_ptr, rows, cols, N, K, D, sxn, sxd, spk, spd,
                     NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Scores [BLOCK_N, BLOCK_K] of rows x cols, fp32; -inf in columns past K. ``rows`` are int64
        (N * D can pass 2**31); ``inv_x`` [BLOCK_N] holds the rows' inverse norms when NORMALIZE."""
        offs_d = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            xt = tl.load(x_ptr + rows[:, None] * sxn + d[None, :] * sxd,
                         mask=(rows[:, None] < N) & (d[None, :] < D), other=0.0)
            pt = tl.load(p_ptr + cols[:, None] * spk + d[None, :] * spd,
                         mask=(cols[:, None] < K) & (d[None, :] < D), other=0.0)
            if UPCAST:  # the interpreter multiplies bf16/fp16 tl.dot operands as raw bits: give it fp32
                acc = tl.dot(xt.to(tl.float32), tl.trans(pt.to(tl.float32)), acc)
            else:
                acc = tl.dot(xt, tl.trans(pt), acc)
        if NORMALIZE:
            inv_p = tl.load(inv_p_ptr + cols, mask=cols < K, other=0.0)
            acc = acc * inv_x[:, None] * inv_p[None, :]
        return tl.where(cols[None, :] < K, acc, -float("inf"))

    @triton.jit
    def _row_scale(inv_x_ptr, rows, N, NORMALIZE: tl.constexpr):
        if NORMALIZE:
            return tl.load(inv_x_ptr + rows, mask=rows < N, other=0.0)
        return tl.full(rows.shape, 1.0, tl.float32)

    def _scores_kernel(x_ptr, p_ptr, inv_x_ptr, inv_p_ptr, out_ptr, N, K, D, sxn, sxd, spk, spd,
                       NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        inv_x = _row_scale(inv_x_ptr, rows, N, NORMALIZE)
        s = _cosine_tile(x_ptr, p_ptr, inv_x, inv_p_ptr, rows, cols, N, K, D, sxn, sxd, spk, spd,
                         NORMALIZE, UPCAST, BLOCK_N, BLOCK_K, BLOCK_D)
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], s, mask=(rows[:, None] < N) & (cols[None, :] < K))

    def _softmax_kernel(x_ptr, p_ptr, inv_x_ptr, inv_p_ptr, out_ptr, N, K, D, sxn, sxd, spk, spd, inv_temp,
                        NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Row softmax over all K: pass 1 streams the row max and sum, pass 2 recomputes and writes."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        inv_x = _row_scale(inv_x_ptr, rows, N, NORMALIZE)
        m = tl.full([BLOCK_N], -float("inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            t = _cosine_tile(x_ptr, p_ptr, inv_x, inv_p_ptr, rows, cols, N, K, D, sxn, sxd, spk, spd,
                             NORMALIZE, UPCAST, BLOCK_N, BLOCK_K, BLOCK_D) * inv_temp
            m_new = tl.maximum(m, tl.max(t, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(t - m_new[:, None]), axis=1)
            m = m_new
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            t = _cosine_tile(x_ptr, p_ptr, inv_x, inv_p_ptr, rows, cols, N, K, D, sxn, sxd, spk, spd,
                             NORMALIZE, UPCAST, BLOCK_N, BLOCK_K, BLOCK_D) * inv_temp
            out = tl.exp(t - m[:, None]) / s[:, None]
            tl.store(out_ptr + rows[:, None] * K + cols[None, :], out, mask=(rows[:, None] < N) & (cols[None, :] < K))

    def _nearest_kernel(x_ptr, p_ptr, inv_x_ptr, inv_p_ptr, idx_ptr, score_ptr, N, K, D, sxn, sxd, spk, spd,
                        NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        inv_x = _row_scale(inv_x_ptr, rows, N, NORMALIZE)
        best = tl.full([BLOCK_N], -float("inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_N], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            t = _cosine_tile(x_ptr, p_ptr, inv_x, inv_p_ptr, rows, cols, N, K, D, sxn, sxd, spk, spd,
                             NORMALIZE, UPCAST, BLOCK_N, BLOCK_K, BLOCK_D)
            tile_best = tl.max(t, axis=1)
            tile_idx = tl.argmax(t, axis=1) + k0  # first maximum within the tile
            better = tile_best > best             # strict: an earlier tile keeps a tie
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, tile_idx, best_idx)
        mask = rows < N
        tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=mask)
        tl.store(score_ptr + rows, best, mask=mask)

    _scores_kernel = triton.jit(_scores_kernel)
    _softmax_kernel = triton.jit(_softmax_kernel)
    _nearest_kernel = triton.jit(_nearest_kernel)


@functools.lru_cache(maxsize=None)
def _autotuned(kernel):
    """``kernel`` under triton.autotune, built at its first launch rather than at import: the autotuner of
    Triton 3.2-3.3 looks up the GPU driver when it is built, which fails on a machine without a GPU."""
    return triton.autotune(_configs(interpret=False), key=["N", "K", "D", "NORMALIZE"])(kernel)


def _launch(kernel, grid, *args, **constants):
    """Autotuned on a GPU; in the interpreter, one fixed config and no benchmarking."""
    if interpreting():
        (config,) = _configs(interpret=True)
        kernel[grid](*args, **constants, **config.kwargs, num_warps=config.num_warps, **LAUNCH_OPTIONS)
    else:
        _autotuned(kernel)[grid](*args, **constants, **LAUNCH_OPTIONS)


def _operands(x: torch.Tensor, prototypes: torch.Tensor, normalize: bool):
    """tl.dot needs both operands in one type: bf16/fp16 stay, anything else runs in fp32. Also returns
    the fp32 inverse row norms of both (placeholders when not normalising)."""
    dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    x, p = x.to(dtype), prototypes.to(device=x.device, dtype=dtype)
    if not normalize:
        return x, p, x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    inv = [1.0 / torch.linalg.vector_norm(t, dim=1, dtype=torch.float32).clamp_min(NORM_EPS) for t in (x, p)]
    return x, p, inv[0], inv[1]


@on_input_device
def similarity_triton(x: torch.Tensor, prototypes: torch.Tensor, normalize: bool = True,
                      temperature: float | None = None) -> torch.Tensor:
    x, p, inv_x, inv_p = _operands(x, prototypes, normalize)
    n, d = x.shape
    k = p.shape[0]
    out = torch.empty((n, k), device=x.device, dtype=torch.float32)
    args = (x, p, inv_x, inv_p, out, n, k, d, x.stride(0), x.stride(1), p.stride(0), p.stride(1))
    if temperature is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
        _launch(_scores_kernel, grid, *args, NORMALIZE=normalize, UPCAST=interpreting())
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _launch(_softmax_kernel, grid, *args, 1.0 / temperature, NORMALIZE=normalize, UPCAST=interpreting())
    return out


@on_input_device
def nearest_triton(x: torch.Tensor, prototypes: torch.Tensor, normalize: bool = True):
    x, p, inv_x, inv_p = _operands(x, prototypes, normalize)
    n, d = x.shape
    k = p.shape[0]
    index = torch.empty(n, device=x.device, dtype=torch.int64)
    score = torch.empty(n, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _launch(_nearest_kernel, grid, x, p, inv_x, inv_p, index, score, n, k, d, x.stride(0), x.stride(1),
            p.stride(0), p.stride(1), NORMALIZE=normalize, UPCAST=interpreting())
    return index, score


class _TritonSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, prototypes, normalize, temperature):
        ctx.save_for_backward(x, prototypes)
        ctx.normalize, ctx.temperature = normalize, temperature
        return similarity_triton(x, prototypes, normalize, temperature)

    @staticmethod
    def backward(ctx, grad_out):
        x, prototypes = ctx.saved_tensors
        with torch.enable_grad():
            xr = x.detach().requires_grad_(ctx.needs_input_grad[0])
            pr = prototypes.detach().requires_grad_(ctx.needs_input_grad[1])
            y = similarity_torch(xr, pr, ctx.normalize, ctx.temperature)
            wrt = [t for t in (xr, pr) if t.requires_grad]
            grads = iter(torch.autograd.grad(y, wrt, grad_out))
        return (next(grads) if ctx.needs_input_grad[0] else None,
                next(grads) if ctx.needs_input_grad[1] else None, None, None)


# ----------------------------------------------------------------- public API
def patch_prototype_similarity(x: torch.Tensor, prototypes: torch.Tensor, normalize: bool = True,
                               temperature: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Cosine (or, with normalize=False, dot-product) scores [N, K] in fp32; with ``temperature``,
    softmax(scores / temperature) over K instead."""
    _check(x, prototypes)
    if temperature is not None and temperature <= 0:
        raise LeopartError("temperature must be > 0")
    if resolve(backend, x, prototypes) == "triton" and x.shape[0] > 0:
        return _TritonSimilarity.apply(x, prototypes, normalize, temperature)
    return similarity_torch(x, prototypes, normalize, temperature)


def nearest_prototype(x: torch.Tensor, prototypes: torch.Tensor, normalize: bool = True,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(index int64 [N], score fp32 [N]) of each row's most similar prototype, never forming N x K."""
    _check(x, prototypes)
    with torch.no_grad():
        if resolve(backend, x, prototypes) == "triton" and x.shape[0] > 0:
            return nearest_triton(x, prototypes, normalize)
        return nearest_torch(x, prototypes, normalize)
