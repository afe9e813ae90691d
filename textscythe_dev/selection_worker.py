"""Run the worker-side selection (:func:`textscythe_vllm.pruning.prune_items`) in a fresh process, for the
rank-independence test (tests/test_tp_rank_independence.py).

Every tensor-parallel rank runs the selection on its own copy of the same inputs; the kept rows must not depend
on anything that can differ between rank processes: RNG states (torch, numpy, Python), the hash seed, or the
number of intra-op threads. This script perturbs all of those as told, runs every case of the input file, and
saves the kept rows (and whether the fallback was used)::

    python -m textscythe_dev.selection_worker IN.pt OUT.pt --threads 2 --seed 7

``IN.pt`` holds ``{"embedding": [V, D], "cases": [{"features", "attention", "candidates", "budget",
"selector", "instruction"}, ...]}``; ``OUT.pt`` gets one ``{"rows": [K, D], "positions": [K], "fell_back": bool}`` per case.
"""

from __future__ import annotations

import argparse
import random
import sys

import numpy as np
import torch

from textscythe_vllm import pruning
from textscythe_vllm.processing import ItemPlan


def perturb_process_state(seed: int, threads: int) -> None:
    """Different RNG states and thread count per process (draws, so the generators really moved)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    for _ in range(seed % 5 + 1):
        torch.rand(17)
        np.random.rand(3)
        random.random()


def run_cases(payload: dict) -> list[dict[str, torch.Tensor]]:
    embedding = payload["embedding"]
    results = []
    kept_positions: list[torch.Tensor] = []
    fallbacks: list[str] = []
    original_log, original_fallback = pruning._log_selection, pruning.metrics.record_fallback
    # The kept positions travel through the selection-log hook and fallbacks through the metrics hook; capture
    # both in-process.
    pruning._log_selection = lambda plan, num_rows, positions: kept_positions.append(positions.clone())
    pruning.metrics.record_fallback = fallbacks.append
    try:
        for case in payload["cases"]:
            plan = ItemPlan(int(case["budget"]), case["selector"], tuple(int(i) for i in case["instruction"]))
            kept_positions.clear()
            fallbacks.clear()
            (rows,) = pruning.prune_items(
                [case["features"]], [case["attention"]], [plan], lambda ids: embedding[ids],
                candidates=[case["candidates"]],
            )
            results.append({"rows": rows.clone(), "positions": kept_positions[0] if kept_positions else None,
                            "fell_back": bool(fallbacks)})
    finally:
        pruning._log_selection, pruning.metrics.record_fallback = original_log, original_fallback
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs")
    parser.add_argument("output")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    perturb_process_state(args.seed, args.threads)
    payload = torch.load(args.inputs, weights_only=False)
    torch.save({"threads": torch.get_num_threads(), "results": run_cases(payload)}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
