"""The DDIM losses, one pure function each: teacher denoising, BTD and TRACT (spec sections 3-6).
EDM's losses are in edm.py; the method records (methods/) wire either into the train step.

Every function takes a `denoise(params, z_t, t, labels, dropout_rng=None) -> x_hat` callable (the
network plus its output reconciliation, models/factory.py), parameter trees, a batch of real images
x (B, H, W, C) in [-1, 1] with labels (B,) or None, an RNG key and, for the distillation losses, the
phase row (teacher step in grid units, student step in grid units, student step count) from
phases.PhasePlan.phase_table. They return (loss, metrics) and are differentiated w.r.t. `params`.

Times are built from integer grid indices (t = i / T), so 1/T gaps are exact and the targets are
evaluated by diffusion.two_step_target_weights, which matches the float64 spec formula.
"""
import chex
import jax
import jax.numpy as jnp

from tract_jax import diffusion

REDUCTIONS = ('sum', 'mean')


def _check_batch(x, labels):
  """Trace-time checks at the boundary every loss shares: NHWC float images, one label each."""
  chex.assert_rank(x, 4)
  chex.assert_type(x, float)
  if labels is not None:
    chex.assert_shape(labels, (x.shape[0],))


def per_example(sq_err, reduction: str):
  """Squared error (B, H, W, C) -> (B,), summed (official TRACT/BTD) or averaged over pixels."""
  axes = tuple(range(1, sq_err.ndim))
  if reduction == 'sum':
    return jnp.sum(sq_err, axis=axes)
  if reduction == 'mean':
    return jnp.mean(sq_err, axis=axes)
  raise ValueError(f'loss_reduction must be one of {REDUCTIONS}, got {reduction!r}')


def _weighted_x_loss(x_pred, target, t, reduction):
  weight = diffusion.snr_weight(t)
  return jnp.mean(weight * per_example(jnp.square(x_pred - target), reduction))


def teacher_loss(params, denoise, x, labels, rng, *, reduction='mean', time_sampling='continuous',
                 teacher_steps=1024, dropout=True):
  """Denoising loss: w(t) ||x_hat(z_t, t) - x||^2 with t ~ U(0, 1) or t on the T-grid."""
  _check_batch(x, labels)
  k_t, k_eps, k_drop = jax.random.split(rng, 3)
  batch = x.shape[0]
  if time_sampling == 'continuous':
    t = jax.random.uniform(k_t, (batch,), jnp.float32)
  elif time_sampling == 'grid':
    t = jax.random.randint(k_t, (batch,), 1, teacher_steps + 1).astype(jnp.float32) / teacher_steps
  else:
    raise ValueError(f"time_sampling must be 'continuous' or 'grid', got {time_sampling!r}")
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  z_t = diffusion.q_sample(x, eps, t)
  x_hat = denoise(params, z_t, t, labels, dropout_rng=k_drop if dropout else None)
  loss = _weighted_x_loss(x_hat, x, t, reduction)
  return loss, {'loss': loss}


def _grid_times(index, teacher_steps):
  return index.astype(jnp.float32) / teacher_steps


def tract_times(rng, phase_row, batch):
  """Grid indices (i0, i1, i2) of TRACT examples (spec section 5, step 1), each (batch,) int32.

  index ~ step * U{1..S_{k+1}} (segment upper end), j ~ U{0..r-1}; i0 = index - j semi,
  i1 = i0 - semi, i2 = index - step (segment lower end). i1 == i2 exactly when j = r - 1.
  """
  semi, step, num_segments = phase_row[0], phase_row[1], phase_row[2]
  ratio = step // semi
  k_seg, k_j = jax.random.split(rng)
  index = step * jax.random.randint(k_seg, (batch,), 1, num_segments + 1)
  j = jax.random.randint(k_j, (batch,), 0, ratio)
  i0 = index - j * semi
  return i0, i0 - semi, index - step


def tract_target(denoise, teacher_params, sema_params, x, eps, labels, i0, i1, i2, *, teacher_steps,
                 clip_x=True):
  """Returns (z0, t0, x*) for given grid indices (spec section 5, steps 2-5).

  z1 = DDIM(z0, teacher, t0 -> t1); z2 = DDIM(z1, self-teacher, t1 -> t2), or z1 when t1 == t2;
  x* = inverse(z0, t0 -> z2, t2), computed as w1 x_hat1 + w2 x_hat2 (diffusion.two_step_target_weights).
  """
  t0, t1, t2 = (_grid_times(i, teacher_steps) for i in (i0, i1, i2))
  z0 = diffusion.q_sample(x, eps, t0)
  x_hat1 = denoise(teacher_params, z0, t0, labels)
  if clip_x:
    x_hat1 = jnp.clip(x_hat1, -1.0, 1.0)
  z1 = diffusion.ddim_step(z0, x_hat1, t0, t1)
  x_hat2 = denoise(sema_params, z1, t1, labels)
  if clip_x:
    x_hat2 = jnp.clip(x_hat2, -1.0, 1.0)
  boundary = i1 == i2  # j = r - 1: the teacher step ends on the segment end, z2 = z1
  w1, w2 = diffusion.two_step_target_weights(t0, t1, t2)
  w1 = jnp.where(boundary, 1.0, w1)  # what the formula gives too; made exact
  w2 = jnp.where(boundary, 0.0, w2)
  target = diffusion.bcast(w1, x_hat1) * x_hat1 + diffusion.bcast(w2, x_hat2) * x_hat2
  chex.assert_equal_shape([target, x])
  return z0, t0, jax.lax.stop_gradient(target)


def tract_loss(params, denoise, teacher_params, sema_params, x, labels, rng, phase_row, *,
               teacher_steps, reduction='sum', clip_x=True, teacher_denoise=None):
  """TRACT loss w(t0) ||student(z0, t0) - x*||^2 (spec section 5).

  teacher_denoise: the network the teacher and self-teacher run (e.g. another computation dtype);
  None = `denoise`.
  """
  _check_batch(x, labels)
  k_times, k_eps = jax.random.split(rng)
  i0, i1, i2 = tract_times(k_times, phase_row, x.shape[0])
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  z0, t0, target = tract_target(teacher_denoise or denoise, teacher_params, sema_params, x, eps,
                                labels, i0, i1, i2, teacher_steps=teacher_steps, clip_x=clip_x)
  x_pred = denoise(params, z0, t0, labels)
  loss = _weighted_x_loss(x_pred, target, t0, reduction)
  return loss, {'loss': loss}


def btd_times(rng, phase_row, batch):
  """Grid indices (i0, i1, i2) of BTD examples: t = i/N, mid = t - 1/(2N), s = t - 1/N, i ~ U{1..N}."""
  semi, step, num_steps = phase_row[0], phase_row[1], phase_row[2]
  i0 = step * jax.random.randint(rng, (batch,), 1, num_steps + 1)
  return i0, i0 - semi, i0 - step


def btd_target(denoise, teacher_params, x, eps, labels, i0, i1, i2, *, teacher_steps):
  """Returns (z_t, t, x*) for given grid indices (spec section 4).

  Two unclipped teacher DDIM steps t -> mid -> s; x* = inverse(z_t, t -> z_s, s), except
  x* = the teacher's second x_hat when s = 0.
  """
  t0, t1, t2 = (_grid_times(i, teacher_steps) for i in (i0, i1, i2))
  z0 = diffusion.q_sample(x, eps, t0)
  x_hat1 = denoise(teacher_params, z0, t0, labels)
  z1 = diffusion.ddim_step(z0, x_hat1, t0, t1)
  x_hat2 = denoise(teacher_params, z1, t1, labels)
  w1, w2 = diffusion.two_step_target_weights(t0, t1, t2)
  at_zero = i2 == 0
  w1 = jnp.where(at_zero, 0.0, w1)
  w2 = jnp.where(at_zero, 1.0, w2)
  target = diffusion.bcast(w1, x_hat1) * x_hat1 + diffusion.bcast(w2, x_hat2) * x_hat2
  return z0, t0, jax.lax.stop_gradient(target)


def btd_loss(params, denoise, teacher_params, x, labels, rng, phase_row, *, teacher_steps,
             reduction='sum', teacher_denoise=None):
  """BTD (progressive distillation) loss w(t) ||student(z_t, t) - x*||^2 (spec section 4)."""
  _check_batch(x, labels)
  k_times, k_eps = jax.random.split(rng)
  i0, i1, i2 = btd_times(k_times, phase_row, x.shape[0])
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  z0, t0, target = btd_target(teacher_denoise or denoise, teacher_params, x, eps, labels, i0, i1,
                              i2, teacher_steps=teacher_steps)
  x_pred = denoise(params, z0, t0, labels)
  loss = _weighted_x_loss(x_pred, target, t0, reduction)
  return loss, {'loss': loss}
