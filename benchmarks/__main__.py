"""Rerun the CPU benchmark set: ``python -m benchmarks`` (about 20 minutes on a 2-core machine).

Each script runs in its own process and rewrites its table under benchmarks/results/. The GPU set is
benchmarks/run_gpu.sh.
"""
import subprocess
import sys

CPU_SET = [
    ["benchmarks.embed"],
    ["benchmarks.memory"],
    ["benchmarks.kernels", "--device", "cpu"],
    ["benchmarks.train", "--device", "cpu", "--steps", "5"],
    ["benchmarks.cluster", "--sizes", "100000", "1100000", "--skip-sklearn-large"],
    ["benchmarks.segment"],
    ["benchmarks.demo"],
]

if __name__ == "__main__":
    failed = []
    for args in CPU_SET:
        print(f"\n=== python -m {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, "-m", *args]).returncode:
            failed.append(args[0])
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")
