"""k-means, matching metrics, CBFE + community detection, and the Segmenter."""
import itertools

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import populate_hf_cache
from sklearn.metrics import adjusted_rand_score

import leopart
from leopart.cluster import _kmeans_pp
from leopart.cli import main
from leopart.errors import LeopartError
from leopart.merge import Segmenter, cbfe, communities, cooccurrence
from leopart.metrics import Confusion, hungarian_miou


# ------------------------------------------------------------------- metrics
def brute_force_one_to_one(pred, target, n_clusters, n_classes, unmatched_class=0):
    """The reference's one-to-one matching by exhaustion: try every assignment of clusters to distinct classes
    (or to nothing), keep those with the largest sum of matched (cluster, class) IoUs, send the clusters left
    without a class to ``unmatched_class`` (None: wrong everywhere) and return the mIoUs of the kept ones."""
    pred, target = pred.ravel(), target.ravel()
    best, mious = -1.0, set()
    for perm in itertools.permutations(range(max(n_clusters, n_classes)), n_clusters):
        score = sum(np.sum((pred == p) & (target == c)) / np.sum((pred == p) | (target == c))
                    for p, c in enumerate(perm) if c < n_classes and np.any((pred == p) | (target == c)))
        if score < best - 1e-12:
            continue
        left = -1 if unmatched_class is None else unmatched_class
        mapped = np.array([perm[p] if perm[p] < n_classes else left for p in pred])
        ious = []
        for c in range(n_classes):
            denom = np.sum((mapped == c) | (target == c))
            if denom:
                ious.append(np.sum((mapped == c) & (target == c)) / denom)
        miou = round(float(np.mean(ious)), 9)
        if score > best + 1e-12:
            best, mious = score, {miou}
        else:
            mious.add(miou)
    return mious


@pytest.mark.parametrize("seed", range(8))
def test_hungarian_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_clusters, n_classes = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    target = rng.integers(0, n_classes, size=(9, 7))
    pred = np.where(rng.random((9, 7)) < 0.6, (target + 1) % n_clusters, rng.integers(0, n_clusters, (9, 7)))
    for unmatched_class in (0, None):
        optimal = brute_force_one_to_one(pred, target, n_clusters, n_classes, unmatched_class)
        miou, per_class = hungarian_miou(pred, target, n_classes=n_classes, unmatched_class=unmatched_class)
        assert round(miou, 9) in optimal
        assert per_class.shape == (n_classes,)


def test_one_to_one_maximises_iou_not_correct_pixels():
    # Cluster 0 covers class 0 exactly (40 px); cluster 1 covers class 1 (10 px) and half of class 2 (50 of
    # 100 px); cluster 2 the rest of class 2. Most correct pixels: 1 -> 2 (50 px), leaving 2 and 1 alone
    # (IoUs 1, 50/110, 0); largest IoU sum: 1 -> 1 (10/60) and 2 -> 2 (50/100), as the reference matches.
    target = np.array([0] * 40 + [1] * 10 + [2] * 100)
    pred = np.array([0] * 40 + [1] * 10 + [1] * 50 + [2] * 50)
    n_classes = 3
    miou, iou = hungarian_miou(pred, target, n_classes=n_classes)
    np.testing.assert_allclose(iou, [1, 10 / 60, 50 / 100])
    # More clusters than classes: the left-over one is background (class 0), as in the reference.
    pred4 = np.where(np.arange(150) < 20, 3, pred)  # cluster 3 takes half of class 0
    _, iou = hungarian_miou(pred4, target, n_classes=n_classes)
    np.testing.assert_allclose(iou, [1, 10 / 60, 50 / 100])
    _, iou = hungarian_miou(pred4, target, n_classes=n_classes, unmatched_class=None)
    np.testing.assert_allclose(iou, [20 / 40, 10 / 60, 50 / 100])


def test_many_to_one_by_hand():
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 255]])
    pred = np.array([[0, 1, 2, 2], [0, 1, 3, 2], [4, 4, 0, 4]])
    # clusters 0,1 -> class 0 (cluster 0 overlaps class 0 twice, class 2 once); 2,3 -> 1; 4 -> 2
    miou, iou = hungarian_miou(pred, target, many_to_one=True)
    # class 0: TP 4 (0,0 1,0 0,1 1,1), FP 1 (cluster 0 at (2,2)); class 1: TP 4; class 2: TP 2, FN 1
    np.testing.assert_allclose(iou, [4 / 5, 4 / 4, 2 / 3])
    assert miou == pytest.approx((0.8 + 1 + 2 / 3) / 3)
    one_to_one, _ = hungarian_miou(pred, target)
    assert one_to_one < miou


def test_streaming_equals_concatenated_and_ignore_index():
    rng = np.random.default_rng(1)
    preds = [rng.integers(0, 6, (5, 8)) for _ in range(4)]
    targets = [rng.integers(0, 4, (5, 8)) for _ in range(4)]
    targets[2][0] = 255
    whole = hungarian_miou(np.concatenate(preds), np.concatenate(targets), many_to_one=True)
    streamed = hungarian_miou(iter(preds), (t for t in targets), many_to_one=True)
    assert whole[0] == pytest.approx(streamed[0])
    assert Confusion().update(np.array([[3]]), np.array([[255]])).counts.size == 0


def test_metric_errors():
    with pytest.raises(LeopartError, match="does not match"):
        hungarian_miou(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(LeopartError, match="different numbers"):
        hungarian_miou([np.zeros(3, int)], [np.zeros(3, int)] * 2)
    with pytest.raises(LeopartError, match="integer ids"):
        hungarian_miou(np.zeros(3), np.zeros(3, int))
    with pytest.raises(LeopartError, match="n_classes=2"):
        hungarian_miou(np.zeros(3, int), np.array([0, 1, 4]), n_classes=2)


# ------------------------------------------------------------------- k-means
def planted_mixture(n_per=400, k=6, d=16, seed=0, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1) * 3
    labels = torch.arange(k).repeat_interleave(n_per)
    x = centers[labels] + spread * 3 * torch.randn(len(labels), d, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm], labels[perm]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_kmeans_recovers_planted_mixture(metric):
    x, truth = planted_mixture()
    km = leopart.cluster(x, 6, metric=metric, seed=0)
    assert adjusted_rand_score(truth.numpy(), km.labels.numpy()) >= 0.99
    assert km.centroids.shape == (6, 16) and km.labels.shape == (2400,)
    again = leopart.cluster(x, 6, metric=metric, seed=0)
    assert torch.equal(km.labels, again.labels) and torch.equal(km.centroids, again.centroids)
    assert km.inertia == again.inertia
    assert torch.equal(km.predict(x), km.labels)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_points_on_their_centroids_have_no_negative_inertia(metric):
    for x in (torch.ones(100, 8), torch.tensor([[0.3, -1.7, 2.9], [1.1, 0.2, -0.4]]).repeat(50, 1)):
        km = leopart.cluster(x, 2, metric=metric, seed=0)
        # Only rounding is left; it was -1.2e-05 for the ones (sum of 1 - cos, with each cos rounded above 1).
        assert 0.0 <= km.inertia < 1e-3, km.inertia


def test_kmeans_input_forms_and_errors():
    x, _ = planted_mixture(n_per=50, k=3, d=8)
    grid = x[:144].reshape(4, 6, 6, 8)
    a = leopart.cluster(grid, 3, seed=1)
    b = leopart.cluster(iter(x[:144].split(50)), 3, seed=1)
    assert a.labels.shape == (144,) and torch.equal(a.labels, b.labels)
    assert torch.equal(leopart.cluster(grid, np.int64(3), seed=1).labels, a.labels)  # numpy's k too
    with pytest.raises(LeopartError, match="larger than the number of feature vectors"):
        leopart.cluster(x[:5], 6)
    with pytest.raises(LeopartError, match="NaN"):
        leopart.cluster(torch.full((10, 2), float("nan")), 2)
    late = torch.zeros(40_000, 2)
    late[33_000, 1] = float("inf")  # in a later chunk of the check
    with pytest.raises(LeopartError, match="NaN or infinite"):
        leopart.cluster(late, 2)
    bad = {"feats.safetensors": r"cannot cluster a path \(feats.safetensors\): pass the features",
           3: "cannot cluster a int", (): "no features to cluster", torch.zeros(5): r"got shape \(5,\)"}
    for features, match in bad.items():
        with pytest.raises(LeopartError, match=match):
            leopart.cluster(features, 2)
    with pytest.raises(LeopartError, match=r"different dimensions: \[4, 8\]"):
        leopart.cluster([x[:10], x[:10, :4]], 2)
    for init, match in [(torch.zeros(2, 8), r"init centroids must be \[3, 8\]"), ("foo", "init must be")]:
        with pytest.raises(LeopartError, match=match):
            leopart.cluster(x, 3, init=init)
    with pytest.raises(LeopartError, match="metric must be one of cosine, euclidean, not 'l1'"):
        leopart.cluster(x, 3, metric="l1")
    # Counts of the wrong kind are named (strings were TypeErrors from a comparison or the seeding).
    for kwargs, match in [(dict(iters="10"), "^iters must be an integer, not '10'$"),
                          (dict(iters=-1), "^iters must be >= 0, not -1$"),
                          (dict(seed="a"), "^seed must be an integer, not 'a'$"),
                          (dict(n_init=0), "^n_init must be a positive integer, not 0$")]:
        with pytest.raises(LeopartError, match=match):
            leopart.cluster(x, 3, **kwargs)
    assert leopart.cluster(x, 3, iters=np.int32(2), seed=np.int64(1)).centroids.shape == (3, 8)
    with pytest.raises(LeopartError, match="features of dimension 4, but the centroids have 8"):
        a.predict(x[:, :4])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_kmeans_result_does_not_depend_on_the_chunk_size(metric):
    """Chunks are a memory matter only: labels and centroids are bit-identical for any chunk size (on the CPU,
    where the default chunk is small)."""
    x, _ = planted_mixture(n_per=700, k=6, d=16)
    one = leopart.cluster(x, 12, iters=8, metric=metric, chunk_size=len(x))
    for chunk_size in (None, 333):
        other = leopart.cluster(x, 12, iters=8, metric=metric, chunk_size=chunk_size)
        assert torch.equal(one.labels, other.labels) and torch.equal(one.centroids, other.centroids)
        assert one.inertia == other.inertia
    with pytest.raises(LeopartError, match="metric"):
        leopart.cluster(x, 2, metric="manhattan")


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_kmeans_pp_seeding_is_d2_sampling(metric):
    """Each next centre is drawn with probability proportional to its squared distance to the nearest centre
    so far: the seeding picks what a plain loop picks from the same random draws."""
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    got = _kmeans_pp(x, 7, metric, torch.Generator().manual_seed(5), sample_size=200, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    pts = x[torch.randperm(300, generator=g)[:200]]
    if metric == "cosine":
        pts = torch.nn.functional.normalize(pts, dim=1)
    picked = [int(torch.randint(200, (1,), generator=g))]
    for _ in range(6):
        d2 = torch.stack([((pts - pts[i]) ** 2).sum(1) for i in picked]).min(0).values
        picked.append(int(torch.multinomial((d2 / d2.sum()).double(), 1, generator=g)))
    assert len(set(picked)) == 7 and torch.equal(got, pts[picked])


def test_empty_clusters_are_reseeded():
    x, _ = planted_mixture(n_per=100, k=4, d=8)
    init = x[:1].repeat(4, 1) + torch.arange(4)[:, None] * 1e-6  # all centroids on one point
    km = leopart.cluster(x, 4, init=init, metric="euclidean", iters=30)
    assert torch.bincount(km.labels, minlength=4).min() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kmeans_streams_features_that_do_not_fit(monkeypatch):
    """Features too big for the GPU stay in host memory and go over chunk by chunk: the result is the one
    with the features on the GPU (up to the rounding of atomic sums), the re-seeding of empty clusters included."""
    from leopart.cluster import _place

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40_000, 32, generator=g)
    x[:, 0] += 6  # every point near +e0, so the centroid at -e0 starts empty and is re-seeded
    init = torch.randn(8, 32, generator=g)
    init[0] = 0
    init[0, 0] = -1
    args = dict(iters=6, init=init, device="cuda", chunk_size=4096, progress=False)
    resident = leopart.cluster(x, 8, **args)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 1))  # nothing fits
    assert _place(x, torch.device("cuda")).device.type == "cpu"
    streamed = leopart.cluster(x, 8, **args)
    torch.testing.assert_close(streamed.centroids, resident.centroids, atol=1e-4, rtol=0)
    assert (streamed.labels == resident.labels).float().mean() > 0.999
    assert torch.bincount(streamed.labels, minlength=8).min() > 0


def test_kmeans_inertia_matches_faiss():
    faiss = pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20000, 32, generator=g) + 4 * torch.randn(40, 32, generator=g)[torch.randint(0, 40, (20000,), generator=g)]
    k, iters = 50, 25
    km = leopart.cluster(x, k, iters=iters, metric="euclidean", seed=0)
    fk = faiss.Kmeans(32, k, niter=iters, seed=1, max_points_per_centroid=10**6)
    fk.train(x.numpy())
    distances, _ = fk.index.search(x.numpy(), 1)
    faiss_inertia = float(distances.astype(np.float64).sum())
    assert km.inertia <= 1.01 * faiss_inertia, (km.inertia, faiss_inertia)



def test_raw_means_spherical_kmeans_is_faiss_spherical_kmeans():
    """raw_means=True follows faiss.Kmeans(spherical=True), the reference's CBFE k-means: from the same start, the
    same centroids and labels; averaging the unit vectors instead (leopart's default) ends elsewhere here, where the
    points' norms vary a lot."""
    faiss = pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(5)
    directions = torch.randn(6, 16, generator=g)
    x = directions[torch.randint(0, 6, (3000,), generator=g)] + 0.9 * torch.randn(3000, 16, generator=g)
    x = x * torch.exp(torch.randn(3000, 1, generator=g))  # norms spread over an order of magnitude
    start = torch.nn.functional.normalize(x[:8], dim=1)
    fk = faiss.Kmeans(16, 8, niter=40, spherical=True, max_points_per_centroid=10**6)
    fk.train(x.numpy(), init_centroids=start.numpy())
    _, faiss_labels = fk.index.search(x.numpy(), 1)
    km = leopart.cluster(x, 8, iters=40, metric="cosine", init=start, raw_means=True)
    torch.testing.assert_close(km.centroids, torch.from_numpy(fk.centroids), atol=1e-4, rtol=0)
    assert (km.labels.numpy() == faiss_labels[:, 0]).mean() > 0.999
    # Its inertia is faiss's objective turned into a cost: sum over points of |x| - x . c.
    cos = torch.nn.functional.normalize(x, dim=1) @ km.centroids.T
    assert km.inertia == pytest.approx(float((x.norm(dim=1) * (1 - cos.max(1).values)).double().sum()), rel=1e-4)
    unit = leopart.cluster(x, 8, iters=40, metric="cosine", init=start)
    assert (unit.centroids - torch.from_numpy(fk.centroids)).abs().max() > 1e-2
    with pytest.raises(LeopartError, match="raw_means is an option of spherical k-means"):
        leopart.cluster(x, 8, metric="euclidean", raw_means=True)

# ---------------------------------------------------------------- CBFE and CD
def test_cbfe_picks_low_attention_clusters():
    labels = [torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1], [3, 3, 3, 3]])]
    fg = [torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)]
    flags, chosen = cbfe(labels, fg, 4, bg_share=0.6)  # cluster 0: 0/3 fg, 3: 1/4, 1 and 2: all fg
    assert flags.tolist() == [False, True, True, False]
    assert chosen["bg_share_actual"] == pytest.approx(7 / 12)


def planted_scene(seed, size=12):
    """Object A = parts 1,2,3 (stacked bands), object B = parts 4,5 (side by side), background part 0."""
    rng = np.random.default_rng(seed)
    grid = np.zeros((size, size), dtype=np.int64)
    y, x = rng.integers(0, 3, 2)
    grid[y:y + 2, x:x + 4], grid[y + 2:y + 4, x:x + 4], grid[y + 4:y + 6, x:x + 4] = 1, 2, 3
    y, x = rng.integers(0, 3), rng.integers(7, 8)
    grid[y + 6:y + 9, x:x + 2], grid[y + 6:y + 9, x + 2:x + 4] = 4, 5
    return torch.from_numpy(grid)


def test_community_detection_recovers_planted_objects():
    grids = [planted_scene(s) for s in range(10)]
    fg = np.array([False, True, True, True, True, True])
    weights = cooccurrence(grids, fg)
    assert weights[0].sum() == 0 and weights[1, 4] == 0  # background and cross-object pairs never count
    p2o = communities(weights, fg, weight_threshold=0.05, seed=0)
    assert p2o[0] == 0
    assert p2o[1] == p2o[2] == p2o[3] and p2o[4] == p2o[5] and p2o[1] != p2o[4]
    assert sorted(set(p2o.tolist())) == [0, 1, 2]


def test_community_detection_without_edges_keeps_every_part_apart():
    """No pair of foreground parts above the threshold: each is its own object (networkx 3.0's Louvain
    raised ZeroDivisionError on such a graph)."""
    fg = np.array([False, True, True, True])
    p2o = communities(np.zeros((4, 4)), fg, weight_threshold=0.07, seed=0)
    assert p2o[0] == 0 and sorted(p2o[1:].tolist()) == [1, 2, 3]


def test_community_edges_need_the_weight_both_ways():
    """As in the reference code: parts join only when each is a frequent neighbour of the other. Part 1 sits
    beside part 2 in 30% of its neighbourhoods but 2 beside 1 in 1%: no edge (their mean, 15.5%, made one)."""
    fg = np.array([False, True, True, True])
    weights = np.zeros((4, 4))
    weights[1, 2], weights[2, 1] = 0.3, 0.01
    weights[2, 3] = weights[3, 2] = 0.2
    p2o = communities(weights, fg, weight_threshold=0.1, seed=0)
    assert p2o[2] == p2o[3] and p2o[1] != p2o[2]


def test_merge_checks_its_inputs_and_takes_arrays():
    centroids = torch.randn(5, 8)
    gen = torch.Generator().manual_seed(0)
    grids = [torch.randint(0, 5, (4, 4), generator=gen) for _ in range(3)]
    fg = [torch.rand(4, 4, generator=gen) > 0.5 for _ in range(3)]
    fitted = leopart.merge(centroids, grids, fg)
    from_arrays = leopart.merge(centroids.numpy(), [g.numpy() for g in grids], [f.numpy() for f in fg])
    assert torch.equal(fitted.part_to_object, from_arrays.part_to_object)
    bad = [(dict(labels=[g - 1 for g in grids]), r"part ids -1..3, but the 5 centroids allow 0..4"),
           (dict(labels=[g.float() for g in grids]), "labels must be integer part ids"),
           (dict(labels=[g[:0] for g in grids]), "no patches to merge"),
           (dict(centroids=centroids[0]), r"centroids must be \[K, D\], got shape \(8,\)"),
           (dict(metric="dot"), "metric must be one of cosine, euclidean, not 'dot'"),
           (dict(weight_threshold=-0.1), r"weight_threshold must lie in \[0, 1\], not -0.1"),
           (dict(resolution=0), "the Louvain resolution must be positive, not 0"),
           # Settings of the wrong kind (were TypeErrors from a comparison).
           (dict(weight_threshold="0.1"), "^weight_threshold must be a number, not '0.1'$"),
           (dict(bg_share="0.6"), "^bg_share must be a number, not '0.6'$"),
           (dict(seed="1"), "^seed must be an integer, not '1'$")]
    for change, match in bad:
        args = {"centroids": centroids, "labels": grids, "foreground": fg, **change}
        with pytest.raises(LeopartError, match=match):
            leopart.merge(args.pop("centroids"), args.pop("labels"), args.pop("foreground"), **args)
    # numpy scalars work (a numpy seed failed in networkx) and are kept as plain numbers, which config.json takes.
    seg = leopart.merge(centroids, grids, fg, weight_threshold=np.float32(0.05), seed=np.int64(1))
    assert type(seg.params["seed"]) is int and type(seg.params["weight_threshold"]) is float


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_segmenter_assigns_parts_as_its_kmeans_did(tmp_path, metric):
    """A segmenter's part scores rank the centroids as its k-means assigned (nearest by squared distance for
    Euclidean parts, not by cosine), also after a save and load."""
    x, _ = planted_mixture(n_per=60, k=6, d=16, seed=1)
    x = x * torch.linspace(0.2, 3.0, len(x))[:, None]  # norms that differ, so the two metrics disagree
    km = leopart.cluster(x, 6, metric=metric, seed=0)
    grids = km.labels.view(-1, 6, 10)
    seg = leopart.merge(km, grids, grids % 2 == 0)
    assert seg.metric == metric
    loaded = Segmenter.from_pretrained(seg.save_pretrained(tmp_path / "seg"))
    assert loaded.metric == metric
    for s in (seg, loaded):
        assert torch.equal(s.part_scores(x).argmax(-1), km.labels)
        assert torch.equal(s.part_scores(x.view(-1, 6, 10, 16)).argmax(-1), grids)  # any leading shape


def test_merge_end_to_end_and_segmenter_round_trip(tmp_path):
    grids = [planted_scene(s) for s in range(10)]
    fg_masks = [g > 0 for g in grids]
    centroids = torch.randn(6, 8)
    seg = leopart.merge(centroids, grids, fg_masks, bg_share=None, weight_threshold=0.05)
    assert seg.part_to_object[0] == 0 and seg.n_objects == 2
    assert not seg.foreground[0] and seg.foreground[1:].all()
    folder = seg.save_pretrained(tmp_path / "seg")
    assert "6 part clusters merged into 2 objects (5 foreground parts)" in (folder / "README.md").read_text()
    loaded = Segmenter.from_pretrained(folder)
    assert torch.equal(loaded.part_to_object, seg.part_to_object) and torch.equal(loaded.centroids, seg.centroids)
    assert loaded.params["weight_threshold"] == 0.05
    files = {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")}
    populate_hf_cache("someone/tiny-segmenter", files)
    hub_seg = Segmenter.from_pretrained("someone/tiny-segmenter")
    assert torch.equal(hub_seg.foreground, seg.foreground)
    # `leopart info` describes a segmenter on the Hub as it does a local one, naming the repo.
    r = CliRunner().invoke(main, ["info", "someone/tiny-segmenter"])
    assert r.exit_code == 0 and "segmenter            someone/tiny-segmenter\nparts                6\n" in r.output, r.output
    # A repo of another kind fails by its config alone, before its weights would download (none are cached).
    populate_hf_cache("someone/config-only", {"config.json": (folder / "config.json").read_bytes()})
    with pytest.raises(LeopartError, match="^Hub repository 'someone/config-only' holds a leopart segmenter, "
                                           "not a leopart model$"):
        leopart.from_pretrained("someone/config-only")
    with pytest.raises(LeopartError, match="^Hub repository 'someone/config-only' holds a leopart segmenter, "
                                           "not a leopart probe head$"):
        leopart.ProbeHead.from_pretrained("someone/config-only")
    with pytest.raises(LeopartError, match=r"part ids 0..5, but the 3 centroids allow 0..2"):
        leopart.merge(centroids[:3], grids, fg_masks)
    with pytest.raises(LeopartError, match="not a saved leopart segmenter"):
        Segmenter.from_pretrained(tmp_path)
