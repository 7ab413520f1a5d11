"""Sinkhorn-Knopp with SwAV semantics, in torch and as a fused Triton kernel.

SwAV's algorithm on scores S [N, K] (N samples, K prototypes):

    Q = exp(S / eps)^T; Q /= Q.sum()
    repeat n_iters: Q /= Q.sum(1) * K  (each prototype gets mass 1/K)
                    Q /= Q.sum(0) * N  (each sample gets mass 1/N)
    return (Q * N)^T                   (each row a distribution over prototypes)

Both implementations here compute exactly that, but in the log domain with scaling vectors instead of
rescaling the matrix: Q_nk = exp(S_nk/eps + a_k + b_n), where the prototype step sets
a_k = -log K - logsumexp_n(S_nk/eps + b_n) and the sample step b_n = -log N - logsumexp_k(S_nk/eps + a_k).
The total-mass normalisation is a constant that the first prototype step removes, so it is skipped.
Every logsumexp is max-shifted, so scores/eps of 1e3 (and more) neither overflow nor underflow to all-zero
rows, and bf16/fp16 inputs are accumulated in fp32.

The Triton version reads the N x K matrix once per iteration: one pass per block of rows computes the new
b for those rows (the sample step) and, in the same pass, the per-prototype partial logsumexps for the
next a (the prototype step), which a tiny kernel combines. The last pass writes the output instead.
Reads: 1 + n_iters passes over S, one write of the output; no N x K temporaries besides the output.
With ``distributed=True`` the per-prototype partials and N are all-reduced, so every process gets the rows
of single-process Sinkhorn on the concatenated batch.

How it is launched (rows per tile, one or two tiles per row, warps, persistent programs) is a ``Launch``. On a
GPU, calls of 1M scores and more use the fastest of a few candidates, timed as whole calls at the first call of
each shape (``choose_launch``); smaller calls, and the interpreter, use a fixed choice.
"""
# No `from __future__ import annotations` in kernel files: the interpreter of Triton 3.0 and 3.1 knows a
# tl.constexpr parameter only by its evaluated annotation, and a string "tl.constexpr" is not one.
import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ..errors import LeopartError
from .backend import (
    LAUNCH_OPTIONS,
    interpreting,
    next_pow2,
    on_input_device,
    resolve,
)


def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3, backend: str = "auto",
             distributed: bool = False) -> torch.Tensor:
    """SwAV Sinkhorn-Knopp: scores [N, K] -> float32 assignments [N, K], each row summing to 1."""
    if scores.ndim != 2:
        raise LeopartError(f"sinkhorn expects scores [N, K], got shape {tuple(scores.shape)}")
    if n_iters < 1:
        raise LeopartError("sinkhorn needs n_iters >= 1")
    if epsilon <= 0:
        raise LeopartError("sinkhorn needs epsilon > 0")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise LeopartError("distributed=True needs an initialised torch.distributed process group")
    if resolve(backend, scores) == "triton":
        return sinkhorn_triton(scores, epsilon, n_iters, distributed)
    return sinkhorn_torch(scores, epsilon, n_iters, distributed)


# --------------------------------------------------------------------- torch
def _global_count(n: int, device, distributed: bool) -> int:
    if not distributed:
        return n
    t = torch.tensor([n], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def _combine_across_processes(col_max: torch.Tensor, col_sum: torch.Tensor, distributed: bool) -> torch.Tensor:
    """logsumexp per column from (max, sum of exp(v - max)) partials, all-reduced when distributed."""
    if distributed:
        global_max = col_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX)
        safe = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
        col_sum = col_sum * torch.exp(col_max - safe)
        dist.all_reduce(col_sum)
        col_max = safe
    return col_max + torch.log(col_sum)


def sinkhorn_torch(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3,
                   distributed: bool = False) -> torch.Tensor:
    """Plain-torch reference (and CPU path): log-domain SwAV Sinkhorn, fp32."""
    x = scores.float() / epsilon
    n_local, k = x.shape
    n_total = _global_count(n_local, x.device, distributed)
    b = torch.zeros(n_local, device=x.device)
    for _ in range(n_iters):
        v = x + b[:, None]
        col_max = v.amax(dim=0) if n_local else torch.full((k,), -math.inf, device=x.device)
        safe = torch.where(torch.isfinite(col_max), col_max, torch.zeros_like(col_max))
        col_sum = torch.exp(v - safe).sum(dim=0)
        a = -math.log(k) - _combine_across_processes(safe, col_sum, distributed)
        b = -math.log(n_total) - torch.logsumexp(x + a[None, :], dim=1)
    return torch.exp(x + a[None, :] + b[:, None] + math.log(n_total))


# -------------------------------------------------------------------- triton
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (macOS): the torch path serves everything
    triton = None

if triton is not None:

    @triton.jit
    def _merge(m, s, m2, s2):
        # Merge two (max, sum of exp(v - max)) pairs; -inf maxima (no data yet) are handled.
        m_new = tl.maximum(m, m2)
        safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        return m_new, s * tl.exp(m - safe) + s2 * tl.exp(m2 - safe)

    @triton.jit
    def _row_pass(x_ptr, stride_n, stride_k, a_ptr, b_ptr, out_ptr, pm_ptr, ps_ptr,
                 N, K, inv_eps, log_n,
                 UPDATE_B: tl.constexpr, WRITE_OUT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_TILE: tl.constexpr):
        """For each block of rows: [sample step, if UPDATE_B] b = -log N - lse_k(x + a), else b = 0 (the
        first pass, before any sample step); then either write the output exp(x + a + b + log N), or fold
        lse_n(x + b) into this program's per-column partials. WRITE_OUT passes are sample-step passes."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        offs_n = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Single tile: this program's column partials live in registers over its rows, stored once at the end.
        acc_m = tl.full([BLOCK_K], -float("inf"), tl.float32)
        acc_s = tl.zeros([BLOCK_K], tl.float32)
        for row0 in range(pid * BLOCK_N, N, nprog * BLOCK_N):
            rows = row0 + offs_n
            rmask = rows < N
            rows = rows.to(tl.int64)  # N * K can pass 2**31
            if SINGLE_TILE:
                # The whole row fits in one tile: load it once for both steps.
                cmask = offs_k < K
                mask = rmask[:, None] & cmask[None, :]
                x = tl.load(x_ptr + rows[:, None] * stride_n + offs_k[None, :] * stride_k, mask=mask, other=0.0)
                x = tl.where(mask, x.to(tl.float32) * inv_eps, -float("inf"))
                if UPDATE_B:
                    a = tl.load(a_ptr + offs_k, mask=cmask, other=0.0)
                    t = x + a[None, :]
                    m = tl.max(t, axis=1)
                    m_safe = tl.where(m == -float("inf"), 0.0, m)
                    # A non-empty max-shifted sum is >= 1: the clamp only touches masked (empty) lanes.
                    lse = m_safe + tl.log(tl.maximum(tl.sum(tl.exp(t - m_safe[:, None]), axis=1), 1.0))
                    b = -log_n - lse
                    tl.store(b_ptr + rows, b, mask=rmask)
                else:
                    b = tl.zeros([BLOCK_N], tl.float32)
                if WRITE_OUT:  # a: loaded by the sample step above
                    out = tl.exp(x + a[None, :] + b[:, None] + log_n)
                    tl.store(out_ptr + rows[:, None] * K + offs_k[None, :], out, mask=mask)
                else:
                    v = tl.where(mask, x + b[:, None], -float("inf"))
                    cm = tl.max(v, axis=0)
                    cm_safe = tl.where(cm == -float("inf"), 0.0, cm)
                    cs = tl.sum(tl.exp(v - cm_safe[None, :]), axis=0)
                    acc_m, acc_s = _merge(acc_m, acc_s, cm, cs)
            else:
                if UPDATE_B:
                    m = tl.full([BLOCK_N], -float("inf"), tl.float32)
                    s = tl.zeros([BLOCK_N], tl.float32)
                    for k0 in range(0, K, BLOCK_K):
                        cols = k0 + offs_k
                        cmask = cols < K
                        mask = rmask[:, None] & cmask[None, :]
                        x = tl.load(x_ptr + rows[:, None] * stride_n + cols[None, :] * stride_k, mask=mask, other=0.0)
                        a = tl.load(a_ptr + cols, mask=cmask, other=0.0)
                        t = tl.where(mask, x.to(tl.float32) * inv_eps + a[None, :], -float("inf"))
                        tm = tl.max(t, axis=1)
                        tm_safe = tl.where(tm == -float("inf"), 0.0, tm)
                        m, s = _merge(m, s, tm, tl.sum(tl.exp(t - tm_safe[:, None]), axis=1))
                    m_safe = tl.where(m == -float("inf"), 0.0, m)
                    b = -log_n - (m_safe + tl.log(tl.maximum(s, 1.0)))
                    tl.store(b_ptr + rows, b, mask=rmask)
                else:
                    b = tl.zeros([BLOCK_N], tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    cols = k0 + offs_k
                    cmask = cols < K
                    mask = rmask[:, None] & cmask[None, :]
                    x = tl.load(x_ptr + rows[:, None] * stride_n + cols[None, :] * stride_k, mask=mask, other=0.0)
                    x = x.to(tl.float32) * inv_eps
                    if WRITE_OUT:
                        a = tl.load(a_ptr + cols, mask=cmask, other=0.0)
                        out = tl.exp(x + a[None, :] + b[:, None] + log_n)
                        tl.store(out_ptr + rows[:, None] * K + cols[None, :], out, mask=mask)
                    else:
                        v = tl.where(mask, x + b[:, None], -float("inf"))
                        cm = tl.max(v, axis=0)
                        cm_safe = tl.where(cm == -float("inf"), 0.0, cm)
                        cs = tl.sum(tl.exp(v - cm_safe[None, :]), axis=0)
                        # Read-modify-write of this program's partials: the barrier makes the previous
                        # row block's stores (possibly by other threads of this program) visible.
                        tl.debug_barrier()
                        pm = tl.load(pm_ptr + pid * K + cols, mask=cmask, other=-float("inf"))
                        ps = tl.load(ps_ptr + pid * K + cols, mask=cmask, other=0.0)
                        pm, ps = _merge(pm, ps, cm, cs)
                        tl.store(pm_ptr + pid * K + cols, pm, mask=cmask)
                        tl.store(ps_ptr + pid * K + cols, ps, mask=cmask)
        if SINGLE_TILE and not WRITE_OUT:
            cmask = offs_k < K
            tl.store(pm_ptr + pid * K + offs_k, acc_m, mask=cmask)
            tl.store(ps_ptr + pid * K + offs_k, acc_s, mask=cmask)

    @triton.jit
    def _combine(pm_ptr, ps_ptr, out_m_ptr, out_s_ptr, a_ptr, P, K, log_k,
                FINAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
        """Reduce the [P, K] partials per column, BLOCK_P partial rows per step (P is a few hundred on a
        GPU: one row per step would be a long serial chain of loads and merges). FINAL: write a = -log K - lse;
        otherwise write (max, sum) for an all-reduce across processes."""
        cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        cmask = cols < K
        offs_p = tl.arange(0, BLOCK_P)
        m = tl.full([BLOCK_K], -float("inf"), tl.float32)
        s = tl.zeros([BLOCK_K], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            prow = p0 + offs_p
            mask = (prow < P)[:, None] & cmask[None, :]
            offsets = prow[:, None] * K + cols[None, :]
            pm = tl.load(pm_ptr + offsets, mask=mask, other=-float("inf"))
            ps = tl.load(ps_ptr + offsets, mask=mask, other=0.0)
            tm = tl.max(pm, axis=0)
            tm_safe = tl.where(tm == -float("inf"), 0.0, tm)
            m, s = _merge(m, s, tm, tl.sum(ps * tl.exp(pm - tm_safe[None, :]), axis=0))
        m_safe = tl.where(m == -float("inf"), 0.0, m)
        if FINAL:
            tl.store(a_ptr + cols, -log_k - (m_safe + tl.log(tl.maximum(s, 1.0))), mask=cmask)
        else:
            tl.store(out_m_ptr + cols, m_safe, mask=cmask)
            tl.store(out_s_ptr + cols, s, mask=cmask)


# The combine reduces [programs, K] partials in tiles of 64 partial rows x 32 columns (128-byte row segments).
COMBINE_BLOCK_P, COMBINE_BLOCK_K = 64, 32


# ---------------------------------------------------------------- launching
@dataclass(frozen=True)
class Launch:
    """How the Triton Sinkhorn runs: tiles of block_n rows x block_k columns (single_tile: the whole row in one
    tile, read once per pass; else the sample-step passes read each row block twice), num_warps per program, and
    as many persistent programs as programs_per_sm per SM allow."""
    block_n: int
    block_k: int
    single_tile: bool
    num_warps: int = 4
    programs_per_sm: int = 4

    def programs(self, n: int, device: torch.device) -> int:
        """As few persistent programs as give the same number of row blocks per program (fewer partials to
        combine). The interpreter counts as two SMs: a handful of programs, each looping over many blocks."""
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
        row_blocks = max(1, -(-n // self.block_n))
        blocks_per_program = -(-row_blocks // (self.programs_per_sm * sms))
        return -(-row_blocks // blocks_per_program)


def gpu_launch(k: int) -> Launch:
    """The untuned choice on a GPU. Memory-bound: tiles of ~8K elements; one tile per row while K <= 1024 (measured
    on an H200: one 4096-wide tile of 2 rows at 4 warps was slower at K = 3000, as it spills)."""
    block_k = max(next_pow2(k), 16)
    if block_k <= 1024:
        return Launch(max(1, min(64, 8192 // block_k)), block_k, True)
    return Launch(16, 512, False)


def default_launch(k: int) -> Launch:
    if interpreting():
        return Launch(64, min(next_pow2(k), 1024), k <= 1024)  # big tiles: fewer interpreted steps
    return gpu_launch(k)


def launch_candidates(k: int) -> list[Launch]:
    """What the tuner times on a GPU, gpu_launch(k) first. Register pressure decides: at K = 300 the 16 x 512 tile
    takes ~200 registers per thread in its sample-step passes (2-3 programs per SM), 4 x 512 ~80; where K > 1024
    one tile per row reads each row block once, and compiles without spills at 8-16 warps (sm_90, ptxas)."""
    first = gpu_launch(k)
    if first.single_tile:
        smaller = [Launch(max(1, first.block_n // d), first.block_k, True, warps)
                   for d in (1, 2, 4) for warps in (4, 8)]
        candidates = [first, replace(first, programs_per_sm=2), *smaller]
    else:
        row = next_pow2(k)
        candidates = [first, replace(first, num_warps=8),
                      *(Launch(rows, row, True, warps) for rows, warps in ((1, 16), (2, 16), (4, 16), (2, 8))
                        if rows * row <= 16384)]
    return list(dict.fromkeys(candidates))  # in order, without repeats


# Smaller calls keep the default: a pass over fewer than 1M fp32 scores (4 MB) takes microseconds, so timing
# the candidates would cost more than it can save. Training's own call, one global crop of 32 images x 196 patches
# x 300 prototypes (1.9M scores, no queue), is above the bar. The tuned choices are remembered per process, as
# triton.autotune's.
TUNE_MIN_SCORES = 1 << 20
_tuned: dict[tuple, Launch] = {}


def choose_launch(scores: torch.Tensor, epsilon: float, n_iters: int) -> Launch:
    """On a GPU, for calls of 1M scores and more: the fastest of launch_candidates, timed as whole calls on these
    scores at the first call of each (GPU, dtype, layout, K, N rounded up to a power of two), then remembered.
    Elsewhere, under torch.use_deterministic_algorithms (timings vary, and so would the rounding) and in a CUDA
    graph capture of a shape not yet tuned: the untuned default. Whole calls are timed, not single kernels (as
    triton.autotune would): the tiles decide the number of programs, hence the partials that every combine
    reads, so the passes and combines are chosen together."""
    n, k = scores.shape
    if not _tunable(scores):
        return default_launch(k)
    key = (str(scores.device), scores.dtype, scores.stride(1) == 1, k, next_pow2(n))
    if key not in _tuned:
        if scores.is_cuda and torch.cuda.is_current_stream_capturing():  # a CUDA graph: nothing can be timed
            return default_launch(k)
        run = functools.partial(_sinkhorn, scores, epsilon, n_iters, False)
        _tuned[key] = fastest_launch(run, launch_candidates(k), _cuda_ms)
    return _tuned[key]


def _tunable(scores: torch.Tensor) -> bool:
    return (scores.is_cuda and not interpreting() and scores.numel() >= TUNE_MIN_SCORES
            and not torch.are_deterministic_algorithms_enabled())


def fastest_launch(run, candidates: list[Launch], time_ms) -> Launch:
    """The candidate for which ``time_ms(lambda: run(launch))`` is least. A candidate other than the first that
    fails to compile or launch on this GPU (out of registers or shared memory) is passed over."""
    best, best_ms = candidates[0], time_ms(lambda: run(candidates[0]))
    for launch in candidates[1:]:
        try:
            ms = time_ms(lambda: run(launch))  # noqa: B023 - called at once, in this iteration
        except Exception:  # noqa: BLE001 - triton's compile and resource errors have no common base class
            ms = math.inf
        if ms < best_ms:
            best, best_ms = launch, ms
    return best


def _cuda_ms(fn) -> float:
    """Milliseconds per call of ``fn``: the best of three rounds of calls after one that compiles."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rounds = []
    for _ in range(3):
        start.record()
        for _ in range(5):
            fn()
        end.record()
        end.synchronize()
        rounds.append(start.elapsed_time(end) / 5)
    return min(rounds)


@on_input_device  # the tuner's timing too runs on the scores' GPU
def sinkhorn_triton(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3, distributed: bool = False,
                    launch: Launch | None = None) -> torch.Tensor:
    """The Triton Sinkhorn; ``launch``: its tiles, warps and programs (default: choose_launch's)."""
    return _sinkhorn(scores, epsilon, n_iters, distributed, launch or choose_launch(scores, epsilon, n_iters))


def _sinkhorn(scores: torch.Tensor, epsilon: float, n_iters: int, distributed: bool, launch: Launch) -> torch.Tensor:
    n, k = scores.shape
    device = scores.device
    n_total = _global_count(n, device, distributed)
    single = launch.single_tile
    programs = launch.programs(n, device)
    # No fills needed: the first pass takes b = 0 without reading b, and every pass writes what the next reads.
    a = torch.empty(k, device=device, dtype=torch.float32)
    b = torch.empty(n, device=device, dtype=torch.float32)
    # Per-program column partials (max, sum of exp): programs x K, a few hundred rows at most.
    pm = torch.empty((programs, k), device=device, dtype=torch.float32)
    ps = torch.empty((programs, k), device=device, dtype=torch.float32)
    col_m = torch.empty(k, device=device, dtype=torch.float32)
    col_s = torch.empty(k, device=device, dtype=torch.float32)
    out = torch.empty((n, k), device=device, dtype=torch.float32)
    combine_grid = (-(-k // COMBINE_BLOCK_K),)
    common = dict(BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, SINGLE_TILE=single, num_warps=launch.num_warps,
                  **LAUNCH_OPTIONS)

    def accumulate(update_b: bool):
        # One pass over the rows that folds lse_n(x + b) into fresh partials (after the sample step if update_b).
        if not single:  # a single tile's partials are stored whole; multi-tile ones are read-modify-written
            pm.fill_(-math.inf)
            ps.zero_()
        _row_pass[(programs,)](scores, scores.stride(0), scores.stride(1), a, b, out, pm, ps, n, k, inv_eps, log_n,
                              UPDATE_B=update_b, WRITE_OUT=False, **common)

    def prototype_step():
        # Partials in pm/ps -> new a (all-reduced first when distributed).
        nonlocal a
        _combine[combine_grid](pm, ps, col_m, col_s, a, programs, k, math.log(k),
                              FINAL=not distributed, BLOCK_P=COMBINE_BLOCK_P, BLOCK_K=COMBINE_BLOCK_K,
                              **LAUNCH_OPTIONS)
        if distributed:
            a = -math.log(k) - _combine_across_processes(col_m, col_s, True)

    inv_eps = 1.0 / epsilon
    log_n = math.log(n_total)
    # First prototype step with b = 0: fold lse_n(x) into the partials without touching b.
    accumulate(update_b=False)
    prototype_step()
    for _ in range(n_iters - 1):
        accumulate(update_b=True)
        prototype_step()
    # Last sample step, fused with writing the output.
    _row_pass[(programs,)](scores, scores.stride(0), scores.stride(1), a, b, out, pm, ps, n, k, inv_eps, log_n,
                          UPDATE_B=True, WRITE_OUT=True, **common)
    return out
