"""canvas-engineering, Triton edition: per-edge attention types over a canvas of regions.

Declare regions (:class:`RegionSpec`, :class:`CanvasLayout`), the edges between them and
the attention type of each (:class:`Connection`, :class:`CanvasTopology`), and run them
with :class:`AttentionDispatcher`.
"""

from canvas_engineering.attention import (
    ATTENTION_REGISTRY,
    BUILTIN_ATTENTION,
    CogVideoXAttention,
    CopyAttention,
    CosineAttention,
    CrossAttention,
    GatedAttention,
    HyenaAttention,
    LinearAttention,
    LocalAttention,
    MambaAttention,
    MixtureAttention,
    NoneAttention,
    PerceiverAttention,
    PoolingAttention,
    RandomFixedAttention,
    RWKVAttention,
    SigmoidAttention,
    SparseAttention,
    create_attention,
    register_attention,
)
from canvas_engineering.canvas import ATTENTION_TYPES, CanvasLayout, RegionSpec
from canvas_engineering.connectivity import CanvasTopology, Connection, TemporalFill
from canvas_engineering.dispatch import AttentionDispatcher

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_REGISTRY",
    "ATTENTION_TYPES",
    "BUILTIN_ATTENTION",
    "AttentionDispatcher",
    "CanvasLayout",
    "CanvasTopology",
    "CogVideoXAttention",
    "Connection",
    "CopyAttention",
    "CosineAttention",
    "CrossAttention",
    "GatedAttention",
    "HyenaAttention",
    "LinearAttention",
    "LocalAttention",
    "MambaAttention",
    "MixtureAttention",
    "NoneAttention",
    "PerceiverAttention",
    "PoolingAttention",
    "RandomFixedAttention",
    "RegionSpec",
    "RWKVAttention",
    "SigmoidAttention",
    "SparseAttention",
    "TemporalFill",
    "create_attention",
    "register_attention",
]
