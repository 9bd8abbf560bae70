"""A method's train step for timing: built by tract_jax.steps.build_train_step (the builder training
uses, so a benchmark times exactly the step training runs), with random parameters and one random
global batch of the config's image shape. throughput.py, scaling.py and host_sync.py time it."""
import copy
import math

import jax
import ml_collections
import numpy as np

import flops  # benchmarks/flops.py
import measure  # benchmarks/measure.py
from tract_jax import methods, parallel, phases, steps
from tract_jax.models.unet import canonical_dtype, canonical_remat


def model_options(model_config, dtype='', teacher_dtype='', remat=''):
  """(dtype, teacher_dtype, remat) from the flags, else config.model's fields, else float32 / the
  student's dtype / 'none'. Returns canonical names ('float32', 'blocks', ...)."""
  dtype = canonical_dtype(dtype or model_config.dtype or 'float32').name
  teacher_dtype = canonical_dtype(teacher_dtype or model_config.teacher_dtype or dtype).name
  remat = canonical_remat(remat or model_config.remat or 'none')
  return dtype, teacher_dtype, remat


def with_model_options(model_config, **fields):
  """A copy of config.model with `fields` (dtype, teacher_dtype, remat) set; config.model itself is
  left as it is."""
  model_config = ml_collections.ConfigDict(model_config)
  with model_config.unlocked():
    model_config.update(fields)
  return model_config


def random_params(shapes, seed: int, sharding=None):
  """Random float32 parameters of the given tree of ShapeDtypeStructs, made with NumPy on the host
  (no init program to compile: that alone takes tens of seconds for the paper models on a GPU).
  Kernels ~ N(0, 1/fan_in), GroupNorm scales 1, biases 0: the scale of a trained network, which is
  all a timing needs (the values do not change the work done). Each leaf is placed with `sharding`,
  else with its ShapeDtypeStruct's own (factory.abstract_params with a mesh)."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      value = np.ones(s.shape, np.float32)
    elif name.endswith("['bias']"):
      value = np.zeros(s.shape, np.float32)
    else:
      fan_in = math.prod(s.shape[:-1]) if len(s.shape) > 1 else 1
      value = rng.standard_normal(s.shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
    return jax.device_put(value, sharding or getattr(s, 'sharding', None))
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def random_batch(image_shape, batch, num_classes, seed=0):
  """Host batch of uniform [-1, 1] images (batch, H, W, C) and int labels, like data.ArraySource."""
  rng = np.random.default_rng(seed)
  return {'image': rng.uniform(-1.0, 1.0, (batch,) + tuple(image_shape)).astype(np.float32),
          'label': rng.integers(0, max(num_classes, 1), (batch,)).astype(np.int32)}


def plan_for(config, method: methods.Method):
  """The phase plan whose first phase the step is timed on: the config's schedule for its own
  method, else the method's default schedule (TRACT: T -> 1; BTD: halving)."""
  if method.name == config.method and config.time_schedule:
    schedule = config.time_schedule
  else:
    schedule = method.default_schedule(config.teacher_steps)
  num_phases = len(method.schedule(schedule, config.teacher_steps)) - 1
  samples = max(int(config.train_samples), config.batch_size * num_phases)
  return phases.make_plan(method.name, config.teacher_steps, schedule, samples, config.batch_size,
                          config.ema_residual)


def bench_config(config, batch: int, dtype: str, teacher_dtype: str, remat: str):
  """A copy of `config` whose batches are `batch` and whose networks compute as asked."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model = with_model_options(config.model, dtype=dtype, teacher_dtype=teacher_dtype,
                                      remat=remat)
  config.batch_size = config.teacher_training.batch_size = batch
  return config


class StepBench:
  """The train step of method `name` (in config.parametrisation) with its state and one global
  batch; `run()` is one update. dtype / teacher_dtype / remat: '' = config.model's (model_options).

  With `abstract`, `params` are ShapeDtypeStructs and so are the state and the batch: the step can
  be lowered and compiled but not run.
  """

  def __init__(self, config, name, batch, mesh, params, image_shape, *, dtype='',
               teacher_dtype='', remat='', abstract=False):
    dtype, teacher_dtype, self.remat = model_options(config.model, dtype, teacher_dtype, remat)
    self.method = methods.get(name, config.parametrisation)
    self.config = bench_config(config, batch, dtype, teacher_dtype, self.remat)
    self.plan = plan_for(self.config, self.method) if self.method.distils else None
    self.mesh, self.abstract = mesh, abstract
    self.params_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    built = steps.build_train_step(self.config, self.method, mesh, params, self.plan,
                                   abstract=abstract)
    self.jitted, self.state = built.step, built.state
    host_batch = random_batch(image_shape, batch, config.model.num_classes, seed=config.seed)
    if abstract:
      sharding = parallel.batch_sharding(mesh)
      self.batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                    for k, v in host_batch.items()}
    else:
      self.batch = parallel.global_batch(host_batch, mesh)
    self.compiled = None

  def compile(self, cached=False):
    """Lowers and compiles the step (measure.compile_timed); returns its timings."""
    self.compiled, timings = measure.compile_timed(self.jitted, self.state, self.batch,
                                                   cached=cached)
    return timings

  def model_flops(self, flops_of_this_step):
    """FLOPs of the step without remat's recomputation: the lowered FLOPs of the same step with
    remat 'none' (lowering only); this step's own when it has no remat."""
    if self.remat == 'none':
      return flops_of_this_step
    plain = copy.deepcopy(self.config)
    plain.model.remat = 'none'
    built = steps.build_train_step(plain, self.method, self.mesh, self.params_shapes, self.plan,
                                   abstract=True)
    return flops.lowered_flops(built.step, built.state, self.batch)

  def run(self):
    self.state, metrics = self.compiled(self.state, self.batch)  # the old state is donated
    return metrics['loss']
