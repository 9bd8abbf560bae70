"""Bad inputs stop the job at start-up with one line (ConfigError, exit 2), before anything
compiles: labels that do not fit the model, a damaged .npz, a workdir that is a file (issue 22's
table)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, tiny_config
from tract_jax import data, train
from tract_jax.errors import ConfigError


def _npz(path, labels=None, n=16):
  """An .npz of n 8x8 grey images; labels: None (no 'labels' array), a scalar or an (n,) array."""
  images = np.random.default_rng(0).integers(0, 256, (n, 8, 8), dtype=np.uint8)
  arrays = {'images': images}
  if labels is not None:
    arrays['labels'] = np.broadcast_to(np.asarray(labels, np.int64), (n,))
  np.savez(path, **arrays)
  return str(path)


def _fails_at_start(tmp_path, config, match):
  """train_and_evaluate stops with a one-line ConfigError before it writes or trains anything."""
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError, match=match) as info:
    train.train_and_evaluate(config, str(workdir))
  assert '\n' not in str(info.value)
  assert not (workdir / 'checkpoints').exists() and not (workdir / 'teacher').exists()
  return str(info.value)


def test_conditional_model_on_labels_beyond_num_classes(tmp_path):
  config = tiny_config(**{'model.num_classes': 10})
  config.data.name = _npz(tmp_path / 'huge.npz', labels=np.arange(16) % 3 * 10**9)
  message = _fails_at_start(tmp_path, config, 'has labels up to 2000000000')
  assert message.startswith('model.num_classes=10:')


def test_conditional_model_on_unlabelled_data(tmp_path):
  for name, labels in (('none.npz', None), ('zeros.npz', 0)):
    config = tiny_config(**{'model.num_classes': 10})
    config.data.name = _npz(tmp_path / name, labels=labels)
    _fails_at_start(tmp_path, config, 'has no labels')


def test_damaged_npz(tmp_path):
  good = _npz(tmp_path / 'good.npz', labels=np.arange(16) % 2)
  with open(good, 'rb') as f:
    raw = f.read()
  cases = {'truncated.npz': raw[:len(raw) // 2], 'text.npz': b'not an archive\n', 'empty.npz': b''}
  for name, content in cases.items():
    with open(tmp_path / name, 'wb') as f:
      f.write(content)
    config = tiny_config()
    config.data.name = str(tmp_path / name)
    _fails_at_start(tmp_path, config, 'cannot read it as an .npz file')


def test_workdir_that_is_a_file(tmp_path):
  existing = tmp_path / 'notes.txt'
  existing.write_text('not a folder')
  for workdir in (existing, existing / 'run'):
    with pytest.raises(ConfigError, match=r'^workdir=.*: not a folder') as info:
      train.train_and_evaluate(tiny_config(), str(workdir))
    assert '\n' not in str(info.value)
  assert existing.read_text() == 'not a folder'


def test_label_check_of_each_source_kind(capsys):
  digits = data.load_digits()  # 10 classes
  data.check_labels(digits, 10)
  with pytest.raises(ConfigError, match='labels up to 9'):
    data.check_labels(digits, 5)
  # A TFDS set reports the classes its ClassLabel declares, and none without a label feature.
  image = np.zeros((8, 8, 1), np.uint8)
  labelled = data.TfdsSource([{'image': image, 'label': 3}] * 4, 'tfds:fake', num_classes=100)
  with pytest.raises(ConfigError, match='labels up to 99'):
    data.check_labels(labelled, 10)
  unlabelled = data.TfdsSource([{'image': image}] * 4, 'tfds:fake', num_classes=0)
  with pytest.raises(ConfigError, match='has no labels'):
    data.check_labels(unlabelled, 10)
  capsys.readouterr()
  # An unconditional model ignores labels, and says so once.
  data.check_labels(digits, 0)
  data.check_labels(unlabelled, 0)
  out = capsys.readouterr().out
  assert out == ("model.num_classes=0: an unconditional model; the labels of data.name='digits' "
                 '(10 classes) are ignored\n')


@pytest.mark.slow
def test_command_line_exit_2_with_one_line(tmp_path):
  """The table's first row through the command line: it no longer trains."""
  npz = _npz(tmp_path / 'huge.npz', labels=10**9)
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'tract_jax.main', '--config=tests/tiny_job.py', f'--workdir={workdir}',
       '--config.model.num_classes=10', f'--config.data.name={npz}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      f"Configuration error: model.num_classes=10: data.name='{npz}' has labels up to 1000000000, "
      'but a class-conditional model needs every label below model.num_classes'], proc.stderr
  assert 'step' not in proc.stdout and not (workdir / 'checkpoints').exists()
