"""What a host read per step costs: the training step run back to back, as the step loop runs it,
against the same with `int(state.phase)` read after every step (what the loop did before it kept
the phase on the host), which makes the host wait for each step before it dispatches the next.
On CPU devices both ways keep the step loop's bound on unfinished updates (loop.py).

  python benchmarks/host_sync.py [--config=configs/demo.py] [--method=tract] [--steps=100]
      [--rounds=3] [--batch=N]

Prints ms/step of both ways, alternating the two `--rounds` times (the median is reported), after
one compile and one warm-up. benchmarks/throughput.py times one call to completion
(block_until_ready), so it cannot show this difference by construction.
"""
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, 'benchmarks')):
  if path not in sys.path:
    sys.path.insert(0, path)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import timed_step  # noqa: E402  (benchmarks/timed_step.py: the train step over the shared builder)
from tract_jax import data, devices, loop, methods, parallel  # noqa: E402
from tract_jax.models import factory  # noqa: E402

FLAGS = flags.FLAGS

if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'demo.py'),
                                  'Model and batch.', lock_config=False)
  flags.DEFINE_enum('method', 'tract', list(methods.names()),
                    'Which step (a method of config.parametrisation).')
  flags.DEFINE_integer('steps', 100, 'Steps per timed round.')
  flags.DEFINE_integer('rounds', 3, 'Rounds of each way, alternating.')
  flags.DEFINE_integer('batch', 0, 'Global batch (default config.batch_size).')


def timed_round(bench, steps: int, read_phase: bool) -> float:
  """Seconds per step of `steps` updates dispatched back to back (one wait at the end; on CPU
  devices, as in the step loop, at most loop.MAX_UPDATES_IN_FLIGHT updates unfinished, since
  unbounded dispatch can deadlock XLA:CPU with several devices)."""
  dispatch = loop.DispatchBound(jax.devices()[0].platform)
  start = time.perf_counter()
  for _ in range(steps):
    dispatch.wait_for_room()
    dispatch.dispatched(bench.run())
    if read_phase:
      int(bench.state.phase)  # a device-to-host read: the host waits for this step
  jax.block_until_ready(bench.state)
  return (time.perf_counter() - start) / steps


def measure(config, method, batch, steps, rounds, log=print):
  """{'no_read': ms/step, 'read_per_step': ms/step} (medians over rounds)."""
  mesh = parallel.mesh_from_config(config)
  image_shape = data.image_shape(config.data)
  params = factory.init_params(factory.build_model(config.model), image_shape, config.seed)
  bench = timed_step.StepBench(config, method, batch, mesh, params, image_shape)
  bench.compile()
  timed_round(bench, 2, False)  # warm-up
  times = {'no_read': [], 'read_per_step': []}
  for _ in range(rounds):
    for key, read in (('no_read', False), ('read_per_step', True)):
      times[key].append(timed_round(bench, steps, read))
  out = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
  log(f'{method} step, batch {batch}, {jax.devices()[0].platform}: back to back '
      f'{out["no_read"]:.2f} ms/step; with int(state.phase) after each step '
      f'{out["read_per_step"]:.2f} ms/step ({out["read_per_step"] / out["no_read"]:.3f}x); '
      f'median of {rounds} rounds of {steps} steps')
  return out


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.batch:
    config.batch_size = config.teacher_training.batch_size = FLAGS.batch
  devices.configure(config)  # CPU: one device per core, as training does (cpu_devices)
  measure(config, FLAGS.method, FLAGS.batch or config.batch_size, FLAGS.steps, FLAGS.rounds)


if __name__ == '__main__':
  app.run(main)
