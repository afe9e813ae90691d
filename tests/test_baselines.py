"""Behavioural checks of each baseline selector: each would fail if the method were implemented wrongly.

Where possible a selector is compared with a small, deliberately naive re-implementation of its documented
rule (full matrices, Python loops over clusters/steps) written independently of the vectorised code.
"""

from __future__ import annotations

import math

import pytest
import torch

from textscythe_vllm.selectors import get_selector
from textscythe_vllm.selectors.divprune import nearest_neighbour_similarity
from textscythe_vllm.selectors.visiondrop import received_attention
from textscythe_vllm.selectors.visionzip import dominant_count


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def min_pairwise_distance(visual: torch.Tensor, indices: torch.Tensor) -> float:
    rows = unit(visual[indices])
    distance = 1.0 - rows @ rows.T
    distance.fill_diagonal_(math.inf)
    return float(distance.min())


def clustered(num_clusters: int, per_cluster: int, dim: int, seed: int, spread: float = 0.05):
    centres = randn(num_clusters, dim, seed=seed)
    noise = spread * randn(num_clusters * per_cluster, dim, seed=seed + 1)
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed + 2))
    return (centres[labels] + noise)[order], labels[order]


def as_set(indices: torch.Tensor) -> set[int]:
    return set(indices.tolist())


# --------------------------------------------------------------------------------------------- random
def test_random_seeded_and_feature_independent():
    visual = randn(100, 8, seed=0)
    same_a = get_selector("random", seed=5).select(visual, budget=10).indices
    same_b = get_selector("random", seed=5).select(randn(100, 8, seed=1), budget=10).indices
    other = get_selector("random", seed=6).select(visual, budget=10).indices
    assert torch.equal(same_a, same_b)
    assert not torch.equal(same_a, other)
    assert torch.equal(get_selector("random").select(visual, budget=10).indices,
                       get_selector("random", seed=0).select(visual, budget=10).indices)


def test_random_is_roughly_uniform():
    counts = torch.zeros(40)
    for seed in range(200):
        counts[get_selector("random", seed=seed).select(randn(40, 4, seed=0), budget=10).indices] += 1
    # each position is kept with probability 1/4: 50 expected out of 200 draws.
    assert int(counts.min()) > 25 and int(counts.max()) < 75


# -------------------------------------------------------------------------------------------- uniform
@pytest.mark.parametrize("budget", [16, 32, 50, 64, 100, 128, 144])
def test_uniform_spreads_over_the_grid(budget):
    side = 24
    indices = get_selector("uniform").select(randn(side * side, 4, seed=0), budget=budget).indices
    rows, cols = indices // side, indices % side
    quadrants = torch.stack([(rows < 12) & (cols < 12), (rows < 12) & (cols >= 12),
                             (rows >= 12) & (cols < 12), (rows >= 12) & (cols >= 12)]).sum(dim=1)
    assert int(quadrants.sum()) == budget
    # ~k/4 each; an odd number of grid lines puts the middle line in one half (about sqrt(k)/2 tokens per
    # quadrant), hence the sqrt(k) slack. "First k tokens" or a row stride would be off by ~k/4.
    assert (quadrants - budget / 4).abs().max() <= math.sqrt(budget) + 1, quadrants.tolist()
    # coverage: every cell is within half a grid stride (+1) of a kept token (Chebyshev distance)
    cell_rows, cell_cols = torch.arange(side * side) // side, torch.arange(side * side) % side
    gap = torch.maximum((cell_rows[:, None] - rows[None, :]).abs(), (cell_cols[:, None] - cols[None, :]).abs())
    radius = int(gap.min(dim=1).values.max())
    assert radius <= math.ceil(side / (2 * math.isqrt(budget))) + 1


def test_uniform_exact_grid_when_budget_is_square():
    indices = get_selector("uniform").select(randn(576, 4, seed=0), budget=64).indices
    rows, cols = torch.unique(indices // 24), torch.unique(indices % 24)
    assert rows.numel() == 8 and cols.numel() == 8  # an 8 x 8 sub-grid
    assert torch.equal(rows, cols)
    assert set(torch.diff(rows).tolist()) <= {3}  # even stride 24 / 8


def test_uniform_one_dimensional_when_not_square():
    indices = get_selector("uniform").select(randn(50, 4, seed=0), budget=5).indices
    assert indices.tolist() == [5, 15, 25, 35, 45]
    gaps = torch.diff(get_selector("uniform").select(randn(2880, 4, seed=0), budget=160).indices)
    assert int(gaps.min()) >= 17 and int(gaps.max()) <= 19


# ------------------------------------------------------------------------------------- cls_attention
def test_cls_attention_keeps_top_attention():
    attention = rand(200, seed=3)
    indices = get_selector("cls_attention").select(randn(200, 8, seed=0), attention=attention, budget=17).indices
    assert as_set(indices) == as_set(torch.topk(attention, 17).indices)


def test_cls_attention_ties_and_missing_attention_prefer_lower_index():
    attention = torch.tensor([0.0, 1.0, 0.5, 1.0, 1.0, 0.5, 0.0, 1.0])
    visual = randn(8, 4, seed=0)
    assert get_selector("cls_attention").select(visual, attention=attention, budget=3).indices.tolist() == [1, 3, 4]
    assert get_selector("cls_attention").select(visual, budget=3).indices.tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------ divprune
def official_divprune(visual: torch.Tensor, k: int) -> list[int]:
    """DivPrune's official algorithm with the full distance matrix (plus masking of picked tokens)."""
    distance = 1.0 - unit(visual) @ unit(visual).T
    distance.fill_diagonal_(0.0)
    picked: list[int] = []
    for step in range(k):
        if step == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = distance[picked].min(dim=0).values
        scores[picked] = -math.inf
        picked.append(int(torch.argmax(scores)))
    return picked


@pytest.mark.parametrize("seed", range(4))
def test_divprune_matches_the_official_greedy(seed):
    visual = randn(60, 12, seed=seed)
    expected = official_divprune(visual, 15)
    assert get_selector("divprune").select(visual, budget=15).indices.tolist() == sorted(expected)


def test_divprune_first_pick_is_the_isolated_token():
    visual, _ = clustered(4, 10, 16, seed=0)
    outlier = randn(16, seed=99)
    visual = torch.cat([visual[:17], outlier[None], visual[17:]])
    assert get_selector("divprune").select(visual, budget=1).indices.tolist() == [17]


def test_divprune_is_more_diverse_than_random():
    visual, labels = clustered(8, 10, 16, seed=1)
    picked = get_selector("divprune").select(visual, budget=8).indices
    assert torch.unique(labels[picked]).numel() == 8  # one token per cluster
    diverse = min_pairwise_distance(visual, picked)
    for seed in range(10):
        random_pick = get_selector("random", seed=seed).select(visual, budget=8).indices
        assert diverse > min_pairwise_distance(visual, random_pick)


def test_divprune_chunked_nearest_neighbour_matches_dense():
    rows = unit(randn(37, 6, seed=4))
    dense = rows @ rows.T
    dense.fill_diagonal_(-math.inf)
    for chunk in (1, 37, 100, 10_000):
        assert torch.allclose(nearest_neighbour_similarity(rows, chunk_elements=chunk), dense.amax(dim=1))


# ---------------------------------------------------------------------------------------------- dart
def test_dart_keeps_largest_norm_pivots_and_least_duplicated_rest():
    visual = randn(80, 10, seed=7) * (0.5 + rand(80, 1, seed=8))
    k, pivots_count = 20, 4
    picked = as_set(get_selector("dart", num_pivots=pivots_count).select(visual, budget=k).indices)
    pivots = torch.topk(visual.norm(dim=1), pivots_count).indices
    assert as_set(pivots) <= picked
    duplication = (unit(visual) @ unit(visual[pivots]).T).amax(dim=1)
    duplication[pivots] = math.inf
    rest = torch.topk(-duplication, k - pivots_count).indices
    assert picked == as_set(pivots) | as_set(rest)


def test_dart_drops_duplicates_of_the_pivots():
    base = randn(30, 8, seed=1)
    pivot_rows = 10.0 * unit(randn(2, 8, seed=2))  # norm 10 -> the pivots
    copies = 0.9 * pivot_rows.repeat(10, 1) + 0.01 * randn(20, 8, seed=3)  # near-duplicates of the pivots
    visual = torch.cat([pivot_rows, copies, base])
    picked = get_selector("dart", num_pivots=2).select(visual, budget=12).indices
    assert {0, 1} <= as_set(picked)
    assert not (as_set(picked) & set(range(2, 22)))  # none of the near-duplicates survives


def test_dart_caps_pivots_to_budget():
    visual = randn(30, 8, seed=1)
    picked = get_selector("dart", num_pivots=8).select(visual, budget=3).indices
    assert as_set(picked) == as_set(torch.topk(visual.norm(dim=1), 3).indices)


# ----------------------------------------------------------------------------------------- visionzip
def reference_visionzip(visual, attention, num_dominant, k):
    """Independent re-implementation: {position: expected row}."""
    n = visual.shape[0]
    dominant = torch.topk(attention, num_dominant).indices.tolist() if num_dominant else []
    remaining = [j for j in range(n) if j not in dominant]
    contextual = k - num_dominant
    step = max(1, len(remaining) // contextual)
    targets = remaining[::step][:contextual]
    groups = {t: [t] for t in targets}
    target_rows = unit(visual[targets])
    for j in remaining:
        if j not in groups:
            groups[targets[int(torch.argmax(target_rows @ unit(visual[j])))]].append(j)
    rows = {d: visual[d] for d in dominant}
    rows.update({t: visual[members].mean(dim=0) for t, members in groups.items()})
    return rows, groups


@pytest.mark.parametrize(("n", "k"), [(576, 64), (100, 10), (50, 2), (50, 49)])
def test_visionzip_contextual_rows_are_group_means(n, k):
    visual, attention = randn(n, 12, seed=n + k), rand(n, seed=k)
    out = get_selector("visionzip").select(visual, attention=attention, budget=k)
    num_dominant = dominant_count(54 / 64, k)
    expected, groups = reference_visionzip(visual, attention, num_dominant, k)
    assert out.indices.tolist() == sorted(expected)
    for position, row in zip(out.indices.tolist(), out.embeddings, strict=True):
        assert torch.allclose(row, expected[position], atol=1e-5), position
    assert sum(len(members) for members in groups.values()) + num_dominant == n  # every token accounted for
    for target, members in groups.items():
        assert (out.info["merge_target"][members] == target).all()


def test_visionzip_default_split_matches_paper():
    assert [dominant_count(54 / 64, k) for k in (64, 128, 192)] == [54, 108, 162]
    assert dominant_count(54 / 64, 1) == 1 and dominant_count(54 / 64, 2) == 1
    assert dominant_count(0.0, 5) == 0 and dominant_count(1.0, 5) == 5


def test_visionzip_dominant_rows_are_exact_copies():
    visual, attention = randn(100, 8, seed=0).half(), rand(100, seed=1)
    out = get_selector("visionzip").select(visual, attention=attention, budget=20)
    dominant = torch.topk(attention, dominant_count(54 / 64, 20)).indices
    position = {p: i for i, p in enumerate(out.indices.tolist())}
    for d in dominant.tolist():
        assert torch.equal(out.embeddings[position[d]], visual[d])


def test_visionzip_ratio_one_is_pure_top_attention():
    visual, attention = randn(60, 8, seed=0), rand(60, seed=1)
    out = get_selector("visionzip", dominant_ratio=1.0).select(visual, attention=attention, budget=9)
    reference = get_selector("cls_attention").select(visual, attention=attention, budget=9)
    assert torch.equal(out.indices, reference.indices) and torch.equal(out.embeddings, reference.embeddings)


# ---------------------------------------------------------------------------------------- visiondrop
def test_visiondrop_received_attention_matches_dense():
    visual = randn(45, 8, seed=0)
    dense = torch.softmax(visual @ visual.T / math.sqrt(8), dim=-1).mean(dim=0)
    for chunk in (1, 45 * 7, 10_000):
        assert torch.allclose(received_attention(visual, chunk_elements=chunk), dense, atol=1e-6)
    assert torch.isclose(dense.sum(), torch.tensor(1.0))


def test_visiondrop_dominant_tokens_by_self_attention():
    visual, attention = randn(80, 8, seed=2), None
    out = get_selector("visiondrop").select(visual, attention=attention, budget=16)
    num_dominant = dominant_count(7 / 8, 16)
    dominant = torch.topk(received_attention(visual), num_dominant).indices
    assert as_set(dominant) <= as_set(out.indices)
    assert int(out.info["dominant_mask"].sum()) == num_dominant
    expected, _ = reference_visionzip(visual, received_attention(visual), num_dominant, 16)
    assert out.indices.tolist() == sorted(expected)
    for position, row in zip(out.indices.tolist(), out.embeddings, strict=True):
        assert torch.allclose(row, expected[position], atol=1e-5)


def test_visiondrop_with_encoder_attention_equals_visionzip_with_same_split():
    visual, attention = randn(80, 8, seed=2), rand(80, seed=3)
    drop = get_selector("visiondrop", dominant_ratio=0.75).select(visual, attention=attention, budget=16)
    zip_ = get_selector("visionzip", dominant_ratio=0.75).select(visual, attention=attention, budget=16)
    assert torch.equal(drop.indices, zip_.indices) and torch.equal(drop.embeddings, zip_.embeddings)


# --------------------------------------------------------------------------------------------- icctp
def reference_icctp(visual, text, attention, k, rho_g=0.6, alpha=0.3):
    """Naive ICCTP per the documented rule (Python loops over clusters)."""
    n = visual.shape[0]
    num_global = math.floor(rho_g * k + 1e-9)
    order = sorted(range(n), key=lambda j: (-float(attention[j]), j))
    global_set = order[:num_global]
    if text.shape[0] == 0:
        return set(order[:k])
    cos = unit(visual) @ unit(text).T
    span = float(attention.max() - attention.min())
    a_norm = (attention - attention.min()) / span if span > 0 else torch.zeros(n)
    rest = [j for j in range(n) if j not in global_set]
    cluster = {j: int(torch.argmax(cos[j])) for j in rest}
    score = {j: alpha * float(cos[j, cluster[j]]) + (1 - alpha) * float(a_norm[j]) for j in rest}
    slots = k - num_global
    tier = {}
    for c in set(cluster.values()):
        members = sorted((j for j in rest if cluster[j] == c), key=lambda j: (-score[j], j))
        quota = max(1, (slots * len(members)) // len(rest))
        for rank, j in enumerate(members):
            tier[j] = 1 if rank == 0 else 2 if rank < quota else 3
    ranked = sorted(rest, key=lambda j: (tier[j], -score[j], j))
    return set(global_set) | set(ranked[:slots])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("k", "num_text"), [(20, 1), (20, 3), (12, 8), (5, 9), (40, 4), (3, 0)])
def test_icctp_matches_reference(seed, k, num_text):
    visual, text, attention = randn(90, 10, seed=seed), randn(num_text, 10, seed=seed + 50), rand(90, seed=seed)
    out = get_selector("icctp").select(visual, text, attention, k)
    assert as_set(out.indices) == reference_icctp(visual, text, attention, k)


def test_icctp_keeps_top_global_attention():
    visual, text, attention = randn(144, 16, seed=0), randn(3, 16, seed=1), rand(144, seed=2)
    out = get_selector("icctp").select(visual, text, attention, 30)
    top = torch.topk(attention, math.floor(0.6 * 30)).indices
    assert as_set(top) <= as_set(out.indices)
    assert as_set(top) == as_set(out.info["global_mask"].nonzero().squeeze(1))


def test_icctp_anchor_pulls_its_region():
    """One text anchor planted in the top-left quadrant of a 12 x 12 grid: ICCTP keeps more of that quadrant
    than random selection and than attention alone."""
    side, dim = 12, 32
    rows, cols = torch.arange(side * side) // side, torch.arange(side * side) % side
    region = (rows < 6) & (cols < 6)
    anchor = randn(dim, seed=5)
    visual = randn(side * side, dim, seed=6)
    visual[region] = 3.0 * unit(anchor) + 0.3 * randn(int(region.sum()), dim, seed=7)
    attention = rand(side * side, seed=8)
    k = 24

    def kept_in_region(indices):
        return int(region[indices].sum())

    icctp = kept_in_region(get_selector("icctp").select(visual, anchor[None], attention, k).indices)
    attention_only = kept_in_region(get_selector("cls_attention").select(visual, attention=attention, budget=k).indices)
    random_mean = sum(kept_in_region(get_selector("random", seed=s).select(visual, budget=k).indices)
                      for s in range(10)) / 10
    assert icctp > random_mean + 3 and icctp > attention_only + 3


def test_icctp_every_non_empty_cluster_keeps_a_token():
    # three well separated groups, each nearest a different text anchor; uniform attention
    visual, labels = clustered(3, 20, 16, seed=3)
    text = torch.stack([visual[labels == c].mean(dim=0) for c in range(3)])
    out = get_selector("icctp", rho_g=0.0).select(visual, text, None, 3)
    assert sorted(labels[out.indices].tolist()) == [0, 1, 2]
    assert sorted(out.info["cluster"][out.indices].tolist()) == [0, 1, 2]


def test_icctp_without_text_is_top_attention():
    visual, attention = randn(50, 8, seed=0), rand(50, seed=1)
    out = get_selector("icctp").select(visual, visual[:0], attention, 10)
    assert torch.equal(out.indices, get_selector("cls_attention").select(visual, attention=attention, budget=10).indices)
