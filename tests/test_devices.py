"""config.cpu_devices: how a CPU run splits the machine's cores into XLA devices (tract_jax/devices.py),
and that 'auto' leaves a count the user set (JAX_NUM_CPU_DEVICES, XLA_FLAGS) alone."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from tract_jax import devices
from tract_jax.errors import ConfigError


def test_auto_takes_one_device_per_core_dividing_every_batch():
  assert devices.auto_count(2, [64, 64, 64]) == 2   # the demo on this kind of machine
  assert devices.auto_count(1, [64]) == 1
  assert devices.auto_count(3, [8, 8]) == 2         # 3 does not divide 8
  assert devices.auto_count(4, [6, 12]) == 3
  assert devices.auto_count(4, [7]) == 1
  assert devices.auto_count(64, [256, 128]) == devices.MAX_AUTO_DEVICES == 8


def test_a_count_set_outside_the_config_wins_over_auto():
  assert devices.choose('auto', None, 2, [64]) == 2
  assert devices.choose('auto', 4, 2, [64]) is None  # leave the user's 4 alone
  assert devices.choose('auto', 1, 2, [64]) is None
  assert devices.choose('3', None, 2, [6]) == 3 and devices.choose(3, 3, 2, [6]) == 3
  with pytest.raises(ConfigError, match=r"cpu_devices='3', but this process was started with 4"):
    devices.choose('3', 4, 2, [6])


@pytest.mark.parametrize('value', ['0', '-2', 'two', '1.5', ''])
def test_bad_values_are_one_line(value):
  with pytest.raises(ConfigError, match=r"^cpu_devices=.*'auto' or a positive integer"):
    devices.parse(value)


def test_this_process_runs_the_default():
  import jax
  from conftest import tiny_config
  expected = devices.auto_count(devices.usable_cores(), devices.sharded_batches(tiny_config()))
  assert len(jax.devices()) == expected


@pytest.mark.slow
@pytest.mark.parametrize('env,expected', [
    ({}, 'auto'), ({'JAX_NUM_CPU_DEVICES': '3'}, 3),
    ({'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}, 1)])
def test_in_a_fresh_process(env, expected):
  """What python -m tract_jax.main does first, in a fresh interpreter: 'auto' picks from the cores
  and the batches, and leaves an environment's count alone."""
  code = ('import sys; sys.path.insert(0, "tests"); import jax; from tiny import tiny_config; '
          'from tract_jax import devices; devices.configure(tiny_config()); print(len(jax.devices()))')
  clean = {k: v for k, v in os.environ.items() if k not in ('JAX_NUM_CPU_DEVICES', 'XLA_FLAGS')}
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=dict(clean, **env),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  if expected == 'auto':
    from conftest import tiny_config
    expected = devices.auto_count(devices.usable_cores(), devices.sharded_batches(tiny_config()))
  assert int(out.stdout.split()[-1]) == expected
