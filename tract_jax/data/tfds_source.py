"""TFDS datasets read with `tfds.data_source` (random access over array_record files), without
TensorFlow and without downloading: a dataset that is not prepared in data.data_dir is a ConfigError
that says how to prepare it elsewhere."""
import os
import sys
from typing import Optional

import numpy as np

from tract_jax.data.names import TFDS_NAMES, TFDS_PREFIX
from tract_jax.data.sources import _ExampleSource
from tract_jax.errors import ConfigError


class TfdsSource(_ExampleSource):
  """A random-access TFDS split: `records[i]` is a dict {'image': uint8 (H, W, C), 'label': int}.

  `records` is what `tfds.data_source` returns (or any sequence of such dicts). Items are read one by
  one: `__getitems__` of the sources that `tfds.testing.mock_data` builds is broken, and the per-item
  cost is small next to the PNG decoding. Every image read is checked (shape, dtype) and every label
  (range); the first FIRST_BATCH_CHECKED examples are read when the source is opened. num_classes 0
  means unlabelled: 'label' is not read and every label is 0. `expected_shape` is the (H, W, C)
  that the TFDS features declare, when known (checked before resizing).
  """

  def __init__(self, records, name: str, num_classes: int,
               expected_shape: Optional[tuple] = None, image_size: int = 0):
    self.records = records
    self.name = name
    self.num_classes = int(num_classes)
    self.image_size = int(image_size)
    self.max_level = 255.0
    self._length = len(records)
    if not self._length:
      raise ConfigError(f'data.name={name!r}: the dataset has no examples')
    first = self._raw_image(0, self._record(0)['image'])
    if expected_shape is not None and None not in expected_shape and first.shape != tuple(
        expected_shape):
      raise ConfigError(f'data.name={name!r}: example 0 has image shape {first.shape}, expected '
                        f'{tuple(expected_shape)} as the TFDS features declare')
    self._open()

  def __len__(self):
    return self._length

  def _record(self, index: int):
    record = self.records[index]
    needed = ('image', 'label') if self.num_classes else ('image',)
    if any(key not in record for key in needed):
      raise ConfigError(f'data.name={self.name!r}: example {index} has features {sorted(record)}, '
                        f'expected {" and ".join(map(repr, needed))}')
    return record

  def _raw_image(self, index: int, image) -> np.ndarray:
    """Checks one decoded image: (H, W, C) with C in (1, 3), uint8."""
    image = np.asarray(image)
    where = f'data.name={self.name!r}: example {index}'
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
      raise ConfigError(f'{where} has image shape {image.shape}, expected (H, W, C) with C = 1 or 3')
    if image.dtype != np.uint8:
      values = (f' with values in [{image.min()}, {image.max()}]'
                if image.size and image.dtype.kind in 'biuf' else '')
      raise ConfigError(f'{where} has image dtype {image.dtype}{values}, expected uint8 in 0..255')
    return image

  def _label(self, index: int, label) -> np.int32:
    label = np.asarray(label)
    if label.ndim or label.dtype.kind not in 'iu' or not 0 <= int(label) < self.num_classes:
      raise ConfigError(f'data.name={self.name!r}: example {index} has label {label.tolist()!r}, '
                        f'expected an integer in 0..{self.num_classes - 1}')
    return np.int32(label)

  def _example(self, index: int):
    record = self._record(index)
    image = self._check_fitted(index, self._raw_image(index, record['image']))
    label = self._label(index, record['label']) if self.num_classes else np.int32(0)
    return {'image': image, 'label': label}


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


def hide_accelerators_from_tensorflow() -> None:
  """If something imported TensorFlow, keep it off the GPUs/TPUs that JAX uses."""
  tf = sys.modules.get('tensorflow')
  if tf is not None:
    try:
      tf.config.set_visible_devices([], 'GPU')
      tf.config.set_visible_devices([], 'TPU')
    except (RuntimeError, ValueError):  # already initialised, or no such device type
      pass


def _builder(name: str, data_dir: Optional[str]):
  """(TFDS name, tfds builder) of data.name `name`; reads metadata only, never downloads."""
  import tensorflow_datasets as tfds  # lazily: half a second, and 'digits' does not need it
  tfds_name = name[len(TFDS_PREFIX):] if name.startswith(TFDS_PREFIX) else TFDS_NAMES[name]
  try:
    return tfds_name, tfds.builder(tfds_name, data_dir=data_dir or None)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f'data.name={name!r}: TFDS cannot build {tfds_name!r}: {first_line}') from e


def _image_feature(name: str, tfds_name: str, builder):
  features = builder.info.features
  if 'image' not in features:
    raise ConfigError(f'data.name={name!r}: {tfds_name!r} has features {sorted(features)}, '
                      "expected an 'image'")
  return features['image']


def tfds_image_shape(name: str, data_dir: Optional[str] = None, image_size: int = 0) -> tuple:
  """(H, W, C) of the train images of data.name `name`, fitted to image_size, from the dataset's
  info: the registered builder declares its features whether or not the data is prepared here, so
  this needs no data. A dataset of varying image size (declared (None, None, C)) needs image_size,
  or its data prepared (then example 0 answers)."""
  tfds_name, builder = _builder(name, data_dir)
  height, width, channels = _image_feature(name, tfds_name, builder).shape
  if image_size:
    return (int(image_size), int(image_size), channels)
  if height is None or width is None:
    if builder.is_prepared():
      return load_tfds(name, data_dir).image_shape
    raise ConfigError(f'data.name={name!r}: {tfds_name!r} images vary in size and the dataset is '
                      'not prepared here; set data.image_size to fix one square size')
  return (height, width, channels)


def load_tfds(name: str, data_dir: Optional[str] = None, image_size: int = 0) -> TfdsSource:
  """The train split of data.name `name` ('cifar10', 'imagenet64' or 'tfds:NAME') from TFDS files
  in `data_dir`.

  Never downloads and never imports TensorFlow; raises ConfigError naming the directory when the
  dataset is missing.
  """
  import tensorflow_datasets as tfds
  data_dir = data_dir or None
  tfds_name, builder = _builder(name, data_dir)
  _check_prepared(name, tfds_name, builder, data_dir)
  image = _image_feature(name, tfds_name, builder)
  features = builder.info.features
  label = features['label'] if 'label' in features else None
  num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0
  try:
    records = tfds.data_source(tfds_name, split='train', data_dir=data_dir, download=False)
  except (KeyError, ValueError, NotImplementedError, OSError) as e:
    raise ConfigError(f'data.name={name!r}: TFDS could not open {tfds_name!r} in '
                      f'{os.fspath(builder.data_path)}: {e}') from e
  source = TfdsSource(records, name, num_classes, expected_shape=image.shape,
                      image_size=image_size)
  hide_accelerators_from_tensorflow()
  return source
