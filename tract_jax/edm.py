"""TRACT with EDM teachers (docs/SPEC_EDM.md; Karras et al. 2022): the noise
grid, the preconditioning, the denoiser around a network, the deterministic step and sampler, the
Heun teacher step, the TRACT target and loss, and EDM's own teacher-training loss.

Conventions. x, x_t: (B, H, W, C) float32 images / noisy images (variance exploding: x_t = x + sigma
eps, no scaling). sigma: (B,) float32 noise levels. Grid indices i0, i1, i2: (B,) int32 into the
grid sigma_0 = 0 < sigma_1 = sigma_min < ... < sigma_T = sigma_max.

Two callables carry a network:
  net(params, x, sigma, labels, dropout_rng=None) -> F, the raw network output at the
    preconditioned input: model.apply({'params': params}, c_in x, c_noise, labels, ...)
    (`make_network`);
  denoise(params, x, sigma, labels, dropout_rng=None) -> D = c_skip x + c_out F (`make_denoiser`).

Precision. The grid is computed in float64 (NumPy) and enters the device as float32 constants,
together with a float64-computed table of pairwise differences sigma_i - sigma_j, so no step size
is formed by a float32 subtraction. The target of the release (computed there in float64) is
evaluated in two algebraically equal forms that avoid the cancellations float32 would otherwise
suffer: at sigma >= sigma_data as a combination of denoised images (x_t, up to 80 * |eps|, drops
out analytically), below sigma_data from offsets to x_t (x0 - x_t, of the size of the noise), since
there x0 and c_skip x_t nearly cancel. tests/test_edm.py compares it with a float64 NumPy
transcription of the spec: below the spec's 1e-5 relative bar (max error / max |F_target| about
3e-6 on the 40-level grid, set at the smallest sigmas by the float32 rounding of the networks' inputs
x_t, x' and x_1, which the release's float32 networks share; a plain float32 transcription of the
spec's formulas gives 6e-6 on the same test).
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tract_jax import losses
from tract_jax.diffusion import bcast

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
P_MEAN = -1.2   # EDM teacher training: ln sigma ~ N(P_MEAN, P_STD^2)
P_STD = 1.2


def sigma_grid(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
               rho: float = RHO) -> np.ndarray:
  """float64 (T + 1,): sigma_0 = 0, then sigma_i = (sigma_min^(1/rho) + (i - 1) / (T - 1)
  (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho for i = 1..T, so sigma_T = sigma_max."""
  if num_steps < 2:
    raise ValueError(f'the EDM grid needs at least 2 steps, got {num_steps}')
  i = np.arange(1, num_steps + 1, dtype=np.float64)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  sigmas = (lo + (i - 1.0) / (num_steps - 1.0) * (hi - lo)) ** rho
  return np.concatenate([[0.0], sigmas])


class Grid:
  """The grid as device constants: sigma (T + 1,) and differences sigma_i - sigma_j (T + 1, T + 1),
  both computed in float64 and rounded once to float32."""

  def __init__(self, num_steps: int):
    self.num_steps = int(num_steps)
    sigmas = sigma_grid(self.num_steps)
    self.sigmas = jnp.asarray(sigmas, jnp.float32)
    self.diffs = jnp.asarray(sigmas[:, None] - sigmas[None, :], jnp.float32)

  def sigma(self, i):
    return self.sigmas[i]

  def diff(self, i, j):
    """sigma_i - sigma_j, rounded once from float64."""
    return self.diffs[i, j]


def precondition(sigma, sigma_data: float = SIGMA_DATA):
  """(c_in, c_skip, c_out, c_noise) of EDM (spec section 1), each shaped like sigma."""
  sigma = jnp.asarray(sigma, jnp.float32)
  total = sigma * sigma + sigma_data ** 2
  c_in = jax.lax.rsqrt(total)
  c_skip = sigma_data ** 2 / total
  c_out = sigma * sigma_data * c_in
  c_noise = 0.25 * jnp.log(jnp.maximum(sigma, 1e-20))
  return c_in, c_skip, c_out, c_noise


def _one_minus_c_skip(sigma, sigma_data: float = SIGMA_DATA):
  """1 - c_skip = sigma^2 / (sigma^2 + sigma_data^2), without the cancellation at small sigma."""
  return sigma * sigma / (sigma * sigma + sigma_data ** 2)


def make_network(model):
  """net(params, x, sigma, labels, dropout_rng=None) -> F, the raw output of `model` at EDM's
  preconditioned input: model.apply({'params': params}, c_in x, c_noise, labels, train=...).

  Any network with the UNet's calling convention works (the DDPM UNet takes c_noise where it takes
  the log-SNR for the DDIM teachers). Dropout runs iff dropout_rng is given."""

  def net(params, x, sigma, labels, dropout_rng=None):
    c_in, _, _, c_noise = precondition(sigma)
    train = dropout_rng is not None
    rngs = {'dropout': dropout_rng} if train else None
    out = model.apply({'params': params}, bcast(c_in, x) * x, c_noise, labels, train=train,
                      rngs=rngs)
    return out.astype(jnp.float32)

  return net


def denoiser(net):
  """D(params, x, sigma, labels, dropout_rng=None) = c_skip x + c_out F(c_in x; c_noise)."""

  def denoise(params, x, sigma, labels, dropout_rng=None):
    _, c_skip, c_out, _ = precondition(sigma)
    return bcast(c_skip, x) * x + bcast(c_out, x) * net(params, x, sigma, labels, dropout_rng)

  return denoise


def make_denoiser(model):
  """The preconditioned denoiser D around `model` (teacher, self-teacher, student and evaluation EMA
  are all D)."""
  return denoiser(make_network(model))


# ---- section 2: deterministic step and sampler --------------------------------------------------
def step(x, x0, sigma, sigma_next, clip_x: bool = True):
  """One deterministic step sigma -> sigma_next given the denoised x0 (clipped to [-1, 1] when
  clip_x): x' = x0 + sigma_next (x - x0) / sigma, non-finite values replaced by 0."""
  if clip_x:
    x0 = jnp.clip(x0, -1.0, 1.0)
  out = x0 + bcast(sigma_next, x) * (x - x0) / bcast(sigma, x)
  return jnp.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def sample(denoise, grid: Grid, params, noise, num_steps, labels=None, *, clip_x: bool = True):
  """Section-2 sampler with S = num_steps steps on the T-grid (S divides T; traced is fine, so one
  compiled sampler serves every step count): x = sigma_T z; for t = T - step, ..., 0 by step = T / S:
  x = step(x, D(x; sigma_{t+step}), sigma_{t+step} -> sigma_t); finally clipped to [-1, 1].

  noise: (B, H, W, C) standard normal z; labels (B,) or None. Returns (B, H, W, C)."""
  chex.assert_rank(noise, 4)
  batch = noise.shape[0]
  num_steps = jnp.asarray(num_steps, jnp.int32)
  stride = grid.num_steps // num_steps

  def body(k, x):
    hi = grid.num_steps - k * stride
    s_hi = jnp.full((batch,), grid.sigma(hi))
    s_lo = jnp.full((batch,), grid.sigma(hi - stride))
    return step(x, denoise(params, x, s_hi, labels), s_hi, s_lo, clip_x)

  x = jax.lax.fori_loop(0, num_steps, body, grid.sigmas[-1] * noise)
  return jnp.clip(x, -1.0, 1.0)


def make_sampler(denoise, num_steps_grid: int, clip_x: bool = True):
  """A jitted sample(params, noise, num_steps, labels) on the T-step grid (like
  sampling.make_sampler; num_steps is traced)."""
  grid = Grid(num_steps_grid)
  return jax.jit(functools.partial(sample, denoise, grid, clip_x=clip_x))


# ---- section 3: training target and loss --------------------------------------------------------
def _denoised(net, params, x, sigma, labels):
  """(F, x0, x0 - x) of one network call; the offset x0 - x = c_out F - (1 - c_skip) x is formed
  without subtracting two nearly equal images."""
  _, c_skip, c_out, _ = precondition(sigma)
  f = net(params, x, sigma, labels)
  x0 = bcast(c_skip, x) * x + bcast(c_out, x) * f
  offset = bcast(c_out, x) * f - bcast(_one_minus_c_skip(sigma), x) * x
  return f, x0, offset


def _clipped(x, x0, offset, clip_x):
  """x0 clipped to [-1, 1] and its offset to x (unchanged, exact, where no clipping happened)."""
  if not clip_x:
    return x0, offset
  x0c = jnp.clip(x0, -1.0, 1.0)
  return x0c, jnp.where(x0c == x0, offset, x0c - x)


def _heun_teacher(net, params, x_t, s0, s1, d01, labels):
  """The teacher's Heun step s0 -> s1 (raw D, not clipped; spec section 3).

  Returns (F_boundary, x_1, x0_eff, delta): the teacher's F at (x_t, s0) (the boundary target),
  the step's end x_1, the step's effective denoised image x0_eff with
  x_1 = (s1 / s0) x_t + ((s0 - s1) / s0) x0_eff, and delta = x_1 - x_t."""
  f_a, x0a, off_a = _denoised(net, params, x_t, s0, labels)
  x_mid = x_t + bcast(d01 / s0, x_t) * off_a                   # x' = x_t + (s1 - s0) e
  _, x0b, off_b = _denoised(net, params, x_mid, s1, labels)
  # x_1 = x_t + (s1 - s0) (e + e') / 2 with e = -off_a / s0, e' = -off_b / s1.
  delta = bcast(0.5 * d01, x_t) * (off_a / bcast(s0, x_t) + off_b / bcast(s1, x_t))
  x0_eff = (bcast(s1 - d01, x_t) * x0a + bcast(s0, x_t) * x0b) / bcast(2.0 * s1, x_t)
  return f_a, x_t + delta, x0_eff, delta


def _euler_teacher(net, params, x_t, s0, s1, d01, labels, clip_x):
  """A distilled teacher's own section-2 step s0 -> s1 (phases after the first); same returns as
  `_heun_teacher`, the boundary target being its (clipped) x0 in F space."""
  f_a, x0a, off_a = _denoised(net, params, x_t, s0, labels)
  x0c, off_c = _clipped(x_t, x0a, off_a, clip_x)
  _, c_skip0, c_out0, _ = precondition(s0)
  f_bound = jnp.where(x0c == x0a, f_a, (x0c - bcast(c_skip0, x_t) * x_t) / bcast(c_out0, x_t))
  delta = bcast(d01 / s0, x_t) * off_c
  return f_bound, x_t + delta, x0c, delta


def tract_target(net, grid: Grid, teacher_params, sema_params, x, eps, labels, i0, i1, i2, *,
                 teacher_heun=True, clip_x: bool = True, teacher_net=None):
  """(x_t, F_target) for given grid indices (spec section 3); F_target (B, H, W, C) is in the
  network's output space, stop-gradient.

  Indices come from losses.tract_times, TRACT's own draw: with g = 1 (the release's one phase
  T,S) its j is the release's `semi`; i1 = i0 - g unclamped. x_t = x + s0 eps. Teacher step
  s0 -> s1 (Heun with raw D when teacher_heun, else the section-2 step), self-teacher section-2
  step s1 -> s2 (x_2 = x_1 when i1 == i2: the teacher step ended the segment),
  x_target = (x_2 s0 - x_t s2) / (s0 - s2). Boundary: when i1 == 0 (index - semi - 1 == 0)
  x_target = the teacher's x0 at s0, and i1 is clamped to 1 so that the unused branch stays finite. F_target = (x_target - c_skip(s0) x_t) / c_out(s0).

  teacher_heun: Python bool, or a traced bool scalar (lax.cond; one compiled step for every phase).
  teacher_net: the network the teacher and self-teacher run (None = net).
  """
  chex.assert_equal_shape([x, eps])
  teacher_net = teacher_net or net
  boundary, end = bcast(i1 == 0, x), bcast(i1 == i2, x)
  i1 = jnp.maximum(i1, 1)   # the release's clamp
  s0, s1, s2 = grid.sigma(i0), grid.sigma(i1), grid.sigma(i2)
  d01, d02, d12 = grid.diff(i0, i1), grid.diff(i0, i2), grid.diff(i1, i2)
  x_t = x + bcast(s0, x) * eps

  heun = functools.partial(_heun_teacher, teacher_net, teacher_params, x_t, s0, s1, d01, labels)
  euler = functools.partial(_euler_teacher, teacher_net, teacher_params, x_t, s0, s1, d01, labels,
                            clip_x=clip_x)
  if isinstance(teacher_heun, bool):
    f_bound, x_1, x0_teacher, delta = heun() if teacher_heun else euler()
  else:
    f_bound, x_1, x0_teacher, delta = jax.lax.cond(teacher_heun, heun, euler)

  _, x0s, off_s = _denoised(teacher_net, sema_params, x_1, s1, labels)   # self-teacher at s1
  if clip_x:  # a clipped x0's offset is taken to the unrounded x_1 = x_t + delta
    x0s_clipped = jnp.clip(x0s, -1.0, 1.0)
    off_s = jnp.where(x0s_clipped == x0s, off_s, (x0s_clipped - x_t) - delta)
    x0s = x0s_clipped
  _, c_skip0, c_out0, _ = precondition(s0)
  # x_target = w_t x0_teacher + w_s x0_self (x_t cancels); the same, as an offset to x_t:
  # x_target - x_t = s0 / (s0 - s2) (delta + (s1 - s2) / s1 (x0_self - x_1)).
  w_t, w_s = s2 * d01 / (s1 * d02), s0 * d12 / (s1 * d02)
  x_target = bcast(w_t, x) * x0_teacher + jnp.where(end, 0.0, bcast(w_s, x) * x0s)
  numer_large = x_target - bcast(c_skip0, x) * x_t
  numer_small = (bcast(_one_minus_c_skip(s0), x) * x_t + bcast(s0 / d02, x) * (
      delta + jnp.where(end, 0.0, bcast(d12 / s1, x) * off_s)))
  numer = jnp.where(bcast(s0 >= SIGMA_DATA, x), numer_large, numer_small)
  f_target = jnp.where(boundary, f_bound, numer / bcast(c_out0, x))
  return x_t, jax.lax.stop_gradient(f_target)


def tract_loss(params, net, grid: Grid, teacher_params, sema_params, x, labels, rng, phase_row, *,
               teacher_heun=True, clip_x: bool = True, reduction: str = 'mean',
               teacher_net=None, dropout: bool = False):
  """TRACT-EDM loss (spec section 3): mean over the batch of the mean over pixels ('mean', the
  release) of (F_pred - F_target)^2; the weight (s0^2 + sigma_data^2) c_out^2 / (s0 sigma_data)^2
  is identically 1. F_pred = (D_student - c_skip x_t) / c_out is taken as the network output F
  itself (equal in exact arithmetic, without the float32 cancellation)."""
  k_idx, k_eps, k_drop = jax.random.split(rng, 3)
  i0, i1, i2 = losses.tract_times(k_idx, phase_row, x.shape[0])
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  x_t, f_target = tract_target(net, grid, teacher_params, sema_params, x, eps, labels, i0, i1, i2,
                               teacher_heun=teacher_heun, clip_x=clip_x, teacher_net=teacher_net)
  f_pred = net(params, x_t, grid.sigma(i0), labels, k_drop if dropout else None)
  loss = jnp.mean(losses.per_example(jnp.square(f_pred - f_target), reduction))
  return loss, {'loss': loss}


def teacher_loss(params, net, x, labels, rng, *, reduction: str = 'mean', dropout: bool = True,
                 p_mean: float = P_MEAN, p_std: float = P_STD):
  """EDM's denoising loss: ln sigma ~ N(p_mean, p_std^2), n ~ N(0, I),
  lambda(sigma) ||D(x + sigma n; sigma) - x||^2 with lambda = (sigma^2 + sigma_data^2) /
  (sigma sigma_data)^2, reduced over pixels by `reduction` and averaged over the batch.

  Evaluated as ||F - F_target||^2 with F_target = (x - c_skip y) / c_out (lambda c_out^2 = 1), which
  is the same number without the cancellation of D - x at small sigma."""
  k_sigma, k_noise, k_drop = jax.random.split(rng, 3)
  sigma = jnp.exp(p_mean + p_std * jax.random.normal(k_sigma, (x.shape[0],), jnp.float32))
  noise = jax.random.normal(k_noise, x.shape, x.dtype)
  y = x + bcast(sigma, x) * noise
  _, c_skip, c_out, _ = precondition(sigma)
  # x - c_skip y = (1 - c_skip) x - c_skip sigma n
  f_target = ((bcast(_one_minus_c_skip(sigma), x) * x - bcast(c_skip * sigma, x) * noise)
              / bcast(c_out, x))
  f_pred = net(params, y, sigma, labels, k_drop if dropout else None)
  loss = jnp.mean(losses.per_example(jnp.square(f_pred - f_target), reduction))
  return loss, {'loss': loss}
