"""The CogVideoX demo (canvas_engineering.cogvideox_demo): a tiny CogVideoX grafted with
looped blocks and robot_manipulation's topology in its attention trains, and its
processor really restricts attention."""

from __future__ import annotations

import importlib.util
import math

import pytest

from canvas_engineering import CanvasAttnProcessor, LoopedCogVideoXBlock
from canvas_engineering.cogvideox_demo import build, main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed (pip install -e '.[cogvideox]')"
)


def test_demo_trains_and_prints_the_loss(capsys):
    losses = main(["--steps", "3"])
    printed = capsys.readouterr().out
    assert [f"step {i}/3: loss {loss:.4f}" in printed for i, loss in enumerate(losses, 1)] == [True] * 3
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]


def test_demo_model_is_grafted_and_masked():
    transformer, looped_blocks, _, topology, layout = build()
    assert list(transformer.transformer_blocks) == looped_blocks
    assert all(isinstance(block, LoopedCogVideoXBlock) and block.current_loops == 2 for block in looped_blocks)
    processors = list(transformer.attn_processors.values())
    assert len(processors) == 2 and all(isinstance(p, CanvasAttnProcessor) for p in processors)
    assert layout.num_positions == 48 and (topology.to_additive_mask(layout) == 0).any(1).all()
    assert (topology.to_additive_mask(layout) != 0).any()
    trainable = {name for name, p in transformer.named_parameters() if p.requires_grad}
    assert trainable == {
        f"transformer_blocks.{i}.{name}" for i in range(2) for name in ("loop_emb", "loop_emb_enc", "loop_gate")
    }


def test_docs_cogvideox_example_runs():
    """The CogVideoX block of docs/backbones.md, executed as written: only the loop parameters get
    gradients, and the topology really masks attention."""
    import re
    from pathlib import Path

    backbones = (Path(__file__).resolve().parent.parent / "docs" / "backbones.md").read_text()
    section = backbones.split("## A CogVideoX backbone", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    namespace: dict = {}
    exec(compile(block, "docs/backbones.md", "exec"), namespace)
    assert namespace["noise_pred"].shape == (2, 3, 4, 8, 8)
    with_grad = {name for name, p in namespace["transformer"].named_parameters() if p.grad is not None}
    assert with_grad == {
        f"transformer_blocks.{i}.{name}" for i in range(2) for name in ("loop_emb", "loop_emb_enc", "loop_gate")
    }
    assert (namespace["topology"].to_additive_mask(namespace["layout"]) != 0).any()
