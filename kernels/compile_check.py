"""Compile every Triton kernel for a CUDA GPU without one, and report ptxas's figures per configuration.

The kernel tests run on CPU under Triton's interpreter, which is lenient where the GPU compiler is not
(layouts, register pressure, shared memory). This runs Triton's real pipeline (TTIR -> TTGIR -> LLVM IR
-> PTX -> cubin with ptxas) for a target architecture, for every autotune config and specialisation the
dispatch code can launch, so compile errors, spills and shared-memory overflows show up in CI:

    python -m leopart.kernels.compile_check [--arch 90] [--jobs 2]

Triton must be imported with TRITON_INTERPRET unset or 0 (this module refuses otherwise); any Triton
>= 3.0 works. Integer arguments are compiled unspecialised ("i32").
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from .backend import LAUNCH_OPTIONS

# Shared memory a block may use: 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100/H200).
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
SINKHORN_K = (1, 21, 300, 3000)  # one tile (tiny, small, training K) and two tiles (K > 1024)


@dataclass
class Spec:
    """One compilation: a kernel, its argument types and its compile-time constants."""
    kernel: str           # "module.function"
    signature: dict       # argument name -> "*fp32" | "i32" | "fp32" | "constexpr"
    constants: dict       # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3

    @property
    def label(self) -> str:
        dtype = self.signature.get("x_ptr", "")[1:]
        consts = " ".join(f"{k}={v}" for k, v in self.constants.items())
        name = f"{self.kernel}[{dtype}]" if dtype else self.kernel
        return f"{name} {consts} warps={self.num_warps} stages={self.num_stages}"


@dataclass
class Report:
    label: str
    error: str | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None


def _signature(pointers: dict, ints: list, floats: list, constexprs: list) -> dict:
    return {**{k: f"*{v}" for k, v in pointers.items()}, **{k: "i32" for k in ints},
            **{k: "fp32" for k in floats}, **{k: "constexpr" for k in constexprs}}


def specs() -> list[Spec]:
    """Everything similarity.py and sinkhorn.py launch on a GPU."""
    similarity, sinkhorn = (importlib.import_module(f"{__package__}.{m}") for m in ("similarity", "sinkhorn"))
    out = []
    strides = ["N", "K", "D", "sxn", "sxd", "spk", "spd"]
    flags = ["NORMALIZE", "UPCAST", "BLOCK_N", "BLOCK_K", "BLOCK_D"]
    for name, extra_ptrs, extra_floats in (("_scores_kernel", {"out_ptr": "fp32"}, []),
                                           ("_softmax_kernel", {"out_ptr": "fp32"}, ["inv_temp"]),
                                           ("_nearest_kernel", {"idx_ptr": "i64", "score_ptr": "fp32"}, [])):
        for dtype in ("fp32", "bf16"):
            ptrs = {"x_ptr": dtype, "p_ptr": dtype, "inv_x_ptr": "fp32", "inv_p_ptr": "fp32", **extra_ptrs}
            for cfg in similarity._configs(interpret=False):
                for normalize in ((True, False) if dtype == "fp32" else (True,)):
                    out.append(Spec(f"similarity.{name}", _signature(ptrs, strides, extra_floats, flags),
                                    {"NORMALIZE": normalize, "UPCAST": False, **cfg.kwargs},
                                    cfg.num_warps, cfg.num_stages))
    row_ptrs = ["a_ptr", "b_ptr", "out_ptr", "pm_ptr", "ps_ptr"]
    for dtype in ("fp32", "bf16"):
        sig = _signature({"x_ptr": dtype, **{p: "fp32" for p in row_ptrs}}, ["stride_n", "stride_k", "N", "K"],
                         ["inv_eps", "log_n"], ["UPDATE_B", "WRITE_OUT", "BLOCK_N", "BLOCK_K", "SINGLE_TILE"])
        for k in SINKHORN_K:
            # Every tile the tuner may time (programs per SM compile alike).
            tiles = dict.fromkeys((c.block_n, c.block_k, c.single_tile, c.num_warps)
                                  for c in sinkhorn.launch_candidates(k))
            for block_n, block_k, single, warps in tiles:
                for update_b, write_out in ((False, False), (True, False), (True, True)):
                    out.append(Spec("sinkhorn._row_pass", sig,
                                    {"UPDATE_B": update_b, "WRITE_OUT": write_out, "BLOCK_N": block_n,
                                     "BLOCK_K": block_k, "SINGLE_TILE": single}, warps))
    for final in (True, False):
        sig = _signature({p: "fp32" for p in ("pm_ptr", "ps_ptr", "out_m_ptr", "out_s_ptr", "a_ptr")}, ["P", "K"],
                         ["log_k"], ["FINAL", "BLOCK_P", "BLOCK_K"])
        out.append(Spec("sinkhorn._combine", sig, {"FINAL": final, "BLOCK_P": sinkhorn.COMBINE_BLOCK_P,
                                                   "BLOCK_K": sinkhorn.COMBINE_BLOCK_K}))
    return out


def _jit_function(kernel: str):
    from triton.runtime.jit import JITFunction

    module, name = kernel.split(".")
    fn = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    while not isinstance(fn, JITFunction):  # an autotuner wraps the JITFunction
        fn = fn.fn
    return fn


def _ptxas_binaries() -> list[str]:
    """ptxas programs to try: TRITON_PTXAS_PATH, else those Triton ships. Triton 3.9 ships two, `ptxas` (an
    older CUDA's) and `ptxas-blackwell`, and only the second reads the PTX version it emits for sm_90."""
    import triton

    if os.environ.get("TRITON_PTXAS_PATH"):
        return [os.environ["TRITON_PTXAS_PATH"]]
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return [path for path in (os.path.join(bin_dir, name) for name in ("ptxas", "ptxas-blackwell"))
            if os.path.isfile(path)]


def _ptxas_figures(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spill bytes) from ptxas -v on the PTX, or (None, None) when no ptxas here can read it."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for ptxas in _ptxas_binaries():
            log = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True).stderr
            regs = re.search(r"Used (\d+) registers", log)
            if regs:
                spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", log)
                return int(regs.group(1)), sum(int(x) for x in spills)
    return None, None


def _root_cause(e: BaseException) -> str:
    """One line for a compiler error: Triton nests the real message (e.g. 'K >= 16') under source excerpts."""
    while e.__cause__ is not None:
        e = e.__cause__
    message = getattr(e, "error_message", None) or (e.args[-1] if e.args else "")
    return f"{type(e).__name__}: {' '.join(str(message).split())[:300]}"


def compile_one(spec: Spec, arch: int) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        fn = _jit_function(spec.kernel)
        # In the kernel's argument order: Triton 3.0 reads the signature by position.
        signature = {name: spec.signature[name] for name in fn.arg_names}
        if "constexprs" in inspect.signature(ASTSource).parameters:  # Triton >= 3.3
            src = ASTSource(fn, signature, constexprs=spec.constants)
        else:  # Triton 3.0-3.2: the signature lists runtime arguments only, constants go apart
            src = ASTSource(fn, {k: v for k, v in signature.items() if v != "constexpr"}, spec.constants)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                           **LAUNCH_OPTIONS})
    except Exception as e:  # noqa: BLE001 - any compiler failure is the finding
        return Report(spec.label, error=_root_cause(e))
    registers, spills = _ptxas_figures(compiled.asm["ptx"], arch)
    shared = compiled.metadata.shared
    error = None
    if shared > MAX_SHARED.get(arch, MAX_SHARED[80]):
        error = f"{shared} bytes of shared memory, more than sm_{arch} allows"
    return Report(spec.label, error, registers, spills, shared)


def check(arch: int = 90, jobs: int = 2) -> list[Report]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_check needs TRITON_INTERPRET unset or 0: the interpreter compiles nothing")
    todo = specs()
    if jobs <= 1:
        return [compile_one(s, arch) for s in todo]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_one, todo, [arch] * len(todo)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10: 80 (A100), 90 (H100/H200)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    reports = check(args.arch, args.jobs)
    for r in reports:
        if r.error:
            print(f"FAIL {r.label}  -- {r.error}")
        else:
            figures = (f"regs={r.registers} spills={r.spill_bytes}B" if r.registers is not None
                       else "regs=? spills=? (no ptxas here reads this PTX)")
            print(f"ok   {r.label}  {figures} smem={r.shared_bytes}B")
    failed = sum(r.error is not None for r in reports)
    print(f"sm_{args.arch}: {len(reports) - failed} of {len(reports)} kernel configurations compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
