"""A tour of the package: the specification's four design recipes, each built, run forward
and backward, and trained for a few steps on a toy target; then, with the ``cogvideox``
extra installed, a tiny CogVideoX grafted with looped blocks and a topology in its attention
(:mod:`canvas_engineering.cogvideox_demo`).

Run with ``python -m canvas_engineering.demo``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch

from canvas_engineering import AttentionDispatcher, cogvideox_demo
from canvas_engineering.recipes import RECIPES


def run_recipe(name: str, T: int, grid: int, d_model: int, steps: int) -> None:
    """Build one recipe, describe it, and fit the dispatcher to a fixed random target."""
    topology, layout = RECIPES[name](T=T, grid=grid, d_model=d_model)
    dispatcher = AttentionDispatcher(topology, layout, d_model=d_model, n_heads=4)
    print(f"\n== {name}: T={T}, grid={grid}x{grid}, {layout.num_positions} positions, d_model={d_model}")
    for region in layout.regions:
        spec = layout.region_spec(region)
        print(f"   region {region:<16} {layout.region_numel(region):>5} positions, default_attn={spec.default_attn}")
    print(f"   runs {dispatcher.extra_repr()}")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, layout.num_positions, d_model, generator=generator)
    target = torch.randn(2, layout.num_positions, d_model, generator=generator)
    optimizer = torch.optim.Adam(dispatcher.parameters(), lr=1e-3)
    for step in range(steps):
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(dispatcher(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        print(f"   step {step + 1}/{steps}: loss {loss.item():.4f}  ({elapsed * 1e3:.1f} ms forward+backward+step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=4, help="canvas frames")
    parser.add_argument("--grid", type=int, default=8, help="spatial grid side (even, >= 4)")
    parser.add_argument("--d-model", type=int, default=64, help="model width (divisible by 4)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per recipe")
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in RECIPES:
        run_recipe(name, args.T, args.grid, args.d_model, args.steps)
    print("\nAll four recipes ran forward and backward.")
    if importlib.util.find_spec("diffusers") is None:
        print(
            "The fifth demo, a tiny CogVideoX with looped blocks and a topology in its attention, needs the "
            "cogvideox extra: pip install -e '.[cogvideox]'"
        )
        return
    print("\n== cogvideox: a tiny CogVideoX grafted with looped blocks, robot_manipulation's topology in its attention")
    cogvideox_demo.main(["--steps", str(args.steps)])


if __name__ == "__main__":
    main()
