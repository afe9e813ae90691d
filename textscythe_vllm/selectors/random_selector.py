"""Random visual-token selection: the floor every method must beat.

Not a paper's method but the standard control of the token-pruning literature (e.g. the "Random" ablation of
ICCTP, Yu et al., AAAI 2026, Fig. 5). Interpretation: ``k`` distinct positions drawn uniformly without
replacement -- the first ``k`` entries of ``torch.randperm(N)`` from a CPU ``torch.Generator`` seeded with
``seed``. The draw depends only on ``(seed, N, k)``, never on the features or the device (the permutation is
drawn on the CPU -- the one host tensor in the selectors -- and then moved to the input's device), so the
same request always keeps the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from textscythe_vllm.selectors.base import TokenSelector, check_integer


@dataclass
class RandomSelector(TokenSelector):
    """Seeded uniform random subset of size ``k`` (see module docstring)."""

    name: ClassVar[str] = "random"

    seed: int = 0

    def __post_init__(self) -> None:
        self.seed = check_integer("seed", self.seed, minimum=0, maximum=2**64 - 1)

    def _select(self, visual: Tensor, text: Tensor, attention: Tensor | None, k: int) -> Tensor:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(self.seed)
        permutation = torch.randperm(visual.shape[0], generator=generator, device="cpu")
        return permutation[:k].to(visual.device)
