"""TextScythe against an independent plain-NumPy reference of the pinned interpretation (paper Sec. 3).

The reference below is written from the paper's equations and the project's pinned reading of them
(docs/how-it-works.md); it imports nothing from ``textscythe_vllm``. Both sides run in float64, so the kept
indices must be *identical*, not merely close.

1. ``S = cos(T, V)`` ``[T, N]``; ``P_i = softmax(S_i)`` over the visual tokens (Eq. 1).
2. ``ER_i = H(P_i) / (max_j P_ij / mean_j P_ij)``, natural log (Eq. 2).
3. ``lambda = alpha * (round(log10 T) + 1)``; ``tau = mean(ER) - lambda * std(ER)``, population std (Eq. 3).
4. key text tokens: ``ER_i < tau`` (strict) (Eq. 4).
5. ``V_rel = U_{i key} {j : P_ij > mean(P_i) + lambda * std(P_i)}`` (Eqs. 5, 6).
6. ``|V_rel| > K``: the K members with the largest ``max_{i key} P_ij`` (ties -> lower index).
7. otherwise fill from ``R = V \\ V_rel``: ``A`` = min-max normalised attention (zeros if constant/absent);
   first ``argmax_R A``, then ``argmax_R A_j - max_{k in V_sup} cos(V_j, V_k)`` (ties -> lower index) (Eq. 7).
8. output: the sorted union.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

ALPHA = 0.7


# ----------------------------------------------------------------------------------------------------------
# Reference (NumPy, float64)
# ----------------------------------------------------------------------------------------------------------


def ref_lambda(num_text: int, alpha: float = ALPHA) -> float:
    """Eq. 3's scale. ``log10`` of an integer is never exactly ``x.5``, so the rounding mode is moot."""
    return alpha * (int(np.rint(np.log10(num_text))) + 1)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def ref_probs(text: np.ndarray, visual: np.ndarray) -> np.ndarray:
    """Eq. 1: row-wise softmax of the text-visual cosine similarity, ``[T, N]``."""
    sim = _unit_rows(text) @ _unit_rows(visual).T
    exp = np.exp(sim - sim.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def ref_entropy_ratio(probs: np.ndarray) -> np.ndarray:
    """Eq. 2: entropy over peak-to-mean ratio, per text token."""
    entropy = -np.sum(probs * np.log(probs), axis=1)
    return entropy / (probs.max(axis=1) / probs.mean(axis=1))


@dataclass
class RefResult:
    indices: np.ndarray
    key_text: np.ndarray  # [T] bool
    relevant: np.ndarray  # [N] bool
    truncated: bool  # step 6 ran (|V_rel| > K)
    supplemented: int  # |V_sup|


def ref_textscythe(
    visual: np.ndarray, text: np.ndarray, attention: np.ndarray | None, k: int, alpha: float = ALPHA
) -> RefResult:
    n = visual.shape[0]
    t = text.shape[0]
    key_text = np.zeros(t, dtype=bool)
    relevant = np.zeros(n, dtype=bool)
    if k >= n:
        return RefResult(np.arange(n), key_text, relevant, False, 0)

    probs = None
    if t > 0:
        lam = ref_lambda(t, alpha)
        probs = ref_probs(text, visual)
        ratios = ref_entropy_ratio(probs)
        tau = ratios.mean() - lam * ratios.std()  # numpy's std is the population std (ddof=0)
        key_text = ratios < tau
        for i in np.flatnonzero(key_text):
            relevant |= probs[i] > probs[i].mean() + lam * probs[i].std()

    rel_idx = np.flatnonzero(relevant)
    if rel_idx.size > k:
        strength = probs[key_text][:, rel_idx].max(axis=0)
        ranked = sorted(range(rel_idx.size), key=lambda m: (-strength[m], rel_idx[m]))
        return RefResult(np.sort(rel_idx[ranked[:k]]), key_text, relevant, True, 0)

    if attention is None or attention.max() == attention.min():
        importance = np.zeros(n)
    else:
        importance = (attention - attention.min()) / (attention.max() - attention.min())
    unit = _unit_rows(visual)
    remaining = ~relevant
    supplement: list[int] = []
    max_cos = np.zeros(n)  # max_{k in V_sup} cos(V_j, V_k); only read once V_sup is non-empty
    while rel_idx.size + len(supplement) < k:
        candidates = np.flatnonzero(remaining)  # ascending, so argmax's first maximum = lower index
        score = importance[candidates] if not supplement else importance[candidates] - max_cos[candidates]
        pick = int(candidates[np.argmax(score)])
        cos_pick = unit @ unit[pick]
        max_cos = cos_pick if not supplement else np.maximum(max_cos, cos_pick)
        supplement.append(pick)
        remaining[pick] = False
    indices = np.sort(np.concatenate([rel_idx, np.array(supplement, dtype=np.int64)]))
    return RefResult(indices, key_text, relevant, False, len(supplement))


# ----------------------------------------------------------------------------------------------------------
# Random cases with planted object regions
# ----------------------------------------------------------------------------------------------------------

SIZES = (16, 64, 576)
DIMS = (8, 32, 64)
TEXT_LENGTHS = (0, 1, 2, 5, 12, 40, 120)
ATTENTION_MODES = ("none", "constant", "random")
NUM_CASES = 200


@dataclass
class Case:
    seed: int
    visual: np.ndarray
    text: np.ndarray
    attention: np.ndarray | None
    k: int

    def __repr__(self) -> str:
        mode = "none" if self.attention is None else f"{self.attention.shape[0]}"
        return f"Case(seed={self.seed}, N={self.visual.shape[0]}, D={self.visual.shape[1]}, " \
               f"T={self.text.shape[0]}, K={self.k}, attention={mode})"


def make_case(seed: int) -> Case:
    rng = np.random.default_rng(1000 + seed)
    n = SIZES[seed % len(SIZES)]
    d = DIMS[(seed // len(SIZES)) % len(DIMS)]
    t = TEXT_LENGTHS[seed % len(TEXT_LENGTHS)]
    mode = ATTENTION_MODES[(seed // 9) % len(ATTENTION_MODES)]

    visual = rng.normal(size=(n, d))
    text = rng.normal(size=(t, d)) * rng.uniform(0.5, 3.0)
    # Plant 1-3 objects: a contiguous region of visual rows ~= one text token's direction + noise, so that
    # token's similarity distribution is peaked and it becomes a key token.
    if t > 0 and seed % 8 != 7:
        for _ in range(rng.integers(1, 4)):
            anchor = rng.integers(t)
            size = int(rng.integers(2, max(3, n // 4)))
            start = int(rng.integers(0, n - size + 1))
            noise = rng.uniform(0.1, 1.0)
            direction = text[anchor] / np.linalg.norm(text[anchor])
            visual[start:start + size] = direction * np.sqrt(d) * rng.uniform(0.5, 2.0) \
                + noise * rng.normal(size=(size, d))

    if mode == "none":
        attention = None
    elif mode == "constant":
        attention = np.full(n, rng.uniform(0.0, 1.0))
    else:
        attention = rng.dirichlet(np.full(n, 0.3))

    # Budgets across the range, half of them small so that |V_rel| > K (step 6) happens; a few K >= N.
    roll = seed % 10
    if roll < 4:
        k = int(rng.integers(1, max(2, n // 12)))
    elif roll < 9:
        k = int(rng.integers(1, n))
    else:
        k = int(rng.choice([n - 1, n, n + 5]))
    return Case(seed, visual, text, attention, k)


CASES = [make_case(seed) for seed in range(NUM_CASES)]


@functools.cache
def reference_for(seed: int) -> RefResult:
    case = CASES[seed]
    return ref_textscythe(case.visual, case.text, case.attention, case.k)


def _torch_select(case: Case):
    from textscythe_vllm.selectors import get_selector

    attention = None if case.attention is None else torch.from_numpy(case.attention)
    return get_selector("textscythe").select(
        torch.from_numpy(case.visual), torch.from_numpy(case.text), attention, case.k
    )


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"seed{case.seed}")
def test_matches_reference(case: Case) -> None:
    expected = reference_for(case.seed)
    out = _torch_select(case)
    got = out.indices.numpy()
    assert got.dtype == np.int64
    assert got.tolist() == expected.indices.tolist(), case
    assert len(got) == min(case.k, case.visual.shape[0])
    np.testing.assert_array_equal(out.embeddings.numpy(), case.visual[got])
    if case.k < case.visual.shape[0]:
        np.testing.assert_array_equal(out.info["key_text_mask"].numpy(), expected.key_text)
        np.testing.assert_array_equal(out.info["relevant_mask"].numpy(), expected.relevant)


@pytest.mark.parametrize("path", ["gram", "matvec"])
def test_matches_reference_on_either_fill_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The diversity fill gets its similarities from one Gram GEMM or from one matrix-vector product per step,
    by cost; pinned to either, every case still keeps exactly the reference's indices."""
    import textscythe_vllm.selectors.base as base_module

    if path == "gram":
        monkeypatch.setattr(base_module, "GRAM_SPEEDUP", 10**9)
        monkeypatch.setattr(base_module, "GRAM_MAX_ELEMENTS", 1 << 40)
    else:
        monkeypatch.setattr(base_module, "GRAM_MAX_ELEMENTS", 0)
    for case in CASES:
        if reference_for(case.seed).supplemented > 1:
            assert _torch_select(case).indices.tolist() == reference_for(case.seed).indices.tolist(), case


def test_cases_cover_both_branches() -> None:
    """The random cases must exercise truncation (step 6), pure supplementation and the mixed path."""
    results = [reference_for(c.seed) for c in CASES]
    truncated = sum(r.truncated for r in results)
    mixed = sum((not r.truncated) and r.relevant.any() and r.supplemented > 0 for r in results)
    fill_only = sum((not r.relevant.any()) and r.supplemented > 0 for r in results)
    with_keys = sum(r.key_text.any() for r in results)
    assert truncated >= 20, truncated
    assert mixed >= 20, mixed
    assert fill_only >= 20, fill_only
    assert with_keys >= 80, with_keys
    # attention modes all appear on the supplementation path
    modes = {("none" if c.attention is None else "constant" if np.ptp(c.attention) == 0 else "random")
             for c, r in zip(CASES, results, strict=True) if r.supplemented > 1}
    assert modes == {"none", "constant", "random"}


WITH_TEXT = [case for case in CASES if case.text.shape[0] > 0][:28]


@pytest.mark.parametrize("case", WITH_TEXT, ids=lambda case: f"seed{case.seed}")
def test_entropy_ratio_matches_reference(case: Case) -> None:
    from textscythe_vllm.selectors.textscythe import entropy_ratio

    expected = ref_entropy_ratio(ref_probs(case.text, case.visual))
    got = entropy_ratio(torch.from_numpy(case.text), torch.from_numpy(case.visual))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=0)


def test_entropy_ratio_of_no_text_is_empty() -> None:
    from textscythe_vllm.selectors.textscythe import entropy_ratio

    case = next(c for c in CASES if c.text.shape[0] == 0)
    got = entropy_ratio(torch.from_numpy(case.text), torch.from_numpy(case.visual))
    assert got.shape == (0,)


def test_entropy_ratio_float32() -> None:
    case = CASES[5]
    expected = ref_entropy_ratio(ref_probs(case.text, case.visual))
    from textscythe_vllm.selectors.textscythe import entropy_ratio

    got = entropy_ratio(torch.from_numpy(case.text).float(), torch.from_numpy(case.visual).float())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


# Hand-computed: round(log10 T) = 0 for T <= 3 (log10 3 = 0.477), 1 for 4..31 (log10 4 = 0.602,
# log10 31 = 1.491), 2 for 32..316 (log10 32 = 1.505, log10 316 = 2.4997), 3 from 317 (2.5011).
LAMBDAS = {1: 0.7, 3: 0.7, 4: 1.4, 10: 1.4, 31: 1.4, 32: 2.1, 100: 2.1, 316: 2.1, 317: 2.8}


@pytest.mark.parametrize(("num_text", "expected"), sorted(LAMBDAS.items()))
def test_lambda(num_text: int, expected: float) -> None:
    from textscythe_vllm.selectors.textscythe import threshold_scale

    assert ref_lambda(num_text) == pytest.approx(expected, abs=1e-12)
    assert threshold_scale(num_text, ALPHA) == pytest.approx(expected, abs=1e-12)
    assert threshold_scale(num_text, 1.0) == pytest.approx(expected / ALPHA, abs=1e-12)


def test_single_text_token_has_no_key() -> None:
    """T = 1: std(ER) = 0, so ER < tau = ER never holds -- pure supplementation."""
    case = next(c for c in CASES if c.text.shape[0] == 1 and c.k < c.visual.shape[0])
    out = _torch_select(case)
    assert not out.info["key_text_mask"].any()
    assert not out.info["relevant_mask"].any()


def test_alpha_changes_selection_consistently() -> None:
    """Non-default alpha: the reference and the selector still agree (lambda scales both thresholds)."""
    from textscythe_vllm.selectors import get_selector

    for alpha in (0.0, 1.2):
        for case in CASES[:30]:
            expected = ref_textscythe(case.visual, case.text, case.attention, case.k, alpha=alpha)
            attention = None if case.attention is None else torch.from_numpy(case.attention)
            got = get_selector("textscythe", alpha=alpha).select(
                torch.from_numpy(case.visual), torch.from_numpy(case.text), attention, case.k
            )
            assert got.indices.tolist() == expected.indices.tolist(), (alpha, case)


def test_reference_sanity_math() -> None:
    """The reference itself: P rows are distributions and uniform P gives ER = log N."""
    rng = np.random.default_rng(0)
    probs = ref_probs(rng.normal(size=(3, 5)), rng.normal(size=(7, 5)))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    uniform = np.full((1, 7), 1 / 7)
    assert ref_entropy_ratio(uniform)[0] == pytest.approx(math.log(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_text_tokens_are_never_key_tokens(dtype):
    # Identical instruction tokens have one ER value: a zero spread, whatever the matmul rounding says.
    from textscythe_vllm.selectors import get_selector

    visual = torch.randn(256, 512, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for seed in range(20):
        text = torch.randn(1, 512, generator=torch.Generator().manual_seed(seed), dtype=dtype).repeat(13, 1)
        out = get_selector("textscythe").select(visual, text, None, 8)
        assert not out.info["key_text_mask"].any()
        assert not out.info["relevant_mask"].any()
