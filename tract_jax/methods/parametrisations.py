"""The two parametrisations a method can use: how a network is conditioned, sampled and described
in an export's sidecar.

DDIM: the variance-preserving cosine schedule of TRACT.md; the network takes (z_t, logsnr(t)) and
its output becomes x_hat by config.model.mean_type; deterministic DDIM sampling.
EDM: Karras et al.'s sigma grid and preconditioning (docs/SPEC_EDM.md); the network takes
(c_in x, c_noise) and D = c_skip x + c_out F; the section-2 sampler on the teacher_steps grid.
"""
import jax
import numpy as np

from tract_jax import diffusion, edm, sampling
from tract_jax.errors import ConfigError
from tract_jax.methods.base import Parametrisation
from tract_jax.models import factory


# ---- DDIM ------------------------------------------------------------------------------------------
def _ddim_denoiser(model, config):
  return factory.make_denoiser(model, config.model.mean_type)


def _ddim_sampler(model, config):
  return sampling.make_sampler(_ddim_denoiser(model, config), clip_x=config.clip_x)


def logsnr_grid(num_steps: int):
  """The cosine log-SNR schedule (spec section 1) and its values at t = i / num_steps, i = 0..N,
  evaluated by diffusion.logsnr_schedule in float64."""
  a, b, _ = diffusion.cosine_constants()
  t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  with jax.enable_x64(True):
    logsnr = np.asarray(diffusion.logsnr_schedule(t), np.float64)
  return {
      'type': 'cosine',
      'logsnr_min': diffusion.LOGSNR_MIN,
      'logsnr_max': diffusion.LOGSNR_MAX,
      'formula': 'logsnr(t) = -2 log(tan(a t + b)), b = arctan(exp(-logsnr_max / 2)), '
                 'a = arctan(exp(-logsnr_min / 2)) - b; alpha^2 = sigmoid(logsnr), '
                 'sigma^2 = sigmoid(-logsnr)',
      'a': a,
      'b': b,
      'grid_t': t.tolist(),
      'grid_logsnr': logsnr.tolist(),
  }


def _ddim_sidecar(config, num_steps: int):
  return {
      'network_inputs': 'x (B, H, W, C) in NHWC, logsnr (B,) float32, labels (B,) int when '
                        'num_classes > 0 (one-hot inside); the network embeds '
                        '1000 * arctan(exp(-logsnr / 2)) / (pi / 2)',
      'mean_type': config.model.mean_type,
      'mean_type_note': "'x': output is x_hat; 'both': channels [:C] x head, [C:] eps head, "
                        'x_hat = sigma^2 * x_head + alpha^2 * (z - sigma * eps_head) / alpha; '
                        "'eps': x_hat = (z - sigma * eps) / alpha; 'v': x_hat = alpha * z - sigma * v",
      'sampler': 'DDIM from z ~ N(0, I) at t = 1: for i = N..1, t = i / N, s = (i - 1) / N: '
                 'x_hat = network prediction (clipped to [-1, 1] if clip_x), '
                 'eps_hat = (z - alpha_t x_hat) / sigma_t, z = alpha_s x_hat + sigma_s eps_hat; '
                 'the sample is z at t = 0 (= x_hat of the last step)',
      'logsnr_schedule': logsnr_grid(num_steps),
  }


DDIM = Parametrisation(name='ddim', label='DDIM', make_denoiser=_ddim_denoiser,
                       make_sampler=_ddim_sampler, sampler_sidecar=_ddim_sidecar,
                       check_config=lambda config: None)


# ---- EDM -------------------------------------------------------------------------------------------
def check_grid_steps(teacher_steps: int) -> None:
  """The EDM grid needs T >= 2 (edm.sigma_grid)."""
  if teacher_steps < 2:
    raise ConfigError(f'teacher_steps={teacher_steps}: the EDM noise grid needs at least 2 steps '
                      '(the release uses 40)')


def _edm_checks(config) -> None:
  if config.model.mean_type != 'x':
    raise ConfigError(f"model.mean_type={config.model.mean_type!r}: with parametrisation='edm' the "
                      "network output is EDM's preconditioned F; leave mean_type='x'")
  check_grid_steps(config.teacher_steps)
  if config.mode != 'train' and config.eval.steps and config.teacher_steps % config.eval.steps:
    raise ConfigError(f'eval.steps={config.eval.steps}: the EDM sampler steps on the '
                      f'teacher_steps={config.teacher_steps} grid, so it must divide it')


def _edm_denoiser(model, config):
  del config
  return edm.make_denoiser(model)


def _edm_sampler(model, config):
  return edm.make_sampler(edm.make_denoiser(model), config.teacher_steps, clip_x=config.clip_x)


def _edm_sidecar(config, num_steps: int):
  teacher_steps = int(config.teacher_steps)
  if teacher_steps % num_steps:
    raise ConfigError(f'steps={num_steps}: the EDM sampler steps on the '
                      f'teacher_steps={teacher_steps} grid, so it must divide it')
  sigmas = edm.sigma_grid(teacher_steps)
  stride = teacher_steps // num_steps
  return {
      'network_inputs': 'x_in = c_in(sigma) x (B, H, W, C) in NHWC, c_noise(sigma) (B,) float32, '
                        'labels (B,) int when num_classes > 0; the output is F, and the denoised '
                        'image is D(x; sigma) = c_skip(sigma) x + c_out(sigma) F',
      'preconditioning': {
          'sigma_data': edm.SIGMA_DATA,
          'c_in': '1 / sqrt(sigma^2 + sigma_data^2)',
          'c_skip': 'sigma_data^2 / (sigma^2 + sigma_data^2)',
          'c_out': 'sigma sigma_data / sqrt(sigma^2 + sigma_data^2)',
          'c_noise': 'log(sigma) / 4',
      },
      'sigma_grid': {
          'formula': 'sigma_0 = 0; sigma_i = (sigma_min^(1/rho) + (i - 1) / (T - 1) '
                     '(sigma_max^(1/rho) - sigma_min^(1/rho)))^rho for i = 1..T',
          'sigma_min': edm.SIGMA_MIN, 'sigma_max': edm.SIGMA_MAX, 'rho': edm.RHO,
          'teacher_steps': teacher_steps,
          'sigmas': sigmas.tolist(),
      },
      'sampling_sigmas': sigmas[::-stride].tolist(),
      'sampler': 'x = sigma_max z with z ~ N(0, I); for each consecutive pair (s, s_next) of '
                 'sampling_sigmas (every T/N-th grid level, from sigma_T down to sigma_0 = 0): '
                 'x0 = D(x; s) (clipped to [-1, 1] if clip_x), x = x0 + s_next (x - x0) / s, '
                 'non-finite values replaced by 0; the sample is x clipped to [-1, 1]',
  }


EDM = Parametrisation(name='edm', label='EDM', make_denoiser=_edm_denoiser,
                      make_sampler=_edm_sampler, sampler_sidecar=_edm_sidecar,
                      check_config=_edm_checks)
