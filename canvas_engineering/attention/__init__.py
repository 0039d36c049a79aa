"""The attention function types and their registry.

Every type is an ``nn.Module`` built as ``cls(d_model, n_heads, dropout, **options)`` whose
``forward(queries (B, N, d_model), keys (B, M, d_model), values (B, M, d_model))`` returns
``(B, N, d_model)``. A built-in type's class says what it computes and its complexity
(``description``, ``complexity``); :data:`ATTENTION_TYPES`, ``AttentionDispatcher.explain()``
and the README's type table are derived from those and from the constructor's options.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from canvas_engineering.attention.backbone import CogVideoXAttention
from canvas_engineering.attention.compression import CopyAttention, PerceiverAttention, PoolingAttention
from canvas_engineering.attention.dot_product import (
    CosineAttention,
    CrossAttention,
    LinearAttention,
    SigmoidAttention,
)
from canvas_engineering.attention.gating import GatedAttention
from canvas_engineering.attention.meta import MixtureAttention, NoneAttention, RandomFixedAttention
from canvas_engineering.attention.recurrence import HyenaAttention, MambaAttention, RWKVAttention
from canvas_engineering.attention.sparse import LocalAttention, SparseAttention
from canvas_engineering.attention.validation import check_dropout

BUILTIN_ATTENTION: dict[str, type[nn.Module]] = {
    "cross_attention": CrossAttention,
    "self_attention": CrossAttention,
    "linear_attention": LinearAttention,
    "cosine_attention": CosineAttention,
    "sigmoid_attention": SigmoidAttention,
    "gated": GatedAttention,
    "perceiver": PerceiverAttention,
    "pooling": PoolingAttention,
    "copy": CopyAttention,
    "sparse_attention": SparseAttention,
    "local_attention": LocalAttention,
    "random_fixed": RandomFixedAttention,
    "mixture": MixtureAttention,
    "mamba": MambaAttention,
    "rwkv": RWKVAttention,
    "hyena": HyenaAttention,
    "cogvideox": CogVideoXAttention,
    "none": NoneAttention,
}
"""The 18 built-in names (17 types and the alias ``self_attention``)."""

ATTENTION_REGISTRY: dict[str, type[nn.Module]] = dict(BUILTIN_ATTENTION)
"""Every registered name, built-in or added with :func:`register_attention`."""


def _declared_types() -> dict[str, str]:
    """Each built-in class under the first name it is registered with (later names are
    aliases): ``"<description>. <complexity>."``."""
    first_names: dict[type[nn.Module], str] = {}
    for name, cls in BUILTIN_ATTENTION.items():
        first_names.setdefault(cls, name)
    return {name: f"{cls.description}. {cls.complexity}." for cls, name in first_names.items()}


ATTENTION_TYPES: dict[str, str] = _declared_types()
"""Every built-in type (aliases left out) and what it computes, with its complexity."""

SHARED_ARGUMENTS = ("d_model", "n_heads", "dropout")
"""The constructor arguments of every type, set for all types at once by the caller."""


def type_options(cls: type[nn.Module]) -> dict[str, Any]:
    """The keyword options ``cls`` takes besides :data:`SHARED_ARGUMENTS`, in signature
    order, each with its default (``inspect.Parameter.empty`` where there is none)."""
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name: parameter.default
        for name, parameter in inspect.signature(cls).parameters.items()
        if name not in SHARED_ARGUMENTS and parameter.kind in keyword
    }


def format_options(options: Mapping[str, Any]) -> str:
    """``{"order": 2, "max_len": 4096}`` as ``"order=2, max_len=4096"`` (a required
    option without a default as its bare name)."""
    return ", ".join(
        name if value is inspect.Parameter.empty else f"{name}={value!r}" for name, value in options.items()
    )


def check_options(owner: str, fn_name: str, options: Mapping[str, Any]) -> None:
    """Raise TypeError for an entry of ``options`` that the type registered as ``fn_name``
    does not take (a name outside its signature, or one of :data:`SHARED_ARGUMENTS`),
    listing the options it takes. A class with ``**kwargs`` takes any other name."""
    cls = ATTENTION_REGISTRY[fn_name]
    known = type_options(cls)
    any_name = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())
    wrong = [name for name in options if name in SHARED_ARGUMENTS or not (name in known or any_name)]
    if wrong:
        raise TypeError(
            f"{owner}: {fn_name!r} ({cls.__name__}) takes no option {', '.join(map(repr, wrong))}; "
            f"its options: {format_options(known) or 'none'} (d_model, n_heads and dropout are set for "
            f"every type at once)"
        )


def unknown_attention_message(name: object) -> str:
    """The error text for a name that is not registered, listing the known names."""
    return f"unknown attention type {name!r}; registered types: {sorted(ATTENTION_REGISTRY)}"


def create_attention(fn_name: str, d_model: int, n_heads: int = 4, dropout: float = 0.0, **kwargs) -> nn.Module:
    """Build the registered attention module ``fn_name``.

    Args:
        fn_name: a name in :data:`ATTENTION_REGISTRY`.
        d_model: model width.
        n_heads: number of heads.
        dropout: dropout on attention weights.
        **kwargs: type-specific options (``top_k``, ``window_size``, ``n_latents``, ...).

    Raises:
        ValueError: for an unknown name (listing the known ones), a dropout outside
            ``[0, 1]`` or a bad option value.
        TypeError: when ``fn_name`` is not a string, or for an option the type does not take
            (the message lists the ones it takes).
    """
    if not isinstance(fn_name, str):
        raise TypeError(f"create_attention: fn_name must be a string, got {type(fn_name).__name__} {fn_name!r}")
    if fn_name not in ATTENTION_REGISTRY:
        raise ValueError(unknown_attention_message(fn_name))
    check_options("create_attention", fn_name, kwargs)
    return ATTENTION_REGISTRY[fn_name](d_model, n_heads, check_dropout(fn_name, dropout), **kwargs)


def register_attention(name: str, cls: type[nn.Module], *, replace: bool = False) -> None:
    """Register a custom attention type under ``name``.

    Args:
        name: a non-empty string without ``.``.
        cls: an ``nn.Module`` subclass built as ``cls(d_model, n_heads, dropout, **options)``
            with ``forward(queries, keys, values)``; its class attribute ``complexity``,
            where it has one, is what ``AttentionDispatcher.explain()`` shows.
        replace: allow replacing a name that is already registered with another class
            (built-in names included). Registering the same class again is a no-op.

    Raises:
        ValueError: for an empty name or one with ``.``, or a taken name without ``replace=True``.
        TypeError: when ``name`` is not a string or ``cls`` not an ``nn.Module`` subclass.
    """
    if not isinstance(name, str):
        raise TypeError(f"register_attention: name must be a string, got {type(name).__name__}")
    if not name or "." in name:
        raise ValueError(
            f"register_attention: name must be a non-empty string without '.', got {name!r} "
            f"(it becomes a submodule key of the dispatcher)"
        )
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_attention: cls must be an nn.Module subclass, got {cls!r}")
    registered = ATTENTION_REGISTRY.get(name)
    if registered is not None and registered is not cls and not replace:
        kind = "built-in" if name in BUILTIN_ATTENTION else "registered"
        raise ValueError(
            f"register_attention: {name!r} is already a {kind} type ({registered.__name__}); "
            f"pass replace=True to replace it"
        )
    ATTENTION_REGISTRY[name] = cls


__all__ = [
    "ATTENTION_REGISTRY",
    "ATTENTION_TYPES",
    "BUILTIN_ATTENTION",
    "create_attention",
    "register_attention",
    "CrossAttention",
    "LinearAttention",
    "CosineAttention",
    "SigmoidAttention",
    "GatedAttention",
    "PerceiverAttention",
    "PoolingAttention",
    "CopyAttention",
    "SparseAttention",
    "LocalAttention",
    "RandomFixedAttention",
    "MixtureAttention",
    "MambaAttention",
    "RWKVAttention",
    "HyenaAttention",
    "CogVideoXAttention",
    "NoneAttention",
]
