"""Train states, the jitted update steps and the phase loop: teacher training, TRACT and BTD.

Sections, top to bottom: configuration checks; model and optimiser; the train state and EMAs; the
update steps; sampling and evaluation helpers; the teacher job; the distillation job (phase loop);
the driver `train_and_evaluate(config, workdir)` that chains them.
"""
import functools
import json
import math
import os
import time
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tract_jax import checkpoints, data, diffusion, methods, parallel, phases, sampling, writers
from tract_jax.evaluation.digits_metric import teacher_agreement_rmse
from tract_jax.models.unet import UNet
from tract_jax.phases import ConfigError

METHODS = ('teacher', 'tract', 'btd')
MODES = ('train', 'evaluate', 'sample')
METRICS = ('agreement', 'digits_fid', 'fid')


# ---------------------------------------------------------------------------------------------------
# Configuration checks: everything that can be wrong fails here, before any compilation.
# ---------------------------------------------------------------------------------------------------
def _choice(name, value, allowed):
  if value not in allowed:
    raise ConfigError(f'{name}={value!r}: allowed values are {", ".join(map(repr, allowed))}')


def validate_config(config):
  """Checks the fields; returns the phase plan (None for the teacher job)."""
  _choice('method', config.method, METHODS)
  _choice('mode', config.mode, MODES)
  _choice('data.name', config.data.name, data.DATASETS)
  _choice('loss_reduction', config.loss_reduction, methods.REDUCTIONS)
  _choice('teacher_training.loss_reduction', config.teacher_training.loss_reduction,
          methods.REDUCTIONS)
  _choice('teacher_training.time_sampling', config.teacher_training.time_sampling,
          ('continuous', 'grid'))
  _choice('ema_reset', config.ema_reset, ('none', 'phase'))
  _choice('nonfinite', config.nonfinite, ('stop', 'skip'))
  for metric in config.eval.metrics:
    _choice('eval.metrics entry', metric, METRICS)
  if 'digits_fid' in config.eval.metrics and config.data.name != 'digits':
    raise ConfigError(f"eval.metrics: 'digits_fid' scores the embedded digits only, not "
                      f'data.name={config.data.name!r}')
  if 'fid' in config.eval.metrics:
    for field in ('inception_weights', 'reference_stats'):
      if not config.eval[field] or not os.path.exists(os.path.expanduser(config.eval[field])):
        raise ConfigError(f"eval.{field}={config.eval[field]!r}: 'fid' in eval.metrics needs this "
                          'file (see README, "FID protocol")')
  if config.eval_every < 0:
    raise ConfigError(f'eval_every={config.eval_every}: must be >= 0 (0 = only at phase ends)')
  _choice('model.mean_type', config.model.mean_type, diffusion.MEAN_TYPES)
  _choice('model.conv_impl', config.model.conv_impl, ('xla', 'im2col'))
  if not 0.0 <= config.sema < 1.0:
    raise ConfigError(f'sema={config.sema}: must be in [0, 1)')
  if not 0.0 < config.teacher_training.ema_decay < 1.0:
    raise ConfigError(f'teacher_training.ema_decay={config.teacher_training.ema_decay}: must be in (0, 1)')
  for name in ('checkpoint_every', 'log_every'):
    if int(config[name]) < 1:
      raise ConfigError(f'{name}={config[name]}: must be a positive integer')
  if (config.model.num_heads is None) == (config.model.head_dim is None):
    raise ConfigError('model.num_heads / model.head_dim: set exactly one of them (the other None)')
  channels_out = config.model.out_ch
  if config.model.mean_type == 'both' and channels_out % 2:
    raise ConfigError(f"model.out_ch={channels_out}: mean_type 'both' needs an even number "
                      '(an x head and an eps head)')
  if config.method == 'teacher':
    if config.teacher_training.train_steps < 1:
      raise ConfigError(f'teacher_training.train_steps={config.teacher_training.train_steps}: the '
                        'teacher job needs at least one step')
    return None
  if not config.teacher_checkpoint and config.teacher_training.train_steps < 1:
    raise ConfigError("teacher_checkpoint='': give a teacher checkpoint, or set "
                      'teacher_training.train_steps > 0 to train a teacher first')
  if config.teacher_checkpoint and not os.path.isdir(
      checkpoints.resolve_params_path(config.teacher_checkpoint)):
    raise ConfigError(f'teacher_checkpoint={config.teacher_checkpoint!r}: no such checkpoint '
                      'directory')
  return phases.make_plan(config.method, config.teacher_steps, config.time_schedule,
                          config.train_samples, config.batch_size, config.ema_residual)


def check_image_shape(config, image_shape):
  """The UNet halves the resolution len(ch_mult) - 1 times; the channels must match the output."""
  h, w, c = image_shape
  levels = len(config.model.ch_mult) - 1
  if h != w or h % (2 ** levels):
    raise ConfigError(f'model.ch_mult={tuple(config.model.ch_mult)}: {len(config.model.ch_mult)} '
                      f'levels need square images whose side is divisible by {2 ** levels}; the '
                      f'data has {h}x{w}')
  expected = 2 * c if config.model.mean_type == 'both' else c
  if config.model.out_ch != expected:
    raise ConfigError(f'model.out_ch={config.model.out_ch}: mean_type {config.model.mean_type!r} '
                      f'on {c}-channel images needs {expected}')


def check_device_sizes(config, mesh):
  """Batch sizes against the mesh and the processes."""
  parallel.check_batch(config.batch_size, mesh, 'batch_size')
  parallel.check_batch(config.teacher_training.batch_size, mesh, 'teacher_training.batch_size')
  parallel.check_batch(config.eval.sample_batch, mesh, 'eval.sample_batch')
  if config.eval.num_samples % config.eval.sample_batch:
    raise ConfigError(f'eval.num_samples={config.eval.num_samples}: must be a multiple of '
                      f'eval.sample_batch={config.eval.sample_batch}')


# ---------------------------------------------------------------------------------------------------
# Model and optimiser.
# ---------------------------------------------------------------------------------------------------
def build_model(model_config, dropout: float = 0.0) -> UNet:
  return UNet(ch=model_config.ch, emb_ch=model_config.emb_ch, ch_mult=tuple(model_config.ch_mult),
              num_res_blocks=model_config.num_res_blocks,
              attn_resolutions=tuple(model_config.attn_resolutions),
              num_heads=model_config.num_heads, head_dim=model_config.head_dim, dropout=dropout,
              out_ch=model_config.out_ch, num_classes=model_config.num_classes,
              num_groups=model_config.num_groups, conv_impl=model_config.conv_impl)


def make_denoiser(model: UNet, mean_type: str):
  """(params, z_t, t, labels, dropout_rng=None) -> x_hat: the network conditioned on logsnr(t)."""

  def denoise(params, z_t, t, labels, dropout_rng=None):
    logsnr = diffusion.logsnr_schedule(t)
    train = dropout_rng is not None
    rngs = {'dropout': dropout_rng} if train else None
    out = model.apply({'params': params}, z_t, logsnr, labels, train=train, rngs=rngs)
    return diffusion.predict_x(out, z_t, t, mean_type)

  return denoise


def init_params(model: UNet, image_shape, seed: int):
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  labels = jnp.zeros((1,), jnp.int32) if model.num_classes else None
  init = jax.jit(lambda key: model.init(key, x, jnp.zeros((1,)), labels, train=False)['params'])
  return init(jax.random.PRNGKey(seed))


def make_optimizer(learning_rate, warmup_steps=0, grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8):
  if warmup_steps > 0:
    lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                               optax.constant_schedule(learning_rate)], [warmup_steps])
  else:
    lr = learning_rate
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip and grad_clip > 0 else []
  return optax.chain(*parts, optax.adam(lr, b1=b1, b2=b2, eps=eps))


# ---------------------------------------------------------------------------------------------------
# Train state and EMAs.
# ---------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  """Everything needed to resume bit-for-bit. Distillation fields are None for the teacher job."""
  step: jax.Array            # int32: updates done
  phase: jax.Array           # int32: phase whose teacher is in teacher_params
  params: Any                # student (or teacher being trained)
  opt_state: Any
  ema_params: Any            # evaluation EMA
  ema_count: jax.Array       # int32: EMA updates since the last reset
  sema_params: Any           # TRACT self-teacher (None otherwise)
  sema_count: jax.Array
  teacher_params: Any        # frozen teacher of the current phase (None for the teacher job)
  rng: jax.Array             # uint32 key data
  nonfinite_count: jax.Array  # int32: updates skipped because the loss or a gradient was not finite
  first_nonfinite: jax.Array  # int32: step number of the first such update, -1 if none


def ema_update(ema, new, count, log_momentum: float):
  """Bias-corrected EMA (spec section 3): n += 1; d = (1 - m) / (1 - m^n); ema += d (new - ema).

  log_momentum = log(m), computed in float64 on the host; d = expm1(log m) / expm1(n log m) keeps
  full float32 accuracy for m = 0.99996 (1 - m in float32 would lose 3 digits).
  """
  count = count + 1
  if log_momentum == -math.inf:  # m = 0: plain copy
    decay = jnp.float32(1.0)
  else:
    decay = jnp.expm1(jnp.float32(log_momentum)) / jnp.expm1(count.astype(jnp.float32) * log_momentum)
  ema = jax.tree.map(lambda e, p: e + decay * (p - e), ema, new)
  return ema, count


def _log(m: float) -> float:
  return math.log(m) if m > 0 else -math.inf


def _maybe_flip(x, rng, enabled):
  if not enabled:
    return x
  flip = jax.random.bernoulli(rng, 0.5, (x.shape[0], 1, 1, 1))
  return jnp.where(flip, x[:, :, ::-1, :], x)


def _labels(batch, conditional):
  return batch['label'] if conditional else None


# ---------------------------------------------------------------------------------------------------
# Update steps (jitted once; the phase is a traced value, so one compiled step serves every phase).
# ---------------------------------------------------------------------------------------------------
def _jit_step(step_fn, mesh=None, state_sharding=None):
  """jit with the state donated; with a mesh, the state keeps its shardings and the batch is split
  over the devices (XLA inserts the gradient all-reduce / FSDP gathers)."""
  if mesh is None:
    return jax.jit(step_fn, donate_argnums=0)
  return jax.jit(step_fn, in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                 out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)


def _apply_update(state: TrainState, loss, metrics, grads, tx, log_m, log_sema=None):
  """Optimiser step and EMA updates; a non-finite loss or gradient leaves params, optimiser state and
  EMAs untouched (the update is skipped and counted), so NaNs never reach the state."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema, ema_count = ema_update(state.ema_params, params, state.ema_count, log_m)
  new = state.replace(params=params, opt_state=opt_state, ema_params=ema, ema_count=ema_count)
  if log_sema is not None:
    sema_params, sema_count = ema_update(state.sema_params, params, state.sema_count, log_sema)
    new = new.replace(sema_params=sema_params, sema_count=sema_count)
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
  bad = jnp.logical_not(finite)
  new = new.replace(
      step=state.step + 1,
      nonfinite_count=state.nonfinite_count + bad.astype(jnp.int32),
      first_nonfinite=jnp.where(bad & (state.first_nonfinite < 0), state.step, state.first_nonfinite))
  return new, dict(metrics, grad_norm=grad_norm)


def make_teacher_step(denoise, tx, *, ema_decay, reduction, time_sampling, teacher_steps,
                      random_flip, conditional, dropout, mesh=None, state_sharding=None):
  log_m = _log(ema_decay)

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    k_flip, k_loss = jax.random.split(rng)
    x = _maybe_flip(batch['image'], k_flip, random_flip)
    loss_fn = functools.partial(methods.teacher_loss, denoise=denoise, x=x,
                                labels=_labels(batch, conditional), rng=k_loss, reduction=reduction,
                                time_sampling=time_sampling, teacher_steps=teacher_steps,
                                dropout=dropout)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return _apply_update(state, loss, metrics, grads, tx, log_m)

  return _jit_step(step_fn, mesh, state_sharding)


def make_distill_step(denoise, tx, plan: phases.PhasePlan, *, sema, reduction, clip_x, random_flip,
                      conditional, mesh=None, state_sharding=None):
  table = jnp.asarray(plan.phase_table())
  log_m = _log(plan.ema_momentum)
  log_sema = _log(sema)

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    k_flip, k_loss = jax.random.split(rng)
    x = _maybe_flip(batch['image'], k_flip, random_flip)
    labels = _labels(batch, conditional)
    row = table[state.phase]
    if plan.method == 'tract':
      loss_fn = functools.partial(methods.tract_loss, denoise=denoise,
                                  teacher_params=state.teacher_params,
                                  sema_params=state.sema_params, x=x, labels=labels, rng=k_loss,
                                  phase_row=row, teacher_steps=plan.teacher_steps,
                                  reduction=reduction, clip_x=clip_x)
    else:
      loss_fn = functools.partial(methods.btd_loss, denoise=denoise,
                                  teacher_params=state.teacher_params, x=x, labels=labels,
                                  rng=k_loss, phase_row=row, teacher_steps=plan.teacher_steps,
                                  reduction=reduction)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return _apply_update(state, loss, metrics, grads, tx, log_m,
                         log_sema if plan.method == 'tract' else None)

  return _jit_step(step_fn, mesh, state_sharding)


def advance_phase(state: TrainState, reset_ema: bool) -> TrainState:
  """Phase change: the evaluation EMA becomes the teacher; student, self-teacher and optimiser go on."""
  teacher = jax.tree.map(jnp.copy, state.ema_params)
  count = jnp.zeros_like(state.ema_count) if reset_ema else state.ema_count
  return state.replace(phase=state.phase + 1, teacher_params=teacher, ema_count=count)


# ---------------------------------------------------------------------------------------------------
# Sampling and evaluation helpers.
# ---------------------------------------------------------------------------------------------------
class Evaluator:
  """Fixed noise (and labels) shared by the teacher and every student, so grids line up."""

  def __init__(self, config, denoise, image_shape, workdir, mesh=None):
    self.workdir = workdir
    self.mesh = mesh or parallel.mesh_from_config(config)
    self.sample = sampling.make_sampler(denoise, clip_x=config.clip_x)
    n = config.eval.num_samples
    key = jax.random.PRNGKey(config.seed + 1_000_003)
    # Generated identically on every host (same key), then each sampling batch is split over devices.
    self.noise = np.asarray(jax.random.normal(key, (n,) + tuple(image_shape), jnp.float32))
    if config.model.num_classes:  # uniformly random labels for evaluation samples
      self.labels = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (n,), 0,
                                                  config.model.num_classes))
    else:
      self.labels = None
    self.batch = config.eval.sample_batch
    self.metrics = tuple(config.eval.metrics)
    self.seed = config.seed
    self.num_classes = config.model.num_classes
    self.fid_samples = config.eval.fid_samples
    self.inception_weights = config.eval.inception_weights
    self.reference_stats = config.eval.reference_stats
    self.reference = None  # the teacher's T-step samples, once computed

  def samples(self, params, num_steps: int) -> np.ndarray:
    out = []
    sharding = parallel.batch_sharding(self.mesh)
    for i in range(0, len(self.noise), self.batch):
      noise = jax.device_put(self.noise[i:i + self.batch], sharding)
      labels = None if self.labels is None else jax.device_put(self.labels[i:i + self.batch], sharding)
      out.append(parallel.to_host(self.sample(params, noise, num_steps, labels)))
    return np.concatenate(out)

  def score(self, params, num_steps: int, reference=None) -> dict:
    """The configured metrics of `num_steps`-step samples (quantised to uint8 levels, like the paper).

    'agreement': RMSE against the teacher's T-step samples from the same noise (`reference`);
    'digits_fid': FID in the embedded digits' feature space (offline); 'fid': Inception FID against
    the reference statistics, on eval.fid_samples samples.
    """
    images = self.samples(params, num_steps)
    out = {}
    if 'agreement' in self.metrics and reference is not None:
      out['rmse_vs_teacher'] = teacher_agreement_rmse(images, reference)
    if 'digits_fid' in self.metrics:
      from tract_jax.evaluation.digits_metric import DigitsMetric
      self._digits = getattr(self, '_digits', None) or DigitsMetric()
      out['digits_fid'] = self._digits.fid(images)
    if 'fid' in self.metrics:
      out[f'fid{self.fid_samples // 1000}k'] = self.inception_fid(params, num_steps)
    return out, images

  def inception_fid(self, params, num_steps: int) -> float:
    from tract_jax.evaluation import fid, inception
    if getattr(self, '_inception', None) is None:
      self._inception = inception.load_inception(self.inception_weights, mesh=self.mesh)
      self._reference_stats = fid.load_stats(self.reference_stats)
    stats = fid.ActivationStats()
    key = jax.random.PRNGKey(self.seed + 2_000_003)
    sharding = parallel.batch_sharding(self.mesh)
    for i in range(0, self.fid_samples, self.batch):
      k = jax.random.fold_in(key, i)
      noise = jax.random.normal(k, (self.batch,) + self.noise.shape[1:], jnp.float32)
      labels = (jax.random.randint(jax.random.fold_in(k, 1), (self.batch,), 0, self.num_classes)
                if self.num_classes else None)
      images = parallel.to_host(self.sample(params, jax.device_put(noise, sharding), num_steps,
                                            None if labels is None else jax.device_put(labels, sharding)))
      stats.update(np.asarray(self._inception(images[:self.fid_samples - i])))
    mu, sigma, _ = stats.finalize()
    mu_ref, sigma_ref, _ = self._reference_stats
    return fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)

  def teacher_reference(self, teacher_params, teacher_steps: int) -> np.ndarray:
    """T-step teacher samples from the fixed noise, cached in the workdir."""
    path = os.path.join(self.workdir, f'teacher_samples_{teacher_steps}.npz')
    if os.path.exists(path):
      cached = np.load(path)['images']
      if cached.shape == self.noise.shape:
        self.reference = cached
        return cached
    images = self.samples(teacher_params, teacher_steps)
    self.reference = images
    if jax.process_index() == 0:
      tmp = path + '.tmp.npz'
      np.savez(tmp, images=images)
      os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache
    save_grid(self.workdir, f'teacher_{teacher_steps}steps.png', images, self.labels)
    return images


def save_grid(workdir, name, images, labels=None):
  path = writers.save_grid(os.path.join(workdir, name), images, labels=labels)
  print(f'  wrote {path}', flush=True)
  return path


# ---------------------------------------------------------------------------------------------------
# The teacher job.
# ---------------------------------------------------------------------------------------------------
def create_state(params, tx, rng_seed, mesh, fsdp_min_size=2**18, *, sema=False, teacher=None):
  """The initial train state, created already sharded on the mesh. Returns (state, shardings)."""
  init = lambda p, t: _new_state(p, tx, rng_seed, sema=sema, teacher=t)
  shardings = parallel.tree_shardings(jax.eval_shape(init, params, teacher), mesh, fsdp_min_size)
  return jax.jit(init, out_shardings=shardings)(params, teacher), shardings


def _new_state(params, tx, rng_seed, *, sema=False, teacher=None):
  zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the step donates the whole state
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  # Copies throughout: the state is donated to the step, the caller's arrays must survive it.
  return TrainState(step=zero(), phase=zero(), params=copy(params), opt_state=tx.init(params),
                    ema_params=copy(params), ema_count=zero(),
                    sema_params=copy(params) if sema else None, sema_count=zero(),
                    teacher_params=None if teacher is None else copy(teacher),
                    rng=jax.random.PRNGKey(rng_seed), nonfinite_count=zero(),
                    first_nonfinite=jnp.full((), -1, jnp.int32))


def train_teacher(config, workdir: str, source=None, mesh=None):
  """Trains a teacher (spec section 6) in `workdir`; returns its evaluation-EMA parameters.

  Resumes from workdir/checkpoints; the finished EMA is written to workdir/ema_params.
  """
  tc = config.teacher_training
  os.makedirs(workdir, exist_ok=True)
  final_path = os.path.join(workdir, 'ema_params')
  source = source or data.load_source(config.data)
  check_image_shape(config, source.image_shape)
  model = build_model(config.model, dropout=tc.dropout)
  denoise = make_denoiser(model, config.model.mean_type)
  tx = make_optimizer(tc.learning_rate, tc.warmup_steps, tc.grad_clip, config.optimizer.b1,
                      config.optimizer.b2, config.optimizer.eps)
  mesh = mesh or parallel.mesh_from_config(config)
  parallel.check_batch(tc.batch_size, mesh, 'teacher_training.batch_size')
  params = init_params(model, source.image_shape, config.seed)
  if os.path.isdir(final_path):
    print(f'Teacher already trained: {final_path}', flush=True)
    return checkpoints.load_params(final_path, params)
  state, state_sharding = create_state(params, tx, config.seed, mesh, config.mesh.fsdp_min_size)
  batcher = data.StepBatcher(source, tc.batch_size, config.seed, jax.process_index(),
                             jax.process_count())
  step_fn = make_teacher_step(denoise, tx, ema_decay=tc.ema_decay, reduction=tc.loss_reduction,
                              time_sampling=tc.time_sampling, teacher_steps=config.teacher_steps,
                              random_flip=config.data.random_flip,
                              conditional=bool(config.model.num_classes), dropout=tc.dropout > 0,
                              mesh=mesh, state_sharding=state_sharding)
  writer = writers.MetricWriter(workdir, enabled=jax.process_index() == 0)
  total = int(tc.train_steps)
  print(f'Teacher training: {total} steps, batch {tc.batch_size}, '
        f'{sum(x.size for x in jax.tree.leaves(params)):,} parameters', flush=True)
  with checkpoints.StateCheckpoints(os.path.join(workdir, 'checkpoints'),
                                    config.keep_checkpoints) as ckpts:
    state = ckpts.restore_or_keep(state, what='teacher training')
    state = run_loop(config, state, step_fn, batcher, mesh, ckpts, writer, total,
                     label=lambda step, state: 'teacher', scalar_prefix='teacher')
  checkpoints.save_params(final_path, state.ema_params)
  writer.close()
  return state.ema_params


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; the state was saved. Re-running the same command resumes."""


class NonFiniteError(RuntimeError):
  """The loss or a gradient was not finite (the update was not applied)."""


class _SignalFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step (so that it can save first)."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handler)
    return self

  def _handler(self, signum, frame):
    del frame
    if self.signum is not None:  # a second signal: stop now
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    import signal
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _check_finite(config, state, ckpts, where: str, reported: int = 0) -> int:
  """Host-side policy for skipped non-finite updates: 'stop' raises, 'skip' warns when the count grew
  past `reported` and goes on. Returns the current count."""
  count = int(state.nonfinite_count)
  if count <= reported:
    return count
  first = int(state.first_nonfinite)
  last_good = ckpts.latest_step()
  good = (f'the last good checkpoint is step {last_good} in {ckpts.directory}' if last_good is not None
          else 'no checkpoint was saved yet')
  message = (f'non-finite loss or gradients at step {first + 1} ({where}); {count} update(s) '
             f'skipped so far, parameters unchanged by them; {good}')
  if config.nonfinite == 'stop':
    raise NonFiniteError(message + ". Set --config.nonfinite=skip to skip such updates and go on.")
  print(f'WARNING: {message}', flush=True)
  return count


def run_loop(config, state, step_fn, batcher, mesh, ckpts, writer, total, *, label, scalar_prefix,
             phase_steps=None, on_phase_end=None, before_step=None, on_eval=None):
  """The update loop shared by the teacher and distillation jobs.

  Logs every `log_every` steps, saves every `checkpoint_every` steps, at every phase end (every
  `phase_steps` steps: on_phase_end(step, state) runs first) and at the end; a SIGTERM/SIGINT saves
  and raises Preempted. Non-finite updates are checked (one device sync) only at those points.
  """
  step = int(state.step)
  progress = writers.Progress(step, total)
  reported = 0  # non-finite updates already warned about
  # A background thread reads the next batches while the device computes.
  with _SignalFlag() as signals, data.Prefetcher(batcher, step) as batches:
    while step < total:
      if before_step is not None:
        state = before_step(step, state)
      batch_step, batch = batches.next()
      assert batch_step == step, (batch_step, step)
      state, metrics = step_fn(state, parallel.global_batch(batch, mesh))
      step += 1
      phase_end = phase_steps is not None and step % phase_steps == 0
      if step % config.log_every == 0 or step == total or phase_end or step == 1:
        reported = _check_finite(config, state, ckpts, label(step, state), reported)
        m = {k: float(v) for k, v in metrics.items()}
        writer.scalars(step, {f'{scalar_prefix}/{k}': v for k, v in m.items()})
        print(f'[{label(step, state)}] step {step}/{total} loss {m["loss"]:.4f} '
              f'({progress.line(step)})', flush=True)
      if (on_eval is not None and config.eval_every and step % config.eval_every == 0
          and not phase_end):
        on_eval(step, state)
      if phase_end or step % config.checkpoint_every == 0 or step == total:
        reported = _check_finite(config, state, ckpts, label(step, state), reported)
        if phase_end and on_phase_end is not None:
          on_phase_end(step, state)  # the phase artefact first, then the resumable state
        ckpts.save(step, state)
      if signals.signum is not None:
        reported = _check_finite(config, state, ckpts, label(step, state), reported)
        ckpts.save(step, state, wait=True)
        raise Preempted(f'signal {signals.signum} at step {step}: checkpoint saved in '
                        f'{ckpts.directory}; re-run the same command to resume')
  ckpts.wait()
  return state


# ---------------------------------------------------------------------------------------------------
# The distillation job (TRACT or BTD): the phase loop.
# ---------------------------------------------------------------------------------------------------
def train_distillation(config, workdir: str, plan: phases.PhasePlan, teacher_params, source=None,
                       mesh=None):
  """Runs every phase of `plan` from `teacher_params`; returns the final state."""
  source = source or data.load_source(config.data)
  mesh = mesh or parallel.mesh_from_config(config)
  parallel.check_batch(config.batch_size, mesh)
  model = build_model(config.model, dropout=0.0)  # dropout 0 in every network while distilling
  denoise = make_denoiser(model, config.model.mean_type)
  opt = config.optimizer
  tx = make_optimizer(opt.learning_rate, opt.warmup_steps, opt.grad_clip, opt.b1, opt.b2, opt.eps)
  conditional = bool(config.model.num_classes)
  # The student starts from the teacher; EMAs start there too (the first update copies the student).
  state, state_sharding = create_state(teacher_params, tx, config.seed + 1, mesh,
                                       config.mesh.fsdp_min_size, sema=plan.method == 'tract',
                                       teacher=teacher_params)
  step_fn = make_distill_step(denoise, tx, plan, sema=config.sema, reduction=config.loss_reduction,
                              clip_x=config.clip_x, random_flip=config.data.random_flip,
                              conditional=conditional, mesh=mesh, state_sharding=state_sharding)
  batcher = data.StepBatcher(source, config.batch_size, config.seed + 1, jax.process_index(),
                             jax.process_count())
  writer = writers.MetricWriter(workdir, enabled=jax.process_index() == 0)
  evaluator = Evaluator(config, denoise, source.image_shape, workdir, mesh)
  if 'agreement' in evaluator.metrics:
    evaluator.teacher_reference(teacher_params, plan.teacher_steps)  # cached in the workdir
  print(f'{plan.method.upper()}: schedule {",".join(map(str, plan.schedule))}, {plan.num_phases} '
        f'phase(s) of {plan.steps_per_phase} steps, batch {config.batch_size}, evaluation-EMA '
        f'momentum {plan.ema_momentum:.8f}', flush=True)

  def before_step(step, state):
    if plan.phase_of_step(step) > int(state.phase):
      state = advance_phase(state, reset_ema=config.ema_reset == 'phase')
    return state

  def label(step, state):
    k = int(state.phase)
    return f'{plan.method} phase {k}: {plan.schedule[k]}->{plan.schedule[k + 1]} steps'

  def on_phase_end(step, state):
    _finish_phase(workdir, plan, int(state.phase), state, evaluator, writer, step)

  def on_eval(step, state):
    phase = int(state.phase)
    scores, images = evaluator.score(state.ema_params, plan.student_steps(phase), evaluator.reference)
    if jax.process_index() == 0:
      writer.scalars(step, {f'eval/{k}': v for k, v in scores.items()} | {'eval/phase': phase})
      writer.image(step, f'samples/phase{phase}', images)
      print(f'  eval at step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in scores.items()),
            flush=True)

  with checkpoints.StateCheckpoints(os.path.join(workdir, 'checkpoints'),
                                    config.keep_checkpoints) as ckpts:
    state = ckpts.restore_or_keep(state, what=plan.method)
    state = run_loop(config, state, step_fn, batcher, mesh, ckpts, writer, plan.total_steps,
                     label=label, scalar_prefix=plan.method, phase_steps=plan.steps_per_phase,
                     on_phase_end=on_phase_end, before_step=before_step, on_eval=on_eval)
  writer.close()
  return state


def _finish_phase(workdir, plan, phase, state, evaluator, writer, step):
  """Keeps phase k's evaluation EMA (the S_{k+1}-step student) and writes its sample grid."""
  student_steps = plan.student_steps(phase)
  # Every process takes part in a (possibly sharded) save.
  checkpoints.save_params(os.path.join(workdir, f'phase_{phase}_ema'), state.ema_params)
  scores, images = evaluator.score(state.ema_params, student_steps, evaluator.reference)
  if jax.process_index() == 0:
    save_grid(workdir, f'phase{phase}_student_{student_steps}steps.png', images, evaluator.labels)
    writer.image(step, f'samples/phase{phase}_{student_steps}steps', images)
    writer.scalars(step, {f'eval/{k}': v for k, v in scores.items()} | {
        'eval/phase': phase, 'eval/student_steps': student_steps, 'eval/phase_end': 1})
    print(f'  phase {phase} student ({student_steps} steps): '
          + ', '.join(f'{k} {v:.4f}' for k, v in scores.items()), flush=True)


def teacher_agreement(workdir, plan, teacher_params, student_params, evaluator):
  """RMSE of the final student's samples and of the undistilled teacher at the student's step count,
  both against the teacher's T-step samples from the same noise."""
  final_steps = plan.schedule[-1]
  reference = evaluator.teacher_reference(teacher_params, plan.teacher_steps)
  undistilled = evaluator.samples(teacher_params, final_steps)
  student = evaluator.samples(student_params, final_steps)
  if jax.process_index() == 0:
    save_grid(workdir, f'teacher_{final_steps}steps.png', undistilled, evaluator.labels)
  result = {'student_steps': final_steps,
            'rmse_student_vs_teacher': teacher_agreement_rmse(student, reference),
            'rmse_undistilled_vs_teacher': teacher_agreement_rmse(undistilled, reference)}
  result['ratio'] = result['rmse_student_vs_teacher'] / max(result['rmse_undistilled_vs_teacher'],
                                                            1e-12)
  if 'digits_fid' in evaluator.metrics:
    from tract_jax.evaluation.digits_metric import DigitsMetric
    metric = DigitsMetric()
    result['digits_fid_teacher'] = metric.fid(reference)
    result['digits_fid_student'] = metric.fid(student)
    result['digits_fid_undistilled'] = metric.fid(undistilled)
  return result


# Fields that define a run: a workdir whose checkpoints came from other values cannot be resumed.
# (Mesh, logging, checkpoint and evaluation settings may change between restarts.)
RUN_FIELDS = ('method', 'seed', 'teacher_checkpoint', 'teacher_steps', 'time_schedule',
              'train_samples', 'batch_size', 'ema_residual', 'ema_reset', 'sema', 'loss_reduction',
              'clip_x', 'optimizer', 'teacher_training', 'model', 'data.name')
WORKDIR_ARTEFACTS = ('checkpoints', 'teacher', 'ema_params', 'result.json', 'summary.jsonl',
                     'tensorboard')


def _get(tree, dotted):
  for key in dotted.split('.'):
    tree = tree.get(key) if isinstance(tree, dict) else None
  return tree


def protect_workdir(config, workdir):
  """Refuses to resume a workdir written by an incompatible configuration, unless overwrite=True
  (which deletes that run's checkpoints and artefacts first)."""
  import glob
  import shutil
  saved_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(saved_path):
    return
  with open(saved_path) as f:
    saved = json.load(f)
  current = json.loads(config.to_json_best_effort())
  changed = [f'{k}: {json.dumps(_get(saved, k))} -> {json.dumps(_get(current, k))}'
             for k in RUN_FIELDS if _get(saved, k) != _get(current, k)]
  if not changed:
    return
  if not config.overwrite:
    raise ConfigError(f'workdir={workdir!r} holds a run with another configuration ('
                      + '; '.join(changed)[:800] + '). Use another workdir, or '
                      '--config.overwrite=True to delete that run and start over')
  if jax.process_index() == 0:
    print(f'overwrite=True: deleting the previous run in {workdir} ({"; ".join(changed)[:300]})',
          flush=True)
    victims = [os.path.join(workdir, n) for n in WORKDIR_ARTEFACTS]
    victims += glob.glob(os.path.join(workdir, 'phase_*_ema')) + glob.glob(
        os.path.join(workdir, 'teacher_samples_*.npz')) + glob.glob(os.path.join(workdir, '*.png'))
    for path in victims:
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)


def _latest_params(workdir, plan):
  """(path, sampling steps) of the newest trained parameters in a workdir."""
  import glob
  import re
  phases_done = sorted(int(re.search(r'phase_(\d+)_ema$', p).group(1))
                       for p in glob.glob(os.path.join(workdir, 'phase_*_ema')))
  if phases_done and plan is not None:
    k = phases_done[-1]
    return os.path.join(workdir, f'phase_{k}_ema'), plan.student_steps(k)
  for path in (os.path.join(workdir, 'ema_params'), os.path.join(workdir, 'teacher', 'ema_params')):
    if os.path.isdir(path):
      return path, None
  raise ConfigError(f'workdir={workdir!r}: no trained parameters found (phase_<k>_ema/ or '
                    'ema_params/); set eval.params')


def evaluate_or_sample(config, workdir, plan, source, mesh):
  """mode=evaluate: the configured metrics of saved parameters; mode=sample: N samples to .npz+PNG."""
  model = build_model(config.model)
  like = init_params(model, source.image_shape, config.seed)
  if config.eval.params:
    path, steps = config.eval.params, None
  else:
    path, steps = _latest_params(workdir, plan)
  steps = config.eval.steps or steps or config.teacher_steps
  params = checkpoints.load_params(path, like, field='eval.params')
  evaluator = Evaluator(config, make_denoiser(model, config.model.mean_type), source.image_shape,
                        workdir, mesh)
  if config.mode == 'sample':
    images = evaluator.samples(params, steps)
    out = config.eval.output or os.path.join(workdir, f'samples_{steps}steps.npz')
    if jax.process_index() == 0:
      labels = {} if evaluator.labels is None else {'labels': evaluator.labels}
      np.savez(out, images=writers.to_uint8(images), **labels)
      save_grid(os.path.dirname(os.path.abspath(out)), os.path.basename(out)[:-4] + '.png', images,
                evaluator.labels)
    print(f'Wrote {len(images)} samples ({steps} steps) from {path} to {out}', flush=True)
    return {'samples': out, 'steps': steps}
  reference_path = os.path.join(workdir, f'teacher_samples_{config.teacher_steps}.npz')
  reference = np.load(reference_path)['images'] if os.path.exists(reference_path) else None
  scores, _ = evaluator.score(params, steps, reference)
  result = {'params': os.path.abspath(path), 'steps': steps, **scores}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f'eval_{steps}steps.json'), 'w') as f:
      json.dump(result, f, indent=2)
  print(f'Evaluation of {path} at {steps} step(s): '
        + (', '.join(f'{k} {v:.4f}' for k, v in scores.items()) or 'no metric applies '
           '(agreement needs the teacher samples of a distillation workdir)'), flush=True)
  return result


def train_and_evaluate(config, workdir: str):
  """The whole job the config describes: (teacher training), every distillation phase, evaluation."""
  start = time.time()
  plan = validate_config(config)
  parallel.maybe_initialize_distributed(config)
  mesh = parallel.mesh_from_config(config)
  check_device_sizes(config, mesh)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  source = data.load_source(config.data)
  check_image_shape(config, source.image_shape)
  print(parallel.describe(mesh), flush=True)
  protect_workdir(config, workdir)
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, 'config.json.tmp')
    with open(tmp, 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, 'config.json'))

  if config.mode != 'train':
    return evaluate_or_sample(config, workdir, plan, source, mesh)

  if config.method == 'teacher':
    ema = train_teacher(config, workdir, source, mesh)
    model = build_model(config.model)
    evaluator = Evaluator(config, make_denoiser(model, config.model.mean_type), source.image_shape,
                          workdir, mesh)
    evaluator.teacher_reference(ema, config.teacher_steps)
    print(f'Done in {time.time() - start:.0f}s', flush=True)
    return {'wall_time_s': time.time() - start}

  model = build_model(config.model)
  like = init_params(model, source.image_shape, config.seed)
  if config.teacher_checkpoint:
    teacher = checkpoints.load_params(config.teacher_checkpoint, like)
  else:
    print('No teacher_checkpoint: training a teacher first (workdir/teacher)', flush=True)
    teacher = train_teacher(config, os.path.join(workdir, 'teacher'), source, mesh)
  evaluator = Evaluator(config, make_denoiser(model, config.model.mean_type), source.image_shape,
                        workdir, mesh)
  evaluator.teacher_reference(teacher, plan.teacher_steps)
  state = train_distillation(config, workdir, plan, teacher, source, mesh)
  result = teacher_agreement(workdir, plan, teacher, state.ema_params, evaluator)
  result['wall_time_s'] = time.time() - start
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'result.json'), 'w') as f:
      json.dump(result, f, indent=2)
  print(f'Teacher agreement at {result["student_steps"]} step(s) (RMSE against the '
        f'{plan.teacher_steps}-step teacher, same noise): student {result["rmse_student_vs_teacher"]:.4f}, '
        f'undistilled teacher {result["rmse_undistilled_vs_teacher"]:.4f} '
        f'(ratio {result["ratio"]:.2f})', flush=True)
  if 'digits_fid_student' in result:
    print(f'Offline digits FID ({len(evaluator.noise)} samples): teacher at {plan.teacher_steps} steps '
          f'{result["digits_fid_teacher"]:.2f}, student at {result["student_steps"]} step(s) '
          f'{result["digits_fid_student"]:.2f}, undistilled teacher at {result["student_steps"]} '
          f'step(s) {result["digits_fid_undistilled"]:.2f}', flush=True)
  print(f'Done in {result["wall_time_s"]:.0f}s', flush=True)
  return result
