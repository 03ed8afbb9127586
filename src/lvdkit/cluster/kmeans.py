"""Flat k-means with Faiss: k-means++ seeding on a sample, Lloyd iterations in Faiss, chunked assignment of all points.

The building block of the hierarchical k-means of Vo et al. 2024 ("Automatic Data Curation for Self-Supervised
Learning"), which seeds every k-means with k-means++. Faiss's own k-means seeds at random by default; its built-in
k-means++ (``ClusteringInitMethod_KMEANS_PLUS_PLUS``) makes one sequential pass over all training points per
centre: 10 s against 0.7 s for one Lloyd iteration at 50k x 384 and k = 500 (2 cores). So seeding is done here in
numpy (:func:`kmeans_pp_seeds`), greedy and on a sample, and handed to Faiss as ``init_centroids``.

Spherical k-means (the default, for unit embeddings): the rows are L2-normalised, centroids are renormalised after
every iteration (Faiss ``spherical=True``), points go to the centroid of largest inner product, and the reported
distance is ``1 - cosine``. Otherwise: Euclidean k-means and squared L2 distances. Faiss computes in float32
(the paper's web-scale run used float64).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Literal

import numpy as np

from lvdkit.core.faiss_lib import faiss
from lvdkit.core.knn import gpu_available, l2_normalize

InitMethod = Literal["kmeans++", "random"]

DEFAULT_POINTS_PER_CENTROID = 256  # Faiss's default max_points_per_centroid: more training points barely help
SEED_POINTS_PER_CENTROID = 16  # k-means++ seeding sample: enough candidates per centre, cheap for large k
SEED_ROUNDS = 256  # k-means++ draws all k centres in at most this many rounds (exact k-means++ for k <= 256)
ASSIGN_CHUNK = 65_536  # rows searched at a time: bounded temporaries (Faiss blocks the distance matrix itself)
SMALL_WORK = 2**25  # N x k x D below this (~10 ms of one core per pass): run single-threaded (see _small_job)


def prepare(x: np.ndarray, spherical: bool) -> np.ndarray:
    """Contiguous float32 rows [N, D], L2-normalised when ``spherical`` (left as they are when already unit)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not spherical or len(x) == 0:
        return x
    norms = np.linalg.norm(x, axis=1)
    return x if np.allclose(norms, 1.0, atol=1e-4) else l2_normalize(x)


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    n_iter: int = 20,
    spherical: bool = True,
    seed: int = 0,
    sample: int | None = None,
    gpu: bool | None = None,
    init: InitMethod = "kmeans++",
    init_centroids: np.ndarray | None = None,
    chunk: int = ASSIGN_CHUNK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means of the rows of ``x`` [N, D] into ``k`` clusters.

    Training uses at most ``sample`` rows (default ``256 * k``, Faiss's ``max_points_per_centroid``), drawn
    uniformly with ``seed``; every row is then assigned to its nearest centroid in chunks. ``init_centroids``
    [k, D], when given, replaces the seeding (``init``: 'kmeans++' on a sample, or Faiss's 'random'). ``gpu``:
    None = on GPU when this Faiss build sees one.

    Returns centroids [k, D] float32 (unit rows when spherical), assignment [N] int64, distance [N] float32
    (``1 - cosine`` when spherical, else squared L2). Deterministic for a given seed on CPU.
    """
    n = len(x)
    if k < 1 or k > n:
        raise ValueError(f"k-means of {n} points into k={k} clusters: need 1 <= k <= {n}")
    if init not in ("kmeans++", "random"):
        raise ValueError(f"k-means init {init!r}; valid: 'kmeans++', 'random'")
    use_gpu = _resolve_gpu(gpu)
    x = prepare(x, spherical)
    d = x.shape[1]
    rng = np.random.default_rng(seed)

    n_train = min(n, sample if sample is not None else DEFAULT_POINTS_PER_CENTROID * k)
    if n_train < k:
        raise ValueError(f"k-means sample={sample} is smaller than k={k}")
    train = x if n_train == n else x[np.sort(rng.choice(n, size=n_train, replace=False))]

    if init_centroids is not None:
        if init_centroids.shape != (k, d):
            raise ValueError(f"init_centroids has shape {init_centroids.shape}; expected {(k, d)}")
        start: np.ndarray | None = prepare(init_centroids, spherical)
    elif init == "kmeans++":
        start = kmeans_pp_seeds(train, k, spherical=spherical, seed=seed)
    else:
        start = None

    km = faiss.Kmeans(
        d,
        k,
        niter=n_iter,
        spherical=spherical,
        seed=seed,
        gpu=use_gpu,
        verbose=False,
        # we already subsampled: stop Faiss from subsampling again, and from warning about few points per centroid
        # (higher levels of the hierarchy cluster ~10 centroids per cluster on purpose)
        max_points_per_centroid=(n_train + k - 1) // k + 1,
        min_points_per_centroid=1,
    )
    if n_iter > 0:
        with _small_job(n_train * k * d):
            km.train(train, init_centroids=start)
        centroids = np.asarray(km.centroids, dtype=np.float32).reshape(k, d)
    elif start is not None:
        centroids = start.copy()
    else:
        centroids = train[np.sort(rng.choice(n_train, size=k, replace=False))].copy()
    if spherical:
        centroids = l2_normalize(centroids)  # exact unit rows whatever the iteration count
    assign, dist = assign_to_centroids(x, centroids, spherical=spherical, gpu=use_gpu, chunk=chunk)
    return centroids, assign, dist


def assign_to_centroids(
    x: np.ndarray, centroids: np.ndarray, *, spherical: bool = True, gpu: bool | None = None, chunk: int = ASSIGN_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row of ``x`` [N, D] among ``centroids`` [k, D], by exact (flat) search in chunks.

    Returns assignment [N] int64 and distance [N] float32: ``1 - inner product`` when spherical (``1 - cosine`` for
    unit rows), else squared L2.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    d = centroids.shape[1]
    index: faiss.Index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    if _resolve_gpu(gpu):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(centroids)
    assign = np.empty(len(x), np.int64)
    dist = np.empty(len(x), np.float32)
    with _small_job(len(x) * len(centroids) * d):
        for start in range(0, len(x), chunk):
            s, i = index.search(x[start : start + chunk], 1)
            assign[start : start + chunk] = i[:, 0]
            dist[start : start + chunk] = 1.0 - s[:, 0] if spherical else s[:, 0]
    if spherical:
        np.maximum(dist, 0.0, out=dist)  # float32 rounding can give -1e-7 for a point equal to its centroid
    return assign, dist


def kmeans_pp_seeds(
    x: np.ndarray,
    k: int,
    *,
    spherical: bool = True,
    seed: int = 0,
    sample: int | None = None,
    rounds: int = SEED_ROUNDS,
) -> np.ndarray:
    """k-means++ (D² sampling, Arthur & Vassilvitskii 2007) initial centres for ``x`` [N, D]: [k, D] float32 rows.

    Runs on at most ``sample`` rows (default ``16 * k``, at least 10,000). For k <= ``rounds`` centres are drawn
    one at a time, greedily as in scikit-learn: ``2 + ln k`` candidates by D² sampling, keep the one that lowers
    the potential most (plain k-means++ often puts two seeds in one blob and none in another). Larger k would
    mean k sequential passes over the sample, so the centres are drawn in ``rounds`` batches of ``ceil(k /
    rounds)`` instead, each batch by D² sampling without replacement against the centres of the previous batches:
    a close, BLAS-friendly approximation of k-means++.
    """
    rng = np.random.default_rng(seed)
    n = len(x)
    s = min(n, sample if sample is not None else max(SEED_POINTS_PER_CENTROID * k, 10_000))
    if not 1 <= k <= s:
        raise ValueError(f"k-means++ seeding of {s} points into k={k} centres: need 1 <= k <= {s}")
    pool = x if s == n else x[np.sort(rng.choice(n, size=s, replace=False))]
    pool = np.ascontiguousarray(pool, dtype=np.float32)
    sq_norms = np.einsum("ij,ij->i", pool, pool)  # [S]

    def sq_dist(idx: np.ndarray) -> np.ndarray:
        """Squared distances [S, len(idx)] of the pool to pool[idx]: |p|² + |c|² - 2 p·c, one matrix product."""
        return np.maximum(sq_norms[:, None] + sq_norms[idx][None, :] - 2.0 * (pool @ pool[idx].T), 0.0)

    def draw(best: np.ndarray, chosen: list[int], m: int) -> np.ndarray:
        """m distinct pool indices, each with probability ~ best (Gumbel top-m on log weights). Already chosen
        points weigh 0 and come last (drawn only if nothing else is left: duplicate points, which Faiss splits)."""
        keys = np.log(np.maximum(best, 1e-30)) + rng.gumbel(size=s)
        keys[np.asarray(chosen)] = -np.inf
        return np.argpartition(-keys, m - 1)[:m]

    batch = max(1, -(-k // max(1, rounds)))
    n_trials = 2 + int(np.log(k))
    chosen = [int(rng.integers(s))]
    # the products here are [S, D] x [D, <= 40]: memory-bound, so extra BLAS threads only add wake-ups (on 2 busy
    # cores one thread ran them 6-20x faster than two)
    with _one_blas_thread():
        best = sq_dist(np.asarray(chosen))[:, 0]  # [S] squared distance of each pool point to its nearest centre
        while len(chosen) < k:
            if batch == 1:
                cands = draw(best, chosen, min(n_trials, s - len(chosen)))
                cand_best = np.minimum(best[:, None], sq_dist(cands))  # [S, trials]
                j = int(np.argmin(cand_best.sum(axis=0, dtype=np.float64)))
                chosen.append(int(cands[j]))
                best = cand_best[:, j]
            else:
                new = draw(best, chosen, min(batch, k - len(chosen)))
                chosen.extend(int(i) for i in new)
                np.minimum(best, sq_dist(new).min(axis=1), out=best)
    centres = pool[np.asarray(chosen)]
    return l2_normalize(centres) if spherical else centres.copy()


@contextmanager
def _small_job(work: int) -> Iterator[None]:
    """Faiss on one OpenMP thread while the job is small (``work`` = rows x centroids x dims < SMALL_WORK).

    Hierarchical k-means runs many tiny k-means (resampling steps, the upper levels on a few thousand centroids);
    there thread start-up and barriers cost more than the work, 100x more on a busy machine (0.15 s instead of
    0.5 ms for 20 points, measured on 2 shared cores). ``omp_set_num_threads`` is per calling thread in OpenMP,
    and the previous value is restored.
    """
    if work >= SMALL_WORK or faiss.omp_get_max_threads() == 1:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """numpy's BLAS limited to one thread when threadpoolctl is installed (it comes with scikit-learn)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(1, user_api="blas")


def _resolve_gpu(gpu: bool | None) -> bool:
    if gpu is None:
        return gpu_available()
    if gpu and not gpu_available():
        raise ValueError("gpu=True but this Faiss build has no GPU support or sees no GPU; valid: None, False")
    return bool(gpu)
