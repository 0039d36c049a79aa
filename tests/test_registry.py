"""The registry: the 18 names, what each type says of itself (and the README's table of
it), creation, options, registration and constructor checks."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from peer import PEER_ATTENTION_NAMES

import canvas_engineering.attention as attention
import canvas_engineering.canvas
from canvas_engineering import (
    ATTENTION_REGISTRY,
    ATTENTION_TYPES,
    BUILTIN_ATTENTION,
    create_attention,
    register_attention,
)

README = Path(__file__).resolve().parent.parent / "README.md"
TYPES_HEADING = "## Attention types"

SPECIFIED_NAMES = set(PEER_ATTENTION_NAMES) - {"self_attention"}


@pytest.fixture
def clean_registry():
    saved = dict(ATTENTION_REGISTRY)
    yield
    ATTENTION_REGISTRY.clear()
    ATTENTION_REGISTRY.update(saved)


def test_the_eighteen_names():
    """The specification's 17 types and the alias are registered; ATTENTION_TYPES (also
    importable from canvas_engineering.canvas, as in 0.5.0) holds each built-in class once,
    the alias left out."""
    assert SPECIFIED_NAMES | {"self_attention"} <= set(BUILTIN_ATTENTION)
    assert BUILTIN_ATTENTION["self_attention"] is BUILTIN_ATTENTION["cross_attention"]
    assert SPECIFIED_NAMES <= set(ATTENTION_TYPES) and "self_attention" not in ATTENTION_TYPES
    classes = [BUILTIN_ATTENTION[name] for name in ATTENTION_TYPES]
    assert len(set(classes)) == len(classes) and set(classes) == set(BUILTIN_ATTENTION.values())
    assert canvas_engineering.canvas.ATTENTION_TYPES is ATTENTION_TYPES


def test_each_type_says_what_it_computes():
    """Every built-in class sets its own complexity and description (not inherited from the
    class it extends), and its ATTENTION_TYPES entry holds both."""
    for name, text in ATTENTION_TYPES.items():
        cls = BUILTIN_ATTENTION[name]
        for attribute in ("complexity", "description"):
            value = vars(cls).get(attribute)
            assert isinstance(value, str) and value.strip(), f"{cls.__name__} sets no {attribute} of its own"
            assert value in text
        assert cls.complexity.startswith("O(")


def registry_table() -> list:
    """The README's type table as the registry gives it: one row per ATTENTION_TYPES entry
    with its aliases, class, complexity, options (with defaults) and description."""
    rows = ["| name | class | complexity | options | what it computes |", "|---|---|---|---|---|"]
    for name in ATTENTION_TYPES:
        cls = BUILTIN_ATTENTION[name]
        aliases = "".join(
            f" (alias `{alias}`)" for alias, other in BUILTIN_ATTENTION.items() if other is cls and alias != name
        )
        options = ", ".join(
            f"`{attention.format_options({option: default})}`"
            for option, default in attention.type_options(cls).items()
        )
        description = cls.description.replace("|", "\\|")
        rows.append(f"| `{name}`{aliases} | `{cls.__name__}` | {cls.complexity} | {options or '–'} | {description} |")
    return rows


def test_readme_type_table_is_the_registry():
    """The README's table of types is exactly what the registry and the classes say."""
    lines = README.read_text(encoding="utf-8").splitlines()
    assert TYPES_HEADING in lines, f"README.md has no {TYPES_HEADING!r} section"
    after = lines[lines.index(TYPES_HEADING) + 1 :]
    start = next(i for i, line in enumerate(after) if line.startswith("|"))
    end = next((i for i in range(start, len(after)) if not after[i].startswith("|")), len(after))
    expected = registry_table()
    assert after[start:end] == expected, (
        "README.md's type table differs from the registry; it should read:\n" + "\n".join(expected)
    )


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


@pytest.mark.parametrize(
    "name, options, message",
    [
        (
            "hyena",
            {"max_lenn": 8},
            r"create_attention: 'hyena' \(HyenaAttention\) takes no option 'max_lenn'; "
            r"its options: order=2, max_len=4096 ",
        ),
        (
            "local_attention",
            {"top_k": 4, "window": 3},
            r"takes no option 'top_k', 'window'; its options: window_size=8 ",
        ),
        ("rwkv", {"window_size": 3}, r"'rwkv' \(RWKVAttention\) takes no option 'window_size'; its options: none "),
    ],
)
def test_an_option_the_type_does_not_take_is_refused_with_those_it_takes(name, options, message):
    with pytest.raises(TypeError, match=message):
        create_attention(name, d_model=8, n_heads=2, **options)


class Flexible(nn.Module):
    """A custom type whose constructor takes any keyword."""

    def __init__(self, d_model, n_heads=4, dropout=0.0, **options):
        super().__init__()
        self.options = options


def test_a_type_taking_any_keyword_gets_every_option(clean_registry):
    register_attention("flexible", Flexible)
    assert create_attention("flexible", d_model=4, width=3, depth=None).options == {"width": 3, "depth": None}
    assert attention.type_options(Flexible) == {}


def test_type_options_are_the_constructor_keywords_with_their_defaults():
    """Checked against the signatures read another way: the defaults of ``__init__``'s
    positional-or-keyword arguments after (self, d_model, n_heads, dropout)."""
    for cls in set(BUILTIN_ATTENTION.values()):
        code = cls.__init__.__code__
        names = code.co_varnames[4 : code.co_argcount]
        assert attention.type_options(cls) == dict(
            zip(names, cls.__init__.__defaults__[-len(names) :] if names else ())
        ), cls
    assert attention.type_options(BUILTIN_ATTENTION["hyena"]) == {"order": 2, "max_len": 4096}
    assert attention.format_options({"a": 1, "b": "elu", "c": inspect.Parameter.empty}) == "a=1, b='elu', c"


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
