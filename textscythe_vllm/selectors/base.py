"""Shared mechanics of all visual-token selectors.

A selector is a small dataclass whose fields are the method's hyper-parameters. :meth:`TokenSelector.select`
owns everything that is the same for every method -- input validation, the ``budget >= N`` shortcut,
float32 scoring, sorting the result and gathering the output rows -- and calls the method's
:meth:`TokenSelector._select` with clean float32 inputs and ``1 <= k < N``.
"""

from __future__ import annotations

import math
import operator
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor


@dataclass
class SelectionResult:
    """What a selector keeps.

    ``indices``: LongTensor ``[K]``, unique and sorted ascending -- positions in the image's token sequence.
    ``embeddings``: ``[K, D]`` rows to feed the LLM, same dtype/device as the visual input. For pure pruning
    selectors this is ``visual[indices]``; merging selectors return merged rows, each standing at the
    position in ``indices``.
    ``info``: optional per-method diagnostics (e.g. TextScythe's key text tokens), never needed to serve.
    """

    indices: Tensor
    embeddings: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Selection:
    """What ``_select`` may return instead of bare indices: diagnostics and/or merged rows.

    ``merged``: ``[K, D]`` rows aligned with ``indices`` for merging methods; ``None`` for pure pruning
    (the base class then gathers ``visual[indices]`` in the input's own dtype, bit-exact).
    """

    indices: Tensor
    merged: Tensor | None = None
    info: dict[str, Tensor] = field(default_factory=dict)


def check_budget(budget: object) -> int:
    """Return ``budget`` as an int, or raise ``ValueError`` for anything that is not an integer >= 1.

    Python, numpy and torch integer scalars are accepted; bools (of any library), floats, strings and None
    are not.
    """
    return check_integer("budget", budget, minimum=1)


def l2_normalize(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Row-wise L2 normalisation; all-zero rows stay zero (cosine 0 with everything).

    The arithmetic of ``torch.nn.functional.normalize`` (``x / max(||x||, 1e-12)``), optionally into ``out``.
    """
    norm = torch.linalg.vector_norm(x, ord=2, dim=-1, keepdim=True).clamp_min_(1e-12)
    return torch.div(x, norm, out=out) if out is not None else x / norm


#: The largest buffer :func:`scratch` keeps per slot (bigger requests get a fresh tensor): 128 MiB, e.g. an
#: 8,192 x 4,096 float32 matrix; a worker thread keeps at most four slots.
SCRATCH_MAX_BYTES = 1 << 27


class _ScratchBuffers(threading.local):
    def __init__(self) -> None:
        self.by_slot: dict[str, Tensor] = {}


_scratch = _ScratchBuffers()


def scratch(slot: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised ``shape`` tensor on ``like``'s device (``dtype``, default ``like``'s), reused across
    calls on the CPU.

    A fresh tensor of tens of MB costs more in page faults than the arithmetic that fills it (glibc returns
    such blocks to the OS on free: a new ``[2880, 4096]`` float32 tensor costs ~18 ms on 2 cores, filling it
    ~3 ms), so the selectors' large temporaries (float32 and unit rows, the Gram matrix) live in one buffer
    per ``slot`` and thread, grown to the largest size seen up to :data:`SCRATCH_MAX_BYTES`. CUDA's caching
    allocator already reuses blocks: there it is ``torch.empty``. The caller must not let the result (or a
    view of it) outlive its own call.
    """
    dtype = like.dtype if dtype is None else dtype
    numel = math.prod(shape)
    if like.device.type != "cpu" or numel * dtype.itemsize > SCRATCH_MAX_BYTES:
        return like.new_empty(shape, dtype=dtype)
    buffer = _scratch.by_slot.get(slot)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        buffer = _scratch.by_slot[slot] = torch.empty(numel, dtype=dtype, device=like.device)
    return buffer[:numel].view(shape)


def unit_rows(visual: Tensor) -> Tensor:
    """:func:`l2_normalize` of ``visual [N, D]`` into the reused ``"unit"`` :func:`scratch` buffer (valid until the
    next selection on this thread)."""
    return l2_normalize(visual, out=scratch("unit", tuple(visual.shape), visual))


def minmax_normalize(attention: Tensor | None, num_tokens: int, like: Tensor) -> Tensor:
    """Min-max normalise attention to [0, 1] over all tokens; zeros if absent or constant. ``[N]`` float."""
    if attention is None:
        return torch.zeros(num_tokens, dtype=like.dtype, device=like.device)
    low, high = torch.aminmax(attention)
    span = high - low
    # torch.where keeps this on the device: no host round-trip to test for a constant vector.
    return torch.where(span > 0, (attention - low) / torch.where(span > 0, span, 1.0), 0.0)


def stable_top_k(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores; ties go to the lower index (``torch.topk`` does not promise that)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


#: :func:`greedy_diverse_fill` builds a Gram matrix of ``M`` rows when ``2 * count * N * GRAM_SPEEDUP >= M * M``.
#: The symmetric Gram (:func:`cosine_gram`) costs ``M * M / 2`` row dot products at GEMM speed; the
#: matrix-vector loop costs ``count * N`` at matrix-vector speed, and each of its ``[N, D] @ [D]`` products
#: re-reads the whole ``[N, D]`` matrix (memory-bound) while the GEMM is compute-bound: on 2 AVX2 cores
#: (MKL, float32, D = 4096) the GEMM does ~6x more multiply-adds per second at N = 576 and ~10x at N = 2880
#: (measured crossovers: ~50 and ~150 fill steps); 8 puts the switch at 36 and 180 steps, within 30% of
#: the faster path on either side.
GRAM_SPEEDUP = 8
#: The largest Gram matrix (entries) a selector materialises: ``M <= 4096`` rows (64 MiB in float32; 33 MB at
#: M = 2880, 1.3 MB at M = 576). Above it the matrix-vector loop runs.
GRAM_MAX_ELEMENTS = 1 << 24
#: Row-block height of :func:`cosine_gram` (256 rows of a 4096-wide float32 matrix: 4 MiB, cache-friendly
#: GEMM panels; 128-512 are within noise of each other on 2 AVX2 cores).
GRAM_BLOCK_ROWS = 256


def cosine_gram(unit: Tensor, out: Tensor | None = None) -> Tensor:
    """``unit @ unit.T`` for rows ``unit [M, D]`` -> ``[M, M]``, each off-diagonal block computed once.

    Row block ``b`` multiplies against rows ``b..M`` only and its transpose fills the mirrored block below
    the diagonal: ~half the multiply-adds of one GEMM (at N = 2880, D = 4096: ~0.28 s instead of ~0.44 s on
    2 AVX2 cores), and the result is exactly symmetric. Entries round like any GEMM (not like ``mv``).
    """
    num_rows = unit.shape[0]
    gram = unit.new_empty((num_rows, num_rows)) if out is None else out
    for start in range(0, num_rows, GRAM_BLOCK_ROWS):
        stop = min(num_rows, start + GRAM_BLOCK_ROWS)
        upper = gram[start:stop, start:]  # [b, M - start]: this block's diagonal part and everything right of it
        torch.mm(unit[start:stop], unit[start:].T, out=upper)
        gram[stop:, start:stop] = upper[:, stop - start:].T
    return gram


def greedy_diverse_fill(
    unit_visual: Tensor,  # [N, D] L2-normalised rows
    base_score: Tensor,  # [N] importance term, higher is better (finite)
    candidates: Tensor,  # [N] bool, tokens that may be picked
    count: int,
    *,
    num_candidates: int | None = None,
) -> Tensor:
    """Pick ``count`` tokens greedily by ``base_score[j] - max_{k picked} cos(V_j, V_k)``.

    The first pick maximises ``base_score`` alone (the max over an empty set is not taken). Ties go to the
    lower index (``torch.argmax`` returns the first maximum). ``count`` must not exceed the number of
    candidates ``C = num_candidates``, which the caller should pass when it knows it (otherwise it is counted
    here: one host sync, before the loop). Returns LongTensor ``[count]`` in pick order.

    The loop (:func:`greedy_by_penalty_rows`) keeps the running minimum of ``base_score - cos(V, V_pick)``,
    which is ``base_score - max cos`` bit for bit. The similarity rows come from one of two sources, whichever
    costs less; the picks are the same up to the rounding of the similarities (GEMM and matrix-vector
    products round differently), i.e. only ties closer than float precision can break differently:

    * **Gram** (``2 * count * N * GRAM_SPEEDUP >= M * M`` and ``M * M <= GRAM_MAX_ELEMENTS``): the symmetric
      :func:`cosine_gram` of ``M`` rows, turned into ``base - cos`` in place; a step is then a row gather, a
      ``minimum`` and an ``argmax`` over ``[M]``. ``M = C`` (the candidate rows, gathered first) when that at
      least halves the GEMM, else ``M = N`` (no ``[C, D]`` copy; non-candidates score ``-inf``). Extra
      memory: ``M * M`` scores (a reused :func:`scratch` buffer on the CPU).
    * **matrix-vector**: one ``[N, D] @ [D]`` product per step into a preallocated buffer (the arithmetic of
      the original loop, so its picks are bit-identical to it); no extra memory.
    """
    if count == 0:
        return torch.empty(0, dtype=torch.long, device=unit_visual.device)
    num_tokens = base_score.shape[0]
    if num_candidates is None:
        num_candidates = int(candidates.sum())
    subset = 2 * num_candidates * num_candidates < num_tokens * num_tokens  # the candidates' Gram is < half
    size = num_candidates if subset else num_tokens
    if count > 1 and size * size <= GRAM_MAX_ELEMENTS and 2 * count * num_tokens * GRAM_SPEEDUP >= size * size:
        positions = positions_where_false(~candidates, num_candidates) if subset else None  # [C] ascending
        if positions is not None:
            rows = torch.index_select(
                unit_visual, 0, positions, out=scratch("fill_rows", (size, unit_visual.shape[1]), unit_visual)
            )
            base = base_score.index_select(0, positions)
        else:
            rows, base = unit_visual, torch.where(candidates, base_score, -math.inf)
        penalty = cosine_gram(rows, out=scratch("gram", (size, size), rows))  # [M, M] cosine similarities ...
        torch.sub(base, penalty, out=penalty)  # ... -> base[j] - cos(V_i, V_j), in place
        picked = greedy_by_penalty_rows(base, count, gather_rows(penalty))
        return picked if positions is None else positions.index_select(0, picked)

    base = torch.where(candidates, base_score, -math.inf)  # non-candidates are never picked
    similarity = torch.empty_like(base)

    def penalty_row(choice: Tensor) -> Tensor:
        torch.mv(unit_visual, unit_visual.index_select(0, choice).squeeze(0), out=similarity)
        return torch.sub(base, similarity, out=similarity)

    return greedy_by_penalty_rows(base, count, penalty_row)


def gather_rows(matrix: Tensor) -> Callable[[Tensor], Tensor]:
    """``penalty_row`` for :func:`greedy_by_penalty_rows` reading rows of a precomputed matrix (one buffer)."""
    row = matrix.new_empty((1, matrix.shape[1]))
    return lambda choice: torch.index_select(matrix, 0, choice, out=row).squeeze(0)


def greedy_by_penalty_rows(first_score: Tensor, count: int, penalty_row: Callable[[Tensor], Tensor]) -> Tensor:
    """The greedy max-min loop shared by the diversity selectors: LongTensor ``[count]`` of distinct picks.

    Pick 0 is ``argmax first_score``; pick ``s`` is ``argmax_j min_{k < s} penalty_row(pick_k)[j]`` over the
    tokens not picked yet (ties -> lower index). ``penalty_row(choice)`` takes a LongTensor ``[1]`` and returns
    ``[C]`` (it may reuse one buffer); ``-inf`` in ``first_score`` and in every row marks a token that is
    never picked (``count`` must not exceed the others). With ``penalty_row(k)[j] = b_j - cos(V_j, V_k)``
    the running minimum is exactly ``b_j - max_k cos(V_j, V_k)`` (``fl(b - x)`` never increases with ``x``).

    Per step: one ``penalty_row``, an in-place ``minimum``, ``-inf`` written over the pick and an ``argmax``
    written straight into the output (a 1-element view, as indexing with a 0-dim tensor would sync). No host
    synchronisation, no allocation besides what ``penalty_row`` does.
    """
    picked = torch.empty(count, dtype=torch.long, device=first_score.device)
    if count == 0:
        return picked
    torch.argmax(first_score, dim=0, keepdim=True, out=picked[:1])
    score = torch.empty_like(first_score)
    for step in range(1, count):
        previous = picked[step - 1:step]
        if step == 1:
            score.copy_(penalty_row(previous))
        else:
            torch.minimum(score, penalty_row(previous), out=score)
        score.index_fill_(0, previous, -math.inf)
        torch.argmax(score, dim=0, keepdim=True, out=picked[step:step + 1])
    return picked


def _is_scalar_non_bool(value: object) -> bool:
    """Python/numpy/torch scalar (0-dim) that is not a boolean."""
    return not isinstance(value, (bool, str, bytes)) and getattr(value, "ndim", 0) == 0 \
        and str(getattr(value, "dtype", "")) not in ("bool", "torch.bool")


def check_integer(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Validate an integer hyper-parameter (numpy/torch integer scalars accepted, bools not); return an int."""
    try:
        if not _is_scalar_non_bool(value):
            raise TypeError
        number = operator.index(value)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}, got {number}")
    return number


def check_fraction(
    name: str, value: object, *, low: float = 0.0, high: float = 1.0, open_low: bool = False,
    open_high: bool = False,
) -> float:
    """Validate a real hyper-parameter in ``[low, high]`` (ends excluded where ``open_*``); return a float."""
    try:
        if not _is_scalar_non_bool(value) or isinstance(value, complex):
            raise TypeError
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})") from None
    below = number <= low if open_low else number < low
    above = number >= high if open_high else number > high
    if not math.isfinite(number) or below or above:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def ratio_count(ratio: float, total: int) -> int:
    """``floor(ratio * total)``, robust to binary rounding (``0.29 * 100`` counts as 29, not 28)."""
    return min(total, math.floor(ratio * total + 1e-9))


def positions_where_false(mask: Tensor, count: int) -> Tensor:
    """Ascending positions of the ``count`` False entries of a 1-D bool ``mask`` (caller knows ``count``).

    A stable sort instead of ``nonzero`` keeps the result's size known on the host: no device sync.
    """
    return torch.sort(mask.to(torch.uint8), stable=True).indices[:count]


def dominant_contextual_merge(visual: Tensor, importance: Tensor, num_dominant: int, k: int) -> Selection:
    """VisionZip-style "dominant + contextual" reduction of ``visual [N, D]`` to ``k`` rows (``k < N``).

    1. Dominant: the ``num_dominant`` tokens with the largest ``importance`` (ties -> lower index), kept as is.
    2. Contextual: of the ``R = N - num_dominant`` remaining tokens, in ascending position order, every
       ``step = max(1, R // c)``-th one (the first ``c = k - num_dominant``) becomes a merge target, as in
       VisionZip's official code. Every other remaining token is assigned to the target with the largest
       cosine similarity (ties -> the lower-positioned target) and the target's row becomes the plain mean of
       its group ``{target} + assigned tokens``.

    Returns a :class:`Selection` with ``indices`` = dominant then target positions, ``merged`` rows aligned
    with them, and ``info``: ``dominant_mask [N]`` (bool) and ``merge_target [N]`` (the kept position each
    token ended up in; kept tokens map to themselves). Sync-free and deterministic (the group sums are a
    one-hot matmul, not an atomic scatter).
    """
    num_tokens = visual.shape[0]
    device = visual.device
    positions = torch.arange(num_tokens, device=device)
    dominant = stable_top_k(importance, num_dominant)
    is_dominant = torch.zeros(num_tokens, dtype=torch.bool, device=device).index_fill_(0, dominant, True)
    merge_target = positions.clone()
    num_contextual = k - num_dominant
    if num_contextual == 0:
        return Selection(indices=dominant, info={"dominant_mask": is_dominant, "merge_target": merge_target})

    num_remaining = num_tokens - num_dominant
    remaining = positions_where_false(is_dominant, num_remaining)  # [R] ascending
    step = max(1, num_remaining // num_contextual)
    target_local = torch.arange(num_contextual, device=device) * step  # == arange(0, R, step)[:c]
    is_target_local = torch.zeros(num_remaining, dtype=torch.bool, device=device).index_fill_(
        0, target_local, True
    )
    targets = remaining[target_local]  # [c]
    sources = remaining[positions_where_false(is_target_local, num_remaining - num_contextual)]  # [R - c]

    unit = l2_normalize(visual)
    assignment = (unit[sources] @ unit[targets].T).argmax(dim=1)  # [R - c], first max -> lower target
    one_hot = (assignment[:, None] == torch.arange(num_contextual, device=device)[None, :]).to(visual.dtype)
    group_sum = visual[targets] + one_hot.T @ visual[sources]  # [c, D]
    group_size = 1.0 + one_hot.sum(dim=0)  # [c]
    contextual_rows = group_sum / group_size[:, None]

    merge_target[sources] = targets[assignment]
    indices = torch.cat([dominant, targets])
    merged = torch.cat([visual[dominant], contextual_rows])
    return Selection(
        indices=indices, merged=merged, info={"dominant_mask": is_dominant, "merge_target": merge_target}
    )


@dataclass
class TokenSelector(ABC):
    """Base class: subclasses are dataclasses whose fields are hyper-parameters, and implement ``_select``."""

    name: ClassVar[str]
    #: whether the method reads ``text`` / ``attention`` (others ignore them; the vLLM glue uses this to skip
    #: computing inputs a method does not need).
    uses_text: ClassVar[bool] = False
    uses_attention: ClassVar[bool] = False

    def select(
        self,
        visual: Tensor,  # [N, D] projected visual tokens of one image
        text: Tensor | None = None,  # [T, D] instruction-token embeddings (T may be 0)
        attention: Tensor | None = None,  # [N] vision-encoder attention each token receives
        budget: int = 64,
    ) -> SelectionResult:
        budget = check_budget(budget)
        self._check_inputs(visual, text, attention)
        num_tokens = visual.shape[0]
        if budget >= num_tokens:
            return SelectionResult(
                indices=torch.arange(num_tokens, device=visual.device), embeddings=visual
            )
        score_dtype = torch.float64 if visual.dtype == torch.float64 else torch.float32
        # ``_select`` never returns a view of its inputs (pure pruning gathers from ``visual`` below), so the
        # float32 copy of a bfloat16/float16 input can live in a reused buffer.
        visual_f = visual if visual.dtype == score_dtype else scratch(
            "visual", tuple(visual.shape), visual, score_dtype
        ).copy_(visual)
        if text is None:
            text_f = visual_f.new_zeros((0, visual.shape[1]))
        else:
            text_f = text.to(device=visual.device, dtype=score_dtype)
        attention_f = None if attention is None else attention.to(device=visual.device, dtype=score_dtype)

        picked = self._select(visual_f, text_f, attention_f, budget)
        if not isinstance(picked, Selection):
            picked = Selection(indices=picked)
        indices, order = torch.sort(picked.indices)
        embeddings = visual[indices] if picked.merged is None else picked.merged[order].to(visual.dtype)
        return SelectionResult(indices=indices, embeddings=embeddings, info=picked.info)

    @abstractmethod
    def _select(
        self, visual: Tensor, text: Tensor, attention: Tensor | None, k: int
    ) -> Tensor | Selection:
        """Choose ``k`` of ``visual``'s ``N`` rows (``1 <= k < N``; inputs are finite float32/64).

        Return the chosen indices (LongTensor ``[k]``, unique, any order), or a :class:`Selection` carrying
        merged rows and/or diagnostics.
        """

    @staticmethod
    def _check_inputs(visual: Tensor, text: Tensor | None, attention: Tensor | None) -> None:
        if not isinstance(visual, Tensor) or visual.dim() != 2 or visual.shape[0] == 0:
            raise ValueError(f"visual must be a non-empty [N, D] tensor, got shape {getattr(visual, 'shape', None)}")
        if not visual.dtype.is_floating_point:
            raise ValueError(f"visual must be floating point, got {visual.dtype}")
        num_tokens, dim = visual.shape
        if text is not None and (text.dim() != 2 or (text.shape[0] > 0 and text.shape[1] != dim)):
            raise ValueError(f"text must be [T, {dim}], got shape {tuple(text.shape)}")
        if attention is not None and (attention.dim() != 1 or attention.shape[0] != num_tokens):
            raise ValueError(f"attention must be [{num_tokens}], got shape {tuple(attention.shape)}")
        # NaN/inf anywhere makes a sum non-finite, so one reduction per input (and one host sync) clears the
        # common case; only a non-finite sum (which may also be overflow of finite values) needs the full scan.
        inputs = [x for x in (visual, text, attention) if x is not None and x.numel()]
        sums = torch.stack([x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
                            .to(visual.device, torch.float64) for x in inputs])
        if not bool(torch.isfinite(sums).all()) and not all(bool(torch.isfinite(x).all()) for x in inputs):
            raise ValueError("selector inputs contain NaN or inf")
