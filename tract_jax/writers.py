"""PNG grids, TensorBoard scalars/images, a JSON-lines summary and progress lines; each to a local
folder or a bucket (gs://, see paths.py)."""
import io
import json
import math
import os
import shutil
import tempfile
import time
from typing import Dict, Optional

import numpy as np
from PIL import Image

from tract_jax import paths, quantize


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 levels (quantize.py: the quantisation the paper applies before
  evaluation)."""
  return quantize.uint8_levels(np.asarray(images, np.float32)).astype(np.uint8)


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


def save_grid(path, images, ncol: Optional[int] = None, min_size: int = 256,
              labels=None) -> str:
  """Writes a PNG mosaic (local or gs:// path); tiny images (8x8 digits) are enlarged with
  nearest-neighbour pixels. Returns the path written.

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
  png = io.BytesIO()
  image.save(png, format='PNG')
  return str(paths.write_bytes(path, png.getvalue()))


class MetricWriter:
  """Writes scalars to TensorBoard (tensorboardX, when installed) and to workdir/summary.jsonl.
  Progress lines on stdout are the loop's. Use as a context manager (or call close()).

  A local workdir is written in place. A bucket (gs://...) cannot append to an object and
  tensorboardX cannot write to one without TensorFlow, so both files are written in a local staging
  folder and copied whole to workdir/tensorboard/ and workdir/summary.jsonl at most every
  `sync_every_s` seconds, at flush() and at close(); summary.jsonl starts from the bucket's copy, so
  a resumed run appends to it. A crash loses at most the last `sync_every_s` seconds of lines (the
  checkpoints do not depend on them).
  """

  def __init__(self, workdir, enabled: bool = True, sync_every_s: float = 60.0):
    self.enabled = enabled
    self.workdir = paths.resolve(workdir)
    self.remote = paths.is_remote(str(self.workdir))
    self.sync_every_s = sync_every_s
    self._tb = None
    self._stage = None
    self._last_sync = time.monotonic()
    if not enabled:
      return
    if self.remote:
      self._stage = tempfile.mkdtemp(prefix='tract_jax_metrics_')
      local = self._stage
      remote_summary = self.workdir / 'summary.jsonl'
      if remote_summary.exists():  # resuming: keep the lines of the earlier runs
        paths.copy_file(remote_summary, os.path.join(local, 'summary.jsonl'))
    else:
      self.workdir.mkdir(parents=True, exist_ok=True)
      local = os.fspath(self.workdir)
    self._summary = os.path.join(local, 'summary.jsonl')
    self._tb_dir = os.path.join(local, 'tensorboard')
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(self._tb_dir)
    except ImportError:  # TensorBoard output is optional
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def scalars(self, step: int, values: Dict[str, float]):
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)
    with open(self._summary, 'a') as f:
      f.write(json.dumps({'step': int(step), **values}) + '\n')
    if self.remote and time.monotonic() - self._last_sync >= self.sync_every_s:
      self.flush()

  def image(self, step: int, tag: str, images):
    if self.enabled and self._tb is not None:
      grid = make_grid(images)
      self._tb.add_image(tag, grid, step, dataformats='HWC')

  def flush(self):
    """Flushes TensorBoard; for a bucket workdir also copies the staged files there."""
    if self._tb is not None:
      self._tb.flush()
    if self.enabled and self.remote:
      self._sync()

  def _sync(self):
    if os.path.exists(self._summary):
      paths.copy_file(self._summary, self.workdir / 'summary.jsonl')
    if os.path.isdir(self._tb_dir):
      for name in sorted(os.listdir(self._tb_dir)):
        paths.copy_file(os.path.join(self._tb_dir, name), self.workdir / 'tensorboard' / name)
    self._last_sync = time.monotonic()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self.enabled and self.remote and self._stage is not None:
      self._sync()
      shutil.rmtree(self._stage, ignore_errors=True)
      self._stage = None


class Progress:
  """Update rate, images/s and an h:mm:ss ETA for long loops, measured from the first line on (the
  first step includes compilation, so it is not part of the rate)."""

  def __init__(self, end_step: int, images_per_step: int = 0):
    self.end_step = end_step
    self.images_per_step = images_per_step
    self.first = None  # (step, time) of the first line

  def line(self, step: int) -> str:
    now = time.time()
    if self.first is None or step <= self.first[0]:
      self.first = (step, now)
      return 'first step, with compilation'
    rate = (step - self.first[0]) / max(now - self.first[1], 1e-9)
    eta = format_duration((self.end_step - step) / rate)
    images = f', {rate * self.images_per_step:,.0f} images/s' if self.images_per_step else ''
    return f'{rate:.2f} steps/s{images}, ETA {eta}'


def format_duration(seconds: float) -> str:
  """3725.2 -> '1:02:05' (hours are not wrapped into days)."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(max(seconds, 0.0)))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
