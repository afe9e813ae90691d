"""The shared greedy max-min loop (``greedy_diverse_fill``, DivPrune): both ways of getting the similarity
rows -- one Gram GEMM or one matrix-vector product per step -- against naive loops written from the rule.

The rule: pick ``argmax_j base_j`` first, then ``argmax_j base_j - max_{k picked} cos(V_j, V_k)`` over the
not-yet-picked candidates, ties -> lower index. In float64 on generic data the two paths and the naive loop
must agree exactly; the matrix-vector path is moreover the arithmetic of the original loop, so it must agree
bit for bit in float32 too.
"""

from __future__ import annotations

import math

import pytest
import torch

import textscythe_vllm.selectors.base as base_module
import textscythe_vllm.selectors.divprune as divprune_module
from textscythe_vllm.selectors import get_selector
from textscythe_vllm.selectors.base import (
    cosine_gram,
    greedy_by_penalty_rows,
    greedy_diverse_fill,
    l2_normalize,
    scratch,
)

PATHS = ("gram", "matvec")


@pytest.fixture
def force_path(monkeypatch: pytest.MonkeyPatch):
    """``force_path("gram")`` / ``force_path("matvec")``: pin the fill's cost model to one path."""

    def force(path: str) -> None:
        if path == "gram":
            monkeypatch.setattr(base_module, "GRAM_SPEEDUP", 10**9)
            monkeypatch.setattr(base_module, "GRAM_MAX_ELEMENTS", 1 << 40)
        else:
            monkeypatch.setattr(base_module, "GRAM_MAX_ELEMENTS", 0)
            monkeypatch.setattr(divprune_module, "GRAM_MAX_ELEMENTS", 0)

    return force


def original_fill(unit: torch.Tensor, base: torch.Tensor, candidates: torch.Tensor, count: int) -> list[int]:
    """The loop as first written: a masked score rebuilt every step, one ``[N, D] @ [D]`` per pick."""
    available = candidates.clone()
    max_cos = torch.zeros_like(base)
    picked: list[int] = []
    for step in range(count):
        score = torch.where(available, base - max_cos, -math.inf)
        choice = int(torch.argmax(score))
        picked.append(choice)
        available[choice] = False
        similarity = unit @ unit[choice]
        max_cos = similarity if step == 0 else torch.maximum(max_cos, similarity)
    return picked


def naive_fill(unit: torch.Tensor, base: torch.Tensor, candidates: torch.Tensor, count: int) -> list[int]:
    """Python loops over the full cosine matrix, straight from the rule."""
    cosine = (unit @ unit.T).tolist()
    base_list, free = base.tolist(), [j for j in range(len(base)) if bool(candidates[j])]
    picked: list[int] = []
    for _ in range(count):
        def score(j: int) -> float:
            return base_list[j] - max(cosine[j][k] for k in picked) if picked else base_list[j]

        best = max(free, key=lambda j: (score(j), -j))  # largest score, then the lower index
        picked.append(best)
        free.remove(best)
    return picked


def make_case(seed: int, num_tokens: int, dim: int, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    unit = l2_normalize(torch.randn(num_tokens, dim, generator=generator, dtype=dtype))
    base = torch.rand(num_tokens, generator=generator, dtype=dtype)
    if seed % 3 == 0:
        base = torch.zeros_like(base)  # no attention: diversity alone decides after the first pick
    candidates = torch.rand(num_tokens, generator=generator) > (0.0, 0.3, 0.7)[seed % 3]
    candidates[seed % num_tokens] = True
    return unit, base, candidates


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(12))
def test_fill_matches_the_naive_rule(path, seed, force_path):
    force_path(path)
    unit, base, candidates = make_case(seed, num_tokens=(20, 64, 150)[seed % 3], dim=(8, 32)[seed % 2])
    num_candidates = int(candidates.sum())
    for count in sorted({0, 1, 2, num_candidates // 2, num_candidates}):
        expected = naive_fill(unit, base, candidates, count)
        assert greedy_diverse_fill(unit, base, candidates, count).tolist() == expected
        assert greedy_diverse_fill(unit, base, candidates, count, num_candidates=num_candidates).tolist() \
            == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(6))
def test_matvec_path_is_the_original_arithmetic(seed, dtype, force_path):
    """Same similarities, and ``min_k (b - c_k) == b - max_k c_k`` exactly: identical picks, also in float32."""
    force_path("matvec")
    unit, base, candidates = make_case(seed, num_tokens=300, dim=96, dtype=dtype)
    count = int(candidates.sum()) - 1
    assert greedy_diverse_fill(unit, base, candidates, count).tolist() == original_fill(unit, base, candidates, count)


@pytest.mark.parametrize("seed", range(4))
def test_gram_path_matches_the_original_loop_on_generic_float32(seed, force_path):
    """Only the rounding of the similarities differs (GEMM vs matrix-vector), far below these score gaps."""
    force_path("gram")
    unit, base, candidates = make_case(seed, num_tokens=200, dim=512, dtype=torch.float32)
    count = int(candidates.sum()) // 2
    assert greedy_diverse_fill(unit, base, candidates, count).tolist() == original_fill(unit, base, candidates, count)


@pytest.mark.parametrize(("seed", "gathered"), [(0, False), (2, True)])
def test_cost_model_picks_the_gram_for_long_fills(seed, gathered, monkeypatch):
    """The Gram has ``M = C`` rows when that halves it, else ``M = N``; it is built when
    ``2 * count * N * GRAM_SPEEDUP >= M**2`` and ``M**2 <= GRAM_MAX_ELEMENTS``; otherwise the matrix-vector loop."""
    built: list[int] = []
    real = base_module.gather_rows
    monkeypatch.setattr(base_module, "gather_rows", lambda matrix: built.append(matrix.shape[0]) or real(matrix))
    unit, base, candidates = make_case(seed, num_tokens=576, dim=16)
    num_candidates = int(candidates.sum())
    size = num_candidates if gathered else 576
    assert (2 * num_candidates**2 < 576**2) == gathered
    short = size**2 // (2 * 576 * base_module.GRAM_SPEEDUP) - 1
    expected = naive_fill(unit, base, candidates, short + 2)
    assert greedy_diverse_fill(unit, base, candidates, short, num_candidates=num_candidates).tolist() \
        == expected[:short]
    assert built == []
    assert greedy_diverse_fill(unit, base, candidates, short + 2, num_candidates=num_candidates).tolist() == expected
    assert built == [size]
    monkeypatch.setattr(base_module, "GRAM_MAX_ELEMENTS", size**2 - 1)
    greedy_diverse_fill(unit, base, candidates, num_candidates, num_candidates=num_candidates)
    assert built == [size]


def test_duplicates_and_zero_rows_still_give_distinct_picks(force_path):
    for path in PATHS:
        force_path(path)
        unit = l2_normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))[torch.arange(40) % 3]
        unit[5] = 0.0
        candidates = torch.ones(40, dtype=torch.bool)
        picked = greedy_diverse_fill(unit, torch.zeros(40), candidates, 40)
        assert sorted(picked.tolist()) == list(range(40))


def test_greedy_by_penalty_rows_blocks_picks_and_honours_minus_inf():
    first = torch.tensor([0.0, 3.0, -math.inf, 1.0])
    rows = torch.tensor([[0.0, 0.0, -math.inf, 0.0], [5.0, 5.0, -math.inf, 4.0],
                         [0.0, 0.0, -math.inf, 0.0], [9.0, 1.0, -math.inf, 9.0]])
    picked = greedy_by_penalty_rows(first, 3, lambda choice: rows[choice[0]])
    assert picked.tolist() == [1, 0, 3]  # 1; rows[1] -> 0 (5 > 4, 1 blocked); min with rows[0] -> 3 (2: -inf)
    assert greedy_by_penalty_rows(first, 0, lambda choice: rows[choice[0]]).tolist() == []


# ------------------------------------------------------------------------------------- Gram and buffers
@pytest.mark.parametrize("num_rows", [1, 255, 256, 257, 700])
def test_cosine_gram_is_the_gemm_and_exactly_symmetric(num_rows):
    unit = l2_normalize(torch.randn(num_rows, 48, generator=torch.Generator().manual_seed(num_rows)))
    gram = cosine_gram(unit)
    assert torch.equal(gram, gram.T)
    torch.testing.assert_close(gram, unit @ unit.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(gram, unit.double() @ unit.double().T, rtol=0, atol=1e-6, check_dtype=False)
    out = torch.full((num_rows, num_rows), math.nan)
    assert cosine_gram(unit, out=out) is out and torch.equal(out, gram)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l2_normalize_is_torch_normalize_bit_for_bit(dtype):
    rows = torch.randn(300, 77, generator=torch.Generator().manual_seed(1), dtype=dtype)
    rows[3] = 0.0
    expected = torch.nn.functional.normalize(rows, dim=-1)
    assert torch.equal(l2_normalize(rows), expected)
    out = torch.empty_like(rows)
    assert l2_normalize(rows, out=out) is out and torch.equal(out, expected)


def test_scratch_reuses_one_buffer_per_slot_and_dtype(monkeypatch):
    like = torch.zeros(1)
    first = scratch("test_slot", (10, 4), like)
    smaller = scratch("test_slot", (3, 5), like)
    assert smaller.data_ptr() == first.data_ptr() and smaller.shape == (3, 5)
    grown = scratch("test_slot", (20, 4), like)
    assert grown.numel() == 80 and scratch("test_slot", (2,), like).data_ptr() == grown.data_ptr()
    other_dtype = scratch("test_slot", (2,), like, torch.float64)
    assert other_dtype.dtype == torch.float64
    assert scratch("another_slot", (2,), like).data_ptr() != scratch("test_slot", (2,), like).data_ptr()
    monkeypatch.setattr(base_module, "SCRATCH_MAX_BYTES", 64)
    oversized = scratch("test_slot", (17,), like)  # 68 bytes: a fresh tensor, the kept buffer is untouched
    assert oversized.data_ptr() != scratch("test_slot", (2,), like).data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["textscythe", "divprune", "visionzip", "dart", "icctp", "visiondrop"])
def test_results_never_alias_the_reused_buffers(name, dtype, force_path):
    """A second selection (which overwrites every scratch buffer) leaves the first result intact."""
    force_path("gram")
    generator = torch.Generator().manual_seed(3)
    first_inputs = (torch.randn(120, 32, generator=generator).to(dtype), torch.randn(6, 32, generator=generator),
                    torch.rand(120, generator=generator))
    selector = get_selector(name)
    first = selector.select(*first_inputs, budget=40)
    saved = (first.indices.clone(), first.embeddings.clone())
    selector.select(torch.randn(120, 32, generator=generator).to(dtype) * 5, torch.randn(6, 32, generator=generator),
                    torch.rand(120, generator=generator), budget=40)
    assert torch.equal(first.indices, saved[0]) and torch.equal(first.embeddings, saved[1])
    again = selector.select(*first_inputs, budget=40)
    assert torch.equal(again.indices, saved[0]) and torch.equal(again.embeddings, saved[1])


# ------------------------------------------------------------------------------------------------ divprune
def official_divprune(visual: torch.Tensor, k: int) -> list[int]:
    distance = 1.0 - l2_normalize(visual) @ l2_normalize(visual).T
    distance.fill_diagonal_(math.inf)
    picked = [int(torch.argmax(distance.amin(dim=0)))]
    while len(picked) < k:
        scores = distance[picked].amin(dim=0)
        scores[picked] = -math.inf
        picked.append(int(torch.argmax(scores)))
    return sorted(picked)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(4))
def test_divprune_paths_match_the_official_greedy(path, seed, force_path):
    force_path(path)
    visual = torch.randn(90, 24, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for k in (1, 2, 30, 89):
        assert get_selector("divprune").select(visual, budget=k).indices.tolist() == official_divprune(visual, k)


# ----------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", PATHS)
def test_fill_loop_never_synchronises(path, force_path):
    force_path(path)
    unit, base, candidates = (x.cuda() for x in make_case(2, num_tokens=400, dim=64))
    num_candidates = int(candidates.sum())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        picked = greedy_diverse_fill(unit, base, candidates, num_candidates - 1, num_candidates=num_candidates)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert picked.tolist() == naive_fill(unit.cpu(), base.cpu(), candidates.cpu(), num_candidates - 1)
