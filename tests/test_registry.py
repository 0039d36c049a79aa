"""The registry: the 18 names, creation, registration and constructor checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import canvas_engineering.attention as attention
from canvas_engineering import ATTENTION_REGISTRY, ATTENTION_TYPES, BUILTIN_ATTENTION, create_attention, register_attention

SPECIFIED_NAMES = {
    "cross_attention", "linear_attention", "cosine_attention", "sigmoid_attention", "gated", "perceiver",
    "pooling", "copy", "mamba", "rwkv", "hyena", "sparse_attention", "local_attention", "none",
    "random_fixed", "mixture", "cogvideox",
}


@pytest.fixture
def clean_registry():
    saved = dict(ATTENTION_REGISTRY)
    yield
    ATTENTION_REGISTRY.clear()
    ATTENTION_REGISTRY.update(saved)


def test_the_eighteen_names():
    assert set(BUILTIN_ATTENTION) == SPECIFIED_NAMES | {"self_attention"}
    assert BUILTIN_ATTENTION["self_attention"] is BUILTIN_ATTENTION["cross_attention"]
    assert set(ATTENTION_TYPES) == SPECIFIED_NAMES
    assert all(isinstance(text, str) and text for text in ATTENTION_TYPES.values())


def test_create_attention_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown attention type 'flash'.*'cross_attention'.*'rwkv'"):
        create_attention("flash", d_model=8)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("local_attention", {"window_size": 0}, "window_size must be a positive integer"),
        ("sparse_attention", {"top_k": -2}, "top_k must be a positive integer"),
        ("perceiver", {"n_latents": 0}, "n_latents must be a positive integer"),
        ("random_fixed", {"n_random": 0}, "n_random must be a positive integer"),
        ("mixture", {"n_experts": 0}, "n_experts must be a positive integer"),
        ("mixture", {"top_k_experts": 0}, "top_k_experts must be a positive integer"),
        ("mamba", {"state_size": 0}, "state_size must be a positive integer"),
        ("mamba", {"dt_rank": -1}, "dt_rank must be an integer >= 0"),
        ("hyena", {"order": 0}, "order must be a positive integer"),
        ("hyena", {"max_len": 0}, "max_len must be a positive integer"),
    ],
)
def test_non_positive_sizes_are_refused(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_attention(name, d_model=8, n_heads=2, **kwargs)


@pytest.mark.parametrize("name", ["cross_attention", "rwkv", "sparse_attention", "gated", "mixture", "perceiver"])
def test_heads_must_divide_d_model(name):
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=4"):
        create_attention(name, d_model=10, n_heads=4)


def test_forward_shape_errors_name_the_shapes():
    module = create_attention("cross_attention", d_model=8, n_heads=2)
    with pytest.raises(ValueError, match=r"expected keys of shape \(B=2, length, d_model=8\), got \(2, 3, 6\)"):
        module(torch.randn(2, 4, 8), torch.randn(2, 3, 6), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="same length"):
        module(torch.randn(2, 4, 8), torch.randn(2, 3, 8), torch.randn(2, 5, 8))


def test_hyena_refuses_sequences_longer_than_its_filters():
    module = create_attention("hyena", d_model=8, max_len=16)
    module(torch.randn(1, 16, 8), torch.randn(1, 16, 8), torch.randn(1, 16, 8))
    with pytest.raises(ValueError, match="17 queries need an FFT of length 32, longer than max_len=16"):
        module(torch.randn(1, 17, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8))


class Doubling(nn.Module):
    def __init__(self, d_model, n_heads=4, dropout=0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, queries, keys, values):
        return self.scale * queries


def test_register_and_use_a_custom_type(clean_registry):
    register_attention("doubling", Doubling)
    register_attention("doubling", Doubling)
    module = create_attention("doubling", d_model=4)
    x = torch.randn(1, 3, 4)
    assert torch.equal(module(x, x, x), 2 * x)
    assert attention.ATTENTION_REGISTRY is ATTENTION_REGISTRY


@pytest.mark.parametrize(
    "name, cls, error, message",
    [
        ("", Doubling, ValueError, "non-empty string"),
        ("a.b", Doubling, ValueError, "without '.'"),
        (3, Doubling, TypeError, "name must be a string"),
        ("x", object, TypeError, "nn.Module subclass"),
        ("x", Doubling(4), TypeError, "nn.Module subclass"),
        ("cross_attention", Doubling, ValueError, "already a built-in type .CrossAttention.; pass replace=True"),
    ],
)
def test_register_attention_validates(name, cls, error, message, clean_registry):
    with pytest.raises(error, match=message):
        register_attention(name, cls)


def test_replacing_needs_to_be_asked_for(clean_registry):
    register_attention("mine", Doubling)

    class Other(Doubling):
        pass

    with pytest.raises(ValueError, match="already a registered type"):
        register_attention("mine", Other)
    register_attention("mine", Other, replace=True)
    register_attention("cross_attention", Other, replace=True)
    assert ATTENTION_REGISTRY["mine"] is Other and ATTENTION_REGISTRY["cross_attention"] is Other
    assert BUILTIN_ATTENTION["cross_attention"] is not Other
