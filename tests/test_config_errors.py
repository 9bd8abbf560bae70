"""Every start-up check through the real driver, in-process: a command line is parsed by the same
absl/ml_collections flags as `python -m tract_jax.main`, then `train.train_and_evaluate` must stop
with one ConfigError line (what main.py prints after 'Configuration error: ' with exit 2) before
anything is compiled or written. JAX sees 8 devices here (stand-ins: only their count is read before
the checks fail), so the mesh and batch checks have something to check against."""
import os

import jax
import numpy as np
import pytest
from absl import flags

from conftest import ROOT, parse_command_line as parse
from tract_jax import train
from tract_jax.errors import ConfigError


class _StandInDevice:
  platform = 'cpu'


@pytest.fixture
def eight_devices(monkeypatch):
  """jax.devices() lists 8 stand-in CPU devices (the mesh is built from them; the checks below
  fail before any computation would need a real one)."""
  fake = [_StandInDevice() for _ in range(8)]
  monkeypatch.setattr(jax, 'devices', lambda *a, **k: fake)
  return fake


@pytest.mark.parametrize('override,expected', [
    ('--config.method=distill', "method='distill': allowed values are 'teacher', 'tract', 'btd'"),
    ('--config.time_schedule=64,10,1', "time_schedule='64,10,1': every entry must divide"),
    ('--config.time_schedule=64,8,8,1', 'strictly decreasing'),
    ('--config.model.mean_type=noise', "model.mean_type='noise': allowed values"),
    ('--config.data.name=mnist', "data.name='mnist': unknown dataset; allowed"),
    ('--config.teacher_checkpoint=/nonexistent/teacher', "teacher_checkpoint='/nonexistent/teacher'"),
    ('--config.loss_reduction=max', "loss_reduction='max'"),
    ('--config.model.ch_mult=(1,2,2,2,2)', 'side is divisible by 16'),
    ('--config.nonfinite=ignore', "nonfinite='ignore': allowed values are 'stop', 'skip'"),
    ("--config.eval.metrics=('fid',)", "eval.inception_weights='': 'fid' in eval.metrics needs"),
    ('--config.mesh.fsdp=3', 'mesh.fsdp=3: must be a positive divisor of the 8 devices'),
    ('--config.mesh.data=4', 'data * fsdp must equal the 8 devices'),
    ('--config.batch_size=60', 'batch_size=60: must be divisible by the 8 devices'),
    ('--config.eval.sample_batch=12', 'eval.sample_batch=12: must be divisible by the 8 devices'),
    ('--config.ema_reset=sometimes', "ema_reset='sometimes'"),
    ('--config.train_samples=10', 'train_samples=10: too small for 2 phases'),
    ('--config.model.dtype=float16', "model.dtype='float16': allowed values are 'float32', 'bfloat16'"),
    ('--config.model.remat=all', "model.remat='all': allowed values are 'none', 'blocks'"),
    ('--config.teacher_checkpoint=az://bucket/teacher', 'az:// paths are not supported (local paths'),
    ('--config.parametrisation=edm', "parametrisation='edm': allowed with method 'teacher' or "
                                     "'tract_edm'"),
])
def test_bad_config_stops_the_driver_with_one_line(tmp_path, eight_devices, override, expected):
  config = parse(override)
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError) as info:
    train.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert expected in message and '\n' not in message, message
  assert not workdir.exists()  # stopped before writing anything


def test_unreachable_workdir_scheme(tmp_path):
  with pytest.raises(ConfigError, match=r"^workdir='ftp://host/run': ftp:// paths are not "
                                        'supported'):
    train.train_and_evaluate(parse(), 'ftp://host/run')
  assert not os.path.exists(os.path.join(ROOT, 'ftp:'))  # not turned into a local folder 'ftp:'


def test_overrides_parse_like_the_command_line():
  """Types follow the config file's fields: tuples, None-able ints, booleans, nested fields."""
  config = parse('--config.model.ch_mult=(1,2,2)', '--config.model.head_dim=8',
                 '--config.clip_x=False',
                 '--config.teacher_training.train_steps=7', "--config.eval.metrics=('agreement',)")
  assert tuple(config.model.ch_mult) == (1, 2, 2) and config.model.head_dim == 8
  assert config.clip_x is False
  assert config.teacher_training.train_steps == 7 and tuple(config.eval.metrics) == ('agreement',)
  with pytest.raises(flags.IllegalFlagValueError):
    parse('--config.batch_size=many')
  np.testing.assert_equal(parse().teacher_steps, 64)  # configs/demo.py's own value otherwise
