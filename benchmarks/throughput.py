"""Throughput of the train steps, the sampler and the FID feature pass for one config's model.

  python benchmarks/throughput.py --config=configs/demo.py [--config.field=value ...] \
      [--batch=N] [--steps=N] [--what=teacher,tract,btd,sample,fid] [--dtype=bfloat16] \
      [--teacher_dtype=float32] [--remat=blocks] [--compile_only] [--json=out.json]

Times, on the devices JAX sees: the train step of each method --what names (default: every method
of config.parametrisation, e.g. teacher and tract_edm with configs/demo_edm.py), built by
tract_jax.steps.build_train_step as training builds it, on the first phase of its plan; the
parametrisation's sampler at 1, 8 and T steps (one compiled sampler); with `fid` the FID Inception
feature pass and the implied time of a 50k-sample FID at 1 step. For each: lower + XLA compile time
with an empty persistent cache (cold) and from it (cached), ms per call (median of --steps after a
warm-up; at most --max_seconds), images/s, FLOPs of the lowered program (flops.py; with remat, those
of the same step without it), % of the matmul peak measured in the step's dtype, XLA's memory
estimate and the device's peak memory (measure.py). XLA:CPU drops remat: its saving shows on
GPU/TPU only. Parameters and data are random, of the image shape of config.data.name (any name
training accepts, see tract_jax.data.image_shape). --compile_only compiles from abstract shapes
without running (paper-size models on a laptop). Compare numbers from the same run.
"""
import json
import os
import platform
import shutil
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fid_features  # noqa: E402  (benchmarks/fid_features.py)
import flops  # noqa: E402  (benchmarks/flops.py)
import measure  # noqa: E402  (benchmarks/measure.py)
import tables  # noqa: E402  (benchmarks/tables.py)
import timed_step  # noqa: E402  (benchmarks/timed_step.py)
from tract_jax import data, devices, methods, parallel  # noqa: E402
from tract_jax.errors import ConfigError  # noqa: E402
from tract_jax.models import factory  # noqa: E402
from tract_jax.models.unet import count_params  # noqa: E402

EXTRAS = ('sample', 'fid')
FID_SAMPLES = 50_000

if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags
  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'demo.py'),
                                  'Job configuration file (configs/*.py).', lock_config=False)
  flags.DEFINE_integer('batch', None, 'Global batch size (default: config.batch_size).')
  flags.DEFINE_integer('steps', 10, 'Timed calls per benchmark (after one warm-up call).')
  flags.DEFINE_string('json', None, 'Write the results to this JSON file.')
  flags.DEFINE_list('what', None, 'Benchmarks: method names and/or sample, fid (default: every '
                    "method of the config's parametrisation, and sample).")
  flags.DEFINE_float('max_seconds', 60.0, 'Stop timing a benchmark after this many seconds.')
  flags.DEFINE_list('sample_steps', None, 'Sampler step counts to time (default: 1,8,T).')
  flags.DEFINE_integer('peak_size', None, 'Side of the peak-matmul operands (default: 2048 on CPU, '
                       '8192 on GPU/TPU).')
  flags.DEFINE_enum('dtype', '', ['', 'float32', 'bfloat16'], 'Student computation dtype.')
  flags.DEFINE_enum('teacher_dtype', '', ['', 'float32', 'bfloat16'],
                    'Teacher and self-teacher computation dtype (default: config, else --dtype).')
  flags.DEFINE_enum('remat', '', ['', 'none', 'blocks'], 'nn.remat on the UNet blocks.')
  flags.DEFINE_string('compile_cache', 'fresh', "Persistent compilation cache: 'fresh' (an empty "
                      "temporary directory), 'none' (off), or a directory to use as it is.")
  flags.DEFINE_bool('cached_compile', True, 'Also time each compile from the warm persistent cache.')
  flags.DEFINE_bool('compile_only', False, 'Lower and compile from abstract shapes; no run.')
  flags.DEFINE_integer('fid_batch', 200, 'Batch of the FID feature pass (--what=fid).')
  flags.DEFINE_integer('fid_size', 299, 'Inception input side (299 = the FID protocol).')


def default_what(config):
  """Every method of the config's parametrisation, and the sampler."""
  return [m.name for m in methods.REGISTRY
          if m.parametrisation.name == config.parametrisation] + ['sample']


def run_benchmarks(config, batch, steps, what=None, sample_steps=None, peak_size=None, mesh=None,
                   max_seconds=None, log=print, *, dtype='', teacher_dtype='', remat='',
                   compile_only=False, cached_compile=True, fid_batch=200, fid_size=299):
  """Runs the benchmarks; returns the results as a JSON-ready dict. The persistent compilation cache
  is whatever jax.config says (see measure.setup_compilation_cache)."""
  what = list(what or default_what(config))
  unknown = sorted(set(what) - set(methods.names() + EXTRAS))
  if unknown:
    raise ConfigError(f'--what: unknown {unknown}; choose from {methods.names() + EXTRAS}')
  for name in set(what) - set(EXTRAS):  # a method without the config's parametrisation: one line
    methods.get(name, config.parametrisation)
  dtype, teacher_dtype, remat = timed_step.model_options(config.model, dtype, teacher_dtype, remat)
  image_shape = data.image_shape(config.data)
  mesh = mesh or parallel.mesh_from_config(config)
  parallel.check_batch(batch, mesh, '--batch')
  cached = bool(cached_compile and jax.config.jax_compilation_cache_dir)
  log(f'{parallel.describe(mesh)}; {jax.devices()[0].device_kind}; jax {jax.__version__}')
  log(f'student dtype {dtype}, teacher/self-teacher dtype {teacher_dtype}, remat {remat}'
      + (', compile only (abstract shapes)' if compile_only else ''))
  peak = peak_total = None
  if not compile_only:
    peak = measure.matmul_peak(peak_size, dtype=dtype)
    peak_total = peak['flops_per_s'] * mesh.size
    log(f'matmul peak: {peak["flops_per_s"] / 1e9:,.1f} GFLOP/s per device ({peak["size"]}^2 '
        f'{peak["dtype"]}, best of 5) x {mesh.size} device(s)')

  # The network run forward (the sampler's), with the mesh's shardings, as training restores it.
  model_config = timed_step.with_model_options(config.model, dtype=dtype)
  model = factory.build_model(model_config)
  shapes = factory.abstract_params(model, image_shape, mesh, config.mesh.fsdp_min_size)
  params = shapes if compile_only else timed_step.random_params(shapes, config.seed)
  fwd_flops, flops_source = flops.forward_flops(  # model FLOPs: counted in float32
      timed_step.with_model_options(config.model, dtype='float32'), image_shape, 1,
      with_source=True)
  log(f'model: {count_params(shapes):,} parameters, images {image_shape}, batch {batch}; forward '
      f'{fwd_flops / 1e9:,.3f} GFLOP per image ({flops_source})')
  rows = []

  def add_row(name, images, timings, times, flop_count, compiled, note='', extra=None):
    row = {'name': name, 'batch': images, 'compile_s': timings['compile_s'],
           'lower_s': timings.get('lower_s'), 'xla_compile_s': timings.get('xla_compile_s'),
           'cached_compile_s': timings.get('cached_compile_s'), 'flops_per_call': flop_count,
           'flops_source': timings.get('flops_source'), 'dtype': dtype, 'note': note,
           'xla_memory_bytes': measure.memory_estimate(compiled), **(extra or {})}
    if times:
      median = statistics.median(times)
      row.update(ms_per_call=1e3 * median, ms_per_call_min=1e3 * min(times),
                 images_per_s=images / median, timed_calls=len(times))
      if flop_count and peak_total:
        row.update(achieved_flops_per_s=flop_count / median,
                   fraction_of_peak=flop_count / median / peak_total)
    kind, peak_bytes = measure.peak_memory()
    row['peak_memory_so_far'] = {'kind': kind, 'bytes': peak_bytes}
    rows.append(row)
    log(f'  {name}: lower {timings.get("lower_s") or 0:.1f}s + compile '
        f'{timings.get("xla_compile_s") or 0:.1f}s'
        + (f', {row["ms_per_call"]:.1f} ms/call' if times else ''))

  for name in [w for w in what if w not in EXTRAS]:
    bench = timed_step.StepBench(config, name, batch, mesh, params, image_shape, dtype=dtype,
                                 teacher_dtype=teacher_dtype, remat=remat, abstract=compile_only)
    timings = bench.compile(cached=cached)
    times = None if compile_only else measure.time_calls(bench.run, steps, max_seconds)
    note = '' if bench.plan is None else 'schedule ' + ','.join(map(str, bench.plan.schedule))
    add_row(f'{name} step', batch, timings, times, bench.model_flops(timings['flops']),
            bench.compiled, note, {'xla_memory': measure.memory_breakdown(bench.compiled),
                                   'lowered_flops': timings['flops']})
    del bench

  parametrisation = methods.for_config(config).parametrisation
  sample_1step = fid = None
  if ('sample' in what or 'fid' in what) and not compile_only:
    sampler = parametrisation.make_sampler(model, config)
    sharding = parallel.batch_sharding(mesh)
    noise = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (batch,) + image_shape),
                           sharding)
    labels = (jax.device_put(jnp.zeros((batch,), jnp.int32), sharding)
              if config.model.num_classes else None)
    compiled, timings = measure.compile_timed(sampler, params, noise, jnp.int32(1), labels,
                                              cached=cached)
    # The sampler's loop body is counted once: a rollout costs steps x one network call.
    call_flops = flops.lowered_flops(parametrisation.make_denoiser(model, config), params, noise,
                                     jax.ShapeDtypeStruct((batch,), jnp.float32), labels)
    counts = (sample_steps or (1, 8, config.teacher_steps)) if 'sample' in what else (1,)
    for i, n in enumerate(dict.fromkeys(int(s) for s in counts)):
      # The same program for every count: warmed up by the first count's warm-up call.
      times = measure.time_calls(lambda: compiled(params, noise, jnp.int32(n), labels), steps,
                                 max_seconds, warm_up=i == 0)
      sample_1step = statistics.median(times) if n == 1 else sample_1step
      if 'sample' in what:
        shared = {'compile_s': 0.0, 'lower_s': 0.0, 'xla_compile_s': 0.0,
                  'cached_compile_s': 0.0 if cached else None}
        add_row(f'{parametrisation.label} {n} step{"s" if n > 1 else ""}', batch,
                timings if i == 0 else shared, times, n * call_flops if call_flops else None,
                compiled, 'one compiled sampler for every step count'
                + (' (compile counted once)' if i else ''))
    if sample_1step is None:  # 'fid' without a 1-step count among --sample_steps
      sample_1step = statistics.median(measure.time_calls(
          lambda: compiled(params, noise, jnp.int32(1), labels), steps, max_seconds))

  if 'fid' in what and not compile_only:
    timings, times, compiled = fid_features.bench(mesh, fid_batch, fid_size, image_shape[0], steps,
                                                 max_seconds, cached)
    fid_ips, sample_ips = fid_batch / statistics.median(times), batch / sample_1step
    fid = {'feature_images_per_s': fid_ips, 'sample_1step_images_per_s': sample_ips,
           'samples': FID_SAMPLES, 'sampling_s': FID_SAMPLES / sample_ips,
           'features_s': FID_SAMPLES / fid_ips, 'inception_input': fid_size,
           'fid_batch': fid_batch}
    fid['total_s'] = fid['sampling_s'] + fid['features_s']
    add_row('FID features', fid_batch, timings, times, timings['flops'], compiled,
            f'{image_shape[0]}x{image_shape[1]} -> {fid_size}x{fid_size}; 50k-sample FID at 1 '
            f'step: {fid["total_s"]:.0f} s ({fid["sampling_s"]:.0f} sampling + '
            f'{fid["features_s"]:.0f} features)')

  kind, peak_bytes = measure.peak_memory()
  return {
      'config': config.to_dict(), 'platform': jax.devices()[0].platform,
      'device_kind': jax.devices()[0].device_kind, 'num_devices': mesh.size,
      'mesh': dict(mesh.shape), 'jax_version': jax.__version__, 'host': platform.node(),
      'cpu_count': os.cpu_count(), 'batch': batch, 'image_shape': list(image_shape),
      'num_params': count_params(shapes), 'timed_calls': steps, 'dtype': dtype,
      'teacher_dtype': teacher_dtype, 'remat': remat, 'compile_only': compile_only,
      'forward_flops_per_image': fwd_flops, 'flops_source': flops_source, 'matmul_peak': peak,
      'peak_flops_per_s_all_devices': peak_total,
      'peak_memory': {'kind': kind, 'bytes': peak_bytes},
      'compilation_cache': jax.config.jax_compilation_cache_dir or None,
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'fid': fid, 'benchmarks': rows,
  }


def main(argv):
  from absl import app, logging
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  if FLAGS.batch:
    config.batch_size = config.teacher_training.batch_size = FLAGS.batch
  cache_dir, fresh = measure.setup_compilation_cache(FLAGS.compile_cache)
  try:
    devices.configure(config)  # CPU: one device per core, as training does (cpu_devices)
    result = run_benchmarks(
        config, FLAGS.batch or config.batch_size, FLAGS.steps, FLAGS.what,
        [int(s) for s in FLAGS.sample_steps or ()], FLAGS.peak_size,
        max_seconds=FLAGS.max_seconds, dtype=FLAGS.dtype, teacher_dtype=FLAGS.teacher_dtype,
        remat=FLAGS.remat, compile_only=FLAGS.compile_only, cached_compile=FLAGS.cached_compile,
        fid_batch=FLAGS.fid_batch, fid_size=FLAGS.fid_size)
  except ConfigError as e:
    print(f'Configuration error: {e}', file=sys.stderr)
    sys.exit(2)
  finally:
    if fresh:
      shutil.rmtree(cache_dir, ignore_errors=True)
  print(tables.throughput_table(result))
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, 'w') as f:
      json.dump(result, f, indent=2, default=str)
    print(f'wrote {FLAGS.json}')


if __name__ == '__main__':
  from absl import app
  app.run(main)
