"""Throughput of the jitted steps, the sampler and the FID feature pass for one config's model.

  python benchmarks/throughput.py --config=configs/demo.py [--config.field=value ...] \
      [--batch=N] [--steps=N] [--what=teacher,tract,btd,sample,fid] [--dtype=bfloat16] \
      [--teacher_dtype=float32] [--remat=blocks] [--compile_only] [--json=out.json]

Measures, on the devices JAX sees (the config's mesh settings):
  - the teacher training step, the TRACT step and the BTD step (first phase of each method's phase
    plan), DDIM sampling at 1, 8 and T steps (one compiled sampler; T = config.teacher_steps), and
    with `fid` the FID Inception feature pass (random weights, batch --fid_batch of 32x32 images
    resized to 299 inside the program) plus the implied time of a 50k-sample FID at 1 step;
  - compile time of each program, split into lowering (tracing to StableHLO) and XLA compilation,
    with an empty persistent compilation cache ("cold", the default --compile_cache=fresh), and again
    from the warm persistent cache after `jax.clear_caches()` ("cached": what a restarted job pays);
  - ms per call (median of --steps timed calls after one warm-up call, at most --max_seconds of
    timing per benchmark; min too) and images/s;
  - FLOPs per call from XLA's cost analysis of the LOWERED program (`lowered_flops`): the whole
    global computation before optimisation. The compiled program's analysis is per device and, on
    GPU, omits the cuDNN convolution custom calls (it undercounts a UNet ~40x). jax 0.11.2 returns
    no lowered analysis on GPU: there the count is the jaxpr's convolutions and matmuls (valid
    taps only, `jaxpr_flops`; 99.7% of the lowered count on the CIFAR-10 UNet, the rest being
    elementwise work), and the JSON says which source was used ('flops_source'). For the sampler:
    the number of steps times one network evaluation (a while-loop body is counted once). These
    are model FLOPs: with --remat=blocks they come from the same step without remat, so remat's recomputation does not inflate "% peak"; the step's
    own lowered count is kept in the JSON as lowered_flops;
  - achieved FLOP/s as a fraction of the machine's matmul peak measured in the same run in the
    dtype the step computes in (a bf16 x bf16 matmul for --dtype=bfloat16);
  - memory: XLA's per-program estimate (arguments + outputs + temporaries - aliased), and the
    device's peak_bytes_in_use when the backend reports it, else the process's max RSS (labelled).
    XLA:CPU drops remat (it CSEs the recomputation away once the optimisation barriers are gone),
    so remat's saving shows on GPU/TPU only; on CPU, see the saved-residual count in the README.

Mixed precision and remat: --dtype / --teacher_dtype / --remat (default: config.model.dtype /
config.model.teacher_dtype / config.model.remat when the config has them, else float32 / same as
dtype / none). The student forward and backward compute in --dtype; the teacher and self-teacher
forwards that build the target in --teacher_dtype. Parameters, optimiser state, EMAs, DDIM arithmetic,
targets and the loss stay float32.

The steps are the training's own: tract_jax.models.factory builds the networks, state.create_state
the state and steps.make_train_step the jitted update (random flips happen in the input pipeline,
so none are timed here); only the parameters are made here, with NumPy (random_params).
--compile_only lowers and compiles every
step from abstract shapes (jax.ShapeDtypeStruct: nothing allocated) and reports compile times, FLOPs
and XLA's memory estimate without running: it measures paper-size models on a laptop.

Data is random (uniform in [-1, 1]) with the image shape of config.data.name, so no dataset is
needed: `--config=configs/cifar10_tract.py` measures the paper-width model on a GPU/TPU.
Timings on a shared machine are noisy: compare numbers from the same run.
"""
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from tract_jax import import_teacher, parallel, phases, sampling  # noqa: E402
from tract_jax.models import factory  # noqa: E402
from tract_jax.models.unet import canonical_dtype, canonical_remat, count_params  # noqa: E402
from tract_jax.state import create_state, make_optimizer  # noqa: E402
from tract_jax.steps import distill_loss_fn, make_train_step, teacher_loss_fn  # noqa: E402

BENCHMARKS = ('teacher', 'tract', 'btd', 'sample', 'fid')
DEFAULT_WHAT = ('teacher', 'tract', 'btd', 'sample')
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
  flags.DEFINE_list('what', list(DEFAULT_WHAT), f'Benchmarks to run, any of {",".join(BENCHMARKS)}.')
  flags.DEFINE_float('max_seconds', 60.0, 'Stop timing a benchmark after this many seconds '
                     '(at least one timed call): a 1024-step rollout of the paper model is slow.')
  flags.DEFINE_list('sample_steps', None, 'DDIM step counts to time (default: 1,8,T).')
  flags.DEFINE_integer('peak_size', None, 'Side of the peak-matmul operands (default: 2048 on CPU, '
                       '8192 on GPU/TPU).')
  flags.DEFINE_enum('dtype', '', ['', 'float32', 'bfloat16'],
                    'Computation dtype of the student (default: config.model.dtype, else float32).')
  flags.DEFINE_enum('teacher_dtype', '', ['', 'float32', 'bfloat16'],
                    'Computation dtype of the teacher and self-teacher forwards (default: '
                    'config.model.teacher_dtype, else the same as --dtype).')
  flags.DEFINE_enum('remat', '', ['', 'none', 'blocks'],
                    'nn.remat on the UNet blocks (default: config.model.remat, else none).')
  flags.DEFINE_string('compile_cache', 'fresh', "Persistent compilation cache: 'fresh' (an empty "
                      "temporary directory, deleted at exit: the first compile is cold), 'none' "
                      '(off; no cached compile times), or a directory to use as it is.')
  flags.DEFINE_bool('cached_compile', True, 'Also time each compile from the warm persistent cache.')
  flags.DEFINE_bool('compile_only', False, 'Lower and compile from abstract shapes; no run.')
  flags.DEFINE_integer('fid_batch', 200, 'Batch of the FID feature pass (--what=fid).')
  flags.DEFINE_integer('fid_size', 299, 'Inception input side (299 = the FID protocol).')


# ---------------------------------------------------------------------------------------------------
# Measurement helpers.
# ---------------------------------------------------------------------------------------------------
def cost_flops(stage):
  """FLOPs from XLA's cost analysis of a jax `Lowered` or `Compiled` stage, or None.

  `cost_analysis()` returns a dict in recent JAX, a list with one dict per program in older ones,
  or None on some backends.
  """
  try:
    analysis = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None
  flops = analysis.get('flops')
  return float(flops) if flops is not None and flops >= 0 else None


def _prod(values):
  out = 1
  for v in values:
    out *= int(v)
  return out


def _sub_jaxprs(value):
  """Jaxprs held by an equation parameter (a Jaxpr, a ClosedJaxpr, or a tuple of them)."""
  if hasattr(value, 'eqns'):
    return [value]
  if hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    return [value.jaxpr]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _valid_taps(in_size, kernel, out_size, stride, pad_lo, lhs_dil, rhs_dil):
  """Number of (output position, kernel tap) pairs of one spatial dimension that read a real input
  element (not padding, not a hole of lhs dilation): XLA counts only those multiply-adds."""
  pos = (np.arange(out_size)[:, None] * stride + np.arange(kernel)[None, :] * rhs_dil - pad_lo)
  valid = (pos >= 0) & (pos <= (in_size - 1) * lhs_dil) & (pos % lhs_dil == 0)
  return int(valid.sum())


def _conv_flops(eqn) -> float:
  """2 x the multiply-adds of a conv_general_dilated equation that touch real input elements."""
  p = eqn.params
  lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  dn = p['dimension_numbers']
  lhs_spatial, rhs_spatial, out_spatial = dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:]
  nsp = len(lhs_spatial)
  strides = p['window_strides'] or (1,) * nsp
  lhs_dil = p['lhs_dilation'] or (1,) * nsp
  rhs_dil = p['rhs_dilation'] or (1,) * nsp
  taps = 1
  for i in range(nsp):
    taps *= _valid_taps(lhs[lhs_spatial[i]], rhs[rhs_spatial[i]], out[out_spatial[i]], strides[i],
                        p['padding'][i][0], lhs_dil[i], rhs_dil[i])
  # Per (output batch, output feature): taps x input features per group.
  return 2.0 * out[dn.out_spec[0]] * out[dn.out_spec[1]] * rhs[dn.rhs_spec[1]] * taps


def _jaxpr_matmul_flops(jaxpr) -> float:
  """2 x multiply-adds of every dot_general and conv_general_dilated in a jaxpr, nested ones
  included (scan bodies times their length; while bodies once, as XLA counts them; the costliest
  branch of a cond)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * _prod(eqn.outvars[0].aval.shape) * _prod(lhs[d] for d in lhs_contract)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    if name == 'cond':
      total += max((_jaxpr_matmul_flops(j) for j in _sub_jaxprs(eqn.params.get('branches', ()))),
                   default=0.0)
      continue
    factor = float(eqn.params.get('length', 1)) if name == 'scan' else 1.0
    for key, value in eqn.params.items():
      if name == 'while' and key == 'cond_jaxpr':
        continue
      for sub in _sub_jaxprs(value):
        total += factor * _jaxpr_matmul_flops(sub)
  return total


def jaxpr_flops(fn, *args, **kwargs):
  """FLOPs of the convolutions and matmuls of `fn(*args)` counted from its jaxpr (2 per
  multiply-add; elementwise work not counted). The fallback of `lowered_flops` where JAX's lowered
  cost analysis returns nothing (jax 0.11 on GPU); within 1% of it on the UNet (elementwise ops are
  the difference; a test checks both on the CIFAR-10 forward)."""
  return _jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def lowered_flops(fn, *args, **kwargs):
  """FLOPs of one call of `fn(*args, **kwargs)`, from the cost analysis of the lowered program.

  Lowering only (no XLA compile): the arguments may be jax.ShapeDtypeStructs, so the FLOPs of a
  paper-size model are counted without allocating it. The lowered program is the whole (global,
  unpartitioned) computation before XLA's optimisations, so, unlike the compiled program's
  analysis, it counts convolutions that the GPU backend turns into cuDNN custom calls and needs no
  scaling by the device count. A multiply-add counts as 2 FLOPs. `fn` may be jitted already.
  Where the lowered analysis is unavailable (it returns None in jax 0.11.2 on GPU), the count
  falls back to `jaxpr_flops` (convolutions and matmuls only).
  """
  return flops_with_source(fn, *args, **kwargs)[0]


def flops_with_source(fn, *args, lowered=None, **kwargs):
  """(FLOPs, 'lowered' | 'jaxpr') of one call of `fn(*args)`; see lowered_flops. Pass `lowered`
  when the program has been lowered already."""
  jitted = fn if hasattr(fn, 'lower') else jax.jit(fn)
  flops = cost_flops(lowered if lowered is not None else jitted.lower(*args, **kwargs))
  if flops:
    return flops, 'lowered'
  return jaxpr_flops(jitted, *args, **kwargs), 'jaxpr'


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


# ---------------------------------------------------------------------------------------------------
# The model and the steps: the package's own (tract_jax.models.factory, state, steps), so the
# benchmark times exactly the step that training runs.
# ---------------------------------------------------------------------------------------------------
def model_options(model_config, dtype='', teacher_dtype='', remat=''):
  """(dtype, teacher_dtype, remat) from the flags, else config.model's fields when it has them,
  else float32 / the student's dtype / 'none'. Returns canonical names ('float32', 'blocks', ...)."""
  get = lambda name: model_config.get(name, '') if hasattr(model_config, 'get') else ''
  dtype = canonical_dtype(dtype or get('dtype') or 'float32').name
  teacher_dtype = canonical_dtype(teacher_dtype or get('teacher_dtype') or dtype).name
  remat = canonical_remat(remat or get('remat') or 'none')
  return dtype, teacher_dtype, remat


def with_model_options(model_config, **fields):
  """A copy of config.model with `fields` (dtype, teacher_dtype, remat) set: what
  factory.build_model reads. config.model itself is left as it is."""
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
      fan_in = _prod(s.shape[:-1]) if len(s.shape) > 1 else 1
      value = rng.standard_normal(s.shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
    return jax.device_put(value, sharding or getattr(s, 'sharding', None))
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def forward_flops(model_config, image_shape, batch=1, dtype='float32', with_source=False):
  """Lowered FLOPs of one UNet forward at `batch` (nothing allocated, nothing compiled); with
  `with_source`, (FLOPs, 'lowered' | 'jaxpr')."""
  model = factory.build_model(with_model_options(model_config, dtype=dtype))
  params = factory.abstract_params(model, image_shape)
  x = jax.ShapeDtypeStruct((batch,) + tuple(image_shape), jnp.float32)
  logsnr = jax.ShapeDtypeStruct((batch,), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32) if model.num_classes else None
  apply = lambda p, x, l, y: model.apply({'params': p}, x, l, y, train=False)
  flops, source = flops_with_source(apply, params, x, logsnr, labels)
  return (flops, source) if with_source else flops


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


def _abstract(tree, shardings=None):
  if shardings is None:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


def abstract_state(params, tx, rng_seed, mesh, fsdp_min_size, **kwargs):
  """state.create_state from abstract `params`, traced only (nothing allocated): (the state as
  ShapeDtypeStructs with its shardings, the shardings)."""
  out = {}

  def create(p):
    state, out['shardings'] = create_state(p, tx, rng_seed, mesh, fsdp_min_size, **kwargs)
    return state
  shapes = jax.eval_shape(create, params)
  return _abstract(shapes, out['shardings']), out['shardings']


class StepBench:
  """The train step of `method` ('teacher', 'tract' or 'btd') as training builds it (factory,
  state.create_state, steps.make_train_step), with its state and one global batch; `run()` is one
  update. dtype / teacher_dtype / remat: '' = config.model's (see model_options).

  With `abstract`, `params` are ShapeDtypeStructs and so are the state and the batch: the step can
  be lowered and compiled but not run.
  """

  def __init__(self, config, method, batch, mesh, params, image_shape, *, dtype='',
               teacher_dtype='', remat='', abstract=False):
    dtype, teacher_dtype, self.remat = model_options(config.model, dtype, teacher_dtype, remat)
    self.method = method
    self.abstract = abstract
    self._spec = (config, method, batch, mesh, dtype, teacher_dtype, image_shape)
    self._params_shapes = _abstract(params)
    self.jitted, self.state, self.batch, self.plan = self._make(self.remat, params, abstract)
    self.compiled = None

  def _make(self, remat, params, abstract):
    """(jitted step, state, batch, phase plan or None), as train.train_teacher /
    train.train_distillation build them."""
    config, method, batch, mesh, dtype, teacher_dtype, image_shape = self._spec
    model_config = with_model_options(config.model, dtype=dtype, teacher_dtype=teacher_dtype,
                                      remat=remat)
    mean_type, conditional = config.model.mean_type, bool(config.model.num_classes)
    opt = config.optimizer
    plan = None
    if method == 'teacher':
      tc = config.teacher_training
      model = factory.build_model(model_config, dropout=tc.dropout, trained=True)
      tx = make_optimizer(tc.learning_rate, tc.warmup_steps, tc.grad_clip, opt.b1, opt.b2, opt.eps)
      loss_fn = teacher_loss_fn(
          factory.make_denoiser(model, mean_type), reduction=tc.loss_reduction,
          time_sampling=tc.time_sampling, teacher_steps=config.teacher_steps,
          conditional=conditional, dropout=tc.dropout > 0)
      seed, state_kwargs, momenta = config.seed, {}, {'ema_momentum': tc.ema_decay}
    else:
      model = factory.build_model(model_config, dropout=0.0, trained=True)
      tx = make_optimizer(opt.learning_rate, opt.warmup_steps, opt.grad_clip, opt.b1, opt.b2,
                          opt.eps)
      plan = plan_for(config, method, batch)
      teacher_denoise = factory.make_denoiser(factory.build_model(model_config, teacher=True),
                                              mean_type)
      loss_fn = distill_loss_fn(factory.make_denoiser(model, mean_type), plan,
                                reduction=config.loss_reduction, clip_x=config.clip_x,
                                conditional=conditional, teacher_denoise=teacher_denoise)
      seed = config.seed + 1
      state_kwargs = {'sema': method == 'tract', 'teacher': params}
      momenta = {'ema_momentum': plan.ema_momentum,
                 'sema_momentum': config.sema if method == 'tract' else None}
    make = abstract_state if abstract else create_state
    state, shardings = make(params, tx, seed, mesh, config.mesh.fsdp_min_size, **state_kwargs)
    jitted = make_train_step(loss_fn, tx, mesh=mesh, state_sharding=shardings, **momenta)
    host_batch = random_batch(image_shape, batch, config.model.num_classes, seed=config.seed)
    if abstract:
      batch_sharding = parallel.batch_sharding(mesh)
      batch_arrays = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                      for k, v in host_batch.items()}
    else:
      batch_arrays = parallel.global_batch(host_batch, mesh)
    return jitted, state, batch_arrays, plan

  def compile(self, cached=False):
    """Lowers and compiles the step (see compile_timed); returns the timings dict."""
    self.compiled, timings = compile_timed(self.jitted, self.state, self.batch, cached=cached)
    return timings

  def model_flops(self, lowered_flops_of_this_step):
    """FLOPs of the step without remat recomputation: the lowered FLOPs of the same step with remat
    'none' (lowering only). Equal to this step's own lowered FLOPs when it has no remat."""
    if self.remat == 'none':
      return lowered_flops_of_this_step
    jitted, state, batch, _ = self._make('none', self._params_shapes, True)
    return lowered_flops(jitted, state, batch)

  def run(self):
    self.state, metrics = self.compiled(self.state, self.batch)  # the old state is donated
    return metrics['loss']


def random_inception_variables(size, seed=0):
  """Random FID Inception-v3 variables with the real tree's shapes (timing only): He-scaled
  kernels, unit BatchNorm statistics."""
  from tract_jax.evaluation import inception
  shapes = inception.variable_shapes(size)
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if 'kernel' in name:
      fan_in = int(np.prod(s.shape[:-1]))
      return (rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if 'var' in name or 'scale' in name:
      return np.ones(s.shape, np.float32)
    return np.zeros(s.shape, np.float32)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def fid_feature_bench(mesh, batch, size, image_hw, steps, max_seconds, cached):
  """Times the FID feature pass as evaluation runs it (preprocess: uint8 quantisation and TF1
  bilinear resize to `size` inside the program; Inception-v3 at HIGHEST precision; pool3 features).
  Returns (timings, seconds per call, lowered FLOPs, compiled)."""
  from tract_jax.evaluation import inception, preprocess
  model = inception.FIDInceptionV3()

  def features(variables, images):
    return model.apply(variables, preprocess.preprocess(images, size))['pool']

  variables = jax.device_put(random_inception_variables(size), parallel.replicated(mesh))
  images = jax.device_put(
      np.random.default_rng(0).uniform(-1, 1, (batch, image_hw, image_hw, 3)).astype(np.float32),
      parallel.batch_sharding(mesh))
  jitted = jax.jit(features)
  compiled, timings = compile_timed(jitted, variables, images, cached=cached)
  times = time_calls(lambda: compiled(variables, images), steps, max_seconds)
  return timings, times, compiled


def run_benchmarks(config, batch, steps, what=DEFAULT_WHAT, sample_steps=None, peak_size=None,
                   mesh=None, max_seconds=None, log=print, *, dtype='', teacher_dtype='', remat='',
                   compile_only=False, cached_compile=True, fid_batch=200, fid_size=299):
  """Runs the benchmarks; returns the results as a JSON-ready dict. The persistent compilation cache
  is whatever jax.config says (see setup_compilation_cache)."""
  dtype, teacher_dtype, remat = model_options(config.model, dtype, teacher_dtype, remat)
  image_shape = import_teacher.image_shape(config)
  mesh = mesh or parallel.mesh_from_config(config)
  parallel.check_batch(batch, mesh, '--batch')
  n_devices = mesh.size
  cache_dir = jax.config.jax_compilation_cache_dir
  cached = bool(cached_compile and cache_dir)
  log(f'{parallel.describe(mesh)}; {jax.devices()[0].device_kind}; jax {jax.__version__}')
  log(f'student dtype {dtype}, teacher/self-teacher dtype {teacher_dtype}, remat {remat}'
      + (', compile only (abstract shapes)' if compile_only else ''))
  log(f'persistent compilation cache: {cache_dir or "off"}')

  if compile_only:
    peak = None
    peak_total = None
  else:
    peak = matmul_peak(peak_size, dtype=dtype)
    peak_total = peak['flops_per_s'] * n_devices
    log(f'matmul peak: {peak["flops_per_s"] / 1e9:,.1f} GFLOP/s per device ({peak["size"]}x'
        f'{peak["size"]} {peak["dtype"]}, best of 5) x {n_devices} device(s)')

  # The student network run forward (the sampler's), without remat; parameters with the mesh's
  # shardings, as training restores them.
  model = factory.build_model(with_model_options(config.model, dtype=dtype))
  shapes = factory.abstract_params(model, image_shape, mesh, config.mesh.fsdp_min_size)
  params = shapes if compile_only else random_params(shapes, config.seed)
  n_params = count_params(shapes)
  fwd_flops, flops_source = forward_flops(config.model, image_shape, 1, with_source=True)
  source_text = {'lowered': 'lowered program', 'jaxpr': 'jaxpr conv/matmul count'}[flops_source]
  log(f'model: {n_params:,} parameters, images {image_shape}, batch {batch}; forward '
      f'{fwd_flops / 1e9:,.3f} GFLOP per image ({source_text})')

  rows = []

  def add_row(name, images, timings, times, flops, mem, note='', extra=None):
    row = {'name': name, 'batch': images, 'compile_s': timings['compile_s'],
           'lower_s': timings.get('lower_s'), 'xla_compile_s': timings.get('xla_compile_s'),
           'cached_compile_s': timings.get('cached_compile_s'), 'flops_per_call': flops,
           'flops_source': timings.get('flops_source'),
           'xla_memory_bytes': mem, 'note': note, 'dtype': dtype}
    if times:
      median = statistics.median(times)
      row.update(ms_per_call=1e3 * median, ms_per_call_min=1e3 * min(times),
                 images_per_s=images / median, timed_calls=len(times))
      if flops and peak_total:
        row['achieved_flops_per_s'] = flops / median
        row['fraction_of_peak'] = flops / median / peak_total
    mem_label, mem_bytes = peak_memory()
    row['peak_memory_so_far'] = {'kind': mem_label, 'bytes': mem_bytes}
    row.update(extra or {})
    rows.append(row)
    cached_note = (f', cached {timings["cached_compile_s"]:.1f}s'
                   if timings.get('cached_compile_s') is not None else '')
    ms = f', {row["ms_per_call"]:.1f} ms/call' if times else ''
    log(f'  {name}: lower {timings.get("lower_s") or 0:.1f}s + compile '
        f'{timings.get("xla_compile_s") or 0:.1f}s{cached_note}{ms}')

  for method in ('teacher', 'tract', 'btd'):
    if method not in what:
      continue
    bench = StepBench(config, method, batch, mesh, params, image_shape, dtype=dtype,
                      teacher_dtype=teacher_dtype, remat=remat, abstract=compile_only)
    timings = bench.compile(cached=cached)
    times = None if compile_only else time_calls(bench.run, steps, max_seconds)
    note = '' if bench.plan is None else 'schedule ' + ','.join(map(str, bench.plan.schedule))
    flops = bench.model_flops(timings['flops'])
    add_row(f'{method} step', batch, timings, times, flops, memory_estimate(bench.compiled), note,
            {'xla_memory': memory_breakdown(bench.compiled), 'lowered_flops': timings['flops']})
    del bench

  sample_1step = None
  if ('sample' in what or 'fid' in what) and not compile_only:
    denoise = factory.make_denoiser(model, config.model.mean_type)
    sampler = sampling.make_sampler(denoise, clip_x=config.clip_x)
    batch_sharding = parallel.batch_sharding(mesh)
    noise = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (batch,) + tuple(image_shape)),
                           batch_sharding)
    labels = (jax.device_put(jnp.zeros((batch,), jnp.int32), batch_sharding)
              if config.model.num_classes else None)
    compiled, timings = compile_timed(sampler, params, noise, jnp.int32(1), labels, cached=cached)
    # The sampler's loop body is counted once: cost of a rollout = steps x one network call.
    t_in = jax.ShapeDtypeStruct((batch,), jnp.float32)
    call_flops = lowered_flops(denoise, params, noise, t_in, labels)
    counts = (sample_steps or (1, 8, config.teacher_steps)) if 'sample' in what else (1,)
    for i, n in enumerate(dict.fromkeys(int(s) for s in counts)):
      n_arr = jnp.int32(n)
      # The same program for every count: warmed up by the first count's warm-up call.
      times = time_calls(lambda: compiled(params, noise, n_arr, labels), steps, max_seconds,
                         warm_up=i == 0)
      if n == 1:
        sample_1step = statistics.median(times)
      if 'sample' in what:
        shared = {'compile_s': 0.0, 'lower_s': 0.0, 'xla_compile_s': 0.0,
                  'cached_compile_s': 0.0 if cached else None}
        add_row(f'DDIM {n} step{"s" if n > 1 else ""}', batch, timings if i == 0 else shared,
                times, n * call_flops if call_flops else None, memory_estimate(compiled),
                'one compiled sampler for every step count' + (' (compile counted once)' if i else ''))
    if sample_1step is None:  # 'fid' without a 1-step count among --sample_steps
      sample_1step = statistics.median(time_calls(
          lambda: compiled(params, noise, jnp.int32(1), labels), steps, max_seconds))

  fid = None
  if 'fid' in what and not compile_only:
    hw = image_shape[0]
    timings, times, compiled = fid_feature_bench(mesh, fid_batch, fid_size, hw, steps, max_seconds,
                                                 cached)
    fid_ips = fid_batch / statistics.median(times)
    sample_ips = batch / sample_1step
    fid = {'feature_images_per_s': fid_ips, 'sample_1step_images_per_s': sample_ips,
           'samples': FID_SAMPLES, 'sampling_s': FID_SAMPLES / sample_ips,
           'features_s': FID_SAMPLES / fid_ips,
           'total_s': FID_SAMPLES / sample_ips + FID_SAMPLES / fid_ips,
           'inception_input': fid_size, 'fid_batch': fid_batch}
    add_row('FID features', fid_batch, timings, times, timings['flops'], memory_estimate(compiled),
            f'{hw}x{hw} -> {fid_size}x{fid_size}; 50k-sample FID at 1 step: '
            f'{fid["total_s"]:.0f} s ({fid["sampling_s"]:.0f} sampling + {fid["features_s"]:.0f} '
            'features)')

  mem_label, mem_bytes = peak_memory()
  return {
      'config': config.to_dict() if hasattr(config, 'to_dict') else None,
      'platform': jax.devices()[0].platform, 'device_kind': jax.devices()[0].device_kind,
      'num_devices': n_devices, 'mesh': dict(mesh.shape), 'jax_version': jax.__version__,
      'host': platform.node(), 'cpu_count': os.cpu_count(), 'batch': batch,
      'image_shape': list(image_shape), 'num_params': n_params, 'timed_calls': steps,
      'dtype': dtype, 'teacher_dtype': teacher_dtype, 'remat': remat,
      'compile_only': compile_only,
      'forward_flops_per_image': fwd_flops, 'flops_source': flops_source,
      'matmul_peak': peak, 'peak_flops_per_s_all_devices': peak_total,
      'peak_memory': {'kind': mem_label, 'bytes': mem_bytes},
      'compilation_cache': cache_dir or None, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'fid': fid, 'benchmarks': rows,
  }


def format_table(result):
  """The results as a fixed-width text table."""
  header = (f'{"benchmark":<16} {"batch":>5} {"lower s":>7} {"compile s":>9} {"cached s":>8} '
            f'{"ms/call":>9} {"min ms":>8} {"images/s":>10} {"GFLOP/call":>11} {"GFLOP/s":>9} '
            f'{"% peak":>7} {"MiB/dev":>8}')
  lines = [header, '-' * len(header)]
  na = lambda width: f'{"n/a":>{width}}'
  for r in result['benchmarks']:
    flops = r['flops_per_call']
    gflop = f'{flops / 1e9:11.3f}' if flops else na(11)
    timed = 'ms_per_call' in r
    achieved = (f'{r["achieved_flops_per_s"] / 1e9:9.1f}' if 'achieved_flops_per_s' in r
                else na(9))
    frac = f'{100 * r["fraction_of_peak"]:6.1f}%' if 'fraction_of_peak' in r else na(7)
    mem = (f'{r["xla_memory_bytes"] / 2**20:8.1f}' if r['xla_memory_bytes'] is not None
           else na(8))
    cached = f'{r["cached_compile_s"]:8.1f}' if r.get('cached_compile_s') is not None else na(8)
    lines.append(
        f'{r["name"]:<16} {r["batch"]:>5} {r.get("lower_s") or 0:7.1f} {r["compile_s"]:9.1f} '
        f'{cached} '
        + (f'{r["ms_per_call"]:9.2f} {r["ms_per_call_min"]:8.2f} {r["images_per_s"]:10.1f} '
           if timed else f'{na(9)} {na(8)} {na(10)} ')
        + f'{gflop} {achieved} {frac} {mem}')
  peak = result['matmul_peak']
  mem = result['peak_memory']
  if peak:
    lines.append(f'peak: {peak["flops_per_s"] / 1e9:,.1f} GFLOP/s per device ({peak["size"]}x'
                 f'{peak["size"]} {peak["dtype"]} matmul, best of 5) x {result["num_devices"]} '
                 f'device(s); {mem["kind"]}: {mem["bytes"] / 2**20:,.0f} MiB')
  else:
    lines.append(f'peak: not measured (compile only); {mem["kind"]}: {mem["bytes"] / 2**20:,.0f} MiB')
  lines.append(f'{result["platform"]} ({result["device_kind"]}), {result["num_params"]:,} params, '
               f'images {tuple(result["image_shape"])}, dtype {result["dtype"]} (teacher '
               f'{result["teacher_dtype"]}), remat {result["remat"]}; forward '
               f'{result["forward_flops_per_image"] / 1e9:.3f} GFLOP/image (FLOPs: '
               f'{result["flops_source"]}); median of up to '
               f'{result["timed_calls"]} timed calls after a warm-up call')
  lines.append('compile s = lower s + XLA compile with an empty persistent cache ("cold" unless '
               '--compile_cache names a used directory); cached s = lower + load from it'
               + ('' if result['compilation_cache'] else ' (cache off)'))
  if result.get('fid'):
    f = result['fid']
    lines.append(f'FID@50k at 1 step: {f["total_s"]:.1f} s = sampling {f["sampling_s"]:.1f} s '
                 f'({f["sample_1step_images_per_s"]:.0f} images/s) + features '
                 f'{f["features_s"]:.1f} s ({f["feature_images_per_s"]:.0f} images/s)')
  return '\n'.join(lines)


def main(argv):
  from absl import app, logging
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  unknown = sorted(set(FLAGS.what) - set(BENCHMARKS))
  if unknown:
    raise app.UsageError(f'--what: unknown {unknown}; choose from {BENCHMARKS}')
  batch = FLAGS.batch or config.batch_size
  sample_steps = [int(s) for s in FLAGS.sample_steps] if FLAGS.sample_steps else None
  cache_dir, fresh = setup_compilation_cache(FLAGS.compile_cache)
  try:
    result = run_benchmarks(config, batch, FLAGS.steps, FLAGS.what, sample_steps, FLAGS.peak_size,
                            max_seconds=FLAGS.max_seconds, dtype=FLAGS.dtype,
                            teacher_dtype=FLAGS.teacher_dtype, remat=FLAGS.remat,
                            compile_only=FLAGS.compile_only, cached_compile=FLAGS.cached_compile,
                            fid_batch=FLAGS.fid_batch, fid_size=FLAGS.fid_size)
  except phases.ConfigError as e:
    print(f'Configuration error: {e}', file=sys.stderr)
    sys.exit(2)
  finally:
    if fresh:
      shutil.rmtree(cache_dir, ignore_errors=True)
  print(format_table(result))
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, 'w') as f:
      json.dump(result, f, indent=2, default=str)
    print(f'wrote {FLAGS.json}')


if __name__ == '__main__':
  from absl import app
  app.run(main)
