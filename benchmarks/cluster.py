"""k-means vs faiss-cpu and scikit-learn, and community detection (networkx Louvain) vs Infomap.

    pip install -e ".[bench]"
    python -m benchmarks.cluster [--iters 10] [--sizes 100000 1100000] [--skip-sklearn-large] [--cd-only]

k-means: the same Gaussian-mixture features (D = 384, 1,000 true centres) for every library, K = 500, the
same number of Lloyd iterations, one init each (leopart: its default k-means++ on a subsample; faiss: random
points, its only seeding; scikit-learn: random points), euclidean metric (the one all three share). Each run is a
fresh subprocess, so "peak RSS" is that library's own high-water mark (features included). Inertia is
recomputed by one function for every library's centroids, on all points.

CD: co-occurrence graphs of synthetic scenes with planted objects (each object a set of parts that touch);
Louvain (ours) and Infomap (the reference implementation's choice) on the same graph; quality is the
adjusted Rand index of the recovered part -> object map against the planted one.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.common import write_results

D, K, TRUE_CENTRES = 384, 500, 1000


def make_features(n: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(TRUE_CENTRES, D, generator=g) * 2
    x = centres[torch.randint(0, TRUE_CENTRES, (n,), generator=g)]
    x += torch.randn(n, D, generator=g)
    return x.numpy()


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    from leopart.kernels.similarity import nearest_torch

    xt = torch.from_numpy(x)
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    aug = torch.cat([c, -0.5 * (c * c).sum(1, keepdim=True)], 1)
    total = 0.0
    for start in range(0, len(xt), 65536):
        xc = xt[start:start + 65536]
        _, s = nearest_torch(torch.cat([xc, torch.ones(len(xc), 1)], 1), aug, normalize=False)
        total += float(((xc * xc).sum(1) - 2 * s).clamp_min(0).double().sum())
    return total


def run_one(lib: str, n: int, iters: int) -> dict:
    """Runs in a child process: cluster with one library, report time, inertia and peak RSS."""
    x = make_features(n)
    t0 = time.perf_counter()
    if lib == "leopart":
        import leopart

        km = leopart.cluster(torch.from_numpy(x), K, iters=iters, metric="euclidean", seed=0)  # default k-means++
        centroids, done = km.centroids.numpy(), km.n_iter
    elif lib == "faiss":
        import faiss

        fk = faiss.Kmeans(D, K, niter=iters, seed=1, max_points_per_centroid=10**9)
        fk.train(x)
        centroids, done = fk.centroids, iters
    else:
        from sklearn.cluster import KMeans

        sk = KMeans(K, init="random", n_init=1, max_iter=iters, tol=0.0, random_state=0, algorithm="lloyd").fit(x)
        centroids, done = sk.cluster_centers_, sk.n_iter_
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "iters": int(done), "s/iter": seconds / max(1, done),
            "inertia": inertia(x, centroids), "peak RSS GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def kmeans_rows(sizes, iters, skip_sklearn_large) -> list[dict]:
    rows = []
    for n in sizes:
        libs = ["leopart", "faiss", "sklearn"]
        if skip_sklearn_large and n > 200_000:
            libs.remove("sklearn")
        found = {}
        for lib in libs:
            out = subprocess.run([sys.executable, "-m", "benchmarks.cluster", "--child", lib, str(n), str(iters)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                rows.append({"task": f"k-means N={n:,}", "impl": lib, "seconds": f"failed: {out.stderr.strip()[-200:]}"})
                continue
            found[lib] = json.loads(out.stdout.strip().splitlines()[-1])
        for lib, r in found.items():
            base = found.get("faiss", r)
            rows.append({"task": f"k-means N={n:,} D={D} K={K}", "impl": lib, **r,
                         "time vs faiss": r["seconds"] / base["seconds"],
                         "inertia vs faiss": r["inertia"] / base["inertia"]})
    return rows


def planted_graph(n_objects=40, parts_per_object=(3, 6), n_images=400, grid=28, seed=0):
    """Label grids of scenes with 1-4 objects, each a block of touching part stripes; part 0 is background."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(*parts_per_object, size=n_objects)
    first = np.concatenate([[1], 1 + np.cumsum(sizes)[:-1]])
    truth = np.zeros(1 + sizes.sum(), dtype=np.int64)
    for o in range(n_objects):
        truth[first[o]: first[o] + sizes[o]] = o + 1
    grids = []
    for _ in range(n_images):
        g = np.zeros((grid, grid), dtype=np.int64)
        for o in rng.choice(n_objects, size=rng.integers(1, 5), replace=False):
            h, w = rng.integers(6, 12, size=2)
            y, x = rng.integers(0, grid - h), rng.integers(0, grid - w)
            bands = np.array_split(np.arange(h), sizes[o])
            for p, rows_ in enumerate(bands):
                g[y + rows_[0]: y + rows_[-1] + 1, x: x + w] = first[o] + p
        grids.append(torch.from_numpy(g))
    return grids, truth


def cd_rows() -> list[dict]:
    from sklearn.metrics import adjusted_rand_score

    from leopart.merge import communities, cooccurrence

    grids, truth = planted_graph()
    fg = truth > 0
    weights = cooccurrence(grids, fg)
    rows = []
    t0 = time.perf_counter()
    ours = communities(weights, fg, weight_threshold=0.05, resolution=1.0, seed=0)
    t_ours = time.perf_counter() - t0
    rows.append({"task": "CD on planted co-occurrence graph", "impl": "leopart (networkx Louvain)",
                 "seconds": t_ours, "objects found": int(ours.max()), "objects planted": int(truth.max()),
                 "ARI vs planted": adjusted_rand_score(truth[fg], ours[fg])})
    try:
        import infomap
    except ImportError:
        return rows
    for markov_time in (0.4, 2.0):
        t0 = time.perf_counter()
        im = infomap.Infomap(f"--two-level --silent --markov-time {markov_time} --seed 1")
        sym = (weights + weights.T) / 2
        for i, j in zip(*np.nonzero(np.triu(sym, 1) >= 0.05)):
            im.add_link(int(i), int(j), float(sym[i, j]))
        for i in np.flatnonzero(fg):
            im.add_node(int(i))
        im.run()
        found = np.zeros_like(truth)
        for node, module in im.get_modules().items():
            found[node] = module
        seconds = time.perf_counter() - t0
        rows.append({"task": "CD on planted co-occurrence graph", "impl": f"infomap (markov time {markov_time})",
                     "seconds": seconds, "objects found": len(set(found[fg].tolist())),
                     "objects planted": int(truth.max()), "ARI vs planted": adjusted_rand_score(truth[fg], found[fg])})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3, metavar=("LIB", "N", "ITERS"), help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_100_000])
    ap.add_argument("--skip-sklearn-large", action="store_true")
    ap.add_argument("--cd-only", action="store_true", help="only the community-detection comparison")
    args = ap.parse_args()
    if args.child:
        lib, n, iters = args.child
        print(json.dumps(run_one(lib, int(n), int(iters))))
        return
    if not args.cd_only:
        write_kmeans(args)
    write_results("cd_cpu", "cpu", cd_rows(),
                  ["task", "impl", "seconds", "objects found", "objects planted", "ARI vs planted"],
                  note="400 synthetic 28x28 label grids, 40 planted objects of 3-5 parts; edges under 0.05 dropped.")


def write_kmeans(args):
    rows = kmeans_rows(args.sizes, args.iters, args.skip_sklearn_large)
    write_results("cluster_cpu", "cpu", rows,
                  ["task", "impl", "seconds", "iters", "s/iter", "inertia", "peak RSS GiB", "time vs faiss",
                   "inertia vs faiss"],
                  note=f"{args.iters} Lloyd iterations, one init each (leopart: its default k-means++ on a subsample; faiss, "
                       f"scikit-learn: random points), euclidean; features of "
                       f"{TRUE_CENTRES} Gaussian centres; faiss without subsampling.")


if __name__ == "__main__":
    main()
