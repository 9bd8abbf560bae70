"""The uint8 quantisation the paper applies to samples before every evaluation and every saved image:
[-1, 1] -> the nearest of the 256 levels round(127.5 (x + 1)) (half to even, like torch.round),
clamped to 0..255. One formula for NumPy arrays (written images, the digits metric) and jax arrays
(the FID input pipeline, under jit): `xp` is the array module."""
import numpy as np


def uint8_levels(images, xp=np):
  """Images in [-1, 1] -> float levels 0..255, same shape and float dtype."""
  return xp.clip(xp.round((images + 1.0) * 127.5), 0.0, 255.0)


def from_levels(levels):
  """Levels 0..255 -> back in [-1, 1] (0 -> -1, 255 -> 1)."""
  return levels / 127.5 - 1.0
