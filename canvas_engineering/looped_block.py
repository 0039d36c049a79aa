"""Looped execution of a transformer block (canvas-engineering 0.5.0's ``LoopedBlockWrapper``).

A looped block runs the block it wraps ``current_loops`` times. Iteration ``l`` adds the
learned vector ``loop_emb[l]`` to each stream it feeds the block and blends the block's
output into the running state with a learned gate:

    g = sigmoid(loop_gate[l])
    h = g * block(h + loop_emb[l], ...) + (1 - g) * h

The embeddings start at zero and ``current_loops`` at 1, so a freshly grafted block
computes ``g * block(h) + (1 - g) * h`` (``g = 0.5`` for a gate logit of 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from canvas_engineering.canvas import as_integer


def positive_int(value: object, what: str) -> int:
    """``value`` as a Python int >= 1, or a ValueError naming ``what`` and the value."""
    count = as_integer(value)
    if count is None or count < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return count


class LoopedBlock(nn.Module):
    """What every looped block shares: the wrapped block ``original``, the loop counter,
    the per-iteration gates and the iteration itself (:meth:`run_loops`).

    Subclasses register their embedding tables (``(max_loops, width)`` parameters) and
    ``loop_gate`` (``(max_loops, 1)``) and name them in :attr:`loop_parameter_names`.
    """

    loop_parameter_names: tuple[str, ...] = ()

    def __init__(self, original: nn.Module, block_idx: int, max_loops: int) -> None:
        super().__init__()
        if not isinstance(original, nn.Module):
            raise TypeError(
                f"{type(self).__name__}: the wrapped block must be an nn.Module, got {type(original).__name__}"
            )
        self.original = original
        self.block_idx = block_idx
        self.max_loops = positive_int(max_loops, f"{type(self).__name__}: max_loops")
        self.current_loops = 1

    def set_loops(self, n: int) -> None:
        """Run ``min(n, max_loops)`` iterations from now on (``n = 0`` skips the block)."""
        count = as_integer(n)
        if count is None or count < 0:
            raise ValueError(f"{type(self).__name__}.set_loops: n must be an integer >= 0, got {n!r}")
        self.current_loops = min(count, self.max_loops)

    def trainable_params(self) -> int:
        """Number of loop parameters (embeddings and gates), trainable or not."""
        return sum(getattr(self, name).numel() for name in self.loop_parameter_names)

    def check_width(self, stream: torch.Tensor, table: torch.Tensor, name: str) -> None:
        """A clear error when ``stream``'s last axis is not the width of embedding ``table``."""
        if not isinstance(stream, torch.Tensor) or stream.dim() < 1 or stream.shape[-1] != table.shape[1]:
            got = tuple(stream.shape) if isinstance(stream, torch.Tensor) else type(stream).__name__
            raise ValueError(
                f"{type(self).__name__} (block {self.block_idx}): {name} must end in the loop embedding "
                f"width {table.shape[1]}, got {got}; build the wrapper with the width of the block's hidden "
                f"states (graft_looped_blocks(..., inner_dim=...))"
            )

    def run_loops(
        self,
        streams: Sequence[torch.Tensor],
        tables: Sequence[torch.Tensor],
        block: Callable[..., tuple[torch.Tensor, ...]],
        use_checkpoint: bool,
    ) -> tuple[torch.Tensor, ...]:
        """Iterate ``block`` over ``streams`` for ``current_loops`` steps.

        Args:
            streams: the states fed to the block, each ``(..., width_s)``.
            tables: per stream, its ``(max_loops, width_s)`` embedding table.
            block: maps the embedded streams to one new tensor per stream, of the same shapes.
            use_checkpoint: recompute each iteration's activations in the backward pass
                (``torch.utils.checkpoint``, non-reentrant) when more than one loop runs
                with gradients enabled.

        Returns:
            The gated states after the last iteration, one per stream.
        """
        checkpointed = use_checkpoint and self.current_loops > 1 and torch.is_grad_enabled()
        states = tuple(streams)
        for step in range(self.current_loops):
            inputs = tuple(state + table[step] for state, table in zip(states, tables))
            outputs = checkpoint(block, *inputs, use_reentrant=False) if checkpointed else block(*inputs)
            gate = torch.sigmoid(self.loop_gate[step])
            states = tuple(gate * new + (1 - gate) * old for new, old in zip(outputs, states))
        return states

    def check_returned(self, output: object, inputs: Sequence[torch.Tensor], expected: str) -> None:
        """A clear error unless ``output`` (a tuple) holds one tensor per input, of its shape."""
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in output]
        if len(output) != len(inputs) or shapes != [tuple(t.shape) for t in inputs]:
            raise ValueError(
                f"{type(self).__name__} (block {self.block_idx}): the wrapped {type(self.original).__name__} "
                f"must return {expected} of shapes {[tuple(t.shape) for t in inputs]}, got {shapes}"
            )


class LoopedBlockWrapper(LoopedBlock):
    """Run any block whose first argument (and output, or first output) is the hidden state
    ``current_loops`` times, with learned loop embeddings and sigmoid gates.

    Args:
        original: the block to wrap; called as ``original(h, *args, **kwargs)`` and returning
            a tensor of ``h``'s shape, or a tuple whose first entry is one.
        block_idx: the block's index in its model (shown in ``repr`` and error messages).
        max_loops: most iterations (>= 1); ``loop_emb`` is ``(max_loops, embed_dim)``,
            ``loop_gate`` is ``(max_loops, 1)``.
        embed_dim: width of the hidden states (their last axis).
        gate_init_bias: initial gate logit (0 gives ``sigmoid(0) = 0.5``).
        use_gradient_checkpointing: recompute each iteration in the backward pass when more
            than one loop runs.

    Raises:
        ValueError: for ``max_loops < 1``; at forward, for hidden states not ending in
            ``embed_dim`` or a block output that is not a tensor of the input's shape.
    """

    loop_parameter_names = ("loop_emb", "loop_gate")

    def __init__(
        self,
        original: nn.Module,
        block_idx: int = 0,
        max_loops: int = 4,
        embed_dim: int = 256,
        gate_init_bias: float = 0.0,
        use_gradient_checkpointing: bool = True,
    ) -> None:
        super().__init__(original, block_idx, max_loops)
        self.embed_dim = positive_int(embed_dim, "LoopedBlockWrapper: embed_dim")
        self.use_gradient_checkpointing = use_gradient_checkpointing
        self.loop_emb = nn.Parameter(torch.zeros(self.max_loops, self.embed_dim))
        self.loop_gate = nn.Parameter(torch.full((self.max_loops, 1), float(gate_init_bias)))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``hidden_states``: ``(..., embed_dim)`` (e.g. ``(B, N, embed_dim)``); the other
        arguments reach the wrapped block unchanged. Returns the looped state, same shape."""
        self.check_width(hidden_states, self.loop_emb, "hidden_states")

        def block(h: torch.Tensor) -> tuple[torch.Tensor]:
            output = self.original(h, *args, **kwargs)
            first = output[0] if isinstance(output, tuple) and output else output
            self.check_returned((first,), (h,), "a tensor (or a tuple starting with one)")
            return (first,)

        (hidden_states,) = self.run_loops((hidden_states,), (self.loop_emb,), block, self.use_gradient_checkpointing)
        return hidden_states

    def extra_repr(self) -> str:
        return (
            f"block_idx={self.block_idx}, max_loops={self.max_loops}, current_loops={self.current_loops}, "
            f"embed_dim={self.embed_dim}, trainable_params={self.trainable_params()}"
        )
