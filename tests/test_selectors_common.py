"""Contract every registered selector must honour (parametrised over ``available_selectors()``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from textscythe_vllm.selectors import available_selectors, get_selector

SELECTORS = available_selectors()
#: selectors whose kept rows are merged, not copied (``embeddings != visual[indices]`` in general).
MERGING = {"visionzip", "visiondrop"}
DIM = 16


def make_inputs(num_tokens: int = 36, num_text: int = 5, seed: int = 0, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    visual = torch.randn(num_tokens, DIM, generator=generator).to(dtype)
    text = torch.randn(num_text, DIM, generator=generator).to(dtype)
    attention = torch.rand(num_tokens, generator=generator).to(dtype)
    return visual, text, attention


def check_result(name: str, out, visual: torch.Tensor, expected: int) -> None:
    """The invariants of every ``SelectionResult``."""
    indices, embeddings = out.indices, out.embeddings
    assert indices.dtype == torch.long
    assert indices.device == visual.device
    assert indices.shape == (expected,)
    assert torch.unique(indices).numel() == expected, f"{name}: duplicate indices {indices.tolist()}"
    assert bool((indices[1:] > indices[:-1]).all()), f"{name}: indices not sorted ascending"
    assert int(indices.min()) >= 0 and int(indices.max()) < visual.shape[0]
    assert embeddings.shape == (expected, visual.shape[1])
    assert embeddings.dtype == visual.dtype
    assert embeddings.device == visual.device
    if name in MERGING:
        assert bool(torch.isfinite(embeddings).all())
    else:
        assert torch.equal(embeddings, visual[indices])


def test_registry_lists_all_baselines():
    expected = {"textscythe", "random", "uniform", "cls_attention", "divprune", "dart", "visionzip", "icctp",
                "visiondrop"}
    assert expected <= set(SELECTORS)
    for name in SELECTORS:
        selector = get_selector(name)
        assert type(selector).name == name
        assert isinstance(type(selector).uses_text, bool)
        assert isinstance(type(selector).uses_attention, bool)


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("num_tokens", [36, 50])
@pytest.mark.parametrize("offset", [None, 0, 1, 9])
def test_shapes_exact_budget_unique_sorted(name, num_tokens, offset):
    """Budgets 1, 2, 7 (``offset=None``) and ``N - 1 + offset`` (just below, at and above ``N``)."""
    visual, text, attention = make_inputs(num_tokens)
    for budget in [1, 2, 7] if offset is None else [num_tokens - 1 + offset]:
        out = get_selector(name).select(visual, text, attention, budget)
        check_result(name, out, visual, min(budget, num_tokens))


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("budget", [36, 37, 1000])
def test_budget_at_least_n_returns_everything(name, budget):
    visual, text, attention = make_inputs(36)
    out = get_selector(name).select(visual, text, attention, budget)
    assert torch.equal(out.indices, torch.arange(36))
    assert out.embeddings is visual


@pytest.mark.parametrize("name", SELECTORS)
def test_deterministic(name):
    visual, text, attention = make_inputs(50, seed=3)
    first = get_selector(name).select(visual, text, attention, 9)
    second = get_selector(name).select(visual.clone(), text.clone(), attention.clone(), 9)
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(first.embeddings, second.embeddings)


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_preserved(name, dtype):
    visual, text, attention = make_inputs(36, dtype=dtype)
    out = get_selector(name).select(visual, text, attention, 6)
    check_result(name, out, visual, 6)


@pytest.mark.parametrize("name", SELECTORS)
def test_no_tensor_created_on_the_default_device(name):
    """Inputs on the CPU while the default device is 'meta': a factory call without ``device=`` would put a
    tensor on 'meta' and fail when mixed with the inputs, so this catches device-unaware code paths."""
    visual, text, attention = make_inputs(36)
    for args in [(text, attention), (text[:0], None), (None, attention)]:
        with torch.device("meta"):
            out = get_selector(name).select(visual, *args, budget=5)
        check_result(name, out, visual, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SELECTORS)
def test_cuda_device_preserved(name):
    visual, text, attention = (x.cuda() for x in make_inputs(50))
    for args in [(text, attention), (text[:0], None)]:
        out = get_selector(name).select(visual, *args, budget=7)
        check_result(name, out, visual, 7)
        assert out.indices.is_cuda and out.embeddings.is_cuda


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize(
    "case", ["empty_text", "no_text", "one_text", "constant_attention", "no_attention", "nothing", "zero_visual"]
)
def test_edge_inputs(name, case):
    visual, text, attention = make_inputs(36)
    if case == "empty_text":
        text = text[:0]
    elif case == "no_text":
        text = None
    elif case == "one_text":
        text = text[:1]
    elif case == "constant_attention":
        attention = torch.full_like(attention, 0.25)
    elif case == "no_attention":
        attention = None
    elif case == "nothing":
        text, attention = None, None
    elif case == "zero_visual":
        visual = torch.zeros_like(visual)
    for budget in (1, 5, 35):
        out = get_selector(name).select(visual, text, attention, budget)
        check_result(name, out, visual, budget)


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("distinct", [1, 3])
def test_duplicate_visual_rows(name, distinct):
    """Many identical rows (only ``distinct`` different ones): still ``k`` unique indices."""
    visual, text, attention = make_inputs(40)
    visual = visual[torch.arange(40) % distinct]
    for budget in (2, 10, 39):
        out = get_selector(name).select(visual, text, attention, budget)
        check_result(name, out, visual, budget)


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("where", ["visual", "text", "attention"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_rejected(name, where, bad):
    inputs = dict(zip(["visual", "text", "attention"], make_inputs(36), strict=True))
    inputs[where] = inputs[where].clone()
    inputs[where].view(-1)[3] = bad
    with pytest.raises(ValueError):
        get_selector(name).select(inputs["visual"], inputs["text"], inputs["attention"], 5)


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize(
    "budget",
    [
        0, -1, 1.5, 2.0, True, False, "3", None, [3], np.float64(2.0), np.bool_(True),
        pytest.param(torch.tensor(2.0), id="float_tensor"),
        pytest.param(torch.tensor(True), id="bool_tensor"),
    ],
)
def test_invalid_budget_rejected(name, budget):
    visual, text, attention = make_inputs(36)
    with pytest.raises(ValueError):
        get_selector(name).select(visual, text, attention, budget)


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("budget", [np.int64(4), np.int32(4), torch.tensor(4), torch.tensor(4, dtype=torch.int32)])
def test_integer_like_budget_accepted(name, budget):
    visual, text, attention = make_inputs(36)
    out = get_selector(name).select(visual, text, attention, budget)
    reference = get_selector(name).select(visual, text, attention, 4)
    check_result(name, out, visual, 4)
    assert torch.equal(out.indices, reference.indices)


@pytest.mark.parametrize("bad_name", ["nope", "", "TextScythe", None, 3])
def test_unknown_selector_rejected(bad_name):
    with pytest.raises(ValueError):
        get_selector(bad_name)


@pytest.mark.parametrize("name", SELECTORS)
def test_unknown_hyper_parameter_rejected(name):
    with pytest.raises(ValueError):
        get_selector(name, not_a_hyper_parameter=1)


BAD_HYPER_PARAMETERS = [
    ("textscythe", {"alpha": -0.1}),
    ("textscythe", {"alpha": math.nan}),
    ("random", {"seed": -1}),
    ("random", {"seed": 1.5}),
    ("random", {"seed": True}),
    ("random", {"seed": "0"}),
    ("dart", {"num_pivots": 0}),
    ("dart", {"num_pivots": 2.5}),
    ("dart", {"num_pivots": None}),
    ("visionzip", {"dominant_ratio": 1.5}),
    ("visionzip", {"dominant_ratio": -0.1}),
    ("visionzip", {"dominant_ratio": math.nan}),
    ("visionzip", {"dominant_ratio": "0.5"}),
    ("visiondrop", {"dominant_ratio": 2}),
    ("visiondrop", {"dominant_ratio": True}),
    ("icctp", {"rho_g": 1.01}),
    ("icctp", {"rho_g": -0.5}),
    ("icctp", {"alpha": math.inf}),
    ("icctp", {"alpha": None}),
    ("icctp", {"alpha": np.True_}),
    ("random", {"seed": np.array([1])}),
    ("random", {"seed": torch.tensor(1.0)}),
    ("random", {"seed": 2**64}),
]


@pytest.mark.parametrize(("name", "params"), BAD_HYPER_PARAMETERS)
def test_bad_hyper_parameter_rejected(name, params):
    with pytest.raises(ValueError):
        get_selector(name, **params)


GOOD_HYPER_PARAMETERS = [
    ("random", {"seed": np.int64(7)}),
    ("random", {"seed": 2**63}),
    ("dart", {"num_pivots": 1}),
    ("dart", {"num_pivots": 100}),
    ("visionzip", {"dominant_ratio": 0}),
    ("visionzip", {"dominant_ratio": 1}),
    ("visiondrop", {"dominant_ratio": 0.5}),
    ("icctp", {"rho_g": 0.0, "alpha": 1.0}),
    ("icctp", {"rho_g": 1.0, "alpha": 0.0}),
]


def test_hyper_parameters_normalised_to_python_scalars():
    assert type(get_selector("random", seed=np.int64(3)).seed) is int
    assert type(get_selector("dart", num_pivots=torch.tensor(3)).num_pivots) is int
    assert type(get_selector("icctp", rho_g=np.float32(0.5)).rho_g) is float
    assert type(get_selector("visionzip", dominant_ratio=1).dominant_ratio) is float


@pytest.mark.parametrize(("name", "params"), GOOD_HYPER_PARAMETERS)
def test_boundary_hyper_parameters_work(name, params):
    visual, text, attention = make_inputs(36)
    for budget in (1, 2, 9, 35):
        out = get_selector(name, **params).select(visual, text, attention, budget)
        check_result(name, out, visual, budget)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(SELECTORS),
    num_tokens=st.integers(2, 70),
    num_text=st.integers(0, 6),
    budget=st.integers(1, 80),
    seed=st.integers(0, 2**16),
    with_attention=st.booleans(),
    distinct=st.integers(1, 70),
)
def test_property_invariants(name, num_tokens, num_text, budget, seed, with_attention, distinct):
    visual, text, attention = make_inputs(num_tokens, num_text, seed)
    visual = visual[torch.arange(num_tokens) % distinct]
    out = get_selector(name).select(visual, text, attention if with_attention else None, budget)
    check_result(name, out, visual, min(budget, num_tokens))


@pytest.mark.parametrize("name", available_selectors())
def test_declared_inputs_are_the_only_inputs_read(name):
    """The model skips the instruction embedding and the attention probe for selectors that declare they do not
    read them (``uses_text`` / ``uses_attention``): their picks must not depend on them."""
    selector = get_selector(name)
    generator = torch.Generator().manual_seed(7)
    visual = torch.randn(144, 32, generator=generator)
    text = torch.randn(5, 32, generator=generator)
    attention = torch.rand(144, generator=generator)
    full = selector.select(visual, text, attention, 20)
    if not selector.uses_text:
        assert torch.equal(selector.select(visual, text[:0], attention, 20).indices, full.indices), name
    if not selector.uses_attention:
        assert torch.equal(selector.select(visual, text, None, 20).indices, full.indices), name
    if selector.uses_text:  # and the flag is not decorative: text naming some of the tokens changes the picks
        other = selector.select(visual, visual[[130, 131, 140]], attention, 20)
        assert not torch.equal(other.indices, full.indices), name
