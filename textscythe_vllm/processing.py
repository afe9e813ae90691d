"""Processor-side glue: how many placeholders each item gets, and what the model needs to choose them.

A :class:`PruningProcessorMixin` goes in front of a model family's vLLM multimodal processor. It is four jobs,
one class each:

* :class:`RequestPlanning` -- reads ``visual_token_budget`` / ``visual_token_selector`` from the request's
  ``mm_processor_kwargs`` merged over the server's ``--mm-processor-kwargs``, validates them and builds one
  :class:`ItemPlan` per item: budget, selector and the *instruction* (the token ids of the user message holding
  the item, see :mod:`textscythe_vllm.instruction`); ships each plan to the model as the per-item tensor field
  :func:`plan_field` (kept on the CPU);
* :class:`PlanCacheKeys` -- mixes the plan into each item's multimodal hash, which keys the processor cache, the
  encoder cache and the prefix cache -- so the same image with another question or budget is selected anew, and
  an identical request hits every cache;
* :class:`PlaceholderTrimming` -- gives each item ``min(budget, N)`` placeholder tokens;
* :class:`PruningMetrics` -- counts tokens before/after per request and records explanations.

The plans travel from ``apply`` to vLLM's processing steps it calls in a context variable
(:func:`carrying_plans`), never in the HF-processor kwargs: vLLM's steps and the HF processor see exactly the
kwargs stock vLLM would give them.

A model family may prune several modalities (``pruned_modalities``, e.g. Qwen2.5-VL's images and videos): each
modality gets its own plans, located by its own placeholder token, and its own per-item field
(:func:`plan_field`); the budget applies to every item of every pruned modality.

Without a budget nothing changes: the plugin's keys are removed and the stock processor runs with what stock
vLLM would give it, so hashes and placeholders are exactly stock vLLM's. A request's other
``mm_processor_kwargs`` are dropped, except the model's own options a family admits
(:meth:`RequestPlanning.request_processor_options`: Gemma 4's ``max_soft_tokens``, never above the server's), which
reach vLLM's processor as they would without the plugin.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import torch

from textscythe_vllm import LOGGER_NAME, _vllm, explain, metrics
from textscythe_vllm.instruction import TokenizerFacts, instruction_token_ids
from textscythe_vllm.request import CLIENT_KEYS, PruningRequest
from textscythe_vllm.selectors import available_selectors

logger = logging.getLogger(LOGGER_NAME)

#: Per-image tensor field that carries the plan from the processor to ``embed_multimodal``.
PLAN_FIELD = "textscythe_plan"
#: Internal key the middleware sets: the ticket under which this request's budget bucket is filed for the
#: latency metrics (see :class:`textscythe_vllm.metrics._RequestBuckets`).
REQUEST_TAG_KEY = "_textscythe_request"
_PRIVATE_KEYS = frozenset((REQUEST_TAG_KEY, *CLIENT_KEYS))
_PLAN_HEADER = 3  # [budget, selector code, explain id] precede the instruction ids


def plan_field(modality: str) -> str:
    """The per-item plan field of ``modality``: :data:`PLAN_FIELD` for images, ``textscythe_<modality>_plan``
    otherwise (a batched field belongs to exactly one modality)."""
    return PLAN_FIELD if modality == "image" else f"textscythe_{modality}_plan"


@dataclass(frozen=True)
class ItemPlan:
    """How one item (an image, a video) is pruned: keep ``budget`` tokens (0 = keep all) chosen by ``selector``."""

    budget: int
    selector: str
    instruction: tuple[int, ...]
    #: Non-zero: the worker records this selection under the id for the explain route (see ``explain``).
    explain_id: int = 0

    def encode(self) -> torch.Tensor:
        """LongTensor ``[3 + T]``: budget, selector code (index in ``available_selectors()``), explain id,
        instruction ids."""
        code = available_selectors().index(self.selector) if self.budget else -1
        return torch.tensor([self.budget, code, self.explain_id, *self.instruction], dtype=torch.long)

    @classmethod
    def decode(cls, packed: torch.Tensor) -> ItemPlan:
        values = packed.tolist()
        budget, code = int(values[0]), int(values[1])
        selector = available_selectors()[code] if budget else ""
        return cls(budget=budget, selector=selector, instruction=tuple(values[_PLAN_HEADER:]),
                   explain_id=int(values[2]))

    def cache_key(self) -> str:
        key = f"budget={self.budget};selector={self.selector};instruction={','.join(map(str, self.instruction))}"
        # An explained item is selected anew (its own cache entry), so its record describes a selection that ran.
        return f"{key};explain={self.explain_id}" if self.explain_id else key


UNPRUNED = ItemPlan(budget=0, selector="", instruction=())
_profiling = threading.local()


def allow_listed_request_kwargs(kwargs: Mapping[str, object],
                                admitted: Sequence[str] = ()) -> dict[str, object]:
    """The request's ``mm_processor_kwargs`` restricted to :data:`CLIENT_KEYS`.

    Whatever frontend a request came through (any HTTP route, offline ``LLM``, a frontend vLLM adds later), a
    request may set only the plugin's own fields: other HF-processor options (``do_resize``, ``size``, ...) can
    make the worker fail on every request of the batch, and the plugin's private keys must not be forged.
    Each dropped key is logged once, except the model options in ``admitted`` (validated by the family).
    """
    allowed = {key: value for key, value in kwargs.items() if key in CLIENT_KEYS}
    for key in kwargs.keys() - allowed.keys() - {REQUEST_TAG_KEY, *admitted}:
        _log_dropped_once(str(key))
    return allowed


_dropped_keys: set[str] = set()
_dropped_keys_lock = threading.Lock()
_MAX_LOGGED_KEYS = 1024  # a client can send any number of distinct keys; the log stays bounded


def _log_dropped_once(key: str) -> None:
    with _dropped_keys_lock:
        if key in _dropped_keys or len(_dropped_keys) >= _MAX_LOGGED_KEYS:
            return
        _dropped_keys.add(key)
    logger.warning("textscythe: dropped request mm_processor_kwargs key %r (only %s are accepted from requests; "
                   "set processor options for the whole server with --mm-processor-kwargs)", key[:200],
                   ", ".join(CLIENT_KEYS))


def strip_private_kwargs(kwargs: Mapping[str, object]) -> dict[str, object]:
    """Drop the plugin's keys (a server-wide default budget in ``--mm-processor-kwargs``, the middleware's ticket):
    they must reach neither the HF processor nor its lru-cached constructor."""
    return {key: value for key, value in kwargs.items() if key not in _PRIVATE_KEYS}


def plan_items(
    request: PruningRequest | None,
    prompt: Sequence[int],
    placeholder_ids: Sequence[int],
    num_items: int,
    tokenizer: Any,
    facts: TokenizerFacts,
    excluded_placeholder_ids: Sequence[int] | None = None,
) -> tuple[ItemPlan, ...] | None:
    """One plan per item, in prompt order, or ``None`` when the request prunes nothing.

    ``placeholder_ids`` locate the items; ``excluded_placeholder_ids`` (default: the same) are the placeholder
    tokens of every pruned modality, which no instruction contains.
    """
    if request is None or num_items == 0:
        return None
    excluded, markers = facts.get(
        tokenizer, placeholder_ids if excluded_placeholder_ids is None else excluded_placeholder_ids
    )
    placeholder_set = set(placeholder_ids)
    positions = [index for index, token in enumerate(prompt) if token in placeholder_set][:num_items]
    # Prompts whose items are not marked by a placeholder token (rare: text-level targets) use the whole
    # prompt as the instruction of every item.
    positions += [len(prompt)] * (num_items - len(positions))
    instructions = instruction_token_ids(prompt, positions, excluded_ids=excluded, markers=markers)
    return tuple(ItemPlan(request.budget, request.selector, ids) for ids in instructions)


def video_frames(items: Any, index: int) -> tuple[int, int, int]:
    """``(frames, width, height)`` of video ``index`` of a parsed video batch, whose items are frame sequences (PIL
    images or HWC arrays), or ``(frames, metadata)`` pairs where the family needs metadata."""
    video = items.get(index)
    frames = video[0] if isinstance(video, tuple) else video
    first = frames[0]
    width, height = first.size if hasattr(first, "size") and not hasattr(first, "shape") else (
        first.shape[-2], first.shape[-3]
    )
    return len(frames), int(width), int(height)


def spread_budget(budget: int, sizes: Sequence[int]) -> list[int]:
    """How many of an item's ``min(budget, sum(sizes))`` tokens each of its segments keeps -- a segment being a
    run of placeholders between text the prompt keeps (a video frame after its timestamp): as even as the sizes
    allow (water-filling), the remainder to the earliest segments. The processor trims each run and the model
    selects within each segment with these same quotas, so rows and placeholders line up frame by frame."""
    quotas = [0] * len(sizes)
    remaining = min(budget, sum(sizes))
    while remaining > 0:
        open_segments = [index for index, size in enumerate(sizes) if quotas[index] < size]
        share, extra = divmod(remaining, len(open_segments))
        for rank, index in enumerate(open_segments):
            given = min(sizes[index] - quotas[index], share + (1 if rank < extra else 0))
            quotas[index] += given
            remaining -= given
    return quotas


def embed_runs(is_embed: Sequence[bool]) -> list[int]:
    """Lengths of the maximal runs of embedding positions, in order."""
    runs: list[int] = []
    previous = False
    for embed in is_embed:
        if embed:
            if previous:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = bool(embed)
    return runs


def prune_prompt_update(update: Any, budget: int) -> Any:
    """Keep ``min(budget, N)`` of the ``N`` embedding positions of a resolved prompt update; other tokens (a
    video's timestamps, begin/end markers) stay. One run of placeholders keeps its first positions; several runs
    (frames between timestamps) keep the first :func:`spread_budget` quota of each."""
    content = update.content
    full = list(content.full)
    is_embed = [True] * len(full) if content.is_embed is None else content.is_embed(full).tolist()
    if sum(is_embed) <= budget:
        return update
    quotas = iter(spread_budget(budget, embed_runs(is_embed)))
    kept, quota, previous = [], 0, False
    for token, embed in zip(full, is_embed, strict=True):
        if embed:
            if not previous:
                quota = next(quotas)
            previous = True
            if quota == 0:
                continue
            quota -= 1
        previous = bool(embed)
        kept.append(token)
    return replace(update, content=replace(content, full=kept))


@cache
def _plugin_context_class() -> type:
    @dataclass(frozen=True)
    class PluginProcessingContext(_vllm.InputProcessingContext):
        """vLLM merges the server's ``--mm-processor-kwargs`` into every HF-processor call and constructor
        through this method; the plugin's keys must reach neither (HF warns about unknown keys, and the
        constructor cache is keyed on them)."""

        def get_merged_mm_kwargs(self, kwargs: Mapping[str, object], **options: Any) -> dict[str, Any]:
            return strip_private_kwargs(super().get_merged_mm_kwargs(kwargs, **options))

    return PluginProcessingContext


def with_plugin_context(info_factory: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a model's processing-info factory so its info (and processor) use the plugin's context."""

    def build_info(context: Any) -> Any:
        return info_factory(_plugin_context_class()(context.model_config, context.tokenizer))

    return build_info


@dataclass
class _PlansInFlight:
    """The plans of the request being processed, and which of its items vLLM processes now: on a processor-cache
    lookup only the missing items are processed (and get prompt updates), so their plans line up by position."""

    plans: Mapping[str, tuple[ItemPlan, ...]]
    processing: dict[str, list[bool]] = field(default_factory=dict)  # per modality: item is processed now

    def for_processed_items(self, modality: str, num_items: int) -> Sequence[ItemPlan]:
        plans = self.plans.get(modality)
        if plans is None:
            return [UNPRUNED] * num_items
        mask = self.processing.get(modality)
        if mask is not None:
            plans = tuple(plan for plan, processed in zip(plans, mask, strict=True) if processed)
        if len(plans) != num_items:
            raise RuntimeError(f"textscythe: {num_items} {modality} items to process but {len(plans)} plans")
        return plans


_in_flight: ContextVar[_PlansInFlight | None] = ContextVar("textscythe_plans_in_flight", default=None)


@contextlib.contextmanager
def carrying_plans(plans: Mapping[str, tuple[ItemPlan, ...]]) -> Iterator[None]:
    """Make ``plans`` visible to vLLM's processing steps called inside the block (same thread: ``apply`` is
    synchronous); outside it, and for vLLM's own profiling inputs, there are none."""
    token = _in_flight.set(_PlansInFlight(plans) if plans else None)
    try:
        yield
    finally:
        _in_flight.reset(token)


_options_in_flight: ContextVar[Mapping[str, object] | None] = ContextVar("textscythe_request_options", default=None)


@contextlib.contextmanager
def carrying_request_options(options: Mapping[str, object]) -> Iterator[None]:
    """Make the request's admitted model options visible to the processing steps and metrics inside the block."""
    token = _options_in_flight.set(options)
    try:
        yield
    finally:
        _options_in_flight.reset(token)


def request_options_in_flight() -> Mapping[str, object]:
    """The admitted model options of the request being processed (see ``request_processor_options``)."""
    return _options_in_flight.get() or {}


def plans_in_flight(modality: str, num_items: int) -> Sequence[ItemPlan]:
    """The plans of the ``num_items`` items of ``modality`` vLLM is processing now (unpruned when none)."""
    current = _in_flight.get()
    return [UNPRUNED] * num_items if current is None else current.for_processed_items(modality, num_items)


class RequestPlanning:
    """Job 1: request -> one :class:`ItemPlan` per item, carried through ``apply``; ships each processed item's
    plan to the model as its modality's plan field.

    ``pruned_modalities`` are the modalities whose items are pruned; ``placeholder_token_ids(modality)`` returns
    the prompt token(s) that mark one item of ``modality`` before expansion.
    """

    pruned_modalities: tuple[str, ...] = ("image",)

    def placeholder_token_ids(self, modality: str = "image") -> list[int]:
        return [self.info.get_hf_config().image_token_index]  # type: ignore[attr-defined]

    def _all_placeholder_token_ids(self) -> list[int]:
        return [token for modality in self.pruned_modalities for token in self.placeholder_token_ids(modality)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._tokenizer_facts = TokenizerFacts()
        metrics.initialize_api_server_metrics(self.info.ctx.model_config.served_model_name)  # type: ignore[attr-defined]

    def get_dummy_mm_inputs(self, *args: Any, **kwargs: Any) -> Any:
        # Profiling inputs must stay at maximum size even under a server-default budget, or vLLM would
        # size the encoder cache for pruned items and then refuse unpruned ones.
        _profiling.active = True
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)  # type: ignore[misc]
        finally:
            _profiling.active = False

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        if getattr(_profiling, "active", False):  # vLLM's own inputs, not a request's
            return super().apply(  # type: ignore[misc]
                replace(inputs, hf_processor_mm_kwargs=strip_private_kwargs(inputs.hf_processor_mm_kwargs)), timing_ctx
            )
        options = self.request_processor_options(
            {key: value for key, value in inputs.hf_processor_mm_kwargs.items() if key in self.request_option_keys})
        request_kwargs = allow_listed_request_kwargs(inputs.hf_processor_mm_kwargs, self.request_option_keys)
        request_ids = metrics.REQUEST_BUCKETS.claim(inputs.hf_processor_mm_kwargs.get(REQUEST_TAG_KEY))
        # The operator's --mm-processor-kwargs are merged in here and in every HF-processor call (through the
        # context): only the request's own options are restricted to the plugin's keys.
        merged = self.info.ctx.get_mm_config().merge_mm_processor_kwargs(request_kwargs)  # type: ignore[attr-defined]
        request = PruningRequest.from_kwargs(merged)
        self._check_request(request)
        plans = self._plan_request(request, inputs)
        explained = request is not None and request.explain and bool(request_ids) and bool(plans)
        if explained:
            plans = {modality: tuple(replace(plan, explain_id=secrets.randbits(62) | 1) for plan in modality_plans)
                     for modality, modality_plans in plans.items()}
        # The plugin's options travel as plans: vLLM and the HF processor get what stock vLLM gives them for a
        # request with only the model options the family admitted.
        with carrying_request_options(options):
            with carrying_plans(plans):
                result = super().apply(replace(inputs, hf_processor_mm_kwargs=dict(options)),  # type: ignore[misc]
                                       timing_ctx)
            self._record_metrics(inputs, request, result, request_ids)  # type: ignore[attr-defined]
        if explained:
            self._record_explanation(request_ids, plans)  # type: ignore[attr-defined]
        return result

    def _plan_request(self, request: PruningRequest | None, inputs: Any) -> dict[str, tuple[ItemPlan, ...]]:
        plans: dict[str, tuple[ItemPlan, ...]] = {}
        for modality in self.pruned_modalities:
            items = inputs.mm_data_items.get(modality)
            modality_plans = plan_items(
                request,
                inputs.prompt,
                self.placeholder_token_ids(modality),
                0 if items is None else len(items),
                self.info.get_tokenizer(),  # type: ignore[attr-defined]
                self._tokenizer_facts,
                excluded_placeholder_ids=self._all_placeholder_token_ids(),
            )
            if modality_plans is not None:
                plans[modality] = modality_plans
        return plans

    def _check_request(self, request: PruningRequest | None) -> None:
        """Refuse a request the model cannot serve by raising ``PruningRequestError``; by default accept all."""

    #: The model's own ``mm_processor_kwargs`` keys a request may set (each validated by
    #: :meth:`request_processor_options`); the HTTP middleware lets them through for this architecture
    #: (``plugin.REQUEST_PROCESSOR_OPTIONS``).
    request_option_keys: tuple[str, ...] = ()

    def request_processor_options(self, options: Mapping[str, object]) -> dict[str, object]:
        """The request's model options (keys of :attr:`request_option_keys` only), validated: raise
        ``PruningRequestError`` for a value the server must not take (one that would raise its cost above what
        the operator configured). By default there are none."""
        return {}

    # -- hooks called by _vllm.ProcessorHooks -------------------------------------------------------------------
    def add_plan_fields(self, processed_data: Any) -> Any:
        """The processed items plus each item's encoded plan (the per-item plan field of its modality)."""
        for modality in self.pruned_modalities:
            num_items = self._num_processed_items(processed_data, modality)
            if num_items:
                plans = plans_in_flight(modality, num_items)
                processed_data[plan_field(modality)] = [plan.encode() for plan in plans]
        return processed_data

    def _num_processed_items(self, processed_data: Mapping[str, object], modality: str = "image") -> int:
        for key in ("pixel_values", "image_embeds"):
            value = processed_data.get(key)
            if value is not None:
                return len(value)  # type: ignore[arg-type]
        return 0

    def add_plan_field_configs(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """The model inputs' field configs plus the plan fields (batched per item, kept on the CPU)."""
        fields = dict(fields)
        for modality in self.pruned_modalities:
            fields[plan_field(modality)] = _vllm.MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return fields

    def note_items_processed(self, mm_is_cached: Mapping[str, list[bool]]) -> None:
        """On a processor-cache lookup, only the items not cached are processed next."""
        current = _in_flight.get()
        if current is not None:
            current.processing = {modality: [not hit for hit in hits] for modality, hits in mm_is_cached.items()}


class PlanCacheKeys:
    """Job 2: each item's multimodal hash (the processor, encoder and prefix caches' key) -- stock vLLM's, mixed
    with the item's plan when it is pruned."""

    def item_hashes(self, inputs: Any, stock: Callable[[Any], Any]) -> Any:
        hashes = stock(inputs)
        current = _in_flight.get()
        if current is not None:
            algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm  # type: ignore[attr-defined]
            for modality, modality_plans in current.plans.items():
                hashes[modality] = [
                    _vllm.MultiModalHasher.hash_kwargs(algorithm, item=item_hash, textscythe=plan.cache_key())
                    for item_hash, plan in zip(hashes[modality], modality_plans, strict=True)
                ]
        return hashes


class PlaceholderTrimming:
    """Job 3: each pruned item's placeholder run cut to ``min(budget, N)`` embedding positions."""

    def pruned_prompt_updates(self, updates: Any) -> Any:
        if _in_flight.get() is None:
            return updates
        updates = dict(updates)
        for modality in self.pruned_modalities:  # type: ignore[attr-defined]
            if modality not in updates:
                continue
            plans = plans_in_flight(modality, len(updates[modality]))
            updates[modality] = [
                [prune_prompt_update(update, plan.budget) for update in per_item]
                for plan, per_item in zip(plans, updates[modality], strict=True)
            ]
        return updates


class PruningMetrics:
    """Job 4: tokens before/after per request (API server only: profiling never gets here) and the request part
    of explanations. Never fails a request."""

    def _record_explanation(self, request_ids: tuple[str, ...], plans: Mapping[str, Sequence[ItemPlan]]) -> None:
        """The request part of the explanation (see :mod:`textscythe_vllm.explain`)."""
        try:
            tokenizer = self.info.get_tokenizer()  # type: ignore[attr-defined]
            items = [
                {"modality": modality, "index": index, "explain_id": plan.explain_id,
                 "instruction": [tokenizer.decode([token]) for token in plan.instruction]}
                for modality, modality_plans in plans.items() for index, plan in enumerate(modality_plans)
            ]
            model = self.info.ctx.model_config.served_model_name  # type: ignore[attr-defined]
            explain.record_request(list(request_ids), str(model), items)
        except Exception:
            logger.warning("textscythe: could not record the explanation", exc_info=True)

    def _record_metrics(self, inputs: Any, request: PruningRequest | None, result: Any,
                        request_ids: tuple[str, ...]) -> None:
        try:
            before, after = [], []
            for modality in self.pruned_modalities:  # type: ignore[attr-defined]
                items = inputs.mm_data_items.get(modality)
                placeholders = result["mm_placeholders"].get(modality, [])
                before += [self._unpruned_token_count(items, index, modality) for index in range(len(placeholders))]
                after += [placeholder.get_num_embeds() for placeholder in placeholders]
            model_name = self.info.ctx.model_config.served_model_name  # type: ignore[attr-defined]
            budget = None if request is None else request.budget
            metrics.record_request(model_name, budget, None if request is None else request.selector, before, after)
            metrics.REQUEST_BUCKETS.file(request_ids, metrics.budget_bucket(budget))
        except Exception:
            logger.warning("textscythe: could not record request metrics", exc_info=True)

    def _unpruned_token_count(self, items: Any, index: int, modality: str = "image") -> int:
        """Visual tokens the stock processor gives item ``index`` of ``modality``."""
        if isinstance(items, _vllm.ImageEmbeddingItems):
            return items.get_feature_size(index)
        size = items.get_image_size(index)
        return self.info.get_num_image_tokens(  # type: ignore[attr-defined]
            image_width=size.width, image_height=size.height
        )


class PruningProcessorMixin(RequestPlanning, PlanCacheKeys, PlaceholderTrimming, PruningMetrics,
                            _vllm.ProcessorHooks):
    """Put in front of a vLLM ``BaseMultiModalProcessor`` subclass (see module docstring): the four jobs, wired
    to vLLM's private processing steps by :class:`textscythe_vllm._vllm.ProcessorHooks`."""
