"""PNG grids, TensorBoard scalars/images, a JSON-lines summary and progress lines."""
import json
import math
import os
import time
from typing import Dict, Optional

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 levels (the quantisation the paper applies before evaluation)."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, ncol: Optional[int] = None, pad: int = 1, scale: int = 1) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> one uint8 (rows*H', cols*W', C) mosaic, C in {1, 3}."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for k in range(n):
    r, col = divmod(k, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[k]
  return grid


def save_grid(path: str, images, ncol: Optional[int] = None, min_size: int = 256,
              labels=None) -> str:
  """Writes a PNG mosaic; tiny images (8x8 digits) are enlarged with nearest-neighbour pixels.

  labels: optional (N,) class labels, written in the top-left corner of each cell (class-conditional
  samples).
  """
  n, h = len(images), np.asarray(images).shape[1]
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  scale = max(1, min_size // (h * ncol))
  grid = make_grid(images, ncol=ncol, scale=scale)
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  if labels is not None:
    from PIL import ImageDraw
    draw = ImageDraw.Draw(image)
    cell = h * scale + 1
    for k, label in enumerate(np.asarray(labels).tolist()):
      r, c = divmod(k, ncol)
      x, y = 1 + c * cell, 1 + r * cell
      text = str(label)
      box = draw.textbbox((x, y), text)
      draw.rectangle(box, fill=0 if image.mode == 'L' else (0, 0, 0))
      draw.text((x, y), text, fill=255 if image.mode == 'L' else (255, 255, 0))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image.save(path)
  return path


class MetricWriter:
  """Writes scalars to stdout, to TensorBoard (tensorboardX) and to workdir/summary.jsonl."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:  # TensorBoard output is optional
        self._tb = None

  def scalars(self, step: int, values: Dict[str, float], record: bool = True):
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)
    if record:
      with open(os.path.join(self.workdir, 'summary.jsonl'), 'a') as f:
        f.write(json.dumps({'step': int(step), **values}) + '\n')

  def image(self, step: int, tag: str, images):
    if self.enabled and self._tb is not None:
      grid = make_grid(images)
      self._tb.add_image(tag, grid, step, dataformats='HWC')

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


class Progress:
  """steps/s and ETA for long loops."""

  def __init__(self, start_step: int, end_step: int):
    self.start_step, self.end_step = start_step, end_step
    self.t0 = time.time()

  def line(self, step: int) -> str:
    done = step - self.start_step
    elapsed = max(time.time() - self.t0, 1e-9)
    rate = done / elapsed
    eta = (self.end_step - step) / rate if rate > 0 else float('inf')
    return f'{rate:.2f} steps/s, ETA {eta:.0f}s'
