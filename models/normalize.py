"""Per-channel input normalisation kept inside the model, so checkpoints carry their dataset constants."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .registry import ModelConfigError


def _as_channel_buffer(values, in_channels: int, default: float, what: str) -> torch.Tensor:
    if values is None:
        return torch.full((1, in_channels, 1, 1), float(default))
    flat = torch.as_tensor(values, dtype=torch.float32).detach().reshape(-1).clone()
    if flat.numel() != in_channels:
        raise ModelConfigError(f"{what} needs {in_channels} values (one per input channel); got {flat.numel()}")
    if not all(math.isfinite(v) for v in flat.tolist()):
        raise ModelConfigError(f"{what} values must be finite; got {flat.tolist()}")
    return flat.reshape(1, in_channels, 1, 1)


class Normalize(nn.Module):
    """(x - mean) / std per channel, with `mean` and `std` as buffers shaped (1, C, 1, 1)."""

    def __init__(self, in_channels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        mean_buffer = _as_channel_buffer(mean, in_channels, 0.0, "mean")
        std_buffer = _as_channel_buffer(std, in_channels, 1.0, "std")
        if bool((std_buffer <= 0).any()):
            raise ModelConfigError(f"std values must be > 0; got {std_buffer.reshape(-1).tolist()}")
        self.in_channels = in_channels
        self.register_buffer("mean", mean_buffer)
        self.register_buffer("std", std_buffer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A wrong channel count would otherwise surface as an obscure broadcasting or conv error.
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ModelConfigError(
                f"expected input shaped (N, {self.in_channels}, H, W); got {tuple(x.shape)}"
            )
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}"
