"""Throughput of the jitted steps and the sampler for one config's model and one batch size.

  python benchmarks/throughput.py --config=configs/demo.py [--config.field=value ...] \
      [--batch=N] [--steps=N] [--json=out.json]

Measures, on the devices JAX sees (the config's mesh settings):
  - teacher training step (train.make_teacher_step), TRACT step and BTD step (train.make_distill_step
    with the phase plan of each method, first phase), DDIM sampling at 1, 8 and T steps (one compiled
    sampler; T = config.teacher_steps);
  - compile time of each (lower + compile; the sampler is compiled once for every step count);
  - ms per step (median of --steps timed calls after one warm-up call, at most --max_seconds of
    timing per benchmark; min too) and images/s;
  - FLOPs per call from XLA's cost analysis of the compiled program, times the number of devices
    (the analysis describes one device's share; for the sampler: the number of steps times the cost
    of one network evaluation, since XLA counts a loop body once);
  - achieved FLOP/s as a fraction of the machine's matmul peak, measured in the same run (best of
    several jitted square float32 matmuls, at the default matmul precision the steps use too);
  - memory: XLA's per-program estimate (arguments + outputs + temporaries - aliased), and the
    device's peak_bytes_in_use when the backend reports it, else the process's max RSS (labelled).

Data is random (uniform in [-1, 1]) with the image shape of config.data.name, so no dataset is
needed: `--config=configs/cifar10_tract.py` measures the paper-width model on a GPU/TPU.
A CPU run of the demo model takes about a minute (compiles dominate). Timings on a shared machine
are noisy: compare numbers from the same run.
"""
import json
import os
import platform
import resource
import statistics
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tract_jax import import_teacher, parallel, phases, sampling, train  # noqa: E402

FLAGS = flags.FLAGS
BENCHMARKS = ('teacher', 'tract', 'btd', 'sample')

if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'demo.py'),
                                  'Job configuration file (configs/*.py).', lock_config=False)
  flags.DEFINE_integer('batch', None, 'Global batch size (default: config.batch_size).')
  flags.DEFINE_integer('steps', 10, 'Timed calls per benchmark (after one warm-up call).')
  flags.DEFINE_string('json', None, 'Write the results to this JSON file.')
  flags.DEFINE_list('what', list(BENCHMARKS), f'Benchmarks to run, any of {",".join(BENCHMARKS)}.')
  flags.DEFINE_float('max_seconds', 60.0, 'Stop timing a benchmark after this many seconds '
                     '(at least one timed call): a 1024-step rollout of the paper model is slow.')
  flags.DEFINE_list('sample_steps', None, 'DDIM step counts to time (default: 1,8,T).')
  flags.DEFINE_integer('peak_size', None, 'Side of the peak-matmul operands (default: 2048 on CPU, '
                       '8192 on GPU/TPU).')


# ---------------------------------------------------------------------------------------------------
# Measurement helpers.
# ---------------------------------------------------------------------------------------------------
def cost_flops(compiled):
  """FLOPs of a compiled program from XLA's cost analysis, or None when XLA gives none.

  `cost_analysis()` returns a dict in recent JAX, a list with one dict per program in older ones,
  or None on some backends.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None
  flops = analysis.get('flops')
  return float(flops) if flops is not None and flops >= 0 else None


def scale(flops, n_devices):
  """Whole-step FLOPs from the per-device program's: under SPMD partitioning XLA's cost analysis
  describes one device's share (replicated work, e.g. the optimiser update, is counted n times)."""
  return None if flops is None else flops * n_devices


def memory_estimate(compiled):
  """XLA's estimate of a program's device memory in bytes (arguments + outputs + temporaries minus
  buffers aliased by donation), or None."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  try:
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except AttributeError:
    return None


def compile_timed(jitted, *args):
  """(compiled, seconds to lower and compile)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def peak_memory():
  """('device peak_bytes_in_use' | 'process max RSS', bytes): the device's own counter when the
  backend keeps one (GPU, TPU), else the process's resident-set high-water mark (CPU)."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  if peaks:
    return 'device peak_bytes_in_use (max over local devices)', max(peaks)
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
  scale = 1 if sys.platform == 'darwin' else 1024
  return 'process max RSS (no device memory counter)', int(rss_kb * scale)


def matmul_peak(size=None, repeats=5):
  """Best-of-`repeats` FLOP/s of a jitted size x size float32 matmul on the default device."""
  platform_name = jax.devices()[0].platform
  size = size or (2048 if platform_name == 'cpu' else 8192)
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return {'size': size, 'dtype': 'float32', 'best_s': best, 'flops_per_s': 2.0 * size ** 3 / best}


def time_calls(call, steps, max_seconds=None, warm_up=True):
  """Runs call() once to warm up, then up to `steps` times, blocking on each result; stops early
  (after at least one timed call) once `max_seconds` have been spent timing. Returns seconds."""
  if warm_up:
    jax.block_until_ready(call())
  times = []
  while len(times) < steps:
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
    if max_seconds is not None and sum(times) > max_seconds:
      break
  return times


# ---------------------------------------------------------------------------------------------------
# What is benchmarked.
# ---------------------------------------------------------------------------------------------------
def random_batch(image_shape, batch, num_classes, seed=0):
  """Host batch of uniform [-1, 1] images (batch, H, W, C) and int labels, like data.ArraySource."""
  rng = np.random.default_rng(seed)
  return {'image': rng.uniform(-1.0, 1.0, (batch,) + tuple(image_shape)).astype(np.float32),
          'label': rng.integers(0, max(num_classes, 1), (batch,)).astype(np.int32)}


def plan_for(config, method, batch):
  """The phase plan whose first phase the step is timed on: the config's schedule for its own
  method, else T -> 1 (TRACT) or halving (BTD)."""
  T = config.teacher_steps
  if method == config.method and config.time_schedule:
    schedule = config.time_schedule
  else:
    schedule = f'{T},1' if method == 'tract' else ''
  num_phases = len(phases.parse_schedule(schedule)) - 1 if schedule else max(1, int(T).bit_length() - 1)
  samples = max(int(config.train_samples), batch * num_phases)
  return phases.make_plan(method, T, schedule, samples, batch, config.ema_residual)


class StepBench:
  """A jitted train step with its state and one global batch; `run()` is one update."""

  def __init__(self, config, method, batch, mesh, params, image_shape):
    conditional = bool(config.model.num_classes)
    fsdp_min = config.mesh.fsdp_min_size
    self.method = method
    self.plan = None
    if method == 'teacher':
      tc = config.teacher_training
      model = train.build_model(config.model, dropout=tc.dropout)
      denoise = train.make_denoiser(model, config.model.mean_type)
      tx = train.make_optimizer(tc.learning_rate, tc.warmup_steps, tc.grad_clip,
                                config.optimizer.b1, config.optimizer.b2, config.optimizer.eps)
      self.state, sharding = train.create_state(params, tx, config.seed, mesh, fsdp_min)
      self.jitted = train.make_teacher_step(
          denoise, tx, ema_decay=tc.ema_decay, reduction=tc.loss_reduction,
          time_sampling=tc.time_sampling, teacher_steps=config.teacher_steps,
          random_flip=config.data.random_flip, conditional=conditional, dropout=tc.dropout > 0,
          mesh=mesh, state_sharding=sharding)
    else:
      model = train.build_model(config.model, dropout=0.0)
      denoise = train.make_denoiser(model, config.model.mean_type)
      opt = config.optimizer
      tx = train.make_optimizer(opt.learning_rate, opt.warmup_steps, opt.grad_clip, opt.b1, opt.b2,
                                opt.eps)
      self.plan = plan_for(config, method, batch)
      self.state, sharding = train.create_state(params, tx, config.seed + 1, mesh, fsdp_min,
                                                sema=method == 'tract', teacher=params)
      self.jitted = train.make_distill_step(
          denoise, tx, self.plan, sema=config.sema, reduction=config.loss_reduction,
          clip_x=config.clip_x, random_flip=config.data.random_flip, conditional=conditional,
          mesh=mesh, state_sharding=sharding)
    self.batch = parallel.global_batch(
        random_batch(image_shape, batch, config.model.num_classes, seed=config.seed), mesh)
    self.compiled = None

  def compile(self):
    self.compiled, seconds = compile_timed(self.jitted, self.state, self.batch)
    return seconds

  def run(self):
    self.state, metrics = self.compiled(self.state, self.batch)  # the old state is donated
    return metrics['loss']


def run_benchmarks(config, batch, steps, what=BENCHMARKS, sample_steps=None, peak_size=None,
                   mesh=None, max_seconds=None, log=print):
  """Runs the benchmarks; returns the results as a JSON-ready dict."""
  image_shape = import_teacher.image_shape(config)
  train.check_image_shape(config, image_shape)
  mesh = mesh or parallel.mesh_from_config(config)
  parallel.check_batch(batch, mesh, '--batch')
  n_devices = mesh.size
  cache_dir = jax.config.jax_compilation_cache_dir
  log(f'{parallel.describe(mesh)}; {jax.devices()[0].device_kind}; jax {jax.__version__}')
  if cache_dir:
    log(f'note: persistent compilation cache on ({cache_dir}): compile times may be cache hits')

  peak = matmul_peak(peak_size)
  peak_total = peak['flops_per_s'] * n_devices
  log(f'matmul peak: {peak["flops_per_s"] / 1e9:,.1f} GFLOP/s per device ({peak["size"]}x'
      f'{peak["size"]} float32, best of 5) x {n_devices} device(s)')

  model = train.build_model(config.model)
  params = train.init_params(model, image_shape, config.seed)
  params = jax.device_put(params, parallel.replicated(mesh))
  n_params = sum(int(x.size) for x in jax.tree.leaves(params))
  log(f'model: {n_params:,} parameters, images {image_shape}, batch {batch}')

  rows = []

  def add_row(name, compile_s, times, flops, images, mem, note=''):
    median = statistics.median(times)
    row = {'name': name, 'batch': images, 'compile_s': compile_s, 'ms_per_call': 1e3 * median,
           'ms_per_call_min': 1e3 * min(times), 'images_per_s': images / median,
           'flops_per_call': flops, 'xla_memory_bytes': mem, 'timed_calls': len(times),
           'note': note}
    if flops:
      row['achieved_flops_per_s'] = flops / median
      row['fraction_of_peak'] = flops / median / peak_total
    mem_label, mem_bytes = peak_memory()
    row['peak_memory_so_far'] = {'kind': mem_label, 'bytes': mem_bytes}
    rows.append(row)
    log(f'  {name}: compile {compile_s:.1f}s, {1e3 * median:.1f} ms/call')

  for method in ('teacher', 'tract', 'btd'):
    if method not in what:
      continue
    bench = StepBench(config, method, batch, mesh, params, image_shape)
    compile_s = bench.compile()
    flops = scale(cost_flops(bench.compiled), n_devices)
    times = time_calls(bench.run, steps, max_seconds)
    note = '' if bench.plan is None else 'schedule ' + ','.join(map(str, bench.plan.schedule))
    add_row(f'{method} step', compile_s, times, flops, batch, memory_estimate(bench.compiled), note)
    del bench

  if 'sample' in what:
    denoise = train.make_denoiser(model, config.model.mean_type)
    sampler = sampling.make_sampler(denoise, clip_x=config.clip_x)
    batch_sharding = parallel.batch_sharding(mesh)
    noise = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (batch,) + tuple(image_shape)),
                           batch_sharding)
    labels = (jax.device_put(jnp.zeros((batch,), jnp.int32), batch_sharding)
              if config.model.num_classes else None)
    compiled, compile_s = compile_timed(sampler, params, noise, jnp.int32(1), labels)
    # XLA's cost analysis counts a while-loop body once: cost of a rollout = steps x one network call.
    forward = jax.jit(denoise)
    t_in = jax.device_put(jnp.full((batch,), 0.5), batch_sharding)
    forward_flops = scale(cost_flops(forward.lower(params, noise, t_in, labels).compile()),
                          n_devices)
    counts = sample_steps or (1, 8, config.teacher_steps)
    for i, n in enumerate(dict.fromkeys(int(s) for s in counts)):
      n_arr = jnp.int32(n)
      # The same program for every count: warmed up by the first count's warm-up call.
      times = time_calls(lambda: compiled(params, noise, n_arr, labels), steps, max_seconds,
                         warm_up=i == 0)
      add_row(f'DDIM {n} step{"s" if n > 1 else ""}', compile_s if i == 0 else 0.0, times,
              n * forward_flops if forward_flops else None, batch, memory_estimate(compiled),
              'one compiled sampler for every step count' + (' (compile counted once)' if i else ''))

  mem_label, mem_bytes = peak_memory()
  return {
      'config': config.to_dict() if hasattr(config, 'to_dict') else None,
      'platform': jax.devices()[0].platform, 'device_kind': jax.devices()[0].device_kind,
      'num_devices': n_devices, 'mesh': dict(mesh.shape), 'jax_version': jax.__version__,
      'host': platform.node(), 'cpu_count': os.cpu_count(), 'batch': batch,
      'image_shape': list(image_shape), 'num_params': n_params, 'timed_calls': steps,
      'matmul_peak': peak, 'peak_flops_per_s_all_devices': peak_total,
      'peak_memory': {'kind': mem_label, 'bytes': mem_bytes},
      'compilation_cache': cache_dir or None, 'benchmarks': rows,
  }


def format_table(result):
  """The results as a fixed-width text table."""
  header = (f'{"benchmark":<16} {"batch":>5} {"compile s":>9} {"ms/call":>9} {"min ms":>8} '
            f'{"images/s":>10} {"GFLOP/call":>11} {"GFLOP/s":>9} {"% peak":>7} {"MiB/dev":>8}')
  lines = [header, '-' * len(header)]
  for r in result['benchmarks']:
    flops = r['flops_per_call']
    gflop = f'{flops / 1e9:11.3f}' if flops else f'{"n/a":>11}'
    achieved = (f'{r["achieved_flops_per_s"] / 1e9:9.1f}' if flops else f'{"n/a":>9}')
    frac = f'{100 * r["fraction_of_peak"]:6.1f}%' if flops else f'{"n/a":>7}'
    mem = (f'{r["xla_memory_bytes"] / 2**20:8.1f}' if r['xla_memory_bytes'] is not None
           else f'{"n/a":>8}')
    lines.append(f'{r["name"]:<16} {r["batch"]:>5} {r["compile_s"]:9.1f} {r["ms_per_call"]:9.2f} '
                 f'{r["ms_per_call_min"]:8.2f} {r["images_per_s"]:10.1f} {gflop} {achieved} {frac} '
                 f'{mem}')
  peak = result['matmul_peak']
  lines.append(f'peak: {peak["flops_per_s"] / 1e9:,.1f} GFLOP/s per device ({peak["size"]}x'
               f'{peak["size"]} float32 matmul, best of 5) x {result["num_devices"]} device(s); '
               f'{result["peak_memory"]["kind"]}: {result["peak_memory"]["bytes"] / 2**20:,.0f} MiB')
  lines.append(f'{result["platform"]} ({result["device_kind"]}), {result["num_params"]:,} params, '
               f'images {tuple(result["image_shape"])}, median of up to {result["timed_calls"]} '
               'timed calls after a warm-up call')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  unknown = sorted(set(FLAGS.what) - set(BENCHMARKS))
  if unknown:
    raise app.UsageError(f'--what: unknown {unknown}; choose from {BENCHMARKS}')
  batch = FLAGS.batch or config.batch_size
  sample_steps = [int(s) for s in FLAGS.sample_steps] if FLAGS.sample_steps else None
  try:
    result = run_benchmarks(config, batch, FLAGS.steps, FLAGS.what, sample_steps, FLAGS.peak_size,
                            max_seconds=FLAGS.max_seconds)
  except phases.ConfigError as e:
    print(f'Configuration error: {e}', file=sys.stderr)
    sys.exit(2)
  print(format_table(result))
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, 'w') as f:
      json.dump(result, f, indent=2, default=str)
    print(f'wrote {FLAGS.json}')


if __name__ == '__main__':
  app.run(main)
