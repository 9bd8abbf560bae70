"""Input pipelines: the sources (embedded digits, TFDS offline via tfds.testing.mock_data and real
array_record files written here without TensorFlow, 'tfds:NAME', image folders, .npz files), the
image_size resize, the missing-dataset and bad-data errors, the one-line data.name error, and the
grain pipeline: batches a pure function of (seed, step), bit-exact resume, the process split,
deterministic flips, errors re-raised, one run with a worker process.

Nothing here may reach a real download (one stalls about 205 s on this machine): every TFDS test
runs with download_and_prepare and the download manager patched to fail. No JAX compile.
"""
import os
import sys
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from tract_jax import data
from tract_jax.errors import ConfigError

tfds = pytest.importorskip('tensorflow_datasets')


@pytest.fixture
def no_download(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('the input pipeline tried to download')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fail)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download', fail)


def data_config(name, data_dir='', image_size=0):
  return ml_collections.ConfigDict({'name': str(name), 'data_dir': str(data_dir),
                                    'image_size': image_size, 'random_flip': True})


def fake_source(n=24, num_classes=3, width=2):
  """Example i is an image full of level i (so a batch tells which examples it holds)."""
  images = (np.arange(n)[:, None, None, None] * np.ones((1, 2, width, 1))).astype(np.uint8)
  return data.ArraySource(images, np.arange(n) % num_classes, float(n - 1), num_classes, 'fake')


def indices_of(uint8_batch):
  return uint8_batch['image'][:, 0, 0, 0].astype(int)


def read(pipeline, count):
  return [next(pipeline) for _ in range(count)]


def assert_batches_equal(a, b):
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], b['label'])


# ---------------------------------------------------------------------------------------------------
# Digits, data.name.
# ---------------------------------------------------------------------------------------------------
def test_digits_source():
  source = data.load_digits()
  assert len(source) == 1797 and source.image_shape == (8, 8, 1) and source.num_classes == 10
  batch = source.get(np.arange(len(source)))
  assert batch['image'].shape == (1797, 8, 8, 1) and batch['image'].dtype == np.float32
  assert batch['image'].min() == -1.0 and batch['image'].max() == 1.0
  assert batch['label'].dtype == np.int32 and set(batch['label'].tolist()) == set(range(10))
  example = source[5]
  assert example['image'].dtype == np.uint8 and example['image'].shape == (8, 8, 1)
  np.testing.assert_array_equal(example['image'].astype(np.float32) / 8 - 1, batch['image'][5])


@pytest.mark.parametrize('name,reason', [('mnist', 'unknown dataset'),
                                         ('/no/such/folder', 'no such directory'),
                                         ('missing.npz', 'no such .npz file'),
                                         ('tfds:', 'the TFDS name after')])
def test_bad_name_is_one_line_listing_what_is_allowed(name, reason):
  for check in (data.check_name, lambda n: data.load_source(data_config(n))):
    with pytest.raises(ConfigError) as error:
      check(name)
    message = str(error.value)
    assert '\n' not in message and message.startswith(f'data.name={name!r}: {reason}')
    for allowed in ("'digits'", "'cifar10'", "'imagenet64'", "'tfds:NAME'", 'directory', '.npz'):
      assert allowed in message, allowed
  assert data.describe_allowed() in message


def test_a_file_that_is_not_npz(tmp_path):
  (tmp_path / 'images.tar').write_bytes(b'')
  with pytest.raises(ConfigError, match=r"images.tar': a file, but not an .npz file; allowed"):
    data.check_name(str(tmp_path / 'images.tar'))


def test_good_names_pass_the_cheap_check(tmp_path):
  np.savez(tmp_path / 'x.npz', images=np.zeros((2, 4, 4), np.uint8))
  for name in ('digits', 'cifar10', 'imagenet64', 'tfds:mnist', 'tfds:lsun/church_outdoor:3.1.0',
               str(tmp_path), str(tmp_path / 'x.npz')):
    data.check_name(name)
  assert data.DATASETS == ('digits', 'cifar10', 'imagenet64')


# ---------------------------------------------------------------------------------------------------
# Image folders and .npz files.
# ---------------------------------------------------------------------------------------------------
def write_images(directory, images, fmt='png'):
  os.makedirs(directory, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
        os.path.join(directory, f'{i:03d}.{fmt}'))


def test_folder_unlabelled_and_one_subfolder_per_class(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
  write_images(tmp_path / 'flat', images)
  (tmp_path / 'flat' / 'notes.txt').write_text('not an image')
  source = data.load_source(data_config(tmp_path / 'flat'))
  assert len(source) == 10 and source.image_shape == (8, 8, 3) and source.num_classes == 0
  batch = source.get(np.arange(10))
  np.testing.assert_array_equal(batch['image'], images.astype(np.float32) / 127.5 - 1.0)
  np.testing.assert_array_equal(batch['label'], np.zeros(10))

  # Classes in sorted order of the sub-folder names, whatever order they were written in.
  grey = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
  write_images(tmp_path / 'classes' / 'zebra', grey[:2])
  write_images(tmp_path / 'classes' / 'ant', grey[2:5])
  write_images(tmp_path / 'classes' / 'cat', grey[5:])
  source = data.load_source(data_config(tmp_path / 'classes'))
  assert source.num_classes == 3 and source.image_shape == (8, 8, 1) and len(source) == 6
  batch = source.get(np.arange(6))
  np.testing.assert_array_equal(batch['label'], [0, 0, 0, 1, 2, 2])  # ant, cat, zebra
  np.testing.assert_array_equal(batch['image'][4:5],
                                grey[:1].astype(np.float32) / 127.5 - 1.0)  # zebra/000.png

  write_images(tmp_path / 'classes', grey[:1])  # an image next to the class folders
  with pytest.raises(ConfigError, match='both image files .* and sub-folders'):
    data.load_source(data_config(tmp_path / 'classes'))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(ConfigError, match='no .png/.jpg/.jpeg files'):
    data.load_source(data_config(tmp_path / 'empty'))


def test_folder_sizes_must_agree_unless_resized(tmp_path):
  write_images(tmp_path, [np.zeros((8, 8, 3), np.uint8)] * 3 + [np.zeros((8, 12, 3), np.uint8)],
               fmt='jpg')
  with pytest.raises(ConfigError,
                     match=r'example 3 .*\(8, 12, 3\), expected \(8, 8, 3\).*image_size'):
    data.load_source(data_config(tmp_path))
  source = data.load_source(data_config(tmp_path, image_size=4))
  assert source.image_shape == (4, 4, 3) and source.get([3])['image'].shape == (1, 4, 4, 3)


def test_npz(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (10, 8, 8), dtype=np.uint8)
  np.savez(tmp_path / 'grey.npz', images=images, labels=np.arange(10) % 4)
  source = data.load_source(data_config(tmp_path / 'grey.npz'))
  assert source.image_shape == (8, 8, 1) and source.num_classes == 4 and len(source) == 10
  batch = source.get([9, 0])
  np.testing.assert_array_equal(batch['image'][..., 0], images[[9, 0]] / np.float32(127.5) - 1)
  np.testing.assert_array_equal(batch['label'], [1, 0])

  np.savez(tmp_path / 'rgb.npz', images=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
  source = data.load_source(data_config(tmp_path / 'rgb.npz'))
  assert source.image_shape == (8, 8, 3) and source.num_classes == 0
  assert source.get([3])['label'].tolist() == [0]

  for name, arrays, expected in [
      ('float.npz', {'images': np.zeros((2, 4, 4), np.float32)}, r"'images' is float32 .*uint8"),
      ('rgba.npz', {'images': np.zeros((2, 4, 4, 4), np.uint8)}, r'C = 1 or 3'),
      ('other.npz', {'pixels': np.zeros((2, 4, 4), np.uint8)}, r"holds \['pixels'\]"),
      ('labels.npz', {'images': np.zeros((2, 4, 4), np.uint8), 'labels': np.array([0, -1])},
       r"'labels' is int64 \(2,\), expected non-negative")]:
    np.savez(tmp_path / name, **arrays)
    with pytest.raises(ConfigError, match=expected):
      data.load_source(data_config(tmp_path / name))


# ---------------------------------------------------------------------------------------------------
# image_size.
# ---------------------------------------------------------------------------------------------------
def test_fit_square_resizes_the_shorter_side_bicubic_then_crops_the_centre():
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
  out = data.fit_square(image, 6)
  reference = np.asarray(Image.fromarray(image).resize((10, 6), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(out, reference[:, 2:8])
  tall = rng.integers(0, 256, (9, 4, 1), dtype=np.uint8)
  np.testing.assert_array_equal(data.fit_square(tall, 4), tall[2:6])  # crop only
  assert data.fit_square(image, 0) is image
  square = image[:6, :6]
  assert data.fit_square(square, 6) is square  # already the size: untouched
  assert data.fit_square(square, 16).shape == (16, 16, 3)  # up-sampling works too


def test_image_size_on_digits_keeps_their_levels():
  source = data.load_source(ml_collections.ConfigDict({'name': 'digits', 'image_size': 16}))
  assert source.image_shape == (16, 16, 1)
  batch = source.get(np.arange(50))
  assert batch['image'].shape == (50, 16, 16, 1)
  assert batch['image'].min() == -1.0 and batch['image'].max() == 1.0  # bicubic overshoot clipped


# ---------------------------------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------------------------------
def test_a_batch_is_a_function_of_seed_and_step():
  source = data.load_digits()
  for step in (5, 0, 5, 400):  # any order, across epochs (1797 / 16 steps per epoch)
    assert_batches_equal(data.batch_at(source, 16, 3, step), data.batch_at(source, 16, 3, step))
  first = data.step_dataset(source, 16, 3)[0]
  assert not np.array_equal(first['image'], data.step_dataset(source, 16, 4)[0]['image'])
  assert not np.array_equal(first['image'], data.step_dataset(source, 16, 3)[1]['image'])


@pytest.mark.parametrize('batch_size', [8, 5])  # 8 divides the 24 examples, 5 straddles epochs
def test_each_epoch_visits_every_example_once(batch_size):
  steps = data.step_dataset(fake_source(24), batch_size, seed=0)
  rows = np.concatenate([indices_of(steps[s]) for s in range(-(-3 * 24 // batch_size))])
  epochs = [rows[e * 24:(e + 1) * 24] for e in range(3)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(24))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch


def test_process_slices_partition_the_global_batch():
  source = fake_source(24, width=3)
  whole = data.step_dataset(source, 16, 1, random_flip=True)
  for step in (0, 7, 113):
    parts = [data.step_dataset(source, 16, 1, process_index=p, process_count=4,
                               random_flip=True)[step] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]),
                                  whole[step]['image'])
  with pytest.raises(ConfigError, match='divisible'):
    data.step_dataset(source, 10, 0, process_index=0, process_count=4)
  # Two processes' pipelines, with flips, read the 1-process global batches.
  with data.make_pipeline(source, 8, 5, 3, random_flip=True) as single:
    expected = read(single, 4)
  for p in range(2):
    with data.make_pipeline(source, 8, 5, 3, process_index=p, process_count=2,
                            random_flip=True) as local:
      for (step, batch), (expected_step, full) in zip(read(local, 4), expected):
        assert step == expected_step
        assert_batches_equal(batch, {k: v[p * 4:(p + 1) * 4] for k, v in full.items()})


def test_resume_at_any_step_is_bit_exact():
  source = data.load_digits()
  with data.make_pipeline(source, 64, 2, 0, random_flip=True, prefetch=3) as pipeline:
    uninterrupted = read(pipeline, 31)  # 28.1 steps per epoch: crosses the first boundary
  assert [step for step, _ in uninterrupted] == list(range(31))
  for start in (27, 29):
    with data.make_pipeline(source, 64, 2, start, random_flip=True, prefetch=0) as resumed:
      for (step, batch), (expected_step, expected) in zip(read(resumed, 2),
                                                          uninterrupted[start:]):
        assert step == expected_step
        assert_batches_equal(batch, expected)
    assert_batches_equal(data.batch_at(source, 64, 2, start, random_flip=True),
                         uninterrupted[start][1])
  batch = uninterrupted[0][1]
  assert batch['image'].dtype == np.float32 and batch['image'].shape == (64, 8, 8, 1)
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (64,)
  with pytest.raises(RuntimeError, match='closed'):
    next(pipeline)


def test_flips_are_deterministic_per_position_and_about_half():
  source = fake_source(24, width=3)
  source.images[:, :, 0] = 0  # left column dark, the rest at the example's level: flips show
  plain = data.step_dataset(source, 24, 7)
  flipped = data.step_dataset(source, 24, 7, random_flip=True)
  again = data.step_dataset(source, 24, 7, random_flip=True)
  flips, visible = 0, 0
  for step in range(4):  # 4 epochs of 24
    a, b = plain[step]['image'], flipped[step]['image']
    np.testing.assert_array_equal(b, again[step]['image'])
    same = np.all(b == a, axis=(1, 2, 3))
    mirrored = np.all(b == a[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)  # each example as it is or mirrored, labels untouched
    np.testing.assert_array_equal(plain[step]['label'], flipped[step]['label'])
    shows = ~np.all(a == a[:, :, ::-1], axis=(1, 2, 3))  # example 0 is all dark
    flips, visible = flips + int((mirrored & shows).sum()), visible + int(shows.sum())
  assert 0.3 < flips / visible < 0.7
  other_seed = data.step_dataset(source, 24, 8, random_flip=True)[0]['image']
  assert not np.array_equal(other_seed, b)


def records(n=20, shape=(4, 4, 3), dtype=np.uint8, **bad):
  """n good examples; bad={index: image or (image, label)} replaces some."""
  out = [{'image': np.full(shape, i, dtype), 'label': i % 10} for i in range(n)]
  for key, value in bad.items():
    index = int(key[1:])
    image, label = value if isinstance(value, tuple) else (value, out[index]['label'])
    out[index] = {'image': image, 'label': label}
  return out


def test_pipeline_reraises_reading_errors():
  source = data.TfdsSource(records(n=40, i30=np.zeros((4, 4, 1), np.uint8)), 'fake', 10)
  steps = data.step_dataset(source, 4, 0)
  bad_step = next(s for s in range(10) if _holds(steps, s, 30))
  pipeline = data.make_pipeline(source, 4, 0, 0)
  for step in range(bad_step):
    assert next(pipeline)[0] == step
  with pytest.raises(ConfigError, match='example 30'):
    next(pipeline)
  with pytest.raises(RuntimeError, match='closed'):
    next(pipeline)
  with pytest.raises(ConfigError, match='must be >= 0'):
    data.make_pipeline(source, 4, 0, 0, prefetch=-1)


def _holds(steps, step, index):
  """Whether the batch of `step` reads example `index` (read its rows' indices, not its images)."""
  try:
    steps[step]
  except ConfigError as e:
    return f'example {index} ' in str(e)
  return False


# ---------------------------------------------------------------------------------------------------
# TFDS, offline.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name,shape,num_classes,image_size', [
    ('cifar10', (32, 32, 3), 10, 0), ('imagenet64', (64, 64, 3), 1000, 0),
    ('tfds:mnist', (28, 28, 1), 10, 0),
    ('tfds:celeb_a', (16, 16, 3), 0, 16)])  # 218x178 faces, no 'label' feature: unlabelled
def test_tfds_mock_data(name, shape, num_classes, image_size, monkeypatch):
  # mock_data points every builder at a non-existing data_dir, so the "is it prepared?" check
  # (tested below on real files) would refuse it: skip only that check.
  monkeypatch.setattr(data.tfds_source, '_check_prepared', lambda *args: None)
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    source = data.load_source(data_config(name, image_size=image_size))
    assert len(source) == 20 and source.image_shape == shape
    assert source.num_classes == num_classes
    layout = dict(process_index=1, process_count=2, random_flip=True)
    batch = data.batch_at(source, 8, 0, 3, **layout)
    with data.make_pipeline(source, 8, 0, 3, **layout) as pipeline:
      step, again = next(pipeline)
  assert step == 3
  assert batch['image'].shape == (4,) + shape and batch['image'].dtype == np.float32
  assert -1.0 <= batch['image'].min() < batch['image'].max() <= 1.0
  assert batch['label'].dtype == np.int32
  if num_classes:
    assert ((batch['label'] >= 0) & (batch['label'] < num_classes)).all()
  else:
    assert not batch['label'].any()
  assert_batches_equal(batch, again)
  assert 'tensorflow' not in sys.modules


def test_unknown_tfds_name(no_download):
  with pytest.raises(ConfigError, match=r"data.name='tfds:no_such_set': TFDS cannot build "
                                        r"'no_such_set': Dataset no_such_set not found\.$"):
    data.load_source(data_config('tfds:no_such_set'))


def write_array_record_dataset(data_dir, tfds_name, images, labels):
  """A prepared TFDS train split as download_and_prepare(file_format='array_record') lays it out,
  written without TensorFlow (the same writer benchmarks/input_pipeline.py uses)."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  'benchmarks'))
  import input_pipeline  # noqa: E402  (benchmarks/input_pipeline.py)
  input_pipeline.write_tfds_split(str(data_dir), tfds_name, images, labels)


@pytest.mark.parametrize('name,shape,labels', [('cifar10', (32, 32, 3), [3, 0, 9, 1, 5]),
                                               ('imagenet64', (64, 64, 3), [999, 0, 5])])
def test_tfds_real_files(name, shape, labels, tmp_path, no_download):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (len(labels),) + shape, dtype=np.uint8)
  images[0, 0, 0] = (0, 255, 7)  # both ends of the range
  write_array_record_dataset(tmp_path, data.TFDS_NAMES[name], images, labels)
  for data_name in (name, 'tfds:' + data.TFDS_NAMES[name]):
    source = data.load_source(data_config(data_name, tmp_path))
    assert len(source) == len(labels) and source.image_shape == shape
    batch = source.get(np.arange(len(labels))[::-1])
    np.testing.assert_array_equal(batch['image'], images[::-1].astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(batch['label'], labels[::-1])
    assert batch['image'][-1, 0, 0].tolist() == [-1.0, 1.0, np.float32(7) / 127.5 - 1.0]
  assert 'tensorflow' not in sys.modules


@pytest.mark.slow
def test_a_worker_process_reads_the_same_batches_and_reports_errors(tmp_path, no_download):
  """One spawned worker over real array_record files (the TFDS source pickled into it): the same
  batches as in-process reading, then the error of a bad example from the worker, with its type."""
  rng = np.random.default_rng(3)
  images = list(rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
  images[18] = np.zeros((16, 16, 3), np.uint8)  # after the first batch the source checks at open
  write_array_record_dataset(tmp_path, 'cifar10', images, np.arange(20) % 10)
  source = data.load_source(data_config('cifar10', tmp_path))
  steps = data.step_dataset(source, 4, 0, random_flip=True)
  bad_step = next(s for s in range(5) if _holds(steps, s, 18))
  assert bad_step > 0
  with data.make_pipeline(source, 4, 0, 0, random_flip=True) as in_process:
    expected = read(in_process, bad_step)
  start = time.perf_counter()
  with data.make_pipeline(source, 4, 0, 0, random_flip=True, workers=1) as pipeline:
    for (step, batch), (expected_step, expected_batch) in zip(read(pipeline, bad_step), expected):
      assert step == expected_step
      assert_batches_equal(batch, expected_batch)
    with pytest.raises(ConfigError, match=r'example 18 .*\(16, 16, 3\), expected \(32, 32, 3\)'):
      next(pipeline)
  assert time.perf_counter() - start < 30


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
def test_tfds_source_accepts_good_records():
  source = data.TfdsSource(records(), 'fake', 10)
  assert source.image_shape == (4, 4, 3) and len(source) == 20
  batch = source.get(np.array([0, 19]))
  assert batch['image'].dtype == np.float32 and batch['image'][0].max() == -1.0
  assert data.TfdsSource(records(shape=(2, 3, 1)), 'fake', 10).image_shape == (2, 3, 1)
  unlabelled = data.TfdsSource([{'image': r['image']} for r in records()], 'fake', 0)
  assert unlabelled.num_classes == 0 and unlabelled.get([3])['label'].tolist() == [0]


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
  with pytest.raises(ConfigError, match=r'example 30 .*\(4, 4, 1\), expected \(4, 4, 3\)'):
    data.batch_at(source, 40, 0, 0)
  with pytest.raises(ConfigError, match=r"example 0 has features \['image'\], expected"):
    data.TfdsSource([{'image': np.zeros((4, 4, 3), np.uint8)}], 'fake', 10)
  with pytest.raises(ConfigError, match=r'example 0 .*\(4, 4, 3\), expected \(32, 32, 3\) as the'):
    data.TfdsSource(records(), 'fake', 10, expected_shape=(32, 32, 3))
