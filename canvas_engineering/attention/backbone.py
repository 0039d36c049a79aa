"""Backbone-native types."""

from __future__ import annotations

from canvas_engineering.attention.dot_product import CrossAttention


class CogVideoXAttention(CrossAttention):
    """CogVideoX-native attention. Inside :class:`AttentionDispatcher` it is standard
    cross-attention; when a CogVideoX backbone is grafted, the backbone's own 3D-RoPE
    attention supersedes it. Use it as ``default_attn`` on regions trained inside a
    CogVideoX transformer."""

    complexity = "O(NM)"
    description = "cross-attention (a CogVideoX backbone supersedes it when grafted)"
