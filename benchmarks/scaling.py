"""The train step of config.method (TRACT for the demo) on 1, 2, 4 and 8 simulated CPU devices, same
global batch, demo-sized model.

  python benchmarks/scaling.py [--config=configs/demo.py] [--batch=64] [--steps=10] [--quick]
      [--devices=1,2,4,8] [--json=out.json]

A correctness-of-overhead check, not a speed claim: the simulated devices
(--xla_force_host_platform_device_count=8) share the same CPU cores, so splitting the batch cannot
make a step faster; what the table shows is how much the data-parallel machinery (batch sharding,
the gradient all-reduce XLA inserts, per-device dispatch) costs on top of the 1-device step. A
ratio near 1 means the sharded step adds little. Real scaling needs real devices (throughput.py on
a GPU/TPU host).
"""
import os
import sys

# Must happen before JAX is imported (here and in everything imported below).
_FLAG = '--xla_force_host_platform_device_count=8'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAG).strip()
os.environ['JAX_PLATFORMS'] = 'cpu'

import json  # noqa: E402
import statistics  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
  if path not in sys.path:
    sys.path.insert(0, path)

import jax  # noqa: E402

import flops  # noqa: E402  (benchmarks/flops.py)
import measure  # noqa: E402  (benchmarks/measure.py)
import timed_step  # noqa: E402  (benchmarks/timed_step.py: the train step over the shared builder)
from tract_jax import config_checks, data, parallel  # noqa: E402
from tract_jax.models import factory  # noqa: E402

FLAGS = flags.FLAGS
NOTE = ('NOTE: a correctness-of-overhead check, not a speed claim: all simulated devices share the '
        'same CPU cores, so a ratio near 1.0 means the sharded step (batch split, gradient '
        'all-reduce, per-device dispatch) adds little overhead; it cannot show a speed-up.')

if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'demo.py'),
                                  'Job configuration file (its model is used).', lock_config=False)
  flags.DEFINE_integer('batch', 64, 'Global batch size, the same for every device count.')
  flags.DEFINE_integer('steps', 10, 'Timed steps per device count (after one warm-up step).')
  flags.DEFINE_list('devices', ['1', '2', '4', '8'], 'Device counts to time.')
  flags.DEFINE_bool('quick', False, 'Smoke test: 2 timed steps, batch 16.')
  flags.DEFINE_string('json', None, 'Write the results to this JSON file.')


def run_scaling(config, batch, steps, device_counts, log=print):
  """Times the step of config.method on `config`'s model on each device count; returns a
  JSON-ready dict."""
  available = jax.devices()
  image_shape = data.image_shape(config.data)
  config_checks.check_image_shape(config, image_shape)
  model = factory.build_model(config.model)
  params = factory.init_params(model, image_shape, config.seed)
  rows = []
  for n in device_counts:
    if n > len(available):
      raise ValueError(f'{n} devices asked for, {len(available)} present')
    mesh = parallel.make_mesh(n, 1, available[:n])
    parallel.check_batch(batch, mesh, '--batch')
    bench = timed_step.StepBench(config, config.method, batch, mesh,
                                 jax.device_put(params, parallel.replicated(mesh)), image_shape)
    compile_s = bench.compile()['compile_s']
    times = measure.time_calls(bench.run, steps)
    rows.append({'devices': n, 'per_device_batch': batch // n, 'compile_s': compile_s,
                 'ms_per_step': 1e3 * statistics.median(times), 'ms_per_step_min': 1e3 * min(times),
                 'xla_flops_per_device_program': flops.cost_flops(bench.compiled)})
    log(f'  {n} device(s): compile {compile_s:.1f}s, {rows[-1]["ms_per_step"]:.1f} ms/step')
    del bench
  base = rows[0]['ms_per_step']
  for row in rows:
    row['ratio_to_first'] = row['ms_per_step'] / base
  return {'batch': batch, 'timed_steps': steps, 'image_shape': list(image_shape),
          'method': config.method, 'schedule': config.time_schedule, 'cpu_count': os.cpu_count(),
          'jax_version': jax.__version__, 'rows': rows, 'note': NOTE}


def format_table(result):
  first = result['rows'][0]['devices']
  header = (f'{"devices":>7} {"batch/device":>12} {"compile s":>9} {"ms/step":>9} {"min ms":>8} '
            f'{"ratio to " + str(first):>11}')
  lines = [header, '-' * len(header)]
  for r in result['rows']:
    lines.append(f'{r["devices"]:>7} {r["per_device_batch"]:>12} {r["compile_s"]:9.1f} '
                 f'{r["ms_per_step"]:9.1f} {r["ms_per_step_min"]:8.1f} {r["ratio_to_first"]:11.2f}')
  lines.append(f'{result["method"]} step, global batch {result["batch"]}, images '
               f'{tuple(result["image_shape"])}, '
               f'median of {result["timed_steps"]} steps, simulated CPU devices on '
               f'{result["cpu_count"]} cores')
  lines.append(result['note'])
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  batch, steps = (16, 2) if FLAGS.quick else (FLAGS.batch, FLAGS.steps)
  counts = [int(n) for n in FLAGS.devices]
  result = run_scaling(FLAGS.config, batch, steps, counts)
  print(format_table(result))
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, 'w') as f:
      json.dump(result, f, indent=2)
    print(f'wrote {FLAGS.json}')


if __name__ == '__main__':
  app.run(main)
