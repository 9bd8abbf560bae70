"""Random-access image sources: the embedded digits, .npz files and image folders, and what every
source shares (the uint8 example protocol grain reads, model-range batches, the first-batch check).

Every source is a random-access sequence (`__len__`, `__getitem__(i)` -> {'image': uint8 (H, W, C),
'label': int32}) and also answers `get(indices)` with a model-ready batch {'image': float32
(B, H, W, C) in [-1, 1], 'label': int32 (B,)}.
"""
import dataclasses
import importlib.resources
import os
import zipfile
import zlib
from typing import Optional, Sequence

import numpy as np

from tract_jax.errors import ConfigError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# How many examples a source checks when it opens a dataset (the "first batch").
FIRST_BATCH_CHECKED = 16


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 (H, W, C) -> (size, size, C): the shorter side resized to `size` with PIL's bicubic
  filter (antialiased when shrinking), then a centre crop. size 0, or an image already
  size x size, returns the image unchanged."""
  h, w, c = image.shape
  if not size or (h == w == size):
    return image
  scale = size / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  if (new_h, new_w) != (h, w):
    from PIL import Image
    resized = Image.fromarray(image[..., 0] if c == 1 else image).resize(
        (new_w, new_h), Image.Resampling.BICUBIC)
    image = np.asarray(resized).reshape(new_h, new_w, c)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.ascontiguousarray(image[top:top + size, left:left + size])


def to_model_range(images: np.ndarray, max_level: float = 255.0) -> np.ndarray:
  """uint8 levels 0..max_level -> float32 in [-1, 1] (0 -> -1 and max_level -> 1 exactly)."""
  return images.astype(np.float32) / np.float32(max_level / 2) - 1.0


class _ExampleSource:
  """Shared behaviour: `__getitem__` -> one uint8 example, `get` -> a float batch.

  Subclasses set name, num_classes, image_size, max_level (the uint8 level that maps to 1) and
  define `__len__` and `_example(index)` returning {'image': uint8 (H, W, C) already fitted to
  image_size, 'label': int32}.
  """
  image_shape: Optional[tuple] = None

  def __getitem__(self, index):
    return self._example(int(index))

  def _stack(self, indices) -> dict:
    examples = [self._example(int(i)) for i in indices]
    if not examples:
      return {'image': np.zeros((0,) + tuple(self.image_shape), np.uint8),
              'label': np.zeros((0,), np.int32)}
    return {'image': np.stack([e['image'] for e in examples]),
            'label': np.asarray([e['label'] for e in examples], np.int32)}

  def get(self, indices: Sequence[int]) -> dict:
    """{'image': float32 (B, H, W, C) in [-1, 1], 'label': int32 (B,)} of examples `indices`."""
    batch = self._stack(indices)
    return {'image': to_model_range(batch['image'], self.max_level), 'label': batch['label']}

  def _check_fitted(self, index: int, image: np.ndarray) -> np.ndarray:
    image = fit_square(image, self.image_size)
    if self.image_shape is not None and image.shape != self.image_shape:
      raise ConfigError(f'data.name={self.name!r}: example {index} has image shape {image.shape}, '
                        f'expected {self.image_shape} like example 0 (data.image_size > 0 resizes '
                        'every image to one square size)')
    return image

  def _open(self):
    """Sets image_shape from example 0 and reads the first batch, so that a dataset of the wrong
    kind fails at start-up rather than after compilation."""
    if not len(self):
      raise ConfigError(f'data.name={self.name!r}: the dataset has no examples')
    self.image_shape = tuple(self._example(0)['image'].shape)
    self._stack(range(min(len(self), FIRST_BATCH_CHECKED)))


# ---------------------------------------------------------------------------------------------------
# In-memory arrays: the embedded digits and .npz files
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ArraySource(_ExampleSource):
  """An in-memory dataset: uint8 images (N, H, W, C) with levels 0..max_level, int labels (N,)."""
  images: np.ndarray
  labels: np.ndarray
  max_level: float
  num_classes: int
  name: str
  image_size: int = 0

  def __len__(self):
    return len(self.images)

  @property
  def image_shape(self):
    if self.image_size:
      return (self.image_size, self.image_size, self.images.shape[-1])
    return tuple(self.images.shape[1:])

  def _example(self, index: int):
    image = self.images[index]
    if self.image_size:
      # Bicubic overshoots: keep the levels of a max_level < 255 source in range.
      image = np.minimum(fit_square(image, self.image_size), np.uint8(min(self.max_level, 255)))
    return {'image': image, 'label': np.int32(self.labels[index])}

  def get(self, indices: Sequence[int]):
    if self.image_size:
      return super().get(indices)
    indices = np.asarray(indices, np.int64)
    return {'image': to_model_range(self.images[indices], self.max_level),
            'label': self.labels[indices].astype(np.int32)}


def load_digits(image_size: int = 0) -> ArraySource:
  """The 1,797 8x8 handwritten digits shipped in the package (scikit-learn's copy of the UCI set,
  CC BY 4.0, see tract_jax/assets/DIGITS_LICENSE.txt); levels 0..16 mapped to [-1, 1]."""
  with importlib.resources.files('tract_jax.assets').joinpath('digits8x8.npz').open('rb') as f:
    arrays = np.load(f)
    images, labels = arrays['images'][..., None], arrays['labels']
  return ArraySource(images, labels.astype(np.int32), 16.0, 10, 'digits', int(image_size))


def load_npz(path: str, image_size: int = 0) -> ArraySource:
  """uint8 'images' (N, H, W) or (N, H, W, C), C in (1, 3), and optional int 'labels' (N,) >= 0."""
  where = f'data.name={path!r}'
  try:
    with open(path, 'rb') as f:
      magic = f.read(6)
    if not magic.startswith(b'PK') and magic != b'\x93NUMPY':
      raise ValueError('not a zip archive of .npy arrays, as np.savez writes')
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # an .npy file under an .npz name
      raise ValueError(f'it holds one {loaded.dtype} {loaded.shape} array, not named arrays')
    with loaded as arrays:
      contents = {key: arrays[key] for key in arrays.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    # np.load reads any file that starts like a zip as one: a truncated or damaged .npz fails in
    # zipfile, whatever the failure, with one line rather than a traceback.
    raise ConfigError(f'{where}: cannot read it as an .npz file ({type(e).__name__}: '
                      f'{" ".join(str(e).split())[:200]})') from None
  if 'images' not in contents:
    raise ConfigError(f"{where}: holds {sorted(contents)}, expected 'images' (and optional "
                      "'labels')")
  images = contents['images']
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
    raise ConfigError(f"{where}: 'images' is {images.dtype} {contents['images'].shape}, expected "
                      'uint8 (N, H, W) or (N, H, W, C) with C = 1 or 3')
  if not len(images):
    raise ConfigError(f'{where}: the dataset has no examples')
  labels = contents.get('labels')
  if labels is None:
    labels, num_classes = np.zeros(len(images), np.int32), 0
  else:
    if (labels.shape != (len(images),) or labels.dtype.kind not in 'iu'
        or (labels.size and labels.min() < 0)):
      raise ConfigError(f"{where}: 'labels' is {labels.dtype} {labels.shape}, expected "
                        f'non-negative integers ({len(images)},)')
    labels, num_classes = labels.astype(np.int32), int(labels.max()) + 1
  return ArraySource(images, labels, 255.0, num_classes, path, int(image_size))


def check_labels(source, num_classes: int, log: bool = True) -> None:
  """The data's labels against the model's model.num_classes, before anything compiles.

  A class-conditional model (num_classes > 0) needs labelled data (at least two classes) whose
  labels are all below num_classes: a larger label would be one-hot encoded as all zeros and the
  model would silently train unconditionally. An unconditional model ignores labels; `log` says so.
  `source.num_classes` is 1 + the largest label an example can have (0: no labels).
  """
  have = int(source.num_classes)
  where = f'data.name={source.name!r}'
  if not num_classes:
    if have > 1 and log:
      print(f'model.num_classes=0: an unconditional model; the labels of {where} ({have} classes) '
            'are ignored', flush=True)
    return
  if have <= 1:
    raise ConfigError(f'model.num_classes={num_classes}: a class-conditional model needs labelled '
                      f'data, but {where} has no labels (every label is 0); set model.num_classes=0 '
                      "or give labels (.npz 'labels', one sub-folder per class, a TFDS 'label')")
  if have > num_classes:
    raise ConfigError(f'model.num_classes={num_classes}: {where} has labels up to {have - 1}, but a '
                      'class-conditional model needs every label below model.num_classes')


# ---------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------
def _image_files(directory: str) -> list:
  """Sorted image paths under `directory` (recursively), hidden entries skipped."""
  found = []
  for root, dirs, files in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    found += [os.path.join(root, f) for f in sorted(files)
              if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS)]
  return found


class FolderSource(_ExampleSource):
  """Image files decoded with PIL on each read.

  Grey if example 0 is grey (PIL modes 1, L, LA, I, I;16, F), else RGB: every image is converted
  to that mode (alpha dropped). Only 8-bit images keep their levels exactly.
  """

  def __init__(self, directory: str, image_size: int = 0, name: Optional[str] = None):
    self.name = name or directory
    self.image_size = int(image_size)
    self.max_level = 255.0
    where = f'data.name={self.name!r}'
    entries = sorted(e for e in os.listdir(directory) if not e.startswith('.'))
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(directory, e))]
    top_files = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)]
    if class_dirs and top_files:
      raise ConfigError(f'{where}: has both image files ({top_files[0]!r}, ...) and sub-folders '
                        f'({class_dirs[0]!r}, ...); put all images in one folder (unlabelled) or '
                        'in one sub-folder per class')
    if class_dirs:
      self.classes = class_dirs
      self.paths, labels = [], []
      for label, class_dir in enumerate(class_dirs):
        files = _image_files(os.path.join(directory, class_dir))
        self.paths += files
        labels += [label] * len(files)
      self.labels = np.asarray(labels, np.int32)
      self.num_classes = len(class_dirs)
    else:
      self.classes = []
      self.paths = [os.path.join(directory, f) for f in top_files]
      self.labels = np.zeros(len(self.paths), np.int32)
      self.num_classes = 0
    if not self.paths:
      raise ConfigError(f'{where}: no {"/".join(IMAGE_EXTENSIONS)} files found')
    self.mode = None
    self.mode = self._decode(0).mode
    self._open()

  def __len__(self):
    return len(self.paths)

  def _decode(self, index: int):
    from PIL import Image
    try:
      with Image.open(self.paths[index]) as image:
        image.load()
        if self.mode is None:
          grey = image.mode in ('1', 'L', 'LA', 'I', 'I;16', 'F')
          return image.convert('L' if grey else 'RGB')
        return image.convert(self.mode)
    except OSError as e:
      raise ConfigError(f'data.name={self.name!r}: cannot decode {self.paths[index]!r}: '
                        f'{e}') from e

  def _example(self, index: int):
    image = np.asarray(self._decode(index))
    if image.ndim == 2:
      image = image[..., None]
    return {'image': self._check_fitted(index, image), 'label': self.labels[index]}


