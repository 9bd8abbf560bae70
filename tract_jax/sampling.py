"""DDIM sampling: the whole rollout for any number of steps inside one compiled loop."""
import functools

import chex
import jax
import jax.numpy as jnp

from tract_jax import diffusion


def ddim_sample(denoise, params, noise, num_steps, labels=None, *, clip_x=True):
  """Deterministic DDIM from t = 1 to t = 0 in `num_steps` equal steps.

  Args:
    denoise: (params, z_t, t, labels) -> x_hat.
    params: network parameters.
    noise: (B, H, W, C) standard normal z_1.
    num_steps: int or traced int32 scalar (the loop bound is dynamic, so one compiled sampler serves
      every step count).
    labels: (B,) int class labels or None.
    clip_x: clip x_hat to [-1, 1] in every step (TRACT and the published samplers do).
  Returns:
    (B, H, W, C) images in [-1, 1]: the last step's x_hat (clipped to [-1, 1] in any case).
  """
  chex.assert_rank(noise, 4)
  batch = noise.shape[0]
  if labels is not None:
    chex.assert_shape(labels, (batch,))
  num_steps = jnp.asarray(num_steps, jnp.int32)
  n = num_steps.astype(jnp.float32)

  def body(i, carry):
    z_t, _ = carry
    t = jnp.full((batch,), (n - i.astype(jnp.float32)) / n)
    s = jnp.full((batch,), (n - i.astype(jnp.float32) - 1.0) / n)
    x_hat = denoise(params, z_t, t, labels)
    if clip_x:
      x_hat = jnp.clip(x_hat, -1.0, 1.0)
    z_s = diffusion.ddim_step(z_t, x_hat, t, s)
    return z_s, x_hat

  _, x_hat = jax.lax.fori_loop(0, num_steps, body, (noise, jnp.zeros_like(noise)))
  return jnp.clip(x_hat, -1.0, 1.0)


def make_sampler(denoise, clip_x=True):
  """A jitted `sample(params, noise, num_steps, labels)`; num_steps is a traced value."""
  return jax.jit(functools.partial(ddim_sample, denoise, clip_x=clip_x))
