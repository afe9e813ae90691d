"""Tensor parallelism: every rank must keep the same visual tokens.

With ``--tensor-parallel-size N`` each worker rank runs ``embed_multimodal`` and the selector on its own copy of
the (all-gathered) visual features; if two ranks kept different rows, their shards of the same hidden state
would disagree and the output would be garbage. Three checks:

* the selection in separate processes with different RNG states and hash seeds gives the same positions and
  bitwise-identical rows, for every selector (the worker code path, ``prune_items``); with different thread
  counts too, except the last bit of merged (averaged) rows;
* the [CLS]-attention probe all-reduces the per-rank head sums, so ranks holding different heads see the same
  scores, equal to the single-rank scores;
* a real ``vllm serve --tensor-parallel-size 2`` on CPU: both ranks log the same kept positions for every
  selector, and the prompt is pruned to exactly the budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from textscythe_vllm.selectors import available_selectors

IMAGE_TOKENS = 576
DIM = 64


def make_cases() -> dict:
    """LLaVA-1.5-shaped items ([576, D], no layout rows) and LLaVA-NeXT-shaped ones (newline rows excluded),
    float32 and bfloat16, several budgets, every selector."""
    generator = torch.Generator().manual_seed(1234)
    vocabulary = 50
    embedding = torch.randn(vocabulary, DIM, generator=generator)
    cases = []
    for index, selector in enumerate(available_selectors()):
        for shape, dtype, budget in (
            ("llava", torch.float32, 1), ("llava", torch.float32, 64), ("llava", torch.float32, 300),
            ("llava", torch.bfloat16, 64), ("next", torch.float32, 100),
        ):
            rows = IMAGE_TOKENS if shape == "llava" else 600
            features = torch.randn(rows, DIM, generator=generator)
            # a few near-duplicate rows: ties and near-ties are where nondeterminism would show
            features[10:20] = features[0] + 1e-7 * torch.randn(10, DIM, generator=generator)
            candidates = None
            if shape == "next":
                candidates = torch.ones(rows, dtype=torch.bool)
                candidates[24::25] = False  # newline rows
            attention = torch.softmax(torch.randn(rows, generator=generator) * 3, dim=0)
            instruction = torch.randint(0, vocabulary, (5 + index,), generator=generator).tolist()
            cases.append({
                "features": features.to(dtype), "attention": attention, "candidates": candidates,
                "budget": budget, "selector": selector, "instruction": instruction,
            })
    return {"embedding": embedding, "cases": cases}


def raw_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


#: Selectors whose rows are merged (averaged groups), not copied: their rows come out of a float32 matmul.
MERGING_SELECTORS = {"visionzip", "visiondrop"}
#: (threads, RNG seed, PYTHONHASHSEED) of three simulated rank processes: 0 and 1 differ in everything but the
#: thread count (as real ranks do: vLLM gives every rank the same number of threads), 2 also in the thread count.
RANKS = ((1, 1, "0"), (1, 987654, "4242"), (2, 31337, "99"))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    """The same cases selected in three separate processes (started together)."""
    workdir = tmp_path_factory.mktemp("ranks")
    payload = make_cases()
    torch.save(payload, workdir / "inputs.pt")
    processes = []
    for rank, (threads, seed, hash_seed) in enumerate(RANKS):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS=str(threads))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "textscythe_dev.selection_worker", str(workdir / "inputs.pt"),
             str(workdir / f"rank{rank}.pt"), "--threads", str(threads), "--seed", str(seed)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        ))
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    results = [torch.load(workdir / f"rank{rank}.pt", weights_only=False) for rank in range(len(RANKS))]
    assert [result["threads"] for result in results] == [threads for threads, _, _ in RANKS]
    return payload, results


def _label(case: dict) -> str:
    return f"{case['selector']} budget={case['budget']} {case['features'].dtype} rows={case['features'].shape[0]}"


def _check_common(case: dict, first: dict, second: dict) -> None:
    label = _label(case)
    keep = min(case["budget"], case["features"].shape[0])
    assert not first["fell_back"] and not second["fell_back"], label
    assert first["positions"] is not None and first["positions"].shape == (keep,), label
    assert torch.equal(first["positions"], second["positions"]), label
    assert first["rows"].shape == (keep, DIM) and first["rows"].dtype == case["features"].dtype, label
    if case["selector"] not in MERGING_SELECTORS:  # pruning selectors copy the kept rows, bit for bit
        assert torch.equal(raw_bits(first["rows"]), raw_bits(case["features"][first["positions"]])), label


def test_selection_is_bitwise_identical_across_processes_rng_states_and_hash_seeds(rank_results) -> None:
    payload, (rank0, rank1, _) = rank_results
    assert len(payload["cases"]) == 5 * len(available_selectors())
    for case, first, second in zip(payload["cases"], rank0["results"], rank1["results"], strict=True):
        _check_common(case, first, second)
        # bitwise: compare the raw bits (torch.equal would call -0.0 == 0.0)
        assert torch.equal(raw_bits(first["rows"]), raw_bits(second["rows"])), _label(case)


def test_selection_across_thread_counts(rank_results) -> None:
    """1 vs 2 intra-op threads: the same positions for every selector and the same rows, bit for bit, for the
    pruning selectors. Merged rows (visionzip, visiondrop) are group means computed by a float32 matmul whose
    summation order follows the BLAS thread count, so they may differ in the last bit (documented in
    docs/operations.md: give every rank the same thread count, as vLLM does)."""
    payload, (rank0, _, rank2) = rank_results
    for case, first, second in zip(payload["cases"], rank0["results"], rank2["results"], strict=True):
        _check_common(case, first, second)
        if case["selector"] in MERGING_SELECTORS:
            torch.testing.assert_close(first["rows"], second["rows"], rtol=1e-6, atol=1e-6, msg=_label(case))
        else:
            assert torch.equal(raw_bits(first["rows"]), raw_bits(second["rows"])), _label(case)


class _FakeClipAttention(torch.nn.Module):
    """The attributes of vLLM's CLIP attention that the probe reads, for ``heads`` of ``total_heads`` heads."""

    def __init__(self, heads: int, total_heads: int, head_dim: int, tp_size: int) -> None:
        super().__init__()
        self.qkv_proj = torch.nn.Identity()
        self.num_heads_per_partition, self.num_heads = heads, total_heads
        self.head_dim, self.scale, self.tp_size = head_dim, head_dim**-0.5, tp_size


def _shard_qkv(qkv: torch.Tensor, rank: int, tp_size: int, heads: int, head_dim: int) -> torch.Tensor:
    """The qkv_proj output rank ``rank`` of ``tp_size`` computes: its heads of q, then of k, then of v."""
    per_rank = heads // tp_size * head_dim
    parts = qkv.chunk(3, dim=-1)
    return torch.cat([part[..., rank * per_rank:(rank + 1) * per_rank] for part in parts], dim=-1)


@pytest.mark.parametrize("probe_name", ["ClsAttentionProbe", "MeanAttentionProbe"])  # CLIP [CLS]; SigLIP mean
def test_tower_attention_all_reduces_head_sums_across_ranks(monkeypatch: pytest.MonkeyPatch, probe_name) -> None:
    from textscythe_vllm import _vllm, probes

    probe_class = getattr(probes, probe_name)

    heads, head_dim, batch, seq_len, tp_size = 4, 16, 2, 577, 2
    qkv = torch.randn(batch, seq_len, 3 * heads * head_dim, generator=torch.Generator().manual_seed(5))

    def unexpected(tensor: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a single rank must not all-reduce")

    monkeypatch.setattr(_vllm, "tensor_model_parallel_all_reduce", unexpected)
    single = probe_class(_FakeClipAttention(heads, heads, head_dim, tp_size=1)).scores(qkv)
    assert single.shape == (batch, seq_len)
    torch.testing.assert_close(single.sum(dim=1), torch.ones(batch))  # a mean of softmax rows

    probes = [probe_class(_FakeClipAttention(heads // tp_size, heads, head_dim, tp_size))
              for _ in range(tp_size)]
    shards = [_shard_qkv(qkv, rank, tp_size, heads, head_dim) for rank in range(tp_size)]
    # 1) what each rank contributes: its own heads' sum (capture the all-reduce input, pass it through)
    partial: list[torch.Tensor] = []
    monkeypatch.setattr(_vllm, "tensor_model_parallel_all_reduce",
                        lambda tensor: partial.append(tensor.clone()) or tensor)
    for probe, shard in zip(probes, shards, strict=True):
        probe.scores(shard)
    assert len(partial) == tp_size and all(p.shape == (batch, seq_len) for p in partial)
    assert not torch.allclose(partial[0], partial[1])  # the ranks really hold different heads

    # 2) the collective: every rank receives the sum of all ranks' partial sums
    calls: list[int] = []

    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.stack(partial).sum(dim=0)

    monkeypatch.setattr(_vllm, "tensor_model_parallel_all_reduce", all_reduce)
    results = [probe.scores(shard) for probe, shard in zip(probes, shards, strict=True)]
    assert len(calls) == tp_size
    assert torch.equal(results[0], results[1])  # the same scores on every rank
    torch.testing.assert_close(results[0], single, rtol=1e-6, atol=1e-7)  # and the single-rank scores


# --- a real tensor-parallel server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tp_server(tiny_llava_weights_dir, tmp_path_factory):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor parallelism on CPU needs a core per rank")
    from textscythe_dev.server import VLLMServer

    logs = tmp_path_factory.mktemp("tp")
    selection_log = logs / "selection.jsonl"
    with VLLMServer(
        tiny_llava_weights_dir, ["--dtype", "float32", "--tensor-parallel-size", "2", "--seed", "0"],
        env={"TEXTSCYTHE_SELECTION_LOG": str(selection_log), "VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        log_path=logs / "vllm-tp2.log",
    ) as server:
        yield server, selection_log


@pytest.mark.server
def test_tensor_parallel_ranks_keep_the_same_tokens(tp_server) -> None:
    import openai

    from textscythe_dev.images import scene, user_message

    server, selection_log = tp_server
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def prompt_tokens(messages, extra=None) -> int:
        return client.chat.completions.create(
            model=server.model_name, messages=messages, max_tokens=4, temperature=0.0, extra_body=extra
        ).usage.prompt_tokens

    budgets = (7, 64)
    for index, selector in enumerate(available_selectors()):
        messages = [user_message("what colour is the red car next to the tree ?", scene(60 + index))]
        full = prompt_tokens(messages)
        for budget in budgets:
            got = prompt_tokens(messages, {"visual_token_budget": budget, "visual_token_selector": selector})
            assert got == full - IMAGE_TOKENS + budget, selector
    records = [json.loads(line) for line in selection_log.read_text().splitlines()]
    # every selection ran once per rank (both ranks write the same log), each pair identical
    by_selection: dict[tuple[str, int], list[list[int]]] = {}
    for record in records:
        assert record["num_tokens"] == IMAGE_TOKENS
        by_selection.setdefault((record["selector"], record["budget"]), []).append(record["kept_positions"])
    assert sorted(by_selection) == sorted((s, b) for s in available_selectors() for b in budgets)
    for key, kept in by_selection.items():
        assert len(kept) == 2, key
        assert kept[0] == kept[1], key
        assert len(kept[0]) == key[1], key
    assert "falling back to 'uniform'" not in server.log_path.read_text(errors="replace")  # no selector failed
    assert server.alive()
