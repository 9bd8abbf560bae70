"""One of 2 processes (tests/test_recovery.py starts both) restoring one checkpoint folder together,
with 2 simulated CPU devices each and an array sharded over all 4: a step unreadable on one process
only, a read error on one process only, and a truly truncated step. Prints one JSON line.

python tests/restore_worker.py PROCESS_ID PORT DIRECTORY
"""
import errno
import glob
import json
import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from tract_jax import checkpoints, parallel  # noqa: E402

process, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process)
checkpoints.RETRY_DELAYS_S = (0.0, 0.0, 0.0)
mesh = Mesh(np.asarray(jax.devices()).reshape(4, 1), ('data', 'fsdp'))
sharding = NamedSharding(mesh, P('data'))


def state(value):
  """{'w': (8, 4) float32 filled with value, rows split over the 4 devices of both processes}."""
  full = np.full((8, 4), value, np.float32)
  return {'w': jax.make_array_from_callback((8, 4), sharding, lambda index: full[index])}


def value_of(restored):
  return float(np.asarray(restored['w'].addressable_shards[0].data)[0, 0])


def failing_on(ckpts, process_index, step, error, times=1):
  """Makes the restore of `step` raise `error` on one process, `times` times."""
  restore, left = ckpts.restore, [times]

  def call(state_like, s):
    if jax.process_index() == process_index and s == step and left[0] > 0:
      left[0] -= 1
      raise error
    return restore(state_like, s)

  ckpts.restore = call


results = {}
with checkpoints.StateCheckpoints(directory, max_to_keep=5) as ckpts:
  for step in (2, 4, 6):
    ckpts.save(step, state(step), wait=True)
parallel.barrier('saved')

# Step 6 unreadable on process 1 only: both fall back to 4 (no hang in Orbax's restore barrier).
with checkpoints.StateCheckpoints(directory) as ckpts:
  failing_on(ckpts, 1, 6, ValueError('DATA_LOSS: Error reading "w/0.0": corrupt chunk'))
  results['one_process_corrupt'] = value_of(ckpts.restore_or_keep(state(0)))
  results['steps_after'] = list(ckpts.manager.all_steps())

# An I/O error on process 0 only: both retry, both restore the newest step, nothing moved.
with checkpoints.StateCheckpoints(directory) as ckpts:
  failing_on(ckpts, 0, 4, OSError(errno.EIO, 'Input/output error'), times=2)
  results['one_process_io_error'] = value_of(ckpts.restore_or_keep(state(0)))

# A truncated file of step 4 (process 0 cuts it): both agree on step 2.
if process == 0:
  files = [p for p in glob.glob(os.path.join(directory, '4', '**', '*'), recursive=True)
           if os.path.isfile(p) and '/d/' in p]
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 3)
parallel.barrier('truncated')
with checkpoints.StateCheckpoints(directory) as ckpts:
  results['truncated'] = value_of(ckpts.restore_or_keep(state(0)))
  results['steps_at_end'] = list(ckpts.manager.all_steps())
results['set_aside'] = sorted(os.listdir(os.path.join(directory, 'corrupt')))
print('RESULT ' + json.dumps(results), flush=True)
