"""The jitted DDIM rollout against a float64 NumPy loop."""
import jax.numpy as jnp
import numpy as np
import pytest

from tract_jax import sampling
from test_methods import b4, ref_alpha_sigma  # float64 schedule reference


def test_oracle_network_returns_its_x():
  """A network that always predicts the true x makes 1-step and N-step DDIM return that x."""
  rng = np.random.default_rng(0)
  x = np.clip(rng.normal(0, 0.5, (4, 6, 6, 3)), -1, 1).astype(np.float32)
  noise = rng.normal(size=x.shape).astype(np.float32)
  oracle = lambda params, z, t, labels: jnp.asarray(x)
  sample = sampling.make_sampler(oracle)
  for steps in (1, 2, 8, 64):
    np.testing.assert_allclose(sample({}, noise, steps, None), x, atol=1e-6)


def _net(params, z, t, labels):
  out = 1.2 * jnp.tanh(params['w'] * z + t[:, None, None, None] - 0.5)
  if labels is not None:
    out = out + 0.01 * labels[:, None, None, None]
  return out


def _ref_sample(noise, steps, labels=None):
  z = noise.astype(np.float64)
  x_hat = None
  for i in range(steps):
    t = np.full(len(z), (steps - i) / steps)
    s = np.full(len(z), (steps - i - 1) / steps)
    x_hat = 1.2 * np.tanh(0.7 * z + b4(t) - 0.5)
    if labels is not None:
      x_hat = x_hat + 0.01 * b4(labels)
    x_hat = np.clip(x_hat, -1, 1)
    at, st = ref_alpha_sigma(t)
    as_, ss = ref_alpha_sigma(s)
    z = b4(as_) * x_hat + b4(ss) * (z - b4(at) * x_hat) / b4(st)
  return x_hat


@pytest.mark.parametrize('conditional', [False, True])
def test_rollout_matches_reference_for_any_step_count(conditional):
  rng = np.random.default_rng(1)
  noise = rng.normal(size=(5, 4, 4, 1)).astype(np.float32)
  labels = np.arange(5, dtype=np.int32) if conditional else None
  sample = sampling.make_sampler(_net)
  params = {'w': jnp.float32(0.7)}
  for steps in (1, 3, 16):  # one compiled sampler: the step count is a traced value
    ours = sample(params, noise, steps, None if labels is None else jnp.asarray(labels))
    np.testing.assert_allclose(ours, _ref_sample(noise, steps, labels), atol=2e-5)
  assert sample._cache_size() == 1
