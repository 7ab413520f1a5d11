"""Triton kernels against their torch references, run on CPU by Triton's interpreter (TRITON_INTERPRET=1,
set in conftest before triton is imported); the torch Sinkhorn against a literal float64 SwAV.

Tolerances: fp32 results agree to 1e-5 absolute (assignments and cosine scores are O(1) quantities, the
differences are summation order); bf16 inputs are compared against the reference on the same bf16 values,
so the tolerance stays 1e-5. On a real GPU, fp32 matmuls run in TF32: those tests allow 2e-3.

On a GPU machine the compiled kernels are checked with
    TRITON_INTERPRET=0 python -m pytest tests/test_kernels.py -k "gpu and not compiles"
(the interpreter tests need TRITON_INTERPRET=1 and are the default everywhere else).
"""
import importlib
import math
import os
import re
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

from leopart.errors import LeopartError
from leopart.kernels import nearest_prototype, patch_prototype_similarity, sinkhorn
from leopart.kernels.similarity import nearest_torch, similarity_torch
from leopart.kernels.sinkhorn import sinkhorn_torch

cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                          reason="needs a CUDA GPU and TRITON_INTERPRET=0 (compiled kernels)")


def swav_float64(scores, eps=0.05, n_iters=3):
    """SwAV's Sinkhorn exactly as published (multiplicative, float64): the independent yardstick."""
    q = torch.exp(scores.double() / eps).t()
    q /= q.sum()
    k, n = q.shape
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


def cosine_scores(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    p = torch.nn.functional.normalize(torch.randn(k, 16, generator=g), dim=1)
    return x @ p.T


# ------------------------------------------------------------------ sinkhorn
@pytest.mark.parametrize("n,k", [(1, 1), (1, 300), (7, 21), (7, 500), (196, 1), (196, 300), (12544, 300),
                                 (40, 1500)])
def test_sinkhorn_matches_swav(n, k):
    scores = cosine_scores(n, k)
    expected = swav_float64(scores).float()
    ref = sinkhorn(scores, backend="torch")
    tri = sinkhorn(scores, backend="triton")
    assert ref.dtype == tri.dtype == torch.float32 and tri.shape == (n, k)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tri.sum(dim=1), torch.ones(n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,k", [(12544, 300), (5000, 40), (130, 7)])
def test_sinkhorn_many_programs(monkeypatch, n, k):
    """As many programs as a GPU runs (the interpreter's cap is 8): the combine then reduces more partial rows
    (196, 79, 130) than one of its tiles holds (64), the last tile only partly filled."""
    module = importlib.import_module("leopart.kernels.sinkhorn")  # the attribute `sinkhorn` is the function
    launch = module.Launch(64 if n > 130 else 1, module.next_pow2(k), True, programs_per_sm=264)  # 2 x 264 programs
    scores = cosine_scores(n, k, seed=4)
    torch.testing.assert_close(module.sinkhorn_triton(scores, launch=launch), sinkhorn_torch(scores), atol=1e-5,
                               rtol=1e-4)


@pytest.mark.parametrize("n,k", [(300, 21), (300, 300), (40, 1100)])
def test_every_sinkhorn_launch_candidate_matches_torch(n, k):
    """Each launch the GPU tuner may pick (smaller tiles, more warps, fewer programs, one tile per row where K >
    1024) computes the same assignments: the tuner chooses by speed alone."""
    module = importlib.import_module("leopart.kernels.sinkhorn")
    scores = cosine_scores(n, k, seed=5)
    reference = sinkhorn_torch(scores)
    candidates = module.launch_candidates(k)
    assert candidates[0] == module.gpu_launch(k) and len(candidates) == len(set(candidates)) >= 5
    assert any(c.single_tile for c in candidates) and (k <= 1024) == all(c.single_tile for c in candidates)
    for launch in candidates:
        torch.testing.assert_close(module.sinkhorn_triton(scores, launch=launch), reference, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, launch=launch: f"{launch}: {m}")


def test_sinkhorn_tuner_picks_the_fastest_once_per_shape(monkeypatch):
    """On a GPU a large call times the candidates (whole calls) once per shape and remembers the fastest; a
    candidate that fails to compile there is passed over. Run here with the interpreter and a stand-in clock."""
    module = importlib.import_module("leopart.kernels.sinkhorn")
    candidates = module.launch_candidates(300)
    fastest, broken = candidates[3], candidates[4]
    timed = []

    def clock(fn):  # ms by candidate; runs the call as the real clock does
        fn()
        launch = ran[-1]
        timed.append(launch)
        if launch == broken:
            raise RuntimeError("out of resource: registers")
        return 1.0 if launch == fastest else 2.0 + len(timed)

    ran, real_run = [], module._sinkhorn
    monkeypatch.setattr(module, "_sinkhorn", lambda scores, eps, iters, dist, launch: (ran.append(launch),
                                                                                       real_run(scores, eps, iters,
                                                                                                dist, launch))[1])
    monkeypatch.setattr(module, "_cuda_ms", clock)
    monkeypatch.setattr(module, "_tunable", lambda scores: True)
    monkeypatch.setattr(module, "_tuned", {})
    scores = cosine_scores(200, 300, seed=6)
    out = sinkhorn(scores, backend="triton")
    assert timed == candidates and ran[-1] == fastest  # every candidate timed, then the call itself runs the pick
    torch.testing.assert_close(out, sinkhorn_torch(scores), atol=1e-5, rtol=1e-4)
    ran.clear()
    sinkhorn(cosine_scores(150, 300, seed=7), backend="triton")  # same K, N rounds up to the same 256: remembered
    assert ran == [fastest] and len(timed) == len(candidates) and len(module._tuned) == 1
    sinkhorn(scores.bfloat16(), backend="triton")  # another dtype is another shape
    assert len(module._tuned) == 2
    # Untunable calls (CPU, small, deterministic algorithms asked for): the default.
    monkeypatch.undo()
    assert module.choose_launch(scores, 0.05, 3) == module.default_launch(300)
    assert not module._tunable(scores)



def test_sinkhorn_tunes_trainings_own_call(monkeypatch):
    """train.py calls the Sinkhorn once per global crop: at the defaults 32 images x 196 patches x 300 prototypes
    (1.9M scores), a call the GPU tuner must cover (a 2M bar had left it to the untuned default)."""
    from types import SimpleNamespace

    from leopart import LeopartConfig, TrainConfig
    module = importlib.import_module("leopart.kernels.sinkhorn")
    cfg = TrainConfig()
    rows = cfg.batch_size * (cfg.global_size // 16) ** 2
    monkeypatch.setattr(module, "interpreting", lambda: False)  # as on a GPU
    on_gpu = SimpleNamespace(is_cuda=True, numel=lambda: rows * LeopartConfig().num_prototypes)
    assert module._tunable(on_gpu)
    assert not module._tunable(SimpleNamespace(is_cuda=True, numel=lambda: 512 * 300))  # microseconds: not timed

@pytest.mark.parametrize("n_iters,eps", [(1, 0.05), (5, 0.05), (3, 0.5)])
def test_sinkhorn_parameters(n_iters, eps):
    scores = cosine_scores(64, 30, seed=1)
    expected = swav_float64(scores, eps, n_iters).float()
    torch.testing.assert_close(sinkhorn(scores, eps, n_iters, backend="triton"), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [50, 1500])
def test_sinkhorn_extreme_scores_stay_finite(k):
    """scores / eps up to 1e3: no overflow, no all-zero rows; both backends agree."""
    g = torch.Generator().manual_seed(2)
    scores = 2.5 * torch.randn(300, k, generator=g)  # scores / eps ~ N(0, 50^2)
    scores[0] = -50.0    # scores / eps = -1e3: a sample that likes nothing
    scores[:, 0] = 50.0  # scores / eps = +1e3: a prototype everyone likes
    ref = sinkhorn(scores, backend="torch")
    tri = sinkhorn(scores, backend="triton")
    for q in (ref, tri):
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q.sum(dim=1), torch.ones(300), atol=1e-4, rtol=0)
    torch.testing.assert_close(tri, ref, atol=1e-4, rtol=1e-3)


def test_sinkhorn_bf16_and_non_contiguous():
    base = cosine_scores(300, 196, seed=3)
    for scores in (base.t(), base.t().to(torch.bfloat16), cosine_scores(196, 600)[:, ::2]):
        assert not scores.is_contiguous() or scores.dtype == torch.bfloat16
        expected = swav_float64(scores.float()).float()
        torch.testing.assert_close(sinkhorn(scores, backend="triton"), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sinkhorn(scores, backend="torch"), expected, atol=1e-5, rtol=1e-4)


def test_sinkhorn_bad_arguments():
    with pytest.raises(LeopartError, match=r"\[N, K\]"):
        sinkhorn(torch.zeros(3))
    with pytest.raises(LeopartError, match="n_iters"):
        sinkhorn(torch.zeros(3, 2), n_iters=0)
    with pytest.raises(LeopartError, match="process group"):
        sinkhorn(torch.zeros(3, 2), distributed=True)


def _distributed_worker(rank, world, port, scores, backend, results):
    import torch.distributed as dist

    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = scores.chunk(world)[rank]
        results[rank] = sinkhorn(rows, backend=backend, distributed=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_distributed_sinkhorn_equals_single_process(backend):
    scores = cosine_scores(203, 37, seed=4)  # uneven split: 102 + 101 rows
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_distributed_worker, args=(2, free_port(), scores, backend, results), nprocs=2,
                       join=True, start_method="spawn")
    combined = torch.cat([results[0], results[1]])
    torch.testing.assert_close(combined, sinkhorn_torch(scores), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(combined, swav_float64(scores).float(), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- similarity
SIM_CASES = [(1, 1, 64), (7, 21, 256), (196, 300, 384), (12544, 21, 64), (33, 500, 64), (5, 1, 384)]


@pytest.mark.parametrize("n,k,d", SIM_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_similarity_matches_reference(n, k, d, dtype):
    g = torch.Generator().manual_seed(n + k + d)
    x = torch.randn(n, d, generator=g).to(dtype)
    p = torch.randn(k, d, generator=g).to(dtype)
    expected = similarity_torch(x, p)
    got = patch_prototype_similarity(x, p, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (n, k)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    if n * k <= 196 * 300:
        for t in (0.1, 1.0):
            torch.testing.assert_close(patch_prototype_similarity(x, p, temperature=t, backend="triton"),
                                       similarity_torch(x, p, temperature=t), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(patch_prototype_similarity(x, p, normalize=False, backend="triton"),
                                   similarity_torch(x, p, normalize=False), atol=1e-3, rtol=1e-4)


def test_similarity_non_contiguous_and_gradients():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 90, generator=g).t()[:, ::2].detach().requires_grad_(True)  # [90, 128], strided
    assert not x.is_contiguous()
    p = torch.randn(30, 128, generator=g).requires_grad_(True)
    y = patch_prototype_similarity(x, p, temperature=0.1, backend="triton")
    y_ref = similarity_torch(x, p, temperature=0.1)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    grad = torch.randn_like(y)
    gx, gp = torch.autograd.grad(y, (x, p), grad)
    gx_ref, gp_ref = torch.autograd.grad(y_ref, (x, p), grad)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gp, gp_ref)
    strided = torch.randn(64, 300, generator=g)[:, ::3]  # non-unit column stride
    torch.testing.assert_close(patch_prototype_similarity(strided, p[:, :100].detach(), backend="triton"),
                               similarity_torch(strided, p[:, :100].detach()), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n,k,d", SIM_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nearest_matches_matmul_argmax(n, k, d, dtype):
    g = torch.Generator().manual_seed(n * 7 + k + d)
    x = torch.randn(n, d, generator=g).to(dtype)
    p = torch.randn(k, d, generator=g).to(dtype)
    idx, score = nearest_prototype(x, p, backend="triton")
    ref_scores = similarity_torch(x, p)
    ref_score, ref_idx = ref_scores.max(dim=1)
    assert idx.dtype == torch.int64 and score.dtype == torch.float32
    torch.testing.assert_close(score, ref_score, atol=1e-5, rtol=1e-4)
    # Where two prototypes are within float noise of each other either index is right; elsewhere exact.
    gap = ref_scores.topk(min(2, k), dim=1).values
    clear = (gap[:, 0] - gap[:, -1] > 1e-5) if k > 1 else torch.ones(n, dtype=torch.bool)
    assert torch.equal(idx[clear], ref_idx[clear])
    t_idx, t_score = nearest_prototype(x, p, backend="torch")
    assert torch.equal(t_idx[clear], ref_idx[clear])


def test_nearest_ties_go_to_the_lowest_index():
    g = torch.Generator().manual_seed(6)
    p = torch.randn(150, 64, generator=g)
    p[70] = p[3]    # same tile boundary crossing as the kernel's 64-wide K tiles
    p[140] = p[3] * 2  # same direction, other norm: equal cosine
    x = torch.cat([p[3:4] * 0.5, torch.zeros(1, 64), p[100:101]])
    for backend in ("triton", "torch"):
        idx, score = nearest_prototype(x, p, backend=backend)
        assert idx.tolist() == [3, 0, 100], backend
        assert score[1] == 0  # a zero vector scores 0 against everything: first index wins
        torch.testing.assert_close(score[[0, 2]], torch.ones(2))


def test_nearest_unnormalised_is_max_dot_product():
    g = torch.Generator().manual_seed(7)
    x, p = torch.randn(100, 32, generator=g), torch.randn(40, 32, generator=g)
    idx, score = nearest_prototype(x, p, normalize=False, backend="triton")
    ref_score, ref_idx = (x @ p.T).max(dim=1)
    torch.testing.assert_close(score, ref_score, atol=1e-4, rtol=1e-5)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(nearest_torch(x, p, normalize=False)[1], ref_score, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------ dispatch
def test_dispatch(monkeypatch):
    x, p = torch.randn(4, 16), torch.randn(3, 16)
    assert torch.equal(nearest_prototype(x, p)[0], nearest_torch(x, p)[0])  # auto on CPU -> torch
    monkeypatch.setenv("LEOPART_KERNELS", "bogus")
    with pytest.raises(LeopartError, match="LEOPART_KERNELS"):
        nearest_prototype(x, p)
    monkeypatch.setenv("LEOPART_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(LeopartError, match="need CUDA tensors"):
        nearest_prototype(x, p)
    monkeypatch.delenv("LEOPART_KERNELS")
    with pytest.raises(LeopartError, match="backend must be one of"):
        sinkhorn(x, backend="cuda")
    with pytest.raises(LeopartError, match=r"prototypes \[K, D\]"):
        patch_prototype_similarity(x, torch.randn(3, 8))


def test_every_launch_pins_fp_fusion(monkeypatch):
    """Triton 3.10 turns FP fusion (a * b + c as one FMA) off by default, and 3.9 warns at the first compile of
    a kernel launched without saying: every launch passes the setting the kernels were tested and timed with."""
    from triton.runtime import interpreter

    launches = []
    run = interpreter.GridExecutor.__call__

    def recorded(self, *args, **kwargs):  # sees the options before the interpreter drops them
        launches.append((self.fn.__name__, kwargs.get("enable_fp_fusion")))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", recorded)
    x, p = torch.randn(40, 16), torch.randn(21, 16)
    sinkhorn(x @ p.T, backend="triton")
    sinkhorn(torch.randn(8, 1500), backend="triton")  # the multi-tile row pass
    patch_prototype_similarity(x, p, backend="triton")
    patch_prototype_similarity(x, p, temperature=0.1, backend="triton")
    nearest_prototype(x, p, backend="triton")
    assert {name for name, _ in launches} == {"_row_pass", "_combine", "_scores_kernel", "_softmax_kernel",
                                              "_nearest_kernel"}
    assert all(fusion is True for _, fusion in launches), launches


def test_triton_launches_on_the_gpu_of_its_inputs(monkeypatch):
    """Triton launches on the current GPU, whatever the tensors': on cuda:1 with cuda:0 current it refuses their
    pointers. Each function that launches makes its first input's GPU current while it runs; CPU tensors (the
    interpreter) change nothing."""
    from types import SimpleNamespace

    from leopart.kernels import backend, similarity

    sinkhorn_module = sys.modules["leopart.kernels.sinkhorn"]  # the package's `sinkhorn` is the function
    entered = []

    class CurrentDevice:  # stands in for torch.cuda.device, which needs a GPU
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", CurrentDevice)
    ran = backend.on_input_device(lambda x, *rest: ("ran", x.device, rest))
    on_gpu1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    assert ran(on_gpu1, 5) == ("ran", torch.device("cuda", 1), (5,)) and entered == [torch.device("cuda", 1), "exit"]
    entered.clear()
    assert ran(torch.zeros(1), 5)[0] == "ran" and entered == []
    for launcher in (sinkhorn_module.sinkhorn_triton, similarity.similarity_triton, similarity.nearest_triton):
        assert getattr(launcher, "__wrapped__", None) is not None, launcher.__name__


def test_sinkhorn_launch_sweep_runs_every_candidate():
    """The GPU session's launch sweep (benchmarks/kernels.py --sweep), run in the interpreter: a row per
    candidate, checked against torch; one that fails to compile or launch becomes a row saying so."""
    from benchmarks import kernels as bench

    module = importlib.import_module("leopart.kernels.sinkhorn")

    def candidates(k):
        return [*module.launch_candidates(k)[:2], module.Launch(4, 24, True)]  # a 24-wide tile does not compile

    rows = bench.sinkhorn_sweep("cpu", [("tiny", 300, 21), ("wide", 20, 1100)], candidates=candidates, repeat=1)
    first = module.gpu_launch(21)
    assert [(r["size"], r["tile"], r["warps"]) for r in rows] == [
        ("tiny: 300x21", f"{first.block_n} x 32", 4), ("tiny: 300x21", f"{first.block_n} x 32", 4),
        ("tiny: 300x21", "4 x 24", 4), ("wide: 20x1100", "16 x 512 (2 reads)", 4),
        ("wide: 20x1100", "16 x 512 (2 reads)", 8), ("wide: 20x1100", "4 x 24", 4)]
    assert [r["programs per SM"] for r in rows[:2]] == [4, 2]
    assert all(r["max abs error"] < 1e-5 for r in rows[:2] + rows[3:5]), rows
    assert rows[2]["max abs error"].startswith("failed: InterpreterError: ValueError(\"arange's range must be a "
                                               "power of 2\")") and "ms" not in rows[2]
    # The interpreter never tunes: its pick is its own default, at K = 21 the GPU's first candidate too.
    assert [r["tuner's pick"] for r in rows] == ["yes", "", "", "", "", ""]



def test_kernel_benchmark_keeps_each_size_it_measured(monkeypatch, tmp_path):
    """The GPU run has a hard time limit: benchmarks/kernels.py writes its tables after every size, so a run cut
    short (here at the first nearest_prototype size) keeps the Sinkhorn and similarity rows."""
    import json

    from benchmarks import common
    from benchmarks import kernels as bench

    def fake_bench(name, size, impls, device, work, unit):
        if name == "nearest_prototype":
            raise KeyboardInterrupt  # as a time limit would stop it
        return [{"kernel": name, "size": size, "impl": label, "ms": 1.0} for label in impls]

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "bench", fake_bench)
    monkeypatch.setattr(sys, "argv", ["kernels", "--device", "cpu", "--quick", "--skip-compile"])
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    rows = json.loads((tmp_path / "kernels_cpu.json").read_text())["rows"]
    assert [r["size"].split(":")[0] for r in rows if r["impl"] == "torch eager"] == [
        "train ViT-S/16", "one global crop", "train + queue 8192", "train ViT-B/8", "train ViT-S/16"]
    assert rows[-1]["kernel"] == "similarity+softmax"

def test_benchmark_reads_the_issue_targets_off_its_rows():
    """The GPU run states each target as met or not from its own rows, against the nominal bandwidth."""
    from benchmarks.kernels import issue_targets

    rows = [{"kernel": "sinkhorn", "size": "train ViT-S/16: 12544x300", "impl": "torch eager", "ms": 1.4,
             "speedup vs eager": 1.0},
            {"kernel": "sinkhorn", "size": "train ViT-S/16: 12544x300", "impl": "leopart triton", "ms": 0.4,
             "speedup vs eager": 3.5},
            {"kernel": "sinkhorn", "size": "bandwidth N=1M K=3000: 1000000x3000", "impl": "leopart triton",
             "ms": 32.5, "speedup vs eager": 6.4, "GB/s": 1846.0},
            {"kernel": "nearest_prototype", "size": "k-means: 1100000x500x384", "impl": "leopart triton",
             "ms": 2.8, "speedup vs eager": 3.9, "peak extra MiB": 16.8}]
    targets = issue_targets(rows, copy_gbs=4000.0, nominal_gbs=4800.0)
    assert [t["met"] for t in targets] == ["yes", "no", "yes"]
    assert targets[0]["measured"] == "3.50x (0.400 ms)"
    assert targets[1]["measured"] == ("1846 GB/s at the 5-pass minimum traffic = 38% of the nominal 4800 GB/s "
                                      "(46% of a copy's 4000 GB/s)")
    assert targets[2]["measured"] == "3.90x; 16.8 MiB = 0.8% of 2098 MiB"
    # No nominal figure from torch: the copy is the limit. A failed or missing row leaves its target out.
    rows[2]["GB/s"] = 2500.0
    assert issue_targets(rows, 4000.0, None)[1]["measured"].endswith("= 62% of a copy's 4000 GB/s")
    assert issue_targets(rows, 4000.0, 4.8)[1]["measured"].endswith("= 62% of a copy's 4000 GB/s")  # MB/s? dropped
    rows[1]["ms"] = "failed: RuntimeError"
    assert [t["target"][:9] for t in issue_targets(rows[1:], 4000.0, 4800.0)] == ["Sinkhorn,", "nearest_p"]
    assert issue_targets(rows[1:], 4000.0, 4800.0)[0]["target"].endswith("memory bandwidth")


def test_benchmark_multiplicative_baseline_is_swav():
    """benchmarks/kernels.py times the multiplicative Sinkhorn (SwAV's, as the reference code trains with) as
    a second baseline: it must compute the same assignments, or its row compares unlike things."""
    from benchmarks.kernels import sinkhorn_multiplicative

    for n, k, eps, iters in [(12544, 300, 0.05, 3), (7, 21, 0.05, 1), (196, 500, 0.1, 5)]:
        scores = cosine_scores(n, k)
        torch.testing.assert_close(sinkhorn_multiplicative(scores, eps, iters), swav_float64(scores, eps, iters).float(),
                                   atol=1e-5, rtol=1e-4)


def test_kernel_constexpr_annotations_are_objects_not_strings():
    """Triton 3.0-3.1's interpreter finds tl.constexpr parameters by their evaluated annotation: a
    `from __future__ import annotations` in a kernel file turns them into strings and breaks it."""
    import types

    triton = pytest.importorskip("triton")
    for name in ("sinkhorn", "similarity"):
        module = importlib.import_module(f"leopart.kernels.{name}")
        annotations = []
        for obj in vars(module).values():
            if not hasattr(obj, "fn"):
                continue  # not a kernel
            while not isinstance(obj, types.FunctionType):  # autotuner -> jit wrapper -> the Python function
                obj = obj.fn
            annotations += [(obj.__name__, param, ann) for param, ann in obj.__annotations__.items()]
        assert annotations, name
        assert all(ann is triton.language.constexpr for _, _, ann in annotations), annotations


def test_import_builds_no_autotuner():
    """Triton 3.2-3.3's autotuner looks up the GPU driver when it is built, so one built at import broke
    `import leopart` on machines without a GPU: stand in for that autotuner and import."""
    import subprocess
    import sys

    code = ("import triton\n"
            "def needs_a_driver(*args, **kwargs):\n"
            "    raise RuntimeError('0 active drivers ([]). There should only be one.')\n"
            "triton.autotune = needs_a_driver\n"
            "import leopart, leopart.kernels.similarity\n"
            "print('imported')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=120)
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr[-2000:]


# ----------------------------------------------------- compiled for a GPU, without one
@pytest.mark.parametrize("arch", [90])
def test_every_kernel_compiles_for_a_real_gpu(arch, tmp_path):
    """The interpreter forgives what the GPU compiler rejects: build every kernel configuration the dispatch
    can launch through Triton's whole pipeline down to sm_90 machine code (ptxas), with no GPU present."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "leopart.kernels.compile_check", "--arch", str(arch)],
                          capture_output=True, text=True, env=env, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failures, "\n".join(failures) or summary
    done, total = map(int, re.search(r"(\d+) of (\d+) kernel configurations compiled", summary).groups())
    assert done == total >= 60, summary
    # ptxas's figures for every configuration: Triton 3.9 ships a second ptxas, the only one that reads its PTX.
    unmeasured = [line for line in proc.stdout.splitlines()
                  if line.startswith("ok") and not re.search(r" regs=\d+ spills=\d+B ", line)]
    assert not unmeasured, unmeasured[:3]


# ----------------------------------------------------------------- real GPU
@cuda
@pytest.mark.parametrize("n,k", [(7, 21), (12544, 300), (4096, 3000)])
def test_gpu_sinkhorn(n, k):
    module = importlib.import_module("leopart.kernels.sinkhorn")
    scores = cosine_scores(n, k).cuda()
    reference = sinkhorn_torch(scores)
    torch.testing.assert_close(sinkhorn(scores, backend="triton"), reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sinkhorn(scores.bfloat16(), backend="triton"), sinkhorn_torch(scores.bfloat16()),
                               atol=1e-5, rtol=1e-4)
    if n * k >= module.TUNE_MIN_SCORES:  # the call above timed the candidates; each one must also be right here
        assert any(key[3] == k for key in module._tuned)
        for launch in module.launch_candidates(k):
            torch.testing.assert_close(module.sinkhorn_triton(scores, launch=launch), reference, atol=1e-5,
                                       rtol=1e-4, msg=lambda m, launch=launch: f"{launch}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2
                    or os.environ.get("TRITON_INTERPRET") == "1", reason="needs two CUDA GPUs")
def test_gpu_kernels_on_the_second_gpu():
    x, p = torch.randn(1000, 64, device="cuda:1"), torch.randn(21, 64, device="cuda:1")
    assert torch.cuda.current_device() == 0
    torch.testing.assert_close(sinkhorn(x @ p.T, backend="triton"), sinkhorn_torch(x @ p.T), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(patch_prototype_similarity(x, p, backend="triton"), similarity_torch(x, p),
                               atol=2e-3, rtol=0)
    assert nearest_prototype(x, p, backend="triton")[0].device == torch.device("cuda", 1)


@cuda
@pytest.mark.parametrize("n,k,d", SIM_CASES + [(100_000, 500, 384)])
def test_gpu_similarity_and_nearest(n, k, d):
    x, p = torch.randn(n, d, device="cuda"), torch.randn(k, d, device="cuda")
    torch.testing.assert_close(patch_prototype_similarity(x, p), similarity_torch(x, p), atol=2e-3, rtol=0)
    torch.testing.assert_close(patch_prototype_similarity(x, p, temperature=0.1),
                               similarity_torch(x, p, temperature=0.1), atol=2e-2, rtol=0)
    idx, score = nearest_prototype(x, p)
    ref = similarity_torch(x, p)
    torch.testing.assert_close(score, ref.max(dim=1).values, atol=2e-3, rtol=0)
    chosen = ref.gather(1, idx[:, None])[:, 0]
    assert (ref.max(dim=1).values - chosen).max() < 4e-3  # TF32 may swap near-ties only
    xb, pb = x.bfloat16(), p.bfloat16()
    torch.testing.assert_close(patch_prototype_similarity(xb, pb), similarity_torch(xb, pb), atol=1e-3, rtol=0)
    assert math.isfinite(score.sum().item())
