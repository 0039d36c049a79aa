"""Constants the launchers share with the eager ops of ``canvas_engineering.ops``. This module
imports nothing, so the eager ops read them where Triton is not installed."""

KEY_CLAMP = 10.0
"""WKV: keys are clamped to ``[-KEY_CLAMP, KEY_CLAMP]`` before their exponential."""
