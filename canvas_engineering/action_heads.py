"""Action decoding from a diffusion model's output (canvas-engineering 0.5.0's ``ActionHead``)."""

from __future__ import annotations

import torch
import torch.nn as nn

from canvas_engineering.looped_block import positive_int


class ActionHead(nn.Module):
    """A two-layer MLP (``Linear -> GELU -> Linear``, state_dict ``net.0.*`` and ``net.2.*``)
    from the mean latent channel vector to an action.

    Args:
        latent_channels: channels ``C`` of the input (16 for CogVideoX latents).
        action_dim: size of the action (7 for 6-DoF plus gripper).
        hidden_dim: hidden width; ``None`` (or 0) gives ``max(latent_channels // 2, 8)``.
    """

    def __init__(self, latent_channels: int = 16, action_dim: int = 7, hidden_dim: int | None = None) -> None:
        super().__init__()
        self.latent_channels = positive_int(latent_channels, "ActionHead: latent_channels")
        action_dim = positive_int(action_dim, "ActionHead: action_dim")
        hidden_dim = positive_int(hidden_dim or max(self.latent_channels // 2, 8), "ActionHead: hidden_dim")
        self.net = nn.Sequential(
            nn.Linear(self.latent_channels, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, action_dim),
        )

    def forward(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """Decode actions.

        Args:
            noise_pred: ``(B, T, C, *spatial)`` (averaged over ``T`` and the spatial axes),
                ``(B, N, C)`` (averaged over ``N``) or ``(B, C)``.

        Returns:
            ``(B, action_dim)``.
        """
        if not isinstance(noise_pred, torch.Tensor) or noise_pred.dim() < 2:
            got = tuple(noise_pred.shape) if isinstance(noise_pred, torch.Tensor) else type(noise_pred).__name__
            raise ValueError(
                f"ActionHead: expected noise_pred of shape (B, T, C, *spatial), (B, N, C) or (B, C), got {got}"
            )
        channel_axis = 2 if noise_pred.dim() >= 4 else noise_pred.dim() - 1
        if noise_pred.shape[channel_axis] != self.latent_channels:
            raise ValueError(
                f"ActionHead: expected {self.latent_channels} channels on axis {channel_axis} of noise_pred, "
                f"got shape {tuple(noise_pred.shape)}"
            )
        reduced = [axis for axis in range(1, noise_pred.dim()) if axis != channel_axis]
        pooled = noise_pred.mean(dim=reduced) if reduced else noise_pred
        return self.net(pooled)
