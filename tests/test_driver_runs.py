"""Slow tier: the driver in-process for the methods and model kinds the default tier's end-to-end
run (test_train.py, TRACT) does not cover: a class-conditional TRACT job (BTD's phases from the
session's teacher: test_multidevice.py, beside the same job on 8 devices)."""
import os

import numpy as np
import pytest

from conftest import tiny_config
from tract_jax import train

pytestmark = pytest.mark.slow


def test_class_conditional_tract_job(tmp_path):
  """A class-conditional 'both'-output UNet through the whole chained job. Such a network refuses
  to run without labels (test_unet), so the job finishing shows that the teacher's training, the
  teacher, self-teacher and student calls and the evaluator all passed them (which labels: the
  float64 tests of test_methods); the grids carry each sample's class."""
  config = tiny_config('tract', train_samples=2 * 8, time_schedule='16,1')
  config.model.num_classes = 10
  config.model.mean_type = 'both'
  config.model.out_ch = 2
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result['student_steps'] == 1
  assert os.path.exists(tmp_path / 'phase0_student_1steps.png')
  # mode=sample keeps each sample's label and draws it on the grid.
  config.mode = 'sample'
  out = train.train_and_evaluate(config, str(tmp_path))
  saved = np.load(out['samples'])
  labels = saved['labels']
  assert labels.shape == (8,) and labels.min() >= 0 and labels.max() < 10
  assert len(set(labels.tolist())) > 1  # uniformly random classes, not one
  from PIL import Image
  from tract_jax import writers
  images = saved['images'].astype(np.float32) / 127.5 - 1
  plain = writers.save_grid(str(tmp_path / 'plain.png'), images)
  labelled = writers.save_grid(str(tmp_path / 'labelled.png'), images, labels=labels)
  written = np.asarray(Image.open(out['samples'][:-4] + '.png'))
  assert np.array_equal(written, np.asarray(Image.open(labelled)))
  assert not np.array_equal(written, np.asarray(Image.open(plain)))
