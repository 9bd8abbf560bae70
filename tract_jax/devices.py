"""How many XLA devices a CPU run splits the machine's cores into (config.cpu_devices).

XLA:CPU runs the small convolutions of a CPU-sized UNet with little intra-op parallelism, so one CPU
device leaves cores idle. Several CPU devices, one batch shard each (the data parallelism a GPU or
TPU mesh uses), keep them busy. Measured on a 2-core machine (docs/performance.md, "CPU devices"):
the demo's teacher step 124 -> 86 ms and its TRACT step 226 -> 167 ms from 1 to 2 devices; 4
devices on the 2 cores were slower than 2 (105 and 172 ms).

The count must be fixed before JAX starts its backend (jax_num_cpu_devices), so main.py applies
it right after parsing the flags and train_and_evaluate again for in-process callers (a no-op once
JAX runs). It changes only the CPU backend: on a GPU or TPU host the mesh is made of accelerators and
the CPU devices stay unused.
"""
import os
import re
from typing import Iterable, Optional

import jax

from tract_jax.errors import ConfigError

AUTO = 'auto'
# 'auto' uses at most this many devices. Measured only up to 2 cores here (1, 2 and 4 devices on 2
# cores: 2 was fastest); beyond 8 per-device batches of the CPU configs get too small to help.
MAX_AUTO_DEVICES = 8
_XLA_FLAG = re.compile(r'--xla_force_host_platform_device_count=(\d+)')


def usable_cores() -> int:
  """The cores this process may run on (its affinity mask, e.g. a container's limit)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def count_set_by_user() -> Optional[int]:
  """A CPU device count the user chose outside the config: jax_num_cpu_devices (jax.config or the
  JAX_NUM_CPU_DEVICES environment variable), else XLA_FLAGS' host platform device count."""
  if jax.config.jax_num_cpu_devices >= 0:
    return int(jax.config.jax_num_cpu_devices)
  match = _XLA_FLAG.search(os.environ.get('XLA_FLAGS', ''))
  return int(match.group(1)) if match else None


def sharded_batches(config) -> list:
  """The batch sizes this job splits over its devices (each must be divisible by their count)."""
  batches = [config.batch_size, config.teacher_training.batch_size, config.eval.sample_batch]
  if any(m in config.eval.metrics for m in ('fid', 'kid')):
    batches.append(config.eval.inception_batch)
  return [int(b) for b in batches if int(b) > 0]


def auto_count(cores: int, batches: Iterable[int], cap: int = MAX_AUTO_DEVICES) -> int:
  """One device per core, at most `cap`, and a count that divides every batch."""
  batches = list(batches)
  n = max(1, min(int(cores), cap))
  while n > 1 and any(b % n for b in batches):
    n -= 1
  return n


def parse(value) -> Optional[int]:
  """config.cpu_devices: 'auto' -> None, else a positive integer (given as int or text)."""
  if isinstance(value, str) and value.strip().lower() == AUTO:
    return None
  try:
    n = int(value)
  except (TypeError, ValueError):
    n = 0
  if n < 1 or str(value).strip() != str(n):
    raise ConfigError(f"cpu_devices={value!r}: 'auto' or a positive integer (the XLA CPU devices "
                      'a CPU run uses)')
  return n


def choose(value, set_by_user: Optional[int], cores: int, batches) -> Optional[int]:
  """The CPU device count to configure, or None to leave JAX's own setting alone.

  'auto' leaves a count the user set outside the config alone; an explicit config value must agree
  with it."""
  requested = parse(value)
  if requested is None:
    return None if set_by_user is not None else auto_count(cores, batches)
  if set_by_user is not None and set_by_user != requested:
    raise ConfigError(f'cpu_devices={value!r}, but this process was started with {set_by_user} CPU '
                      'devices (JAX_NUM_CPU_DEVICES / XLA_FLAGS); set one of them only')
  return requested


def configure(config) -> Optional[int]:
  """Sets jax_num_cpu_devices for this job before JAX starts; returns the count set, or None when
  JAX's setting was left alone (a user's explicit count, or a backend that already runs)."""
  n = choose(config.get('cpu_devices', AUTO), count_set_by_user(), usable_cores(),
             sharded_batches(config))
  if n is None:
    return None
  try:
    jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:  # JAX already runs in this process (a notebook, a test): keep its devices
    if parse(config.get('cpu_devices', AUTO)) is not None:
      have = len(jax.devices('cpu'))
      if have != n:
        raise ConfigError(f'cpu_devices={n}: JAX already runs in this process with {have} CPU '
                          'devices; set it before the first JAX computation (or run the job '
                          'through python -m tract_jax.main)') from None
    return None
  return n
