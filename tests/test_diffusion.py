"""Every formula of tract_jax.diffusion against a float64 NumPy transcription of the spec."""
import numpy as np
import jax.numpy as jnp
import pytest

from tract_jax import diffusion

T = 1024


# ---- float64 reference, written from spec sections 1-2 as literally as possible -------------------
def ref_logsnr(t, lo=-20.0, hi=20.0):
  b = np.arctan(np.exp(-hi / 2))
  a = np.arctan(np.exp(-lo / 2)) - b
  return -2.0 * np.log(np.tan(a * np.asarray(t, np.float64) + b))


def ref_alpha_sigma(t):
  logsnr = ref_logsnr(t)
  sig = lambda v: 1.0 / (1.0 + np.exp(-v))
  return np.sqrt(sig(logsnr)), np.sqrt(sig(-logsnr))


def b4(v):
  return np.asarray(v, np.float64)[:, None, None, None]


def ref_ddim_step(z_t, x_hat, t, s, clip):
  x_hat = np.asarray(x_hat, np.float64)
  if clip:
    x_hat = np.clip(x_hat, -1, 1)
  at, st = ref_alpha_sigma(t)
  as_, ss = ref_alpha_sigma(s)
  eps = (z_t - b4(at) * x_hat) / b4(st)
  return b4(as_) * x_hat + b4(ss) * eps


def ref_inverse(z_t, z_s, t, s):
  at, st = ref_alpha_sigma(t)
  as_, ss = ref_alpha_sigma(s)
  return (b4(ss) * z_t - b4(st) * z_s) / (b4(ss) * b4(at) - b4(st) * b4(as_))


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return np.max(np.abs(ours - ref)) / np.max(np.abs(ref))


GRID_T = np.array([1, 2, 100, 511, 512, 513, 900, 1023, 1024]) / T


def test_logsnr_schedule_endpoints_and_grid():
  ours = np.asarray(diffusion.logsnr_schedule(jnp.asarray(GRID_T, jnp.float32)))
  ref = ref_logsnr(GRID_T)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-4)
  # Exact constants: logsnr(0) = 20 and logsnr(1) = -20 (the official code's float32 constants give -20.0011).
  np.testing.assert_allclose(diffusion.logsnr_schedule(jnp.array([0.0, 1.0])), [20.0, -20.0], atol=1e-4)


def test_alpha_sigma_relative_accuracy_everywhere():
  t = np.concatenate([GRID_T, [0.0, 0.25, 0.75, 1.0 - 1e-6]])
  alpha, sigma = diffusion.alpha_sigma(jnp.asarray(t, jnp.float32))
  ra, rs = ref_alpha_sigma(t.astype(np.float32))
  # Relative accuracy even where alpha or sigma is ~4.5e-5 (t = 1 and t = 0).
  np.testing.assert_allclose(alpha, ra, rtol=2e-6)
  np.testing.assert_allclose(sigma, rs, rtol=2e-6)
  np.testing.assert_allclose(np.square(alpha) + np.square(sigma), 1.0, rtol=1e-6)


def test_network_time_input_is_about_t():
  t = np.linspace(0, 1, 11)
  u = diffusion.network_time_input(jnp.asarray(ref_logsnr(t), jnp.float32))
  ref = np.arctan(np.exp(-ref_logsnr(t) / 2)) / (np.pi / 2)
  np.testing.assert_allclose(u, ref, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(u, t, atol=1e-4)  # the schedule is a straight line in this angle


def test_snr_weight_truncated():
  t = np.array([0.0, 0.1, 0.5, 0.9, 1.0])
  a, s = ref_alpha_sigma(t)
  np.testing.assert_allclose(diffusion.snr_weight(jnp.asarray(t, jnp.float32)),
                             np.maximum(a**2 / s**2, 1.0), rtol=1e-5)
  assert float(diffusion.snr_weight(jnp.array([1.0]))[0]) == 1.0


def _data(shape=(len(GRID_T), 4, 4, 3), seed=0):
  rng = np.random.default_rng(seed)
  x = np.clip(rng.normal(0, 0.6, shape), -1, 1).astype(np.float32)
  eps = rng.normal(size=shape).astype(np.float32)
  return x, eps


def test_q_sample():
  x, eps = _data()
  a, s = ref_alpha_sigma(GRID_T)
  ours = diffusion.q_sample(x, eps, jnp.asarray(GRID_T, jnp.float32))
  assert rel_err(ours, b4(a) * x + b4(s) * eps) < 1e-6


@pytest.mark.parametrize('mean_type', ['x', 'eps', 'v', 'both'])
def test_predict_x_reconciliation(mean_type):
  x, eps = _data(seed=1)
  t = np.array([0.05, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
  a, s = ref_alpha_sigma(t)
  z = b4(a) * x + b4(s) * eps
  out = {'x': x, 'eps': eps, 'v': b4(a) * eps - b4(s) * x,
         'both': np.concatenate([x, eps], axis=-1)}[mean_type]
  ours = diffusion.predict_x(jnp.asarray(out, jnp.float32), jnp.asarray(z, jnp.float32),
                             jnp.asarray(t, jnp.float32), mean_type)
  # Exact outputs reconcile back to x; 'both' through the spec's formula.
  if mean_type == 'both':
    ref = b4(s**2) * x + b4(a**2) * (z - b4(s) * eps) / b4(a)
  else:
    ref = x
  np.testing.assert_allclose(ours, ref, atol=2e-5 if mean_type != 'eps' else 2e-4)


def test_predict_x_rejects_bad_input():
  z = jnp.zeros((1, 2, 2, 3))
  with pytest.raises(ValueError, match='mean_type'):
    diffusion.predict_x(z, z, jnp.ones(1), 'noise')
  with pytest.raises(ValueError, match='6 output channels'):
    diffusion.predict_x(z, z, jnp.ones(1), 'both')


@pytest.mark.parametrize('clip', [False, True])
def test_ddim_step(clip):
  x, eps = _data(seed=2)
  x_hat = (x * 1.4).astype(np.float32)  # some predictions outside [-1, 1]
  t = GRID_T
  s = t - 1.0 / T
  a, sg = ref_alpha_sigma(t)
  z_t = (b4(a) * x + b4(sg) * eps).astype(np.float32)
  ours = diffusion.ddim_step(z_t, x_hat, jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32), clip)
  ref = ref_ddim_step(z_t.astype(np.float64), x_hat, t, s, clip)
  assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize('center', [1, 512, 1024])
def test_ddim_inverse_small_gaps(center):
  """Inverse of a 1/1024 step near t = 0, 0.5 and 1, from float32 network outputs."""
  n = 6
  rng = np.random.default_rng(center)
  t = np.full(n, center / T)
  s = t - 1.0 / T
  x_hat = np.clip(rng.normal(0, 0.6, (n, 4, 4, 3)), -1, 1).astype(np.float32)
  z_t = rng.normal(size=(n, 4, 4, 3)).astype(np.float32)
  # z_s given exactly (float64) -> the inverse must recover x_hat.
  z_s64 = ref_ddim_step(z_t.astype(np.float64), x_hat, t, s, False)
  ref = ref_inverse(z_t.astype(np.float64), z_s64, t, s)
  np.testing.assert_allclose(ref, x_hat, atol=1e-8)  # the reference itself is a true inverse
  ours = diffusion.ddim_inverse(jnp.asarray(z_t), jnp.asarray(z_s64, jnp.float32),
                                jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32))
  # Against the float64 formula on the same float32 inputs.
  ref32 = ref_inverse(z_t.astype(np.float64), z_s64.astype(np.float32).astype(np.float64), t, s)
  assert rel_err(ours, ref32) < 1e-4


@pytest.mark.parametrize('center', [2, 512, 1024])
@pytest.mark.parametrize('case', ['chain', 'boundary', 'long_jump'])
def test_two_step_target_matches_float64_inverse(center, case):
  """The TRACT/BTD target: teacher step t0 -> t1, second step t1 -> t2, inverse t0 -> t2."""
  n = 5
  rng = np.random.default_rng(center)
  t0 = np.full(n, center / T)
  t1 = t0 - 1.0 / T
  t2 = {'chain': t1 - 1.0 / T, 'boundary': t1, 'long_jump': np.zeros(n)}[case]
  if case == 'long_jump' and center == 2:
    t2 = np.zeros(n)
  x, eps = _data((n, 4, 4, 3), seed=center)
  x_hat1 = (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)  # float32 "network outputs"
  x_hat2 = (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
  a0, s0 = ref_alpha_sigma(t0)
  z0 = b4(a0) * x + b4(s0) * eps
  z1 = ref_ddim_step(z0, x_hat1, t0, t1, False)
  z2 = z1 if case == 'boundary' else ref_ddim_step(z1, x_hat2, t1, t2, False)
  ref = ref_inverse(z0, z2, t0, t2)
  w1, w2 = diffusion.two_step_target_weights(*(jnp.asarray(v, jnp.float32) for v in (t0, t1, t2)))
  ours = diffusion.bcast(w1, x_hat1) * x_hat1 + diffusion.bcast(w2, x_hat2) * x_hat2
  assert rel_err(ours, ref) < 1e-4
  np.testing.assert_allclose(np.asarray(w1) + np.asarray(w2), 1.0, rtol=1e-5)
  if case == 'boundary':
    np.testing.assert_allclose(w1, 1.0, rtol=1e-6)
