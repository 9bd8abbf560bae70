"""Input pipelines: host-local numpy batches, addressed by step number.

Every dataset here is a random-access source, and the batch of update `step` is a pure function of
(seed, step, process): a resumed run reads exactly the batches an uninterrupted run would have read,
with no iterator state to checkpoint.

Batches are dicts {'image': float32 (B, H, W, C) in [-1, 1], 'label': int32 (B,)}.

The TFDS datasets are read with `tfds.data_source` (random access over array_record files) and never
import TensorFlow; nothing here downloads: a dataset that is not prepared in `data.data_dir` is a
ConfigError that says how to prepare it elsewhere. Random flips happen inside the jitted train step
(config.data.random_flip), not here.
"""
import dataclasses
import importlib.resources
import os
import queue
import sys
import threading
from typing import Optional

import numpy as np

from tract_jax.phases import ConfigError

DATASETS = ('digits', 'cifar10', 'imagenet64')

# data.name -> TFDS name; both have a 'train' split with integer labels.
TFDS_NAMES = {'cifar10': 'cifar10', 'imagenet64': 'imagenet_resized/64x64'}
# How many examples TfdsSource checks when it opens a dataset (the "first batch").
FIRST_BATCH_CHECKED = 16


@dataclasses.dataclass
class ArraySource:
  """An in-memory dataset: uint8 images (N, H, W, C) with `levels` grey levels, int labels (N,)."""
  images: np.ndarray
  labels: np.ndarray
  max_level: float
  num_classes: int
  name: str

  def __len__(self):
    return len(self.images)

  @property
  def image_shape(self):
    return tuple(self.images.shape[1:])

  def get(self, indices: np.ndarray):
    images = self.images[indices].astype(np.float32) * (2.0 / self.max_level) - 1.0
    return {'image': images, 'label': self.labels[indices].astype(np.int32)}


def load_digits() -> ArraySource:
  """The 1,797 8x8 handwritten digits shipped in the package (scikit-learn's copy of the UCI set,
  CC BY 4.0, see tract_jax/assets/DIGITS_LICENSE.txt); levels 0..16 mapped to [-1, 1]."""
  with importlib.resources.files('tract_jax.assets').joinpath('digits8x8.npz').open('rb') as f:
    arrays = np.load(f)
    images, labels = arrays['images'][..., None], arrays['labels']
  return ArraySource(images, labels.astype(np.int32), 16.0, 10, 'digits')


class TfdsSource:
  """A random-access TFDS split: `records[i]` is a dict {'image': uint8 (H, W, C), 'label': int}.

  `records` is what `tfds.data_source` returns (or any sequence of such dicts). Items are read one by
  one: `__getitems__` of the sources that `tfds.testing.mock_data` builds is broken, and the per-item
  cost is small next to the PNG decoding. Every image read is checked (shape, dtype) and every label
  (range); the first FIRST_BATCH_CHECKED examples are read when the source is opened, so a dataset of
  the wrong kind fails at start-up rather than after compilation. `expected_shape` is the (H, W, C)
  that the TFDS features declare, when known.
  """

  def __init__(self, records, name: str, num_classes: int,
               expected_shape: Optional[tuple] = None):
    self.records = records
    self.name = name
    self.num_classes = int(num_classes)
    self._length = len(records)
    self.image_shape = None  # set from example 0
    if not self._length:
      raise ConfigError(f'data.name={name!r}: the dataset has no examples')
    first = self._image(0, np.asarray(self._record(0)['image']))
    if expected_shape is not None and None not in expected_shape and first.shape != tuple(
        expected_shape):
      raise ConfigError(f'data.name={name!r}: example 0 has image shape {first.shape}, expected '
                        f'{tuple(expected_shape)} as the TFDS features declare')
    self.image_shape = tuple(first.shape)
    self.get(np.arange(min(self._length, FIRST_BATCH_CHECKED)))

  def __len__(self):
    return self._length

  def _record(self, index: int):
    record = self.records[index]
    if 'image' not in record or 'label' not in record:
      raise ConfigError(f'data.name={self.name!r}: example {index} has features {sorted(record)}, '
                        "expected 'image' and 'label'")
    return record

  def _image(self, index: int, image: np.ndarray) -> np.ndarray:
    """Checks one image: (H, W, C) with C in (1, 3), uint8, the shape of example 0."""
    where = f'data.name={self.name!r}: example {index}'
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
      raise ConfigError(f'{where} has image shape {image.shape}, expected (H, W, C) with C = 1 or 3')
    if self.image_shape is not None and image.shape != self.image_shape:
      raise ConfigError(f'{where} has image shape {image.shape}, expected {self.image_shape} like '
                        'example 0')
    if image.dtype != np.uint8:
      values = (f' with values in [{image.min()}, {image.max()}]'
                if image.size and image.dtype.kind in 'biuf' else '')
      raise ConfigError(f'{where} has image dtype {image.dtype}{values}, expected uint8 in 0..255')
    return image

  def _label(self, index: int, label) -> int:
    label = np.asarray(label)
    if label.ndim or label.dtype.kind not in 'iu' or not 0 <= int(label) < self.num_classes:
      raise ConfigError(f'data.name={self.name!r}: example {index} has label {label.tolist()!r}, '
                        f'expected an integer in 0..{self.num_classes - 1}')
    return int(label)

  def get(self, indices: np.ndarray):
    images = np.empty((len(indices),) + self.image_shape, np.uint8)
    labels = np.empty(len(indices), np.int32)
    for row, index in enumerate(indices):
      index = int(index)
      record = self._record(index)
      images[row] = self._image(index, np.asarray(record['image']))
      labels[row] = self._label(index, record['label'])
    # 0 -> -1 and 255 -> 1 exactly.
    return {'image': images.astype(np.float32) / 127.5 - 1.0, 'label': labels}


def _missing_dataset_message(name: str, tfds_name: str, builder, data_dir: Optional[str]) -> str:
  root = os.fspath(builder.data_dir_root)
  prepare_dir = data_dir or 'DATA_DIR'
  return (
      f'data.name={name!r}: the TFDS dataset {tfds_name!r} (version {builder.version}) is not '
      f'prepared in data_dir={root!r} (looked for {os.fspath(builder.data_path)}/dataset_info.json; '
      f"data.data_dir={data_dir or ''!r}, '' = $TFDS_DATA_DIR or ~/tensorflow_datasets). This job "
      'never downloads. Prepare it once on a machine with internet access, in the array_record '
      'format that random access needs:\n'
      '  pip install tensorflow-cpu tensorflow-datasets array_record\n'
      '  python -c "import tensorflow_datasets as tfds; '
      f"tfds.builder('{tfds_name}', data_dir='{prepare_dir}', file_format='array_record')"
      '.download_and_prepare()"\n'
      f'then copy that data_dir (or just its {tfds_name.split("/")[0]}/ folder) to {root!r} on this '
      'machine (e.g. gcloud storage cp -r gs://BUCKET/tensorflow_datasets/... ; local disk: the '
      'array_record files are read at random), or point --config.data.data_dir at the copy.')


def _check_prepared(name: str, tfds_name: str, builder, data_dir: Optional[str]) -> None:
  """Raises ConfigError unless the builder's files are on disk, random-access, with a train split.

  Only reads metadata: tfds.data_source would otherwise answer a missing dataset with an unrelated
  file-format error, and with download=True it would try to download.
  """
  if not builder.is_prepared():
    raise ConfigError(_missing_dataset_message(name, tfds_name, builder, data_dir))
  import tensorflow_datasets as tfds
  random_access = set(tfds.core.FileFormat.with_random_access())
  formats = builder.info.available_file_formats()
  if not formats & random_access:
    raise ConfigError(
        f'data.name={name!r}: {os.fspath(builder.data_path)} holds {tfds_name!r} in the '
        f'{sorted(f.value for f in formats)} format, but random access needs array_record: '
        're-prepare it with tfds.builder(..., file_format=\'array_record\').download_and_prepare() '
        "or convert it with `tfds convert_format --out_file_format=array_record` (both need "
        'TensorFlow; do it once, elsewhere).')
  if 'train' not in builder.info.splits:
    raise ConfigError(f'data.name={name!r}: {os.fspath(builder.data_path)} has no train split '
                      f'(splits: {sorted(builder.info.splits)}); was the preparation interrupted?')


def _hide_accelerators_from_tensorflow() -> None:
  """If something imported TensorFlow, keep it off the GPUs/TPUs that JAX uses."""
  tf = sys.modules.get('tensorflow')
  if tf is not None:
    try:
      tf.config.set_visible_devices([], 'GPU')
      tf.config.set_visible_devices([], 'TPU')
    except (RuntimeError, ValueError):  # already initialised, or no such device type
      pass


def load_tfds(name: str, data_dir: Optional[str] = None) -> TfdsSource:
  """The train split of data.name `name` ('cifar10' or 'imagenet64') from TFDS files in `data_dir`.

  Never downloads and never imports TensorFlow; raises ConfigError naming the directory when the
  dataset is missing.
  """
  import tensorflow_datasets as tfds  # lazily: half a second, and 'digits' does not need it
  tfds_name = TFDS_NAMES[name]
  data_dir = data_dir or None
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  _check_prepared(name, tfds_name, builder, data_dir)
  try:
    records = tfds.data_source(tfds_name, split='train', data_dir=data_dir, download=False)
  except (KeyError, ValueError, NotImplementedError, OSError) as e:
    raise ConfigError(f'data.name={name!r}: TFDS could not open {tfds_name!r} in '
                      f'{os.fspath(builder.data_path)}: {e}') from e
  features = builder.info.features
  source = TfdsSource(records, name, features['label'].num_classes,
                      expected_shape=features['image'].shape)
  _hide_accelerators_from_tensorflow()
  return source


class StepBatcher:
  """Deterministic epoch-shuffled batches of a random-access source, addressed by step.

  Each process reads its own slice of every global batch: global batch `step` is the slice
  [step * B, (step + 1) * B) of an endless sequence of per-epoch permutations seeded by (seed, epoch),
  and process p of P takes rows p * B/P .. (p + 1) * B/P of it.

  Not tfds.split_for_jax_process: it gives each process a fixed share of the examples, so the
  global batch of a step (and which examples an epoch visits together) would depend on the number
  of processes; here it depends on (seed, step) only, and each host still reads only its own rows.
  """

  def __init__(self, source, global_batch: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    if global_batch % process_count:
      raise ConfigError(f'batch_size={global_batch}: must be divisible by the number of processes '
                        f'({process_count})')
    self.source = source
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.seed = seed
    self.process_index = process_index
    self._perm_cache = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    perm = self._perm_cache.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
      self._perm_cache = {epoch: perm}  # one epoch at a time is enough for sequential reads
    return perm

  def indices(self, step: int) -> np.ndarray:
    n = len(self.source)
    start = step * self.global_batch + self.process_index * self.local_batch
    positions = np.arange(start, start + self.local_batch)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(self.local_batch, np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self._permutation(int(epoch))[offsets[sel]]
    return out

  def batch(self, step: int):
    return self.source.get(self.indices(step))


class Prefetcher:
  """Reads the batches of steps start_step, start_step + 1, ... on a background thread.

  `next()` returns (step, batch) in step order, with up to `depth` batches read ahead, so reading
  (record I/O and PNG decoding, which release the GIL) overlaps the device step. The batches are the
  batcher's, pure functions of the step: to resume at step k make a new Prefetcher(batcher, k); there
  is no state to checkpoint. An error raised while reading is raised again by `next()`. Close it (or
  use it in a `with` block) to stop the thread.
  """

  def __init__(self, batcher, start_step: int, depth: int = 2):
    if depth < 1:
      raise ValueError(f'depth={depth}: must be at least 1')
    self.batcher = batcher
    self.start_step = int(start_step)
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._closed = False
    self._thread = threading.Thread(target=self._read, name='tract_jax-prefetch', daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)  # a timeout, so that close() is noticed
        return True
      except queue.Full:
        pass
    return False

  def _read(self):
    step = self.start_step
    try:
      while self._put((step, self.batcher.batch(step), None)):
        step += 1
    except BaseException as e:  # handed to the consumer, which raises it
      self._put((step, None, e))

  def next(self):
    """(step, batch) for the next step."""
    if self._closed:
      raise RuntimeError('Prefetcher is closed')
    step, batch, error = self._queue.get()
    if error is not None:
      self.close()
      raise error
    return step, batch

  def __next__(self):
    return self.next()

  def __iter__(self):
    return self

  def close(self):
    self._closed = True
    self._stop.set()
    try:
      while True:
        self._queue.get_nowait()
    except queue.Empty:
      pass
    self._thread.join(timeout=10)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def load_source(data_config):
  """The source data.name names: the embedded digits, or a TFDS train split from data.data_dir."""
  name = data_config.name
  if name == 'digits':
    return load_digits()
  if name in TFDS_NAMES:
    return load_tfds(name, data_config.get('data_dir') or None)
  raise ConfigError(f'data.name={name!r}: allowed values are {DATASETS}')


def make_batcher(data_config, global_batch: int, seed: int, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> StepBatcher:
  import jax  # only for the process layout
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  return StepBatcher(load_source(data_config), global_batch, seed, process_index, process_count)
