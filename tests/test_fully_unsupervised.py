"""The reference protocol's fully unsupervised pipeline (leopart.fully_unsupervised), step by step against
plain loops written the way the reference code computes each step, and end to end through `leopart eval`."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from test_segment_eval import scene

from leopart import fully_unsupervised as fu
from leopart.cli import main
from leopart.errors import LeopartError
from leopart.evaluate import PROTOCOLS, fit_kmeans, standardise_and_project


def upsampled(grid_maps: torch.Tensor, size: int) -> np.ndarray:
    return F.interpolate(grid_maps[:, None].float(), size=(size, size), mode="nearest")[:, 0].long().numpy()


def glcm_loops(image: np.ndarray, levels: int, distances, angles) -> np.ndarray:
    """skimage.feature.greycomatrix(image, distances, angles, levels).sum((2, 3)), as plain loops."""
    out = np.zeros((levels, levels), dtype=np.int64)
    rows, cols = image.shape
    for angle in angles:
        for d in distances:
            # skimage rounds half away from zero (its own `round` in _shared/interpolation.pxd)
            dr = int(np.sign(math.sin(angle) * d) * math.floor(abs(math.sin(angle) * d) + 0.5))
            dc = int(np.sign(math.cos(angle) * d) * math.floor(abs(math.cos(angle) * d) + 0.5))
            for r in range(max(0, -dr), min(rows, rows - dr)):
                for c in range(max(0, -dc), min(cols, cols - dc)):
                    out[image[r, c], image[r + dr, c + dc]] += 1
    return out


def test_cooccurrence_offsets_are_greycomatrix_ones():
    # 4 pi / 3 (the reference's angle list) lands on the diagonal (-1, -1) at distance 1 and on (-2, -1) at 2;
    # pi / 4 at distance 2 rounds to (1, 1), so diagonals count twice.
    assert fu.cooccurrence_offsets() == [(0, 1), (0, 2), (1, 1), (1, 1), (1, 0), (2, 0), (1, -1), (1, -1), (0, -1),
                                         (0, -2), (-1, -1), (-2, -1), (-1, 0), (-2, 0), (-1, 1), (-1, 1)]


def test_cooccurrence_weights_match_the_reference_matrix():
    rng = np.random.default_rng(0)
    levels, size = 6, 11
    labels = torch.from_numpy(rng.integers(0, levels - 1, (5, 3, 4)))
    labels[2] = 1  # an image holding one part only: no neighbours, no row
    labels[3, :, :2] = levels - 1
    index = fu.upsample_index((3, 4), size)
    got = fu.cooccurrence_weights(labels, levels, index, chunk=2)
    total, appears = np.zeros((levels, levels)), np.zeros(levels)
    for image in upsampled(labels, size):
        counts = glcm_loops(image, levels, fu.CD_DISTANCES, fu.CD_ANGLES)
        np.fill_diagonal(counts, 0)
        rows = counts.sum(1, keepdims=True)
        total += np.divide(counts, rows, out=np.zeros((levels, levels)), where=rows != 0)
        appears += (rows[:, 0] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = total / appears[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
    # Image 2's lone part has no neighbour: the image counts nowhere.
    np.testing.assert_allclose(fu.cooccurrence_weights(labels[[0, 1, 3, 4]], levels, index), got, equal_nan=True)


def test_graph_edges_need_both_directions_and_weigh_the_smaller():
    w = np.array([[0.0, 0.5, 0.05, np.nan], [0.2, 0.0, 0.3, 0.1], [0.4, 0.3, 0.0, 0.0], [np.nan, 0.1, 0.0, 0.0]])
    assert fu.graph_edges(w, 0.1) == [(0, 1, 0.2), (1, 2, 0.3), (1, 3, 0.1)]


def test_cluster_precisions_average_per_image_precisions():
    rng = np.random.default_rng(1)
    k = 7
    labels = torch.from_numpy(rng.integers(0, k - 1, (6, 5, 5)))  # cluster 6 appears nowhere
    fg = torch.from_numpy(rng.random((6, 5, 5)) < 0.4)
    index = fu.upsample_index((5, 5), 13)
    pixels = torch.bincount(index.flatten(), minlength=25).view(5, 5)
    got = fu.cluster_precisions(labels, fg, k, pixels)
    lab, att = upsampled(labels, 13), upsampled(fg.long(), 13)
    sums, seen = np.zeros(k), np.zeros(k)
    for img_lab, img_att in zip(lab, att):  # the reference's get_cluster_precs
        for c in np.unique(img_lab):
            tp = np.sum((img_att == 1) & (img_lab == c))
            fp = np.sum((img_att != 1) & (img_lab == c))
            sums[c] += tp / max(tp + fp, 1e-8)
            seen[c] += 1
    want = np.divide(sums, seen, out=np.zeros(k), where=seen > 0)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[k - 1] == 0


def test_cbfe_cut_is_the_best_train_cut_rounded_to_005():
    rng = np.random.default_rng(2)
    k, size = 20, 12
    index = fu.upsample_index((4, 4), size)
    targets = [rng.choice([0, 0, 3, 255], (size, size)).astype(np.uint8) for _ in range(8)]
    labels = torch.from_numpy(rng.integers(0, k, (8, 4, 4)))
    precisions = rng.random(k)
    check_cbfe_cut(precisions, labels, targets, index, size)
    # Clusters 11..14 (in precision order) hold no patch, so the cuts at 11..14 tie: the reference's stable sort by
    # IoU leaves the last of them best.
    precisions = np.arange(k) / k
    labels = torch.from_numpy(rng.choice([*range(11), *range(15, k)], (8, 4, 4)))
    assert check_cbfe_cut(precisions, labels, targets, index, size).cut == 14
    with pytest.raises(LeopartError, match="CBFE with 1 clusters tries no cut"):
        fu.choose_cbfe_cut(precisions[:1], labels * 0, targets, index)


def check_cbfe_cut(precisions, labels, targets, index, size):
    k = len(precisions)
    got = fu.choose_cbfe_cut(precisions, labels, targets, index)
    lab = upsampled(labels, size)
    order = np.argsort(precisions, kind="stable")
    jacs = []
    for start in range(int(0.55 * k), int(0.75 * k)):  # the reference's find_good_threshold + eval_jac
        mask = np.isin(lab, order[start:])
        ious = [np.sum((t != 0) & m) / np.sum((t != 0) | m) for t, m in zip(targets, mask)]
        jacs.append((precisions[order[start]], start, np.mean(ious)))
    best = sorted(jacs, key=lambda x: x[2])[-1]  # not max(): among ties the last one, as the reference
    threshold = min(np.arange(0, 1, 0.05), key=lambda x: abs(x - best[0]))
    assert (got.cut, got.threshold) == (best[1], threshold)
    assert got.train_iou == pytest.approx(best[2], rel=1e-12)
    return got


def test_fit_kmeans_with_repeats_clusters_the_upsampled_points():
    torch.manual_seed(0)
    x = torch.randn(40, 3)
    repeats = torch.randint(1, 5, (40,))
    run = PROTOCOLS["reference"]
    got = fit_kmeans(x, 4, run, seed=3, device="cpu", progress=False, repeats=repeats)
    # With at most 256 points per cluster nothing is sampled: the fit is over every repeated point.
    from leopart.cluster import cluster

    want = cluster(x.repeat_interleave(repeats, dim=0), 4, iters=run.iters, n_init=run.n_init, init=run.init, seed=3,
                   metric="euclidean")
    torch.testing.assert_close(got.centroids, want.centroids)
    assert torch.equal(got.labels, want.predict(x))
    assert got.labels.shape == (40,)


def test_standardise_and_project_a_list_as_one_set():
    torch.manual_seed(1)
    a, b = torch.randn(3, 4, 4, 16), torch.randn(2, 4, 4, 16) * 3 + 1
    got_a, got_b = standardise_and_project([a, b], 5)
    want = standardise_and_project(torch.cat([a, b]), 5)
    torch.testing.assert_close(torch.cat([got_a, got_b]), want)


def test_infomap_finds_planted_communities():
    pytest.importorskip("infomap")  # a test dependency: pip install -e ".[test]" has it
    edges = [(0, 1, 0.5), (1, 2, 0.5), (0, 2, 0.5), (3, 4, 0.5), (4, 5, 0.5), (3, 5, 0.5), (2, 3, 0.05)]
    modules = fu.infomap_modules(edges, markov_time=1.0, preferred_modules=2, seed=1)
    assert modules[0] == modules[1] == modules[2] != modules[3] == modules[4] == modules[5]
    assert min(modules.values()) == 1  # module ids start at 1; 0 is left to parts outside the graph


def test_infomap_runs_beside_faiss():
    # Walking infomap's result tree crashed the process (a SWIG iterator) once faiss was imported after infomap.
    pytest.importorskip("infomap")
    pytest.importorskip("faiss")
    code = ("import infomap, faiss; from leopart.fully_unsupervised import infomap_modules; "
            "print(infomap_modules([(0, 1, 0.5), (1, 2, 0.5), (2, 3, 0.05)], 1.0, 2, 1))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.startswith("{"), done.stderr


@pytest.fixture()
def voc_train_val(tmp_path):
    root = tmp_path / "voc"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    names = []
    for i in range(12):
        img, mask = scene(64, 48 + 8 * (i % 3), 10 + i)
        names.append(f"img{i:03d}")
        Image.fromarray(img).save(root / "JPEGImages" / f"{names[-1]}.jpg")
        Image.fromarray(mask).save(root / "SegmentationClass" / f"{names[-1]}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:6]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(names[6:]) + "\n")
    return root


def test_eval_cli_runs_the_reference_fully_unsupervised_protocol(tiny_model_dir, voc_train_val, tmp_path,
                                                                 monkeypatch):
    pytest.importorskip("infomap")
    ev = sys.modules["leopart.evaluate"]
    fits = []
    real_cluster = ev.cluster

    def recording_cluster(x, k, **kwargs):
        fits.append((k, kwargs["metric"], kwargs["raw_means"]))
        return real_cluster(x, k, **kwargs)

    monkeypatch.setattr(ev, "cluster", recording_cluster)
    out = tmp_path / "res.json"
    args = ["eval", str(voc_train_val), "--model", str(tiny_model_dir), "--k", "5", "--fully-unsupervised",
            "--fu-k", "6", "--cbfe-k", "10", "--cd-runs", "3", "--weight-threshold", "0.01", "--resolution", "64",
            "--json", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    d = res["fully_unsupervised_details"]
    assert d["pipeline"] == "reference" and d["train_split"] == "train" and d["n_train_images"] == 6
    assert (d["k"], d["cbfe_k"], d["cd_runs"], d["markov_time"], d["weight_threshold"]) == (6, 10, 3, 2.0, 0.01)
    assert len(res["fully_unsupervised_runs"]) == 3 and len(d["n_objects"]) == 3
    assert res["fully_unsupervised"] == pytest.approx(np.mean(res["fully_unsupervised_runs"]))
    assert all(0 <= v <= 100 for v in res["fully_unsupervised_runs"])
    # The cuts tried send int(0.55 * 10) = 5 or 6 (< int(0.75 * 10)) of the 10 CBFE clusters to the background.
    assert d["cbfe_cut"] in (5, 6) and 0 <= d["cbfe_threshold"] < 1 and 0 <= d["fg_share"] <= 1
    assert round(d["cbfe_threshold"] / 0.05, 6) == round(d["cbfe_threshold"] / 0.05)
    assert "fully unsupervised (k=6, CBFE k=10 cut on train masks, Infomap markov time 2," in r.output
    assert "mean +- std of 3 Infomap runs" in r.output
    # CBFE's spherical k-means is faiss's (normalised means of the raw tokens); the others are Euclidean.
    assert d["cbfe_spherical_means"] == "raw"
    assert sorted(set(fits)) == [(5, "euclidean", False), (6, "euclidean", False), (10, "cosine", True)]
    # The same run again gives the same scores (seeded k-means and Infomap).
    r = CliRunner().invoke(main, args)
    assert json.loads(out.read_text())["fully_unsupervised_runs"] == res["fully_unsupervised_runs"]


def test_eval_cli_reference_fully_unsupervised_refusals(tiny_model_dir, voc_train_val, monkeypatch):
    base = ["eval", str(voc_train_val), "--model", str(tiny_model_dir), "--fully-unsupervised", "--resolution", "64"]
    r = CliRunner().invoke(main, [*base, "--train-split", "val"])
    assert r.exit_code == 1 and "--train-split 'val' shares 6 image(s) with the scored split" in r.output, r.output
    r = CliRunner().invoke(main, [*base, "--bg-share", "0.6"])
    assert r.exit_code == 1 and "pipeline of --protocol cosine, not of --protocol reference" in r.output, r.output
    r = CliRunner().invoke(main, [*base, "--protocol", "cosine", "--markov-time", "0.4"])
    assert r.exit_code == 1 and "pipeline of --protocol reference, not of --protocol cosine" in r.output, r.output
    # Without the infomap package: one line saying what to install, before any model runs.
    monkeypatch.setitem(sys.modules, "infomap", None)
    monkeypatch.setattr(sys.modules["leopart.evaluate"], "dense_features", None)
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 1 and "pip install infomap" in r.output and "Traceback" not in r.output, r.output


def test_reference_protocol_orchestrates_its_steps_as_the_reference(monkeypatch):
    """The whole pipeline, with k-means and Infomap replaced by fixed rules, against the reference's steps written
    out as plain loops on the upsampled maps: train/scored splits, CBFE on both, parts, graph, scoring."""
    from scipy.optimize import linear_sum_assignment

    from leopart.cluster import KMeansResult

    def fit(points, k, metric, seed, repeats):  # a fixed "clustering": the largest of the first k coordinates
        return KMeansResult(torch.zeros(k, points.shape[-1]), points.reshape(-1, points.shape[-1])[:, :k].argmax(1),
                            0.0, 0, metric)

    def components(edges, markov_time, preferred_modules, seed):  # a fixed "community detection"
        parent = {}

        def root(i):
            while parent.setdefault(i, i) != i:
                i = parent[i]
            return i
        for i, j, _ in edges:
            parent[root(i)] = root(j)
        roots = sorted({root(i) for i in parent})
        return {i: roots.index(root(i)) + 1 for i in parent}

    monkeypatch.setattr(fu, "infomap_modules", components)
    monkeypatch.setattr(fu, "check_infomap", lambda: None)  # Infomap is replaced: runs where infomap has no wheels
    rng = np.random.default_rng(5)
    nt, nv, grid, size, d, cbfe_k, k, classes = 7, 6, (6, 6), 13, 12, 10, 8, 3
    tokens = torch.from_numpy(rng.normal(size=(nt + nv, *grid, d))).float()
    attention_fg = torch.from_numpy(rng.random((nt + nv, *grid)) < 0.5)
    targets = [rng.choice([0, 1, 2, 255], (size, size), p=[0.5, 0.2, 0.2, 0.1]).astype(np.uint8)
               for _ in range(nt + nv)]
    got = fu.reference_protocol(tokens[:nt], attention_fg[:nt], targets[:nt], tokens[nt:], attention_fg[nt:],
                                targets[nt:], k=k, num_classes=classes, fit=fit, cbfe_k=cbfe_k, weight_threshold=0.12,
                                markov_time=1.0, runs=2, mask_size=size)

    def up(maps):
        return F.interpolate(maps[:, None].float(), size=(size, size), mode="nearest")[:, 0].long().numpy()

    def precisions(labels, fg):  # get_cluster_precs
        sums, seen = np.zeros(cbfe_k), np.zeros(cbfe_k)
        for lab, att in zip(labels, fg):
            for c in np.unique(lab):
                sums[c] += np.sum(att[lab == c]) / np.sum(lab == c)
                seen[c] += 1
        return np.divide(sums, seen, out=np.zeros(cbfe_k), where=seen > 0)

    cbfe = tokens[..., :cbfe_k].argmax(-1)
    cbfe_up, fg_up = up(cbfe), up(attention_fg.long())
    train_precs = precisions(cbfe_up[:nt], fg_up[:nt])
    order = np.argsort(train_precs, kind="stable")
    jacs = []
    for start in range(int(0.55 * cbfe_k), int(0.75 * cbfe_k)):  # find_good_threshold with eval_jac
        mask = np.isin(cbfe_up[:nt], order[start:])
        ious = [np.sum((t != 0) & m) / np.sum((t != 0) | m) for t, m in zip(targets[:nt], mask)]
        jacs.append((train_precs[order[start]], np.mean(ious)))
    best = sorted(jacs, key=lambda j: j[1])[-1]  # not max(): among ties the last one, as the reference
    threshold = min(np.arange(0, 1, 0.05), key=lambda x: abs(x - best[0]))
    keep = np.concatenate([np.isin(cbfe_up[:nt], np.flatnonzero(train_precs >= threshold)),
                           np.isin(cbfe_up[nt:], np.flatnonzero(precisions(cbfe_up[nt:], fg_up[nt:]) >= threshold))])
    parts = np.where(keep, up(tokens[..., :k].argmax(-1)), k)  # foreground pixels' parts, background k
    total, appears = np.zeros((k + 1, k + 1)), np.zeros(k + 1)
    for image in parts:  # create_matrix
        counts = glcm_loops(image, k + 1, [1, 2], fu.CD_ANGLES)
        np.fill_diagonal(counts, 0)
        rows = counts.sum(1, keepdims=True)
        total += np.divide(counts, rows, out=np.zeros(counts.shape), where=rows != 0)
        appears += rows[:, 0] > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        w = total / appears[:, None]
    edges = [(i, j, min(w[i, j], w[j, i])) for i in range(k + 1) for j in range(i + 1, k + 1)
             if w[i, j] >= 0.12 and w[j, i] >= 0.12]
    modules = components(edges, 1.0, classes - 1, 1)
    pred = np.vectorize(lambda p: modules.get(p, 0))(parts[nt:])
    gt = np.stack(targets[nt:])
    valid = gt != 255
    n_pred = max(pred.max() + 1, classes)
    iou = np.zeros((n_pred, classes))
    for p in range(n_pred):
        for c in range(classes):
            inter = np.sum((pred == p) & (gt == c) & valid)
            union = np.sum(((pred == p) | (gt == c)) & valid)
            iou[p, c] = inter / union if union else 0
    rows, cols = linear_sum_assignment(iou, maximize=True)
    mapped = np.zeros_like(pred)  # unmatched predictions -> background
    for r, c in zip(rows, cols):
        mapped[pred == r] = c
    class_iou = [np.sum((mapped == c) & (gt == c) & valid) / np.sum(((mapped == c) | (gt == c)) & valid)
                 for c in range(classes)]
    assert got["runs"] == pytest.approx([100 * np.mean(class_iou)] * 2, rel=1e-9)
    assert got["n_edges"] == len(edges) and got["cbfe_threshold"] == pytest.approx(threshold)
    assert got["n_objects"] == [len(set(modules.values()))] * 2 and len(set(modules.values())) > 1  # not all one
