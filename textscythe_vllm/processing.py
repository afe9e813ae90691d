"""Processor-side glue: how many placeholders each image gets, and what the model needs to choose them.

A :class:`PruningProcessorMixin` goes in front of a model family's vLLM multimodal processor. For a request
with a budget it

* reads ``visual_token_budget`` / ``visual_token_selector`` from the request's ``mm_processor_kwargs`` merged
  over the server's ``--mm-processor-kwargs`` and validates them;
* builds one :class:`ImagePlan` per image: budget, selector and the *instruction* (the token ids of the user
  message holding the image, see :mod:`textscythe_vllm.instruction`);
* gives each image ``min(budget, N)`` placeholder tokens (``_get_mm_prompt_updates``);
* mixes the plan into each image's multimodal hash, which keys the processor cache, the encoder cache and the
  prefix cache -- so the same image with another question or budget is selected anew, and an identical request
  hits every cache;
* ships the plan to the model as the per-image tensor field :data:`PLAN_FIELD` (kept on the CPU).

A model family may prune several modalities (``pruned_modalities``, e.g. Qwen2.5-VL's images and videos): each
modality gets its own plans, located by its own placeholder token, and its own per-item field
(:func:`plan_field`); the budget applies to every item of every pruned modality.

Without a budget nothing changes: the plugin's keys are removed and the stock processor runs with the
request's other kwargs, so hashes and placeholders are exactly stock vLLM's.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import torch

from textscythe_vllm import LOGGER_NAME, _vllm, explain, metrics
from textscythe_vllm.instruction import TokenizerFacts, instruction_token_ids
from textscythe_vllm.request import CLIENT_KEYS, PruningRequest
from textscythe_vllm.selectors import available_selectors

logger = logging.getLogger(LOGGER_NAME)

#: Internal ``hf_processor_mm_kwargs`` key carrying the plans (``{modality: per-item plans}``) through vLLM's
#: processing pipeline.
#: Never accepted from clients (the middleware drops every key but :data:`CLIENT_KEYS`).
PLAN_KEY = "_textscythe_plans"
#: Per-image tensor field that carries the plan from the processor to ``embed_multimodal``.
PLAN_FIELD = "textscythe_plan"
#: Internal key the middleware sets: the id under which this request's budget bucket is filed for the
#: latency metrics (see :class:`textscythe_vllm.metrics._RequestBuckets`).
REQUEST_TAG_KEY = "_textscythe_request"
_PRIVATE_KEYS = frozenset((PLAN_KEY, REQUEST_TAG_KEY, *CLIENT_KEYS))
_PLAN_HEADER = 3  # [budget, selector code, explain id] precede the instruction ids


def plan_field(modality: str) -> str:
    """The per-item plan field of ``modality``: :data:`PLAN_FIELD` for images, ``textscythe_<modality>_plan``
    otherwise (a batched field belongs to exactly one modality)."""
    return PLAN_FIELD if modality == "image" else f"textscythe_{modality}_plan"


@dataclass(frozen=True)
class ImagePlan:
    """How one image is pruned: keep ``budget`` tokens (0 = keep all) chosen by ``selector``."""

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
    def decode(cls, packed: torch.Tensor) -> ImagePlan:
        values = packed.tolist()
        budget, code = int(values[0]), int(values[1])
        selector = available_selectors()[code] if budget else ""
        return cls(budget=budget, selector=selector, instruction=tuple(values[_PLAN_HEADER:]),
                   explain_id=int(values[2]))

    def cache_key(self) -> str:
        key = f"budget={self.budget};selector={self.selector};instruction={','.join(map(str, self.instruction))}"
        # An explained item is selected anew (its own cache entry), so its record describes a selection that ran.
        return f"{key};explain={self.explain_id}" if self.explain_id else key


UNPRUNED = ImagePlan(budget=0, selector="", instruction=())
_profiling = threading.local()


def allow_listed_request_kwargs(kwargs: Mapping[str, object]) -> dict[str, object]:
    """The request's ``mm_processor_kwargs`` restricted to :data:`CLIENT_KEYS`.

    Whatever frontend a request came through (any HTTP route, offline ``LLM``, a frontend vLLM adds later), a
    request may set only the plugin's own fields: other HF-processor options (``do_resize``, ``size``, ...) can
    make the worker fail on every request of the batch, and the plugin's private keys must not be forged.
    Each dropped key is logged once.
    """
    allowed = {key: value for key, value in kwargs.items() if key in CLIENT_KEYS}
    for key in kwargs.keys() - allowed.keys() - {REQUEST_TAG_KEY}:
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
    """Drop the plugin's keys: they must reach neither the HF processor nor its lru-cached constructor."""
    return {key: value for key, value in kwargs.items() if key not in _PRIVATE_KEYS}


def plan_images(
    request: PruningRequest | None,
    prompt: Sequence[int],
    placeholder_ids: Sequence[int],
    num_images: int,
    tokenizer: Any,
    facts: TokenizerFacts,
    excluded_placeholder_ids: Sequence[int] | None = None,
) -> tuple[ImagePlan, ...] | None:
    """One plan per image, in prompt order, or ``None`` when the request prunes nothing.

    ``placeholder_ids`` locate the items; ``excluded_placeholder_ids`` (default: the same) are the placeholder
    tokens of every pruned modality, which no instruction contains.
    """
    if request is None or num_images == 0:
        return None
    excluded, markers = facts.get(
        tokenizer, placeholder_ids if excluded_placeholder_ids is None else excluded_placeholder_ids
    )
    placeholder_set = set(placeholder_ids)
    positions = [index for index, token in enumerate(prompt) if token in placeholder_set][:num_images]
    # Prompts whose images are not marked by a placeholder token (rare: text-level targets) use the whole
    # prompt as the instruction of every image.
    positions += [len(prompt)] * (num_images - len(positions))
    instructions = instruction_token_ids(prompt, positions, excluded_ids=excluded, markers=markers)
    return tuple(ImagePlan(request.budget, request.selector, ids) for ids in instructions)


def prune_prompt_update(update: Any, budget: int) -> Any:
    """Keep the first ``budget`` embedding positions of a resolved prompt update; other tokens stay."""
    content = update.content
    full = list(content.full)
    is_embed = [True] * len(full) if content.is_embed is None else content.is_embed(full).tolist()
    if sum(is_embed) <= budget:
        return update
    kept, seen = [], 0
    for token, embed in zip(full, is_embed, strict=True):
        if embed:
            seen += 1
            if seen > budget:
                continue
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


class PruningProcessorMixin(_vllm.ProcessorHooks):
    """Put in front of a vLLM ``BaseMultiModalProcessor`` subclass (see module docstring).

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
        request_kwargs = allow_listed_request_kwargs(inputs.hf_processor_mm_kwargs)
        request_ids = metrics.REQUEST_BUCKETS.claim(inputs.hf_processor_mm_kwargs.get(REQUEST_TAG_KEY))
        # The operator's --mm-processor-kwargs are merged in here and in every HF-processor call (through the
        # context): only the request's own options are restricted to the plugin's keys.
        merged = self.info.ctx.get_mm_config().merge_mm_processor_kwargs(request_kwargs)  # type: ignore[attr-defined]
        request = PruningRequest.from_kwargs(merged)
        self._check_request(request)
        kwargs: dict[str, Any] = {}
        plans: dict[str, tuple[ImagePlan, ...]] = {}
        for modality in self.pruned_modalities:
            items = inputs.mm_data_items.get(modality)
            modality_plans = plan_images(
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
        explained = request is not None and request.explain and bool(request_ids) and bool(plans)
        if explained:
            plans = {modality: tuple(replace(plan, explain_id=secrets.randbits(62) | 1) for plan in modality_plans)
                     for modality, modality_plans in plans.items()}
        if plans:
            kwargs[PLAN_KEY] = plans
        result = super().apply(replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)  # type: ignore[misc]
        self._record_metrics(inputs, request, result, request_ids)
        if explained:
            self._record_explanation(request_ids, plans)
        return result

    def _record_explanation(self, request_ids: tuple[str, ...], plans: Mapping[str, Sequence[ImagePlan]]) -> None:
        """The request part of the explanation (see :mod:`textscythe_vllm.explain`). Never fails the request."""
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

    def _check_request(self, request: PruningRequest | None) -> None:
        """Refuse a request the model cannot serve by raising ``PruningRequestError``; by default accept all."""

    def _record_metrics(self, inputs: Any, request: PruningRequest | None, result: Any,
                        request_ids: tuple[str, ...]) -> None:
        """Count the request (API server only: profiling never gets here). Never fails the request."""
        try:
            before, after = [], []
            for modality in self.pruned_modalities:
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

    # -- hooks called by _vllm.ProcessorHooks (vLLM's private processor steps) -----------------------------------
    def hf_kwargs(self, kwargs: Mapping[str, object]) -> dict[str, object]:
        """What vLLM's own processing steps and the HF processor see: the kwargs without the plugin's keys."""
        return strip_private_kwargs(kwargs)

    def item_hashes(self, inputs: Any, stock: Callable[[Any], Any]) -> Any:
        """Each item's multimodal hash: stock vLLM's, mixed with the item's plan when it is pruned."""
        plans = inputs.hf_processor_mm_kwargs.get(PLAN_KEY)
        hashes = stock(replace(inputs, hf_processor_mm_kwargs=strip_private_kwargs(inputs.hf_processor_mm_kwargs)))
        if plans:
            algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm  # type: ignore[attr-defined]
            for modality, modality_plans in plans.items():
                hashes[modality] = [
                    _vllm.MultiModalHasher.hash_kwargs(algorithm, item=item_hash, textscythe=plan.cache_key())
                    for item_hash, plan in zip(hashes[modality], modality_plans, strict=True)
                ]
        return hashes

    def add_plan_fields(self, processed_data: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Any:
        """The processed items plus each item's encoded plan (the per-item plan field of its modality)."""
        for modality in self.pruned_modalities:
            num_items = self._num_processed_items(processed_data, modality)
            plans = _plans_for_items(hf_processor_mm_kwargs, num_items, modality)
            if num_items:
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

    def pruned_prompt_updates(self, updates: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Any:
        """Each pruned item's placeholder run cut to ``min(budget, N)`` embedding positions."""
        if PLAN_KEY not in hf_processor_mm_kwargs:
            return updates
        updates = dict(updates)
        for modality in self.pruned_modalities:
            if modality not in updates:
                continue
            plans = _plans_for_items(hf_processor_mm_kwargs, len(updates[modality]), modality)
            updates[modality] = [
                [prune_prompt_update(update, plan.budget) for update in per_item]
                for plan, per_item in zip(plans, updates[modality], strict=True)
            ]
        return updates

    def kwargs_for_missing_items(self, kwargs: Mapping[str, object], mm_is_cached: Mapping[str, list[bool]]) -> Any:
        """On a processor-cache hit only the missing items are processed: hand on just their plans, so plans and
        processed items line up by position."""
        kwargs = dict(kwargs)
        plans = kwargs.get(PLAN_KEY)
        if plans is not None:
            kwargs[PLAN_KEY] = {
                modality: tuple(
                    plan for plan, hit in zip(
                        modality_plans, mm_is_cached.get(modality, [False] * len(modality_plans)), strict=True
                    ) if not hit
                )
                for modality, modality_plans in plans.items()  # type: ignore[attr-defined]
            }
        return kwargs


def _plans_for_items(kwargs: Mapping[str, object], num_items: int, modality: str = "image") -> Sequence[ImagePlan]:
    """The plans of ``modality``'s items: :data:`PLAN_KEY` holds ``{modality: plans}``; none means unpruned."""
    all_plans = kwargs.get(PLAN_KEY)
    plans = None if all_plans is None else all_plans.get(modality)  # type: ignore[attr-defined]
    if plans is None:
        return [UNPRUNED] * num_items
    if len(plans) != num_items:  # type: ignore[arg-type]
        raise RuntimeError(f"textscythe: {num_items} items to process but {len(plans)} plans")  # type: ignore[arg-type]
    return plans  # type: ignore[return-value]
