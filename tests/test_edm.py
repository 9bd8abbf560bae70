"""TRACT with EDM teachers (docs/SPEC_EDM.md) against a float64 NumPy transcription of the spec, and the
method through the driver on a tiny model.

The math tests use an elementwise stand-in network F(c_in x; c_noise) = a c_in x + b c_noise +
c tanh(c_in x) + d, evaluated exactly in float64 by the reference, so the comparisons isolate the
EDM arithmetic (grid, preconditioning, Heun and section-2 steps, target, loss, sampler).
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny import tiny_edm_config, tiny_edm_job_config
from tract_jax import checkpoints, config_checks, edm, losses, phases, state, steps, train
from tract_jax.errors import ConfigError
from tract_jax.models import factory

SD = 0.5


# ---- float64 reference: docs/SPEC_EDM.md sections 1-3, transcribed ----------------------------------
def ref_grid(T):
  out = [0.0]
  for i in range(1, T + 1):
    out.append((0.002 ** (1 / 7) + (i - 1) / (T - 1) * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7)
  return np.array(out, np.float64)


def ref_pre(s):
  s = np.float64(s)
  return (1 / np.sqrt(s**2 + SD**2), SD**2 / (s**2 + SD**2), s * SD / np.sqrt(s**2 + SD**2),
          0.25 * np.log(max(s, 1e-20)))


def ref_F(p, x_in, c_noise):
  return p['a'] * x_in + p['b'] * c_noise + p['c'] * np.tanh(x_in) + p['d']


def ref_D(p, x, s):
  c_in, c_skip, c_out, c_noise = ref_pre(s)
  return c_skip * x + c_out * ref_F(p, c_in * x, c_noise)


def ref_step(x, x0, s, s_next, clip=True):
  if clip:
    x0 = np.clip(x0, -1, 1)
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.nan_to_num(x0 + s_next * (x - x0) / s, nan=0.0, posinf=0.0, neginf=0.0)


def ref_target(teacher, sema, x, eps, sig, index, semi, stride):
  """One example, the release's phase (teacher step 1 grid unit): returns (x_t, F_target, x_target)."""
  i0, i1, i2 = index - semi, max(index - semi - 1, 1), index - stride
  s0, s1, s2 = sig[i0], sig[i1], sig[i2]
  x_t = x + s0 * eps
  x0 = ref_D(teacher, x_t, s0)
  if index - semi - 1 == 0:
    x_target = x0
  else:
    e = (x_t - x0) / s0
    xp = x_t + (s1 - s0) * e
    x0p = ref_D(teacher, xp, s1)
    e = (e + (xp - x0p) / s1) / 2
    x_1 = x_t + (s1 - s0) * e
    x_2 = x_1 if semi + 1 == stride else ref_step(x_1, ref_D(sema, x_1, s1), s1, s2)
    x_target = (x_2 * s0 - x_t * s2) / (s0 - s2)
  _, c_skip, c_out, _ = ref_pre(s0)
  return x_t, (x_target - c_skip * x_t) / c_out, x_target


def ref_target_euler(teacher, sema, x, eps, sig, i0, g, i2):
  """A later phase (our extension): the distilled teacher takes its own clipped section-2 step of g
  grid units; boundary i0 - g == 0: its clipped x0."""
  s0, s2 = sig[i0], sig[i2]
  x_t = x + s0 * eps
  x0 = np.clip(ref_D(teacher, x_t, s0), -1, 1)
  if i0 - g == 0:
    x_target = x0
  else:
    s1 = sig[i0 - g]
    x_1 = ref_step(x_t, x0, s0, s1)
    x_2 = x_1 if i0 - g == i2 else ref_step(x_1, ref_D(sema, x_1, s1), s1, s2)
    x_target = (x_2 * s0 - x_t * s2) / (s0 - s2)
  _, c_skip, c_out, _ = ref_pre(s0)
  return (x_target - c_skip * x_t) / c_out


# ---- the stand-in network in JAX ------------------------------------------------------------------
class StandIn:
  """Called like the UNet: apply({'params': p}, x_in, c_noise, labels, train=..., rngs=...)."""

  def apply(self, variables, x_in, c_noise, labels, train=False, rngs=None):
    del train, rngs
    p = variables['params']
    out = p['a'] * x_in + p['b'] * c_noise[:, None, None, None] + p['c'] * jnp.tanh(x_in) + p['d']
    if labels is not None:  # a label shift (weight p['e'], default 0.01), to see labels reach a call
      out = out + p.get('e', 0.01) * labels[:, None, None, None].astype(out.dtype)
    return out


# D values well outside [-1, 1] at large and small sigma exercise the clipping.
TEACHER = {'a': 1.7, 'b': -0.6, 'c': 0.5, 'd': 0.3}
SEMA = {'a': 2.1, 'b': 0.4, 'c': -0.8, 'd': -0.2}
NET = edm.make_network(StandIn())
J = lambda p: jax.tree.map(jnp.float32, p)  # noqa: E731


def _inputs(n, seed, shape=(4, 4, 2)):
  rng = np.random.default_rng(seed)
  x = np.clip(rng.normal(0, 0.6, (n,) + shape), -1, 1).astype(np.float32)
  x[:, 0, 0, 0] = -1.0  # saturated pixels, as the digits' background
  eps = rng.normal(size=(n,) + shape).astype(np.float32)
  return x, eps


def _rel(ours, ref):
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


# ---- section 1 -------------------------------------------------------------------------------------
@pytest.mark.parametrize('T', [2, 18, 40, 1024])
def test_sigma_grid_matches_the_spec_in_float64(T):
  grid = edm.sigma_grid(T)
  assert grid.dtype == np.float64 and grid.shape == (T + 1,)
  np.testing.assert_allclose(grid, ref_grid(T), rtol=1e-14, atol=0)
  assert grid[0] == 0.0 and math.isclose(grid[1], 0.002, rel_tol=1e-14)
  assert math.isclose(grid[-1], 80.0, rel_tol=1e-14) and np.all(np.diff(grid) > 0)
  table = edm.Grid(T)
  np.testing.assert_array_equal(np.asarray(table.sigmas), grid.astype(np.float32))
  # Differences are rounded once from float64 (no float32 subtraction of close sigmas).
  np.testing.assert_array_equal(np.asarray(table.diff(jnp.arange(1, T + 1), jnp.arange(T))),
                                np.diff(grid).astype(np.float32))


def test_preconditioning_matches_the_spec():
  sigma = np.array([0.0, 1e-30, 0.002, 0.05, 0.5, 3.0, 80.0])
  ours = edm.precondition(jnp.asarray(sigma, jnp.float32))
  for k, name in enumerate(('c_in', 'c_skip', 'c_out', 'c_noise')):
    ref = np.array([ref_pre(s)[k] for s in sigma.astype(np.float32)])
    np.testing.assert_allclose(np.asarray(ours[k]), ref, rtol=2e-7, atol=1e-30, err_msg=name)
  assert float(ours[3][0]) == pytest.approx(0.25 * math.log(1e-20), rel=1e-6)  # max(sigma, 1e-20)
  # The loss weight (s^2 + sd^2) c_out^2 / (s sd)^2 is identically 1 (so the loss is unweighted).
  s = np.geomspace(0.002, 80, 50)
  c_out = s * SD / np.sqrt(s**2 + SD**2)
  np.testing.assert_allclose((s**2 + SD**2) * c_out**2 / (s * SD) ** 2, 1.0, rtol=1e-14)


def test_denoiser_wraps_the_network_as_the_spec_says():
  x, _ = _inputs(3, 0)
  x = 5.0 * x
  sigma = np.array([0.002, 1.0, 80.0], np.float32)
  ours = edm.make_denoiser(StandIn())(J(TEACHER), jnp.asarray(x), jnp.asarray(sigma), None)
  ref = np.stack([ref_D(TEACHER, x[k].astype(np.float64), sigma[k]) for k in range(3)])
  assert _rel(ours, ref) < 1e-6


# ---- section 2 -------------------------------------------------------------------------------------
def test_step_clips_and_replaces_non_finite_values():
  x = jnp.asarray([[[[3.0]]], [[[2.0]]]])
  x0 = jnp.asarray([[[[1.7]]], [[[jnp.inf]]]])
  out = edm.step(x, x0, jnp.asarray([2.0, 0.0]), jnp.asarray([1.0, 0.0]))
  # clip(1.7) = 1; 1 + 1 * (3 - 1) / 2 = 2; the second is (2 - 1) / 0 = inf -> 0 as nan_to_num does.
  np.testing.assert_allclose(np.asarray(out).ravel(), [2.0, 0.0])
  unclipped = edm.step(x[:1], x0[:1], jnp.asarray([2.0]), jnp.asarray([1.0]), clip_x=False)
  np.testing.assert_allclose(np.asarray(unclipped).ravel(), [1.7 + (3 - 1.7) / 2], rtol=1e-6)


def ref_sample(p, z, T, S):
  sig = ref_grid(T)
  stride = T // S
  x = sig[T] * z
  for t in range(T - stride, -1, -stride):
    x = ref_step(x, ref_D(p, x, sig[t + stride]), sig[t + stride], sig[t])
  return np.clip(x, -1, 1)


def test_sampler_matches_the_spec_for_every_step_count():
  T = 40
  z = np.random.default_rng(1).standard_normal((2, 4, 4, 2)).astype(np.float32)
  sample = edm.make_sampler(edm.make_denoiser(StandIn()), T)
  for S in (1, 2, 8, 40):  # one compiled sampler: the step count is traced
    ours = np.asarray(sample(J(SEMA), jnp.asarray(z), S, None))
    ref = ref_sample(SEMA, z.astype(np.float64), T, S)
    assert np.max(np.abs(ours - ref)) < 1e-5, S
  assert sample._cache_size() == 1
  # The 1-step sample is the clipped D(sigma_T z; sigma_T).
  one = ref_D(SEMA, 80.0 * z.astype(np.float64), 80.0)
  np.testing.assert_allclose(np.asarray(sample(J(SEMA), jnp.asarray(z), 1, None)),
                             np.clip(one, -1, 1), atol=1e-5)


# ---- section 3 -------------------------------------------------------------------------------------
def _check_target(T, stride, index, semi, seed, labels=None):
  """Our target at the release's indices (one phase T, T/stride) against the reference."""
  index, semi = np.asarray(index), np.asarray(semi)
  x, eps = _inputs(len(index), seed)
  grid = edm.Grid(T)
  i0, i1, i2 = index - semi, index - semi - 1, index - stride
  x_t, f_target = edm.tract_target(NET, grid, J(TEACHER), J(SEMA), jnp.asarray(x), jnp.asarray(eps),
                                   labels, *(jnp.asarray(i, jnp.int32) for i in (i0, i1, i2)))
  sig = ref_grid(T)
  refs = [ref_target(TEACHER, SEMA, x[k].astype(np.float64), eps[k].astype(np.float64), sig,
                     int(index[k]), int(semi[k]), stride) for k in range(len(index))]
  ref_xt = np.stack([r[0] for r in refs])
  ref_f = np.stack([r[1] for r in refs])
  assert _rel(x_t, ref_xt) < 1e-6
  err = _rel(f_target, ref_f)
  assert err < 1e-5, err  # the spec's bar for float32 targets
  return err, refs, np.asarray(f_target)


def test_target_one_phase_40_1_every_index_and_cases():
  """40 -> 1: every semi of the single segment, so the boundary (index - semi - 1 == 0, where i1
  is clamped to 1), the end-of-segment case (semi + 1 == step: x_2 = x_1, here also the boundary)
  and all regular examples, from sigma 80 down to 0.002."""
  T = 40
  semi = np.arange(T)
  _, refs, _ = _check_target(T, T, np.full(T, T), semi, seed=0)
  # Boundary: x_target is the teacher's raw (unclipped) denoised output at s0 = sigma_1.
  x, eps = _inputs(T, 0)
  x_t = x[-1] + ref_grid(T)[1] * eps[-1]
  np.testing.assert_allclose(refs[-1][2], ref_D(TEACHER, x_t.astype(np.float64), ref_grid(T)[1]))
  assert np.abs(refs[-1][2]).max() > 1  # unclipped


def test_target_segments_end_of_segment_and_clamp():
  """T = 40, S = 4 (step 10): end of segment (semi = 9) above the bottom segment, the boundary in
  the bottom segment, the top (sigma_40 = 80), and indices next to every case."""
  T, stride = 40, 10
  index = np.array([40, 40, 40, 30, 30, 20, 20, 10, 10, 10, 10])
  semi = np.array([0, 1, 9, 8, 9, 0, 9, 0, 5, 8, 9])
  assert np.any(semi + 1 == stride) and np.any(index - semi - 1 == 0)
  _check_target(T, stride, index, semi, seed=1)


def test_target_end_of_segment_skips_the_self_teacher():
  """semi + 1 == step away from the boundary: x_target = (x_1 s0 - x_t s1) / (s0 - s1), whatever the
  self-teacher computes (a self-teacher giving NaN does not leak)."""
  T, stride = 40, 10
  grid = edm.Grid(T)
  x, eps = _inputs(2, 2)
  i0, i1, i2 = (jnp.asarray([v, v], jnp.int32) for v in (11, 10, 10))
  nan_sema = dict(TEACHER, d=float('nan'))
  _, f_target = edm.tract_target(NET, grid, J(TEACHER), J(nan_sema), jnp.asarray(x),
                                 jnp.asarray(eps), None, i0, i1, i2)
  ref = np.stack([ref_target(TEACHER, SEMA, x[k].astype(np.float64), eps[k].astype(np.float64),
                             ref_grid(T), 20, 9, stride)[1] for k in range(2)])
  assert _rel(f_target, ref) < 1e-5


def test_labels_reach_the_teacher_and_the_self_teacher():
  """Each example's own label reaches both networks of the TRACT-EDM target: switching off one
  network's label term (weight 0) changes every example's target, so that network's call got the
  labels; swapping two examples' labels changes those two targets and no other."""
  T, stride = 40, 10
  index = np.array([40, 40, 30, 30, 20, 20, 10, 10])
  semi = np.array([0, 3, 1, 5, 2, 4, 0, 3])  # no end of segment: every target uses the self-teacher
  i0, i1, i2 = (jnp.asarray(v, jnp.int32) for v in (index - semi, index - semi - 1, index - stride))
  x, eps = _inputs(8, 7)
  labels = np.array([1, 3, 9, 2, 7, 4, 5, 8])  # no 0: its label term would vanish whatever the weight

  def target(teacher_weight, sema_weight, labels):
    _, f = edm.tract_target(NET, edm.Grid(T), J(dict(TEACHER, e=teacher_weight)),
                            J(dict(SEMA, e=sema_weight)), jnp.asarray(x), jnp.asarray(eps),
                            jnp.asarray(labels, jnp.int32), i0, i1, i2)
    return np.asarray(f, np.float64)

  per_example = lambda a, b: np.abs(a - b).max(axis=(1, 2, 3))  # noqa: E731
  full = target(0.05, 0.05, labels)
  assert per_example(full, target(0.0, 0.05, labels)).min() > 1e-3   # the teacher's call
  assert per_example(full, target(0.05, 0.0, labels)).min() > 1e-3   # the self-teacher's call
  swapped = labels.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  moved = per_example(full, target(0.05, 0.05, swapped))
  assert moved[:2].min() > 1e-3 and moved[2:].max() == 0.0, moved


def test_target_random_indices_and_other_grids():
  for T, S, seed in ((40, 1, 3), (40, 2, 4), (18, 3, 5), (256, 4, 6)):
    row = jnp.asarray(phases.make_plan('tract_edm', T, f'{T},{S}', 10 * 8, 8, 1e-3).phase_table()[0])
    i0, i1, i2 = (np.asarray(v) for v in losses.tract_times(jax.random.PRNGKey(seed), row, 24))
    stride = T // S
    index = i2 + stride
    _check_target(T, stride, index, index - i0, seed)


def test_indices_follow_the_spec():
  # The release's phase (g = 1): index = step * U{1..S}, semi = U{0..step-1}, i1 = index - semi - 1.
  row = jnp.asarray(phases.make_plan('tract_edm', 40, '40,4', 10 * 8, 8, 1e-3).phase_table()[0])
  assert tuple(int(v) for v in row) == (1, 10, 4)
  i0, i1, i2 = (np.asarray(v) for v in losses.tract_times(jax.random.PRNGKey(0), row, 4096))
  index = i2 + 10
  assert set(np.unique(index)) == {10, 20, 30, 40}
  assert set(np.unique(index - i0)) == set(range(10))
  assert np.all(i1 == i0 - 1) and np.any(i1 == 0) and np.all(i1 >= i2)
  # A later phase (g = 5 grid units per teacher step): i0 = index - j g, j = U{0..step/g - 1}.
  row = jnp.asarray([5, 20, 2])
  i0, i1, i2 = (np.asarray(v) for v in losses.tract_times(jax.random.PRNGKey(1), row, 4096))
  assert set(np.unique(i2 + 20 - i0)) == {0, 5, 10, 15} and np.all(i1 == i0 - 5)


def test_later_phase_target_uses_the_teachers_own_step():
  """Phases after the first (our extension of the release's one phase): the distilled teacher steps
  g grid units with the clipped section-2 step, Heun or not chosen by a traced flag."""
  T, g, stride = 40, 5, 20
  i0 = np.array([40, 35, 30, 25, 20, 15, 10, 5])
  i2 = np.where(i0 > stride, stride, 0)  # segments (20, 40] and (0, 20]
  x, eps = _inputs(len(i0), 7)
  grid = edm.Grid(T)
  target = jax.jit(lambda heun: edm.tract_target(
      NET, grid, J(TEACHER), J(SEMA), jnp.asarray(x), jnp.asarray(eps), None,
      jnp.asarray(i0), jnp.asarray(i0 - g), jnp.asarray(i2), teacher_heun=heun)[1])
  ref = np.stack([ref_target_euler(TEACHER, SEMA, x[k].astype(np.float64),
                                   eps[k].astype(np.float64), ref_grid(T), int(i0[k]), g, int(i2[k]))
                  for k in range(len(i0))])
  assert _rel(target(jnp.asarray(False)), ref) < 1e-5
  assert _rel(target(jnp.asarray(True)), ref) > 1e-3  # Heun differs


def test_loss_is_the_unweighted_pixel_mean_in_f_space():
  T = 40
  grid = edm.Grid(T)
  x, _ = _inputs(8, 8)
  row = jnp.asarray([1, 40, 1])
  rng = jax.random.PRNGKey(3)
  student = {'a': 0.5, 'b': 0.1, 'c': 0.2, 'd': -0.1}
  loss, _ = edm.tract_loss(J(student), NET, grid, J(TEACHER), J(SEMA), jnp.asarray(x), None, rng,
                           row)
  # The same examples by hand, in float64: F_pred = (D_student - c_skip x_t) / c_out.
  k_idx, k_eps, _ = jax.random.split(rng, 3)
  i0, _, i2 = (np.asarray(v) for v in losses.tract_times(k_idx, row, 8))
  eps = np.asarray(jax.random.normal(k_eps, x.shape, jnp.float32), np.float64)
  sig = ref_grid(T)
  per_example = []
  for k in range(8):
    x_t, f_target, _ = ref_target(TEACHER, SEMA, x[k].astype(np.float64), eps[k], sig, 40,
                                  40 - int(i0[k]), 40)
    s0 = sig[i0[k]]
    _, c_skip, c_out, _ = ref_pre(s0)
    f_pred = (ref_D(student, x_t, s0) - c_skip * x_t) / c_out
    weight = (s0**2 + SD**2) * c_out**2 / (s0 * SD) ** 2
    per_example.append(np.mean(weight * (f_pred - f_target) ** 2))
  np.testing.assert_allclose(float(loss), np.mean(per_example), rtol=1e-5)


def test_teacher_loss_is_edms():
  x, _ = _inputs(6, 9)
  rng = jax.random.PRNGKey(4)
  p = {'a': 0.5, 'b': 0.1, 'c': 0.2, 'd': -0.1}
  loss, _ = edm.teacher_loss(J(p), NET, jnp.asarray(x), None, rng, dropout=False)
  k_sigma, k_noise, _ = jax.random.split(rng, 3)
  sigma = np.exp(-1.2 + 1.2 * np.asarray(jax.random.normal(k_sigma, (6,), jnp.float32), np.float64))
  noise = np.asarray(jax.random.normal(k_noise, x.shape, jnp.float32), np.float64)
  per = []
  for k in range(6):
    s = sigma[k]
    d = ref_D(p, x[k] + s * noise[k], s)
    per.append(np.mean((s**2 + SD**2) / (s * SD) ** 2 * (d - x[k]) ** 2))
  np.testing.assert_allclose(float(loss), np.mean(per), rtol=1e-4)
  # ln sigma ~ N(-1.2, 1.2^2)
  draws = np.log(np.asarray(jnp.exp(-1.2 + 1.2 * jax.random.normal(jax.random.PRNGKey(0),
                                                                    (20000,)))))
  assert abs(draws.mean() + 1.2) < 0.03 and abs(draws.std() - 1.2) < 0.03


# ---- section 4: the optimiser ----------------------------------------------------------------------
def test_optimizer_warmup_in_samples_and_finite_gradients():
  tx = state.make_optimizer(1e-3, grad_clip=0.0, warmup_samples=100, batch_size=8)
  params = {'w': jnp.zeros(3)}
  opt_state = tx.init(params)
  lrs = []
  for _ in range(15):
    updates, opt_state = tx.update({'w': jnp.ones(3)}, opt_state, params)
    lrs.append(-float(updates['w'][0]))  # Adam's first steps move by about lr
  expected = [1e-3 * min(n * 8 / 100, 1.0) for n in range(15)]
  np.testing.assert_allclose(lrs, expected, rtol=1e-3, atol=1e-9)
  g = state.finite_grads({'w': jnp.asarray([jnp.nan, jnp.inf, -jnp.inf, 2.0])})
  np.testing.assert_array_equal(np.asarray(g['w']), [0.0, 1e5, -1e5, 2.0])


def test_step_replaces_non_finite_gradients_instead_of_skipping():
  """tract_edm: a gradient with inf entries is sanitised and applied (only a non-finite loss skips)."""
  params = {'w': jnp.ones(2)}
  tx = state.make_optimizer(1e-2, grad_clip=0.0)

  def loss_fn(p, st, batch, rng):
    del st, batch, rng
    loss = jnp.sum(p['w'] * jnp.asarray([1.0, 0.0]))
    # d/dw1 of sqrt(w1 - 1) at 1 is inf; the value is 0.
    return loss + jnp.sqrt(p['w'][1] - 1.0), {'loss': loss}

  st = state._new_state(params, tx, 0)
  step = steps.make_train_step(loss_fn, tx, ema_momentum=0.5, sanitize_grads=True)
  new, metrics = step(st, {})
  assert int(new.nonfinite_count) == 0 and np.isfinite(float(metrics['grad_norm']))
  assert not np.array_equal(np.asarray(new.params['w']), np.ones(2))


# ---- config checks -----------------------------------------------------------------------------------
_edm_config = tiny_edm_config


@pytest.mark.parametrize('field,value,match', [
    ('parametrisation', 'ddim', "set parametrisation='edm'"),
    ('method', 'tract', "allowed with method 'teacher' or 'tract_edm'"),
    ('model.mean_type', 'both', 'mean_type'),
    ('time_schedule', '8,3', 'divide'),
    ('time_schedule', '8', 'at least two'),
    ('optimizer.warmup_steps', 5, 'warmup_samples'),
    ('student_dropout', 1.5, 'student_dropout'),
    ('parametrisation', 'vp', 'allowed values'),
])
def test_config_errors_are_one_line(field, value, match):
  config = _edm_config()
  target = config
  *path, last = field.split('.')
  for p in path:
    target = target[p]
  target[last] = value
  with pytest.raises(ConfigError, match=match) as info:
    config_checks.validate_config(config)
  assert '\n' not in str(info.value)


def test_plan_supports_what_phases_express():
  plan = config_checks.validate_config(_edm_config(time_schedule='8,2,1', train_samples=2 * 8))
  assert plan.method == 'tract_edm' and plan.schedule == (8, 2, 1)
  assert plan.phase_table().tolist() == [[1, 4, 2], [4, 8, 1]]


# ---- through the driver ------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_edm_teacher_then_tract_edm(tmp_path):
  """The driver trains an EDM teacher, distils it 8 -> 2 -> 1 (Heun in phase 0, the distilled
  teacher's own steps in phase 1: one compiled step), evaluates with the EDM sampler, resumes."""
  config = tiny_edm_job_config()
  result = train.train_and_evaluate(config, str(tmp_path))
  for name in ('teacher_8steps.png', 'phase0_student_2steps.png', 'phase1_student_1steps.png',
               'teacher_1steps.png', 'result.json'):
    assert os.path.exists(tmp_path / name), name
  # The student starts as a copy of the teacher: equal RMSEs would mean it never changed.
  assert np.isfinite(result['rmse_student_vs_teacher'])
  assert result['rmse_student_vs_teacher'] != result['rmse_undistilled_vs_teacher']
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['parametrisation'] == 'edm' and saved['method'] == 'tract_edm'
  # The teacher reference is the section-2 sampler at T steps from the evaluator's fixed noise.
  reference = np.load(tmp_path / 'teacher_samples_8.npz')['images']
  assert reference.shape == (8, 8, 8, 1) and np.abs(reference).max() <= 1.0
  # mode=evaluate scores the newest student with the EDM sampler: the same figure as the run's end.
  config.mode = 'evaluate'
  scored = train.train_and_evaluate(config, str(tmp_path))
  assert scored['steps'] == 1 and scored['params'].endswith('phase_1_ema')
  assert scored['rmse_vs_teacher'] == pytest.approx(result['rmse_student_vs_teacher'], rel=1e-6)
  config.mode = 'train'
  # Resuming with another parametrisation is refused.
  config.method, config.parametrisation = 'tract', 'ddim'
  config.time_schedule, config.teacher_steps = '16,4,1', 16
  config.optimizer.warmup_samples = 0
  with pytest.raises(ConfigError, match='parametrisation'):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.slow
def test_class_conditional_tract_edm(tmp_path):
  """EDM's class-conditional DhariwalUNet (labels as one-hot vectors) distilled from a given
  teacher checkpoint (its initial weights: the teacher job is tested above), with student dropout:
  labels reach teacher, self-teacher, student and the evaluator."""
  config = _edm_config(train_samples=3 * 8)
  config.model.num_classes = 10
  config.model.arch = 'edm_dhariwal'
  # One 8x8 level of 64 channels: the middle block's attention needs 64 channels per head.
  config.model.edm.update(model_channels=64, channel_mult=(1,), num_blocks=1, attn_resolutions=())
  config.student_dropout = 0.1
  config.teacher_checkpoint = str(tmp_path / 'teacher')
  model = factory.build_model(config.model)
  checkpoints.save_params(config.teacher_checkpoint, factory.init_params(model, (8, 8, 1), 0))
  teacher = factory.init_params(model, (8, 8, 1), 0)
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert np.isfinite(result['rmse_student_vs_teacher'])
  assert os.path.exists(tmp_path / 'run' / 'phase0_student_1steps.png')
  # The student's label embedding learned: its gradient is exactly zero unless the student's own
  # forward gets the labels (Adam moves nothing on a zero gradient), and the rows of classes that
  # occur in the batches move.
  student = checkpoints.load_params(str(tmp_path / 'run' / 'phase_0_ema'), teacher)
  (before, after), = [(a, b) for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(teacher),
                                                  jax.tree.leaves(student))
                       if 'map_label' in jax.tree_util.keystr(k) and k[-1].key == 'weight']
  moved = np.abs(np.asarray(after) - np.asarray(before)).max(axis=1)  # (classes, features): a row
  # per class
  assert moved.shape == (10,) and (moved > 0).sum() >= 5, moved
