"""Measuring a jitted program: compile time (lowering and XLA compile, cold and from the persistent
cache), call time, the matmul peak of the device, device memory (XLA's estimate and the device's
peak) and the persistent compilation cache the benchmarks use."""
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from flops import flops_with_source  # benchmarks/flops.py
from tract_jax.models.unet import canonical_dtype


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


def memory_breakdown(compiled):
  """{'argument', 'output', 'temp', 'alias'} bytes from XLA's memory analysis, or None."""
  try:
    m = compiled.memory_analysis()
    return {k: int(getattr(m, f'{k}_size_in_bytes')) for k in ('argument', 'output', 'temp', 'alias')}
  except Exception:  # pylint: disable=broad-except
    return None


def compile_timed(jitted, *args, cached=False):
  """Lowers and compiles `jitted` for `args`; returns (compiled, timings).

  timings: {'lower_s', 'xla_compile_s', 'compile_s' (their sum), 'flops' (lowered program),
  'cached_compile_s'}. With `cached`, the in-memory caches are cleared and the program is lowered and
  compiled again, now served by the persistent compilation cache the first compile filled (None
  when the cache is off); that compiled program is the one returned.
  """
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  flops, source = flops_with_source(jitted, *args, lowered=lowered)
  timings = {'lower_s': lowered_at - start, 'xla_compile_s': done - lowered_at,
             'compile_s': done - start, 'flops': flops, 'flops_source': source,
             'cached_compile_s': None}
  if cached and jax.config.jax_compilation_cache_dir:
    jax.clear_caches()
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    timings['cached_compile_s'] = time.perf_counter() - start
  return compiled, timings


def setup_compilation_cache(spec):
  """Points JAX's persistent compilation cache at `spec` ('fresh' | 'none' | a directory) with no
  minimum compile time or entry size, so every program is cached. Returns (directory or None,
  whether it is a fresh temporary directory to delete)."""
  if spec == 'none':
    jax.config.update('jax_compilation_cache_dir', None)
    return None, False
  fresh = spec == 'fresh'
  directory = tempfile.mkdtemp(prefix='tract_jax_bench_cache_') if fresh else spec
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory, fresh


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
  factor = 1 if sys.platform == 'darwin' else 1024
  return 'process max RSS (no device memory counter)', int(rss_kb * factor)


def matmul_peak(size=None, repeats=5, dtype='float32'):
  """Best-of-`repeats` FLOP/s of a jitted size x size matmul in `dtype` on the default device
  (bf16 operands give the bf16 tensor-core / MXU peak; float32 runs at the default precision,
  which is what the float32 steps use: TF32 passes on recent NVIDIA GPUs)."""
  platform_name = jax.devices()[0].platform
  size = size or (2048 if platform_name == 'cpu' else 8192)
  dt = canonical_dtype(dtype)
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32).astype(dt)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32).astype(dt)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return {'size': size, 'dtype': dt.name, 'best_s': best, 'flops_per_s': 2.0 * size ** 3 / best}


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
