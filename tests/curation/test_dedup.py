"""Duplicate grouping (components, star groups), Hamming pairs from Faiss, and the two dedup stages."""

from __future__ import annotations

import itertools
import random
from collections import deque
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from lvdkit.core import schema
from lvdkit.core.files import list_inputs
from lvdkit.curation.components import component_sizes, connected_components, representatives, star_groups
from lvdkit.curation.dedup_exact import DedupExactConfig, dedup_exact
from lvdkit.curation.dedup_phash import DedupPhashConfig, dedup_phash, hamming_pairs
from lvdkit.curation.ingest import IngestConfig, ingest_files
from lvdkit.truth import load_truth, score_groups

# --- brute-force references, written from the docstrings -----------------------------------------------------------


def bfs_components(n: int, pairs: list[tuple[int, int]]) -> list[frozenset[int]]:
    adj: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in pairs:
        adj[a].add(b)
        adj[b].add(a)
    seen: set[int] = set()
    out = []
    for start in range(n):
        if start in seen:
            continue
        comp = {start}
        queue = deque([start])
        seen.add(start)
        while queue:
            node = queue.popleft()
            for nb in adj[node]:
                if nb not in seen:
                    seen.add(nb)
                    comp.add(nb)
                    queue.append(nb)
        out.append(frozenset(comp))
    return out


def partition(labels: np.ndarray) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(label, set()).add(i)
    return {frozenset(g) for g in groups.values()}


def greedy_star(n: int, pairs: list[tuple[int, int]], priority: list[int]) -> list[int]:
    """Visit nodes by (priority, index); an unassigned node becomes a representative and takes its free neighbours."""
    adj: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in pairs:
        adj[a].add(b)
        adj[b].add(a)
    rep = [-1] * n
    for node in sorted(range(n), key=lambda i: (priority[i], i)):
        if rep[node] != -1:
            continue
        rep[node] = node
        for nb in adj[node]:
            if rep[nb] == -1:
                rep[nb] = node
    return rep


def random_graph(seed: int, n: int, n_edges: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(n), rng.randrange(n)) for _ in range(n_edges)]


def popcount(x: int) -> int:
    return bin(x).count("1")


def brute_hamming_pairs(hashes: list[int], max_distance: int) -> dict[tuple[int, int], int]:
    return {
        (i, j): popcount(hashes[i] ^ hashes[j])
        for i, j in itertools.combinations(range(len(hashes)), 2)
        if popcount(hashes[i] ^ hashes[j]) <= max_distance
    }


def planted_hashes(seed: int, n_base: int = 150) -> list[int]:
    """Random 64-bit hashes plus copies at 0..7 flipped bits; no three hashes are equal."""
    rng = random.Random(seed)
    hashes = [rng.getrandbits(64) for _ in range(n_base)]
    for base in rng.sample(hashes, n_base // 2):
        flips = [0] if rng.random() < 0.2 else []
        flips += [rng.randint(1, 7) for _ in range(rng.randint(1, 3))]
        for k in flips:
            h = base
            for bit in rng.sample(range(64), k):
                h ^= 1 << bit
            hashes.append(h)
    rng.shuffle(hashes)
    counts = {h: hashes.count(h) for h in hashes}
    assert max(counts.values()) <= 2
    return hashes


# --- connected_components / star_groups / representatives ---------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_connected_components_match_bfs(seed: int) -> None:
    n = 5 + seed * 7
    pairs = random_graph(seed, n, n_edges=seed * 5)
    labels = connected_components(n, np.array(pairs, dtype=np.int64).reshape(-1, 2))
    assert labels.shape == (n,)
    assert partition(labels) == set(bfs_components(n, pairs))
    assert sorted(set(labels.tolist())) == list(range(len(set(labels.tolist()))))  # labels are 0..C-1


def test_connected_components_without_pairs_are_singletons() -> None:
    assert connected_components(4, np.empty((0, 2), np.int64)).tolist() == [0, 1, 2, 3]
    assert connected_components(0, np.empty((0, 2), np.int64)).tolist() == []


@pytest.mark.parametrize("seed", range(6))
def test_star_groups_match_the_greedy_reference_and_its_contract(seed: int) -> None:
    rng = random.Random(100 + seed)
    n = 10 + seed * 8
    pairs = random_graph(100 + seed, n, n_edges=n + seed * 4)
    priority = [rng.randrange(n // 2) for _ in range(n)]  # ties on purpose
    rep = star_groups(n, np.array(pairs, dtype=np.int64), np.array(priority, dtype=np.int64))
    assert rep.tolist() == greedy_star(n, pairs, priority)

    edges = {frozenset(p) for p in pairs}
    reps = {int(r) for r in rep}
    for i, r in enumerate(rep.tolist()):
        assert rep[r] == r  # a representative represents itself
        if i != r:
            assert frozenset((i, r)) in edges  # every member is linked to its representative directly
            assert (priority[r], r) < (priority[i], i)  # the representative is the group's best member
    for a, b in itertools.combinations(sorted(reps), 2):
        assert frozenset((a, b)) not in edges  # two linked representatives would have been merged
    # every group lies inside one connected component
    comp = connected_components(n, np.array(pairs, dtype=np.int64))
    assert all(comp[i] == comp[r] for i, r in enumerate(rep.tolist()))


def test_star_groups_break_chains_that_components_merge() -> None:
    chain = np.array([[0, 1], [1, 2], [2, 3]])  # A-B-C-D
    priority = np.array([0, 1, 2, 3])
    rep = star_groups(4, chain, priority)
    assert rep.tolist() == [0, 0, 2, 2]  # A takes B; C is free and takes D
    assert len(set(connected_components(4, chain).tolist())) == 1

    rep = star_groups(4, chain, np.array([3, 0, 1, 2]))  # B is best: takes A and C; D is alone
    assert rep.tolist() == [1, 1, 1, 3]


def test_star_groups_without_pairs_are_singletons() -> None:
    assert star_groups(3, np.empty((0, 2), np.int64), np.array([2, 1, 0])).tolist() == [0, 1, 2]


@pytest.mark.parametrize("seed", range(4))
def test_representatives_are_the_best_member_of_each_component(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 40
    labels = rng.integers(0, 8, n)
    priority = rng.integers(0, 5, n)  # ties broken by index
    got = representatives(labels, priority)
    for i in range(n):
        members = [j for j in range(n) if labels[j] == labels[i]]
        assert got[i] == min(members, key=lambda j: (priority[j], j))


def test_component_sizes_count_members_per_representative() -> None:
    assert sorted(component_sizes(np.array([0, 0, 2, 2, 2, 5])).tolist()) == [1, 2, 3]


# --- hamming_pairs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_distance", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_hamming_pairs_equal_brute_force(max_distance: int, seed: int) -> None:
    hashes = planted_hashes(seed)
    expected = brute_hamming_pairs(hashes, max_distance)
    assert any(d == max_distance for d in expected.values())  # the boundary is exercised
    pairs, dist = hamming_pairs(np.array(hashes, dtype=np.uint64), max_distance)
    assert pairs.shape == (len(dist), 2)
    got = {(int(i), int(j)): int(d) for (i, j), d in zip(pairs.tolist(), dist.tolist(), strict=True)}
    assert len(got) == len(pairs)  # no pair twice
    assert all(i < j for i, j in got)
    assert got == expected


@pytest.mark.parametrize("max_distance", [0, 2])
def test_hamming_pairs_do_not_depend_on_query_chunk(max_distance: int) -> None:
    hashes = np.array(planted_hashes(7, n_base=60), dtype=np.uint64)
    full = hamming_pairs(hashes, max_distance)
    chunked = hamming_pairs(hashes, max_distance, chunk=7)
    as_set = lambda r: {(tuple(p), d) for p, d in zip(r[0].tolist(), r[1].tolist(), strict=True)}  # noqa: E731
    assert as_set(chunked) == as_set(full)


def test_hamming_pairs_use_all_64_bits() -> None:
    hashes = [0, 1 << 63, 1 << 62 | 1 << 63, 1, (1 << 64) - 1]
    for d in (1, 2, 3):
        pairs, dist = hamming_pairs(np.array(hashes, dtype=np.uint64), d)
        got = {(int(i), int(j)): int(k) for (i, j), k in zip(pairs.tolist(), dist.tolist(), strict=True)}
        assert got == brute_hamming_pairs(hashes, d)


def test_hamming_pairs_zero_returns_every_pair_of_equal_hashes() -> None:
    hashes = [7, 7, 9, 7]
    pairs, _ = hamming_pairs(np.array(hashes, dtype=np.uint64), 0)
    assert {tuple(p) for p in pairs.tolist()} == set(brute_hamming_pairs(hashes, 0))


def test_hamming_pairs_of_nothing() -> None:
    for d in (0, 2):
        pairs, dist = hamming_pairs(np.empty(0, np.uint64), d)
        assert pairs.shape == (0, 2) and len(dist) == 0


# --- dedup_exact ---------------------------------------------------------------------------------------------------


def exact_table(rows: list[tuple[str, str, str]]) -> pa.Table:
    ids, uris, hashes = zip(*rows, strict=True) if rows else ((), (), ())
    return pa.table(
        {
            schema.IMAGE_ID: pa.array(ids, pa.string()),
            schema.URI: pa.array(uris, pa.string()),
            "content_hash": pa.array(hashes, pa.string()),
        }
    )


def expected_exact(rows: list[tuple[str, str, str]]) -> dict[str, str | None]:
    """image_id -> dup_of: each hash group keeps the shortest, then lexicographically first, uri."""
    kept: dict[str, tuple[str, str]] = {}
    for id_, uri, h in rows:
        if h not in kept or (len(uri), uri) < (len(kept[h][1]), kept[h][1]):
            kept[h] = (id_, uri)
    return {id_: (None if kept[h][0] == id_ else kept[h][0]) for id_, _, h in rows}


def check_dedup_rows(out: pa.Table, expected_dup_of: dict[str, str | None]) -> None:
    assert out.schema == schema.DEDUP
    rows = {r[schema.IMAGE_ID]: r for r in out.to_pylist()}
    assert len(rows) == out.num_rows == len(expected_dup_of)
    for id_, dup_of in expected_dup_of.items():
        row = rows[id_]
        assert row[schema.DUP_OF] == dup_of
        assert row[schema.KEEP] is (dup_of is None)
        assert row[schema.GROUP_ID] == (dup_of or id_)


def test_dedup_exact_keeps_shortest_then_first_uri() -> None:
    rows = [
        ("i1", "/data/long/folder/a.jpg", "h1"),
        ("i2", "/z/b.jpg", "h1"),
        ("i3", "/a/c.jpg", "h1"),  # same length as /z/b.jpg, sorts first
        ("i4", "/only/one.jpg", "h2"),
        ("i5", "/x/y/zz.png", "h3"),
        ("i6", "/x/y/z.png", "h3"),
    ]
    out = dedup_exact(exact_table(rows), DedupExactConfig())
    check_dedup_rows(out, {"i1": "i3", "i2": "i3", "i3": None, "i4": None, "i5": "i6", "i6": None})
    assert out[schema.IMAGE_ID].to_pylist() == [r[0] for r in rows]  # one row per input row, in order
    assert set(out["distance"].to_pylist()) == {0.0}


@pytest.mark.parametrize("seed", range(3))
def test_dedup_exact_random_tables_match_reference_and_ignore_row_order(seed: int) -> None:
    rng = random.Random(seed)
    rows = []
    for i in range(60):
        depth = rng.randint(0, 3)
        uri = "/" + "/".join(rng.choice(["a", "bb", "c", "dd"]) for _ in range(depth)) + f"/f{rng.randint(0, 99)}.jpg"
        rows.append((f"id{i:03d}", uri + f"?{i}" * rng.randint(0, 1), f"h{rng.randint(0, 15)}"))
    expected = expected_exact(rows)
    assert any(v is not None for v in expected.values())
    first = dedup_exact(exact_table(rows), DedupExactConfig())
    check_dedup_rows(first, expected)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    second = dedup_exact(exact_table(shuffled), DedupExactConfig())
    by_id = lambda t: {r[schema.IMAGE_ID]: r for r in t.to_pylist()}  # noqa: E731
    assert by_id(first) == by_id(second)


def test_dedup_exact_disabled_keeps_everything() -> None:
    rows = [("a", "/a", "h"), ("b", "/b", "h")]
    out = dedup_exact(exact_table(rows), DedupExactConfig(enabled=False))
    check_dedup_rows(out, {"a": None, "b": None})


def test_dedup_exact_of_nothing() -> None:
    out = dedup_exact(exact_table([]), DedupExactConfig())
    assert out.num_rows == 0 and out.schema == schema.DEDUP


def test_dedup_exact_accepts_an_ingest_table() -> None:
    rows = [
        {schema.IMAGE_ID: "x", schema.URI: "/p/x.png", "content_hash": "c1", "status": "ok"},
        {schema.IMAGE_ID: "y", schema.URI: "/p/y.png", "content_hash": "c1", "status": "ok"},
    ]
    out = dedup_exact(pa.Table.from_pylist(rows, schema=schema.INGEST), DedupExactConfig())
    check_dedup_rows(out, {"x": None, "y": "x"})


# --- dedup_phash ---------------------------------------------------------------------------------------------------


def phash_table(rows: list[tuple[str, int, int, int]]) -> pa.Table:
    """rows: (image_id, phash, width, height)."""
    ids, hashes, widths, heights = zip(*rows, strict=True) if rows else ((), (), (), ())
    return pa.table(
        {
            schema.IMAGE_ID: pa.array(ids, pa.string()),
            "phash": pa.array(hashes, pa.uint64()),
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
        }
    )


def test_dedup_phash_keeps_the_most_pixels_then_smallest_id() -> None:
    rows = [
        ("a", 11, 100, 10),  # 1000 px: longest side, but fewest pixels
        ("b", 11, 40, 40),  # 1600 px: kept
        ("c", 22, 50, 50),
        ("d", 22, 50, 50),  # tie on pixels with c: c has the smaller id
        ("e", 33, 60, 60),  # alone
    ]
    out, stats = dedup_phash(phash_table(rows), DedupPhashConfig(max_distance=0))
    check_dedup_rows(out, {"a": "b", "b": None, "c": None, "d": "c", "e": None})
    assert stats == {"pairs": 2, "groups_with_duplicates": 2, "largest_group": 2}
    assert set(out["distance"].to_pylist()) == {0.0}


@pytest.mark.parametrize("grouping", ["star", "components"])
def test_dedup_phash_group_of_identical_hashes_within_a_radius(grouping: str) -> None:
    rows = [("a", 5, 10, 10), ("b", 5, 30, 30), ("c", 5, 20, 20), ("d", 5, 30, 30)]
    out, stats = dedup_phash(phash_table(rows), DedupPhashConfig(max_distance=1, grouping=grouping))  # type: ignore[arg-type]
    check_dedup_rows(out, {"a": "b", "b": None, "c": "b", "d": "b"})
    assert stats["largest_group"] == 4 and stats["groups_with_duplicates"] == 1 and stats["pairs"] == 6


def test_dedup_phash_defaults_group_all_identical_hashes() -> None:
    rows = [("a", 5, 10, 10), ("b", 5, 30, 30), ("c", 5, 20, 20)]
    out, stats = dedup_phash(phash_table(rows), DedupPhashConfig())
    check_dedup_rows(out, {"a": "b", "b": None, "c": "b"})
    assert stats["largest_group"] == 3


def chain_rows() -> list[tuple[str, int, int, int]]:
    """A-B-C-D, each one bit from the next, sizes decreasing so A is the best."""
    h = [0b0, 0b1, 0b11, 0b111]
    return [(name, h[i], 100 - 10 * i, 100 - 10 * i) for i, name in enumerate("ABCD")]


def test_dedup_phash_star_vs_components_on_a_chain() -> None:
    table = phash_table(chain_rows())
    star, star_stats = dedup_phash(table, DedupPhashConfig(max_distance=1, grouping="star"))
    comp, comp_stats = dedup_phash(table, DedupPhashConfig(max_distance=1, grouping="components"))

    check_dedup_rows(star, {"A": None, "B": "A", "C": None, "D": "C"})
    assert star["distance"].to_pylist() == [0.0, 1.0, 0.0, 1.0]
    assert star_stats == {"pairs": 3, "groups_with_duplicates": 2, "largest_group": 2}

    check_dedup_rows(comp, {"A": None, "B": "A", "C": "A", "D": "A"})
    assert comp["distance"].to_pylist() == [0.0, 1.0, 2.0, 3.0]  # D is 3 bits from A: the chaining problem
    assert comp_stats == {"pairs": 3, "groups_with_duplicates": 1, "largest_group": 4}


@pytest.mark.parametrize("grouping", ["star", "components"])
@pytest.mark.parametrize("seed", [0, 1])
def test_dedup_phash_random_matches_reference(grouping: str, seed: int) -> None:
    rng = random.Random(seed)
    hashes = planted_hashes(seed + 10, n_base=80)
    rows = [(f"{rng.getrandbits(32):08x}", h, rng.choice([32, 64, 64, 96]), rng.choice([32, 64])) for h in hashes]
    n, max_distance = len(rows), 3
    pairs = list(brute_hamming_pairs(hashes, max_distance))
    order = sorted(range(n), key=lambda i: (-rows[i][2] * rows[i][3], rows[i][0]))
    priority = [0] * n
    for rank, i in enumerate(order):
        priority[i] = rank
    if grouping == "star":
        rep = greedy_star(n, pairs, priority)
    else:
        rep = [0] * n
        for comp in bfs_components(n, pairs):
            best = min(comp, key=lambda i: priority[i])
            for i in comp:
                rep[i] = best
    out, stats = dedup_phash(phash_table(rows), DedupPhashConfig(max_distance=max_distance, grouping=grouping))  # type: ignore[arg-type]
    check_dedup_rows(out, {rows[i][0]: (None if rep[i] == i else rows[rep[i]][0]) for i in range(n)})
    assert out["distance"].to_pylist() == [float(popcount(hashes[i] ^ hashes[rep[i]])) for i in range(n)]
    sizes = [rep.count(r) for r in set(rep)]
    assert stats == {
        "pairs": len(pairs),
        "groups_with_duplicates": sum(s > 1 for s in sizes),
        "largest_group": max(sizes),
    }


def test_dedup_phash_disabled_keeps_everything() -> None:
    rows = [("a", 5, 10, 10), ("b", 5, 30, 30)]
    out, stats = dedup_phash(phash_table(rows), DedupPhashConfig(enabled=False))
    check_dedup_rows(out, {"a": None, "b": None})
    assert stats["pairs"] == 0 and stats["largest_group"] == 1


def test_dedup_phash_invalid_grouping_lists_valid_options() -> None:
    with pytest.raises(ValueError) as info:
        dedup_phash(phash_table(chain_rows()), DedupPhashConfig(grouping="foo"))  # type: ignore[arg-type]
    message = str(info.value)
    assert "foo" in message and "star" in message and "components" in message


@pytest.mark.parametrize("grouping", ["star", "components"])
def test_dedup_phash_of_nothing(grouping: str) -> None:
    out, stats = dedup_phash(phash_table([]), DedupPhashConfig(max_distance=2, grouping=grouping))  # type: ignore[arg-type]
    assert out.num_rows == 0 and out.schema == schema.DEDUP
    assert stats["pairs"] == 0 and stats["groups_with_duplicates"] == 0 and stats["largest_group"] == 0
    out, _ = dedup_phash(schema.INGEST.empty_table(), DedupPhashConfig())
    assert out.num_rows == 0 and out.schema == schema.DEDUP


# --- the small demo, scored without Ray ------------------------------------------------------------------------------

BROKEN_REASON = {
    "empty": schema.REASON_EMPTY,
    "truncated": schema.REASON_TRUNCATED,
    "text": schema.REASON_NOT_IMAGE,
    "huge_header": schema.REASON_TOO_MANY_PIXELS,
}


def test_small_demo_ingest_and_dedup_against_truth(small_demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # decode() changes Pillow's global
    truth = load_truth(small_demo)
    raw = [r for r in truth.to_pylist() if r["path"].startswith("raw/")]
    uris = list(list_inputs([str(small_demo / "raw")]))
    assert sorted(uris) == sorted(r[schema.URI] for r in raw)  # ingest's uris are load_truth's uris

    ingest = ingest_files(uris, IngestConfig())
    by_uri = {r[schema.URI]: r for r in ingest.to_pylist()}
    for r in raw:
        row = by_uri[r[schema.URI]]
        if r["kind"] == schema.TRUTH_BROKEN:
            assert row["status"] == schema.STATUS_QUARANTINED, r["path"]
            assert row["error"] == BROKEN_REASON[r["transform"]], r["path"]
        else:  # originals in every odd mode, and all planted copies, are usable
            assert row["status"] == schema.STATUS_OK, (r["path"], r["transform"], row["error_detail"])

    ok = ingest.filter(pc.equal(ingest["status"], schema.STATUS_OK))
    exact = dedup_exact(ok, DedupExactConfig())
    uri_of = dict(zip(ok[schema.IMAGE_ID].to_pylist(), ok[schema.URI].to_pylist(), strict=True))
    exact_rep = {uri_of[r[schema.IMAGE_ID]]: uri_of[r[schema.GROUP_ID]] for r in exact.to_pylist()}
    for uri, rep in exact_rep.items():  # every exact decision joins byte-identical files
        assert Path(uri).read_bytes() == Path(rep).read_bytes()
    for r in raw:
        if r["kind"] == schema.TRUTH_EXACT:
            original = str(small_demo / r["original"])
            assert exact_rep[r[schema.URI]] == exact_rep[original], r["path"]

    kept_ids = exact.filter(exact[schema.KEEP])[schema.IMAGE_ID]
    survivors = ok.filter(pc.is_in(ok[schema.IMAGE_ID], value_set=kept_ids))
    assert survivors.num_rows == ok.num_rows - sum(r["kind"] == schema.TRUTH_EXACT for r in raw)
    near, _ = dedup_phash(survivors, DedupPhashConfig(max_distance=0))
    phash_rep = {uri_of[r[schema.IMAGE_ID]]: uri_of[r[schema.GROUP_ID]] for r in near.to_pylist()}
    phash_of = {r[schema.URI]: r["phash"] for r in survivors.to_pylist()}
    for uri, rep in phash_rep.items():  # max_distance=0: only identical hashes are grouped
        assert phash_of[uri] == phash_of[rep]

    live = ok[schema.URI].to_pylist()
    final = [phash_rep[exact_rep[u]] for u in live]
    score = score_groups(truth, live, final)
    assert score.exact_total == sum(r["kind"] == schema.TRUTH_EXACT for r in raw) > 0
    assert score.exact_found == score.exact_total


def test_images_without_structure_get_no_phash_and_are_never_phash_duplicates(tmp_path: Path) -> None:
    """Solid colours and fine chessboards all share one PHash: without the guard the first of them would be kept for
    every other (and for a huge all-zero image), whatever their colours."""
    from PIL import Image

    paths = []
    for k, colour in enumerate([(0, 0, 0), (255, 0, 0), (0, 255, 0), (30, 30, 200)]):
        paths.append(tmp_path / f"solid_{k}.png")
        Image.new("RGB", (64, 64), colour).save(paths[-1])
    checks = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    paths.append(tmp_path / "chess.png")
    Image.fromarray(checks).save(paths[-1])
    photo = np.kron(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8), np.ones((8, 8), np.uint8))
    paths.append(tmp_path / "blocks.png")
    Image.fromarray(photo).save(paths[-1])
    Image.fromarray(photo).save(tmp_path / "blocks_copy.bmp")  # same pixels, other bytes: a real PHash duplicate
    paths.append(tmp_path / "blocks_copy.bmp")
    rows = ingest_files([str(p) for p in paths], IngestConfig())
    assert rows[schema.PHASH].to_pylist()[:5] == [None] * 5 and None not in rows[schema.PHASH].to_pylist()[5:]
    from imagededup.methods import DHash

    # the DHash beside every PHash: imagededup's, of the decoded pixels (both copies of the blocks alike)
    dhash = int(DHash(verbose=False).encode_image(image_array=np.asarray(Image.open(paths[5]).convert("RGB"))), 16)
    assert rows[schema.DHASH].to_pylist() == [None] * 5 + [dhash, dhash]
    table, stats = dedup_phash(
        rows.select([schema.IMAGE_ID, schema.PHASH, schema.WIDTH, schema.HEIGHT]), DedupPhashConfig()
    )
    removed = set(table.filter(pc.invert(table[schema.KEEP]))[schema.IMAGE_ID].to_pylist())
    assert removed == {rows[schema.IMAGE_ID][6].as_py()} or removed == {rows[schema.IMAGE_ID][5].as_py()}
    assert stats["without_phash"] == 5


def test_dedup_phash_counts_a_pair_only_where_the_dhashes_agree() -> None:
    rows = [("a", 7, 10, 10), ("b", 7, 9, 9), ("c", 7, 8, 8), ("d", 7, 7, 7), ("e", 9, 6, 6)]
    table = phash_table(rows).append_column(
        schema.DHASH, pa.array([0b1111, 0b0111, 0xFFFF0000, None, 0b1111], pa.uint64())
    )
    out, stats = dedup_phash(table, DedupPhashConfig())  # max_distance 0, confirm_dhash 3
    dup_of = {r[schema.IMAGE_ID]: r[schema.DUP_OF] for r in out.to_pylist()}
    # b: 1 bit from a; c: equal PHash but a different gradient picture; d: no DHash (ingested before), PHash alone;
    # e: its DHash equals a's, but its PHash does not
    assert dup_of == {"a": None, "b": "a", "c": None, "d": "a", "e": None}
    assert stats["pairs"] == 6  # PHash pairs; a-c and b-c fail the DHash check (c-d stands, d's DHash is unknown)
    alone, alone_stats = dedup_phash(table, DedupPhashConfig(confirm_dhash=None))
    assert {r[schema.DUP_OF] for r in alone.to_pylist() if r[schema.IMAGE_ID] != "e"} == {None, "a"}
    assert alone.filter(pc.invert(alone[schema.KEEP])).num_rows == 3 and alone_stats["pairs"] == 6
    unknown = table.set_column(4, schema.DHASH, pa.nulls(5, pa.uint64()))  # a pool ingested before DHashes
    assert dedup_phash(unknown, DedupPhashConfig())[0].equals(alone)


def test_the_star_rule_inside_equal_phash_buckets_is_the_star_rule_on_the_confirmed_pairs() -> None:
    """At max_distance 0 the pairs are not listed (a bucket of k equal PHashes has k(k-1)/2 of them): the same
    groups as star_groups over the listed, DHash-confirmed pairs, unknown DHashes included."""
    from lvdkit.curation.components import group, keep_priority
    from lvdkit.curation.dedup_phash import confirmed, dhashes_of, hamming_pairs

    rng = np.random.default_rng(7)
    for trial in range(12):
        n = int(rng.integers(2, 200))
        dh = [None if rng.random() < 0.15 else int(v) for v in rng.integers(0, 16, n) << int(rng.integers(0, 4))]
        rows = [(f"{i:04d}", int(rng.integers(0, 5)), int(rng.integers(5, 9)), 10) for i in range(n)]
        table = phash_table(rows).append_column(schema.DHASH, pa.array(dh, pa.uint64()))
        bits = int(rng.integers(0, 4))
        out, _ = dedup_phash(table, DedupPhashConfig(confirm_dhash=bits))
        pairs = hamming_pairs(table[schema.PHASH].to_numpy().astype(np.uint64), 0)[0]
        rep = group(n, pairs[confirmed(pairs, dhashes_of(table, bits), bits)], keep_priority(table), "star")
        expected = {f"{i:04d}": f"{rep[i]:04d}" for i in range(n)}
        assert {r[schema.IMAGE_ID]: r[schema.GROUP_ID] for r in out.to_pylist()} == expected, trial
