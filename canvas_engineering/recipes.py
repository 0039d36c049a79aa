"""The specification's four design recipes as ready-made canvases.

Each function returns ``(topology, layout)`` for a ``T x grid x grid`` canvas. The recipes'
arrows are read as information flow: "A -> B: fn" means B's positions read A's, that is
``Connection(src=B, dst=A, fn=fn)``. Every region also attends to itself, and the
temporal variants add previous-frame edges.
"""

from __future__ import annotations

from collections.abc import Callable

from canvas_engineering.canvas import CanvasLayout, RegionSpec
from canvas_engineering.connectivity import CanvasTopology, Connection

Recipe = tuple[CanvasTopology, CanvasLayout]


def _check_grid(grid: int) -> None:
    if grid < 4 or grid % 2:
        raise ValueError(f"recipes need an even grid of at least 4, got {grid}")


def field_and_two_strips(
    T: int, grid: int, d_model: int, field: tuple[str, str], left: tuple[str, str], right: tuple[str, str]
) -> CanvasLayout:
    """A layout with a large field (all rows but the last two) and the last two rows split
    into a left and a right strip; each region is given as ``(name, default_attn)``."""
    _check_grid(grid)
    half = grid // 2
    boxes = [(0, grid - 2, 0, grid), (grid - 2, grid, 0, half), (grid - 2, grid, half, grid)]
    return CanvasLayout(
        T=T,
        spatial_shape=(grid, grid),
        d_model=d_model,
        regions={
            name: RegionSpec((0, T) + box, default_attn=fn) for (name, fn), box in zip((field, left, right), boxes)
        },
    )


def robot_manipulation(T: int = 8, grid: int = 16, d_model: int = 256) -> Recipe:
    """Visual field (cross), proprioception (linear), actions (cross); actions read the
    visual field, and the proprioceptive state is injected into the actions by pooling."""
    layout = field_and_two_strips(
        T, grid, d_model, ("visual", "cross_attention"), ("proprio", "linear_attention"), ("action", "cross_attention")
    )
    topology = CanvasTopology(
        [
            Connection("visual", "visual"),
            Connection("proprio", "proprio"),
            Connection("action", "action"),
            Connection("action", "visual"),
            Connection("action", "proprio", fn="pooling"),
        ]
    )
    return topology, layout


def embodied_agent(T: int = 8, grid: int = 16, d_model: int = 256) -> Recipe:
    """Perception (cross), memory (mamba), policy (cross); perception retrieves memory
    through a gate, memory compresses perception through perceiver latents, and the
    policy reads both."""
    layout = field_and_two_strips(
        T, grid, d_model, ("perception", "cross_attention"), ("memory", "mamba"), ("policy", "cross_attention")
    )
    topology = CanvasTopology(
        [
            Connection("perception", "perception"),
            Connection("memory", "memory"),
            Connection("policy", "policy"),
            Connection("perception", "memory", fn="gated"),
            Connection("memory", "perception", fn="perceiver"),
            Connection("policy", "perception"),
            Connection("policy", "memory"),
        ]
    )
    return topology, layout


def multi_agent(T: int = 8, grid: int = 16, d_model: int = 256) -> Recipe:
    """Two agents' thoughts (rwkv, causal in time within each agent) and a shared task
    region; agent a's latents are relayed to agent b by copy, and the task reads both."""
    _check_grid(grid)
    half = grid // 2
    layout = CanvasLayout(
        T=T,
        spatial_shape=(grid, grid),
        d_model=d_model,
        regions={
            "agent_a.thought": RegionSpec((0, T, 0, half, 0, half), default_attn="rwkv"),
            "agent_b.thought": RegionSpec((0, T, 0, half, half, grid), default_attn="rwkv"),
            "shared_task": RegionSpec((0, T, half, grid, 0, grid), default_attn="cross_attention"),
        },
    )
    topology = CanvasTopology(
        [
            Connection("agent_a.thought", "agent_a.thought"),
            Connection("agent_b.thought", "agent_b.thought"),
            Connection("shared_task", "shared_task"),
            Connection("agent_b.thought", "agent_a.thought", fn="copy"),
            Connection("shared_task", "agent_a.thought", fn="cross_attention"),
            Connection("shared_task", "agent_b.thought", fn="cross_attention"),
        ]
    )
    return topology, layout


def vision(T: int = 8, grid: int = 16, d_model: int = 256) -> Recipe:
    """Patches (local attention) and a class token per frame (cross); the class token
    pools the patches, and the patches read the class token back."""
    _check_grid(grid)
    layout = CanvasLayout(
        T=T,
        spatial_shape=(grid, grid),
        d_model=d_model,
        regions={
            "patches": RegionSpec((0, T, 0, grid - 1, 0, grid), default_attn="local_attention"),
            "cls": RegionSpec((0, T, grid - 1, grid, 0, 1), default_attn="cross_attention"),
        },
    )
    topology = CanvasTopology(
        [
            Connection("patches", "patches"),
            Connection("cls", "cls"),
            Connection("patches", "cls", fn="cross_attention"),
            Connection("cls", "patches", fn="pooling"),
        ]
    )
    return topology, layout


RECIPES: dict[str, Callable[..., Recipe]] = {
    "robot_manipulation": robot_manipulation,
    "embodied_agent": embodied_agent,
    "multi_agent": multi_agent,
    "vision": vision,
}
"""Recipe name to its builder ``(T, grid, d_model) -> (topology, layout)``."""
