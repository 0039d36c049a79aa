"""canvas-engineering, Triton edition: per-edge attention types over a canvas of regions.

Declare regions (:class:`RegionSpec`, :class:`CanvasLayout`), the edges between them and
the attention type of each (:class:`Connection`, :class:`CanvasTopology`), and run them
with :class:`AttentionDispatcher`.
"""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _link_source_kernels() -> None:
    """Make ``canvas_engineering.kernels`` importable when running from a source checkout
    (``PYTHONPATH=.``): installed, it is the repository's ``kernels/`` folder; uninstalled,
    that folder is loaded under the same name."""
    if _importlib_util.find_spec(__name__ + ".kernels") is not None:
        return
    source = _Path(__file__).resolve().parent.parent / "kernels"
    if not (source / "__init__.py").is_file():
        return
    spec = _importlib_util.spec_from_file_location(
        __name__ + ".kernels", source / "__init__.py", submodule_search_locations=[str(source)]
    )
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_link_source_kernels()

from canvas_engineering.action_heads import ActionHead
from canvas_engineering.attention import (
    ATTENTION_REGISTRY,
    ATTENTION_TYPES,
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
from canvas_engineering.attn_processor import CanvasAttnProcessor
from canvas_engineering.canvas import CanvasLayout, RegionSpec
from canvas_engineering.cogvideox import LoopedCogVideoXBlock, detect_inner_dim
from canvas_engineering.connectivity import CanvasTopology, Connection, MaskSpec, TemporalFill
from canvas_engineering.dispatch import AttentionDispatcher
from canvas_engineering.graft import freeze_full, freeze_half, graft_looped_blocks
from canvas_engineering.looped_block import LoopedBlockWrapper
from canvas_engineering.spatiotemporal import PeriodEmbedding, SinusoidalPositionalEncodingND, SpatiotemporalCanvas

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_REGISTRY",
    "ActionHead",
    "ATTENTION_TYPES",
    "BUILTIN_ATTENTION",
    "AttentionDispatcher",
    "CanvasAttnProcessor",
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
    "LoopedBlockWrapper",
    "LoopedCogVideoXBlock",
    "MambaAttention",
    "MaskSpec",
    "MixtureAttention",
    "NoneAttention",
    "PerceiverAttention",
    "PeriodEmbedding",
    "PoolingAttention",
    "RandomFixedAttention",
    "RegionSpec",
    "RWKVAttention",
    "SigmoidAttention",
    "SinusoidalPositionalEncodingND",
    "SparseAttention",
    "SpatiotemporalCanvas",
    "TemporalFill",
    "create_attention",
    "detect_inner_dim",
    "freeze_full",
    "freeze_half",
    "graft_looped_blocks",
    "register_attention",
]
