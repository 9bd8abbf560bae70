"""The FID input pipeline before the network: uint8 quantisation and the 299x299 bilinear resize in
its two conventions ('torch': PyTorch's F.interpolate(align_corners=False), half-pixel centres, what
the paper's code and pytorch-fid do; 'tf1': the original TF graph's resize, no half-pixel centres).
Each resize is two small matrices applied along H and W, so it is exact and cheap under jit."""
from typing import Tuple

import jax.numpy as jnp
import numpy as np

from tract_jax import quantize

INPUT_SIZE = 299

RESIZE_METHODS = ('torch', 'tf1')
DEFAULT_RESIZE = 'torch'  # the paper's code (pytorch-fid's network with F.interpolate)


def check_resize(resize: str) -> str:
  """Returns `resize` if it is one of RESIZE_METHODS, else raises ValueError naming the choices."""
  if resize not in RESIZE_METHODS:
    raise ValueError(f'resize={resize!r}: allowed values are {RESIZE_METHODS}')
  return resize


def _tf1_resize_weights(in_size: int, out_size: int):
  """Source rows and weights of TF1 ResizeBilinear along one axis (align_corners=False,
  half_pixel_centers=False): source coordinate = dst * in_size / out_size, no antialiasing.

  Returns:
    lower (out,) int32, upper (out,) int32 (clamped to in_size - 1), frac (out,) float32.
  """
  src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  lower = np.floor(src)
  frac = (src - lower).astype(np.float32)
  lower = lower.astype(np.int32)
  upper = np.minimum(lower + 1, in_size - 1).astype(np.int32)
  return lower, upper, frac


def _torch_resize_weights(in_size: int, out_size: int):
  """Source rows and weights of PyTorch's bilinear interpolation along one axis
  (F.interpolate(size=..., mode='bilinear', align_corners=False), the half-pixel rule):
  source coordinate = (dst + 0.5) * in_size / out_size - 0.5, clamped below at 0; the upper
  neighbour is clamped at the last pixel. No antialiasing (PyTorch's default antialias=False).

  Returns:
    lower (out,) int32, upper (out,) int32, frac (out,) float32.
  """
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  src = np.maximum(src, 0.0)
  lower = np.minimum(np.floor(src), in_size - 1)
  frac = (src - lower).astype(np.float32)
  lower = lower.astype(np.int32)
  upper = np.minimum(lower + 1, in_size - 1).astype(np.int32)
  return lower, upper, frac


def _resize_separable(images, size: Tuple[int, int], weights_fn):
  """Bilinear resize with host-computed gather indices and weights: along the width first, then the
  height, each as a + (b - a) * w (static shapes, so indices and weights are constants)."""
  _, height, width, _ = images.shape
  out_h, out_w = size
  if (height, width) == (out_h, out_w):
    return images  # both conventions are the identity at equal size
  x0, x1, wx = weights_fn(width, out_w)
  y0, y1, wy = weights_fn(height, out_h)
  wx = jnp.asarray(wx, images.dtype)[None, None, :, None]
  wy = jnp.asarray(wy, images.dtype)[None, :, None, None]
  left, right = jnp.take(images, x0, axis=2), jnp.take(images, x1, axis=2)
  rows = left + (right - left) * wx                                   # (B, H, out_w, C)
  top, bottom = jnp.take(rows, y0, axis=1), jnp.take(rows, y1, axis=1)
  return top + (bottom - top) * wy                                    # (B, out_h, out_w, C)


def resize_bilinear_tf1(images, size: Tuple[int, int]):
  """TF1 `tf.image.resize_bilinear(images, size, align_corners=False)` (no half-pixel centres).

  Args:
    images: (B, H, W, C) float array.
    size: (out_height, out_width).

  Returns:
    (B, out_height, out_width, C) array of the input's dtype.
  """
  return _resize_separable(images, size, _tf1_resize_weights)


def resize_bilinear_torch(images, size: Tuple[int, int]):
  """PyTorch `F.interpolate(x, size, mode='bilinear', align_corners=False)` (half-pixel centres), the
  resize of pytorch-fid and of the paper's FID code.

  Args:
    images: (B, H, W, C) float array.
    size: (out_height, out_width).

  Returns:
    (B, out_height, out_width, C) array of the input's dtype.
  """
  return _resize_separable(images, size, _torch_resize_weights)


def resize_bilinear(images, size: Tuple[int, int], resize: str = DEFAULT_RESIZE):
  """`resize_bilinear_torch` (resize='torch') or `resize_bilinear_tf1` (resize='tf1')."""
  fn = {'torch': resize_bilinear_torch, 'tf1': resize_bilinear_tf1}[check_resize(resize)]
  return fn(images, size)


def quantize_uint8(images):
  """[-1, 1] -> the nearest of the 256 uint8 levels, back in [-1, 1], as the paper's code does
  (quantize.py), in the images' dtype (traceable)."""
  return quantize.from_levels(quantize.uint8_levels(images, jnp))


def preprocess(images, size: int = INPUT_SIZE, quantize: bool = True, resize: str = DEFAULT_RESIZE):
  """Images in [-1, 1] -> the network input.

  Args:
    images: (B, H, W, C) with C = 3, or C = 1 (repeated to 3 channels); values in [-1, 1].
    size: output side (299 for the real protocol; smaller sizes, at least 75, only for tests).
    quantize: snap to uint8 levels first (spec section 8; a no-op on images read from uint8 files).
    resize: 'torch' (default; the paper's code and pytorch-fid) or 'tf1' (the TF graph's resize).

  Returns:
    (B, size, size, 3) float32.
  """
  check_resize(resize)
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must be (B, H, W, 1 or 3), got shape {images.shape}')
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  if quantize:
    images = quantize_uint8(images)
  return resize_bilinear(images, (size, size), resize)
