"""Student export: Orbax params -> msgpack / npz + sidecar JSON, and back."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import serialization

from conftest import tiny_config
from tract_jax import checkpoints, export, import_teacher
from tract_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(workdir, config):
  """A distillation workdir with phase_0_ema and phase_1_ema (random, different) parameters."""
  like = import_teacher.abstract_params(config)
  leaves, treedef = jax.tree_util.tree_flatten(like)
  saved = {}
  for phase in (0, 1):
    rng = np.random.default_rng(phase)
    params = jax.tree_util.tree_unflatten(
        treedef, [rng.standard_normal(l.shape).astype(np.float32) for l in leaves])
    checkpoints.save_params(os.path.join(workdir, f'phase_{phase}_ema'), params)
    saved[phase] = params
  return saved


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_round_trip(tmp_path):
  config = tiny_config()                       # schedule 16,4,1: phase 0 -> 4 steps, phase 1 -> 1
  saved = fake_run(str(tmp_path / 'run'), config)

  # A workdir exports its last phase; msgpack is plain flax serialization of the nested dict.
  meta = export.export_params(str(tmp_path / 'run'), config, str(tmp_path / 'student.msgpack'))
  assert meta['sample_steps'] == 1 and meta['mean_type'] == 'x'
  params, loaded_meta = export.load_exported(str(tmp_path / 'student.msgpack'))
  assert loaded_meta == json.loads(json.dumps(meta))
  assert_same(params, saved[1])
  raw = serialization.msgpack_restore((tmp_path / 'student.msgpack').read_bytes())
  assert set(raw) == set(saved[1]) and 'down_0.block_0' in raw

  # A phase directory, as npz with 'a/b/c' keys.
  meta = export.export_params(str(tmp_path / 'run' / 'phase_0_ema'), config,
                              str(tmp_path / 'phase0.npz'))
  assert meta['sample_steps'] == 4
  with np.load(tmp_path / 'phase0.npz') as data:
    assert 'down_0.block_0/conv1/kernel' in data.files
  params, loaded_meta = export.load_exported(str(tmp_path / 'phase0.npz'))
  assert_same(params, saved[0])
  assert loaded_meta['params_format'] == 'npz'

  # The sidecar describes how to sample: model, schedule on the sampling grid.
  schedule = loaded_meta['logsnr_schedule']
  assert len(schedule['grid_t']) == 5 and schedule['grid_t'][-1] == 1.0
  assert schedule['grid_logsnr'][0] == pytest.approx(20.0)
  assert schedule['grid_logsnr'][-1] == pytest.approx(-20.0)
  assert loaded_meta['model']['ch'] == 16 and loaded_meta['image_shape'] == [8, 8, 1]
  assert loaded_meta['num_params'] == sum(x.size for x in jax.tree.leaves(saved[0]))

  with pytest.raises(ConfigError, match='must end in .msgpack or .npz'):
    export.export_params(str(tmp_path / 'run'), config, str(tmp_path / 'student.pt'))
  with pytest.raises(ConfigError, match='pass --steps'):
    export.resolve_student(str(tmp_path), config)
  assert export.resolve_student(str(tmp_path), config, steps=2)[1] == 2
  with pytest.raises(ConfigError, match='does not match the configured model'):
    export.export_params(str(tmp_path / 'run'), tiny_config(**{'model.ch': 8}),
                         str(tmp_path / 'x.msgpack'))


@pytest.mark.slow
def test_export_command_line(tmp_path):
  config = tiny_config()
  saved = fake_run(str(tmp_path / 'run'), config)
  cmd = [sys.executable, '-m', 'tract_jax.export', f'--params={tmp_path / "run"}',
         '--config=tests/tiny_job.py', f'--output={tmp_path / "out" / "s.msgpack"}']
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '1-step DDIM' in result.stdout
  params, meta = export.load_exported(str(tmp_path / 'out' / 's.msgpack'))
  assert_same(params, saved[1])
  assert meta['time_schedule'] == '16,4,1'
