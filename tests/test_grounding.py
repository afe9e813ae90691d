"""Planted grounding: TextScythe keeps the image region the instruction talks about; text-blind selectors don't.

A 24 x 24 grid of visual tokens (LLaVA-1.5's 576) with one 6 x 6 object block whose tokens are one text
token's embedding plus noise; everything else is random. The instruction is 12 random text tokens, one of
which names the object. At K = 64 TextScythe must find that token as its only anchor and keep >= 90% of the
block. ``cls_attention`` gets an attention map that is *not* aligned with the object ([CLS] attention does
not know the question: here it is random with a few "register"-like sink peaks elsewhere) and ``random`` is
content-blind; neither may keep 90% of the block.
"""

from __future__ import annotations

import pytest
import torch

from textscythe_vllm.selectors import get_selector

GRID = 24
NUM_VISUAL = GRID * GRID
DIM = 64
NUM_TEXT = 12
BLOCK = 6
BUDGET = 64
SEEDS = range(6)


def planted_scene(seed: int, noise: float = 0.5, block: int = BLOCK) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(NUM_TEXT, DIM, generator=gen)
    text = text / text.norm(dim=1, keepdim=True) * 3.0  # random directions at an LLM-embedding-like scale
    anchor = int(torch.randint(NUM_TEXT, (1,), generator=gen))
    row, col = (int(v) for v in torch.randint(GRID - block + 1, (2,), generator=gen))

    visual = torch.randn(NUM_VISUAL, DIM, generator=gen)
    grid = torch.arange(NUM_VISUAL).view(GRID, GRID)
    region = grid[row:row + block, col:col + block].flatten()
    visual[region] = text[anchor] + noise * 3.0 * torch.randn(region.numel(), DIM, generator=gen) / DIM**0.5

    # Text-agnostic [CLS]-style attention: random background plus a few strong sinks outside the object.
    attention = torch.rand(NUM_VISUAL, generator=gen) * 1e-3
    outside = torch.ones(NUM_VISUAL, dtype=torch.bool)
    outside[region] = False
    candidates = outside.nonzero().squeeze(1)
    sinks = candidates[torch.randperm(candidates.numel(), generator=gen)[:8]]
    attention[sinks] += 0.1
    attention = attention / attention.sum()
    return {"visual": visual, "text": text, "attention": attention, "region": region, "anchor": anchor}


def kept_fraction(indices: torch.Tensor, region: torch.Tensor) -> float:
    return torch.isin(region, indices).float().mean().item()


@pytest.mark.parametrize("seed", SEEDS)
def test_textscythe_keeps_the_named_region(seed: int) -> None:
    scene = planted_scene(seed)
    out = get_selector("textscythe").select(scene["visual"], scene["text"], scene["attention"], BUDGET)
    assert out.indices.numel() == BUDGET
    key = out.info["key_text_mask"]
    assert key.shape == (NUM_TEXT,)
    assert bool(key[scene["anchor"]]), f"anchor {scene['anchor']} not a key token: {key.tolist()}"
    assert int(key.sum()) == 1, key.tolist()  # the 11 unrelated tokens are filtered out
    assert kept_fraction(out.indices, scene["region"]) >= 0.9
    # the relevant set is (essentially) the block itself; the rest of the budget went to supplementation
    relevant = out.info["relevant_mask"].nonzero().squeeze(1)
    assert torch.isin(relevant, scene["region"]).float().mean().item() >= 0.9


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["cls_attention", "random"])
def test_text_agnostic_selectors_miss_the_region(name: str, seed: int) -> None:
    scene = planted_scene(seed)
    out = get_selector(name).select(scene["visual"], scene["text"], scene["attention"], BUDGET)
    assert out.indices.numel() == BUDGET
    assert kept_fraction(out.indices, scene["region"]) < 0.9


@pytest.mark.parametrize("seed", SEEDS)
def test_textscythe_float32_noisier_8x8_region(seed: int) -> None:
    """float32, noisier tokens and an 8 x 8 block as large as the budget: still grounded."""
    scene = planted_scene(100 + seed, noise=0.8, block=8)
    out = get_selector("textscythe").select(
        scene["visual"].float(), scene["text"].float(), scene["attention"].float(), BUDGET
    )
    assert bool(out.info["key_text_mask"][scene["anchor"]])
    assert kept_fraction(out.indices, scene["region"]) >= 0.9
