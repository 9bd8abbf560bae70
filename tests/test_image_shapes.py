"""Image shapes come from the data (tract_jax.data.image_shape) or from a run's record, for every
data.name training accepts; no dataset table in the code."""
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from tract_jax import data, workdir
from tract_jax.errors import ConfigError


def _data(name, image_size=0):
  return ml_collections.ConfigDict({'name': str(name), 'data_dir': '', 'image_size': image_size})


def test_tfds_names_answer_from_their_dataset_info_without_data():
  assert data.image_shape(_data('tfds:mnist')) == (28, 28, 1)
  assert data.image_shape(_data('tfds:mnist', image_size=16)) == (16, 16, 1)
  assert data.image_shape(_data('imagenet64')) == (64, 64, 3)
  with pytest.raises(ConfigError, match='images vary in size') as info:
    data.image_shape(_data('tfds:lsun/church_outdoor'))
  assert '\n' not in str(info.value)
  assert data.image_shape(_data('tfds:lsun/church_outdoor', image_size=64)) == (64, 64, 3)


def test_folders_npz_files_and_the_digits_answer_from_the_source(tmp_path):
  np.savez(tmp_path / 'grey.npz', images=np.zeros((4, 12, 10), np.uint8))
  assert data.image_shape(_data(tmp_path / 'grey.npz')) == (12, 10, 1)
  assert data.image_shape(_data(tmp_path / 'grey.npz', image_size=8)) == (8, 8, 1)
  folder = tmp_path / 'folder'
  folder.mkdir()
  Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(folder / 'a.png')
  assert data.image_shape(_data(folder)) == (6, 5, 3)
  assert data.image_shape(_data('digits')) == (8, 8, 1)


def test_a_run_records_its_image_shape(tmp_path):
  config = tiny_config()
  workdir.record_config(config, tmp_path, (12, 12, 3))
  record = json.loads((tmp_path / 'config.json').read_text())
  assert record['image_shape'] == [12, 12, 3] and record['method'] == 'tract'
  (tmp_path / 'teacher' / 'ema_params').mkdir(parents=True)
  for path in (tmp_path, tmp_path / 'phase_0_ema', tmp_path / 'teacher' / 'ema_params'):
    assert workdir.recorded_image_shape(path) == (12, 12, 3)
  assert workdir.recorded_image_shape(tmp_path / 'teacher' / 'ema_params' / 'x' / 'y') is None
  workdir.protect(config, tmp_path)  # the record is not a configuration difference
