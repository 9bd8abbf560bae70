"""Input pipelines: the embedded digits, StepBatcher determinism and process slicing, the TFDS path
(offline: tfds.testing.mock_data, and real array_record files written here without TensorFlow), the
missing-dataset and bad-data errors, and the prefetcher.

Nothing here may reach a real download (one stalls about 205 s on this machine): every TFDS test
runs with download_and_prepare and the download manager patched to fail.
"""
import io
import os
import sys
import time

import ml_collections
import numpy as np
import pytest

from tract_jax import data
from tract_jax.phases import ConfigError

tfds = pytest.importorskip('tensorflow_datasets')


@pytest.fixture
def no_download(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('the input pipeline tried to download')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fail)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download', fail)


def data_config(name, data_dir=''):
  return ml_collections.ConfigDict({'name': name, 'data_dir': str(data_dir), 'random_flip': True})


def fake_source(n=24, num_classes=3):
  images = (np.arange(n)[:, None, None, None] * np.ones((1, 2, 2, 1))).astype(np.uint8)
  return data.ArraySource(images, np.arange(n) % num_classes, float(n - 1), num_classes, 'fake')


# ---------------------------------------------------------------------------------------------------
# Digits and StepBatcher.
# ---------------------------------------------------------------------------------------------------
def test_digits_source():
  source = data.load_digits()
  assert len(source) == 1797 and source.image_shape == (8, 8, 1) and source.num_classes == 10
  batch = source.get(np.arange(len(source)))
  assert batch['image'].shape == (1797, 8, 8, 1) and batch['image'].dtype == np.float32
  assert batch['image'].min() == -1.0 and batch['image'].max() == 1.0
  assert batch['label'].dtype == np.int32 and set(batch['label'].tolist()) == set(range(10))


def test_batcher_is_a_function_of_seed_and_step():
  source = data.load_digits()
  a, b = data.StepBatcher(source, 16, seed=3), data.StepBatcher(source, 16, seed=3)
  for step in (5, 0, 5, 400):  # any order, across epochs (1797 / 16 steps per epoch)
    np.testing.assert_array_equal(a.batch(step)['image'], b.batch(step)['image'])
    np.testing.assert_array_equal(a.batch(step)['label'], b.batch(step)['label'])
  other = data.StepBatcher(source, 16, seed=4)
  assert not np.array_equal(a.indices(0), other.indices(0))
  assert not np.array_equal(a.indices(0), a.indices(1))


@pytest.mark.parametrize('batch_size', [8, 5])  # 8 divides the 24 examples, 5 straddles epochs
def test_each_epoch_visits_every_example_once(batch_size):
  batcher = data.StepBatcher(fake_source(24), batch_size, seed=0)
  rows = np.concatenate([batcher.indices(step) for step in range(-(-3 * 24 // batch_size))])
  epochs = [rows[e * 24:(e + 1) * 24] for e in range(3)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(24))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch


def test_process_slices_partition_the_global_batch():
  source = data.load_digits()
  whole = data.StepBatcher(source, 16, seed=1)
  for step in (0, 7, 113):  # 113 straddles the first epoch boundary
    parts = [data.StepBatcher(source, 16, 1, p, 4).indices(step) for p in range(4)]
    assert len(set(np.concatenate(parts).tolist())) == 16
    np.testing.assert_array_equal(np.concatenate(parts), whole.indices(step))
    images = [data.StepBatcher(source, 16, 1, p, 4).batch(step)['image'] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(images), whole.batch(step)['image'])
  with pytest.raises(ConfigError, match='divisible'):
    data.StepBatcher(source, 10, 0, 0, 4)


def test_unknown_dataset_name():
  with pytest.raises(ConfigError, match='imagenet64'):
    data.load_source(data_config('mnist'))


# ---------------------------------------------------------------------------------------------------
# TFDS, offline.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name,shape,num_classes', [('cifar10', (32, 32, 3), 10),
                                                    ('imagenet64', (64, 64, 3), 1000)])
def test_tfds_mock_data(name, shape, num_classes, monkeypatch):
  # mock_data points every builder at a non-existing data_dir, so the "is it prepared?" check
  # (tested below on real files) would refuse it: skip only that check.
  monkeypatch.setattr(data, '_check_prepared', lambda *args: None)
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    source = data.load_source(data_config(name))
    assert len(source) == 20 and source.image_shape == shape
    assert source.num_classes == num_classes
    batch = data.StepBatcher(source, 8, seed=0, process_index=1, process_count=2).batch(3)
    again = data.StepBatcher(source, 8, seed=0, process_index=1, process_count=2).batch(3)
  assert batch['image'].shape == (4,) + shape and batch['image'].dtype == np.float32
  assert -1.0 <= batch['image'].min() < batch['image'].max() <= 1.0
  assert batch['label'].dtype == np.int32
  assert ((batch['label'] >= 0) & (batch['label'] < num_classes)).all()
  np.testing.assert_array_equal(batch['image'], again['image'])
  assert 'tensorflow' not in sys.modules


def write_array_record_dataset(data_dir, tfds_name, images, labels):
  """Writes a prepared TFDS train split the way download_and_prepare(file_format='array_record')
  lays it out (PNG-encoded tf.train.Example records + metadata), without TensorFlow."""
  from array_record.python import array_record_module
  from PIL import Image
  from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

  builder = tfds.builder(tfds_name, data_dir=data_dir, file_format='array_record')
  path = os.fspath(builder.data_path)
  os.makedirs(path, exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(
      os.path.join(path, f'{builder.name}-train.array_record-00000-of-00001'), 'group_size:1')
  num_bytes = 0
  for i, (image, label) in enumerate(zip(images, labels)):
    png = io.BytesIO()
    Image.fromarray(image).save(png, format='PNG')
    feature = {'image': tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(
                   value=[png.getvalue()])),
               'label': tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(
                   value=[int(label)]))}
    if 'id' in builder.info.features:
      feature['id'] = tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(
          value=[f'train_{i}'.encode()]))
    record = tf_example_pb2.Example(
        features=tf_feature_pb2.Features(feature=feature)).SerializeToString()
    num_bytes += len(record)
    writer.write(record)
  writer.close()
  template = tfds.core.ShardedFileTemplate(data_dir=path, dataset_name=builder.name, split='train',
                                           filetype_suffix='array_record')
  builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name='train', shard_lengths=[len(images)], num_bytes=num_bytes, filename_template=template)]))
  builder.info.write_to_directory(path)


@pytest.mark.parametrize('name,shape,labels', [('cifar10', (32, 32, 3), [3, 0, 9, 1, 5]),
                                               ('imagenet64', (64, 64, 3), [999, 0, 5])])
def test_tfds_real_files(name, shape, labels, tmp_path, no_download):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (len(labels),) + shape, dtype=np.uint8)
  images[0, 0, 0] = (0, 255, 7)  # both ends of the range
  write_array_record_dataset(tmp_path, data.TFDS_NAMES[name], images, labels)
  source = data.load_source(data_config(name, tmp_path))
  assert len(source) == len(labels) and source.image_shape == shape
  batch = source.get(np.arange(len(labels))[::-1])
  np.testing.assert_array_equal(batch['image'], images[::-1].astype(np.float32) / 127.5 - 1.0)
  np.testing.assert_array_equal(batch['label'], labels[::-1])
  assert batch['image'][-1, 0, 0].tolist() == [-1.0, 1.0, np.float32(7) / 127.5 - 1.0]
  assert 'tensorflow' not in sys.modules


@pytest.mark.parametrize('name', ['cifar10', 'imagenet64'])
def test_missing_dataset_fails_fast_with_instructions(name, tmp_path, no_download):
  start = time.perf_counter()
  with pytest.raises(ConfigError) as error:
    data.load_source(data_config(name, tmp_path))
  assert time.perf_counter() - start < 10
  message = str(error.value)
  tfds_name = data.TFDS_NAMES[name]
  for piece in (f'data.name={name!r}', str(tmp_path), tfds_name, 'never downloads',
                'pip install tensorflow-cpu', f"tfds.builder('{tfds_name}', data_dir='{tmp_path}', "
                "file_format='array_record').download_and_prepare()", 'copy'):
    assert piece in message, piece
  assert os.listdir(tmp_path) == []  # nothing written either


def test_prepared_in_the_wrong_format_or_without_train_split(tmp_path, no_download):
  # Metadata only, as an interrupted or TFRecord preparation would leave it.
  for file_format in ('tfrecord', 'array_record'):
    builder = tfds.builder('cifar10', data_dir=tmp_path / file_format, file_format=file_format)
    os.makedirs(builder.data_path)
    builder.info.write_to_directory(builder.data_path)
  with pytest.raises(ConfigError, match=r"tfrecord.*array_record.*convert_format"):
    data.load_source(data_config('cifar10', tmp_path / 'tfrecord'))
  with pytest.raises(ConfigError, match='no train split'):
    data.load_source(data_config('cifar10', tmp_path / 'array_record'))


# ---------------------------------------------------------------------------------------------------
# Bad data.
# ---------------------------------------------------------------------------------------------------
def records(n=20, shape=(4, 4, 3), dtype=np.uint8, **bad):
  """n good examples; bad={index: image or (image, label)} replaces some."""
  out = [{'image': np.full(shape, i, dtype), 'label': i % 10} for i in range(n)]
  for key, value in bad.items():
    index = int(key[1:])
    image, label = value if isinstance(value, tuple) else (value, out[index]['label'])
    out[index] = {'image': image, 'label': label}
  return out


def test_tfds_source_accepts_good_records():
  source = data.TfdsSource(records(), 'fake', 10)
  assert source.image_shape == (4, 4, 3) and len(source) == 20
  batch = source.get(np.array([0, 19]))
  assert batch['image'].dtype == np.float32 and batch['image'][0].max() == -1.0
  assert data.TfdsSource(records(shape=(2, 3, 1)), 'fake', 10).image_shape == (2, 3, 1)


@pytest.mark.parametrize('bad,expected', [
    ({'i0': np.zeros((4, 4), np.uint8)}, r'example 0 has image shape \(4, 4\), expected \(H, W, C\)'),
    ({'i3': np.zeros((4, 4, 2), np.uint8)}, r'example 3 .*\(4, 4, 2\), expected \(H, W, C\) with C'),
    ({'i5': np.zeros((8, 8, 3), np.uint8)}, r'example 5 .*\(8, 8, 3\), expected \(4, 4, 3\) like'),
    ({'i2': np.full((4, 4, 3), 0.5, np.float32)},
     r'example 2 has image dtype float32 with values in \[0.5, 0.5\], expected uint8 in 0..255'),
    ({'i7': np.full((4, 4, 3), 300, np.int16)}, r'example 7 .*int16 .*\[300, 300\].*uint8'),
    ({'i4': (np.zeros((4, 4, 3), np.uint8), 10)}, r'example 4 has label 10, expected .* 0..9'),
    ({'i6': (np.zeros((4, 4, 3), np.uint8), 'cat')}, r"example 6 has label 'cat'"),
])
def test_bad_first_batch(bad, expected):
  with pytest.raises(ConfigError, match=r"data.name='fake': " + expected):
    data.TfdsSource(records(**bad), 'fake', 10)


def test_bad_examples_later_on():
  source = data.TfdsSource(records(n=40, i30=np.zeros((4, 4, 1), np.uint8)), 'fake', 10)
  batcher = data.StepBatcher(source, 40, seed=0)
  with pytest.raises(ConfigError, match=r'example 30 .*\(4, 4, 1\), expected \(4, 4, 3\)'):
    batcher.batch(0)
  with pytest.raises(ConfigError, match=r"example 0 has features \['image'\], expected"):
    data.TfdsSource([{'image': np.zeros((4, 4, 3), np.uint8)}], 'fake', 10)
  with pytest.raises(ConfigError, match=r'example 0 .*\(4, 4, 3\), expected \(32, 32, 3\) as the'):
    data.TfdsSource(records(), 'fake', 10, expected_shape=(32, 32, 3))


# ---------------------------------------------------------------------------------------------------
# Prefetcher.
# ---------------------------------------------------------------------------------------------------
def test_prefetcher_matches_direct_reads_and_restarts_anywhere():
  batcher = data.StepBatcher(data.load_digits(), 64, seed=2)
  for start in (0, 27):  # 27 straddles the first epoch boundary (1797 / 64 = 28.1 steps)
    with data.Prefetcher(batcher, start, depth=3) as prefetcher:
      for expected_step in range(start, start + 5):
        step, batch = prefetcher.next()
        assert step == expected_step
        direct = data.StepBatcher(data.load_digits(), 64, seed=2).batch(step)
        np.testing.assert_array_equal(batch['image'], direct['image'])
        np.testing.assert_array_equal(batch['label'], direct['label'])
    assert not prefetcher._thread.is_alive()
    with pytest.raises(RuntimeError, match='closed'):
      prefetcher.next()


def test_prefetcher_reraises_reading_errors():
  source = data.TfdsSource(records(n=40, i30=np.zeros((4, 4, 1), np.uint8)), 'fake', 10)
  batcher = data.StepBatcher(source, 4, seed=0)
  bad_step = next(s for s in range(10) if 30 in batcher.indices(s))
  prefetcher = data.Prefetcher(batcher, 0)
  for step in range(bad_step):
    assert prefetcher.next()[0] == step
  with pytest.raises(ConfigError, match='example 30'):
    prefetcher.next()
  assert not prefetcher._thread.is_alive()
  with pytest.raises(ValueError, match='depth'):
    data.Prefetcher(batcher, 0, depth=0)
