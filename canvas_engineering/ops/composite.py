"""Higher derivatives of the autograd functions whose backward is written out."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def composite_gradients(
    composite: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    needs_input_grad: Sequence[bool],
    grad: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``composite(*inputs)`` against ``grad`` for the inputs whose
    ``needs_input_grad`` is set (None for the others), by autograd with ``create_graph=True``.

    An autograd function whose backward is written out returns these when its backward is
    itself differentiated (grad mode on inside the backward): autograd through the
    composite it stands for then gives exact higher derivatives.
    """
    needed = [tensor for tensor, need in zip(inputs, needs_input_grad) if need]
    grads = iter(torch.autograd.grad(composite(*inputs), needed, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in needs_input_grad[: len(inputs)])
