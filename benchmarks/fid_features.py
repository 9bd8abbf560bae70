"""The FID feature pass as evaluation runs it, timed on random Inception weights (throughput.py)."""
import jax
import numpy as np

import measure  # benchmarks/measure.py
from tract_jax import parallel
from tract_jax.evaluation import inception, preprocess


def random_inception_variables(size, seed=0):
  """Random FID Inception-v3 variables with the real tree's shapes (timing only): He-scaled
  kernels, unit BatchNorm statistics."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if 'kernel' in name:
      fan_in = int(np.prod(s.shape[:-1]))
      return (rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return (np.ones if 'var' in name or 'scale' in name else np.zeros)(s.shape, np.float32)
  return jax.tree_util.tree_map_with_path(leaf, inception.variable_shapes(size))


def bench(mesh, batch, size, image_hw, steps, max_seconds, cached):
  """Times the FID feature pass as evaluation runs it (inception.InceptionFeatures' program:
  uint8 quantisation and the default 'torch' bilinear resize to `size` inside the program,
  Inception-v3 at HIGHEST precision, pool3 features) on random weights.
  Returns (timings, seconds per call, compiled)."""
  model = inception.FIDInceptionV3()
  variables = jax.device_put(random_inception_variables(size), parallel.replicated(mesh))
  images = jax.device_put(
      np.random.default_rng(0).uniform(-1, 1, (batch, image_hw, image_hw, 3)).astype(np.float32),
      parallel.batch_sharding(mesh))
  jitted = jax.jit(lambda v, x: model.apply(v, preprocess.preprocess(x, size))['pool'])
  compiled, timings = measure.compile_timed(jitted, variables, images, cached=cached)
  times = measure.time_calls(lambda: compiled(variables, images), steps, max_seconds)
  return timings, times, compiled
