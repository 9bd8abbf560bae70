"""An exported student sampled outside the package: the sidecar's numbers (schedule or sigma grid,
preconditioning, step rule) and the network's apply are all the small samplers below use, and they
reproduce what `mode=sample` writes from the same noise. Also: a run trained on an .npz file exports
from the command line after its data is gone (the image shape comes from the run's config.json)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from tiny import tiny_edm_job_config
from tract_jax import checkpoints, export, seeds, train
from tract_jax.models import factory


def _network(meta):
  """apply(params, x, scalar (B,)) of the exported architecture (the network is all we take)."""
  model = factory.build_model(ml_collections.ConfigDict(meta['model']))
  return jax.jit(lambda params, x, s: model.apply({'params': params}, x, s, None, train=False))


def sample_ddim(meta, params, noise):
  """DDIM as the sidecar describes it: logsnr on the grid t = i / N, x_hat clipped, z <- alpha_s
  x_hat + sigma_s eps_hat. Coefficients in float64, network in float32."""
  assert meta['parametrisation'] == 'ddim' and meta['mean_type'] == 'x'
  apply, logsnr = _network(meta), np.asarray(meta['logsnr_schedule']['grid_logsnr'])
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))
  z = np.asarray(noise, np.float64)
  for i in range(meta['sample_steps'], 0, -1):
    level = np.full((len(z),), logsnr[i], np.float32)
    x = np.clip(np.asarray(apply(params, jnp.asarray(z, jnp.float32), level), np.float64), -1, 1)
    eps = (z - alpha[i] * x) / sigma[i]
    z = alpha[i - 1] * x + sigma[i - 1] * eps
  return np.clip(x, -1, 1)


def sample_edm(meta, params, noise):
  """EDM's deterministic sampler as the sidecar describes it: x = sigma_max z; D = c_skip x +
  c_out F(c_in x; c_noise), clipped; x <- x0 + s_next (x - x0) / s along sampling_sigmas."""
  assert meta['parametrisation'] == 'edm'
  apply, sigmas = _network(meta), meta['sampling_sigmas']
  sd = meta['preconditioning']['sigma_data']
  x = sigmas[0] * np.asarray(noise, np.float64)
  for s, s_next in zip(sigmas[:-1], sigmas[1:]):
    c_in, c_skip = 1 / np.sqrt(s * s + sd * sd), sd * sd / (s * s + sd * sd)
    c_out, c_noise = s * sd / np.sqrt(s * s + sd * sd), np.log(s) / 4
    f = apply(params, jnp.asarray(c_in * x, jnp.float32), jnp.full((len(x),), c_noise, jnp.float32))
    x0 = np.clip(c_skip * x + c_out * np.asarray(f, np.float64), -1, 1)
    x = x0 + s_next * (x - x0) / s
  return np.clip(x, -1, 1)


def _perturbed_student(config, run_dir):
  """A phase-0 student of `config` in run_dir: initial parameters moved by 0.05 N(0, 1), so the
  zero-initialised output layer is not zero."""
  params = factory.init_params(factory.build_model(config.model), (8, 8, 1), 0)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  checkpoints.save_params(os.path.join(run_dir, 'phase_0_ema'), params)


@pytest.mark.slow
@pytest.mark.parametrize('parametrisation', ['ddim', 'edm'])
def test_exported_student_samples_like_mode_sample(tmp_path, parametrisation):
  if parametrisation == 'ddim':
    config = tiny_config('tract', time_schedule='16,4,1')      # phase 0: a 4-step student
  else:
    config = tiny_edm_job_config()  # 8,2,1 (phase 0: 2 steps): the end-to-end EDM run's sampler
  run = str(tmp_path / 'run')
  _perturbed_student(config, run)
  config.mode, config.eval.params = 'sample', run
  sampled = train.train_and_evaluate(config, run)
  with np.load(sampled['samples']) as f:
    reference = f['images']  # uint8, what mode=sample writes

  meta = export.export_params(run, config, str(tmp_path / 'student.npz'))
  assert meta['sample_steps'] == sampled['steps'] == (4 if parametrisation == 'ddim' else 2)
  params, meta = export.load_exported(str(tmp_path / 'student.npz'))
  # The evaluator's fixed noise: config.seed + seeds.EVAL_NOISE, standard normal.
  noise = jax.random.normal(jax.random.PRNGKey(config.seed + seeds.EVAL_NOISE),
                            (config.eval.num_samples,) + tuple(meta['image_shape']), jnp.float32)
  sampler = sample_ddim if parametrisation == 'ddim' else sample_edm
  ours = np.clip(np.round((sampler(meta, params, np.asarray(noise)) + 1) * 127.5), 0, 255)
  diff = np.abs(ours - reference.astype(np.float64))
  assert np.abs(reference.astype(np.float64) - 127.5).max() > 50  # not a flat image
  # float64 coefficients here, float32 in the package: at most one uint8 level apart, rarely.
  assert diff.max() <= 1 and np.mean(diff > 0) < 0.02, (diff.max(), np.mean(diff > 0))
  if parametrisation == 'edm':
    assert meta['sigma_grid']['sigmas'][0] == 0.0 and len(meta['sigma_grid']['sigmas']) == 9
    assert meta['sampling_sigmas'] == meta['sigma_grid']['sigmas'][::-4]


def _export_command(*args):
  cmd = [sys.executable, '-m', 'tract_jax.export', *args]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
def test_npz_trained_run_and_edm_student_export_from_the_command_line(tmp_path):
  """A teacher trained on an .npz file of 12x12 RGB images (a shape no table knows), exported with
  `python -m tract_jax.export` after the .npz is deleted: the shape comes from the run's record.
  Then an EDM student (configs/demo_edm.py's method) through the same command."""
  images = np.random.default_rng(0).integers(0, 256, (32, 12, 12, 3), np.uint8)
  npz = tmp_path / 'faces.npz'
  np.savez(npz, images=images)
  overrides = {'data.name': str(npz), 'model.out_ch': 3,
               'teacher_training.train_steps': 2, 'eval.metrics': ()}
  config = tiny_config('teacher', **overrides)
  run = tmp_path / 'run'
  train.train_and_evaluate(config, str(run))
  assert json.loads((run / 'config.json').read_text())['image_shape'] == [12, 12, 3]
  os.remove(npz)

  flags = [f'--config.{k}={v}' for k, v in overrides.items() if k != 'eval.metrics']
  stdout = _export_command(f'--params={run}', '--config=tests/tiny_job.py',
                           '--config.method=teacher', *flags,
                           f'--output={tmp_path / "teacher.msgpack"}')
  assert '16-step DDIM' in stdout
  params, meta = export.load_exported(str(tmp_path / 'teacher.msgpack'))
  assert meta['image_shape'] == [12, 12, 3] and meta['parametrisation'] == 'ddim'
  saved = checkpoints.load_params(str(run / 'ema_params'), params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  edm_config = tiny_config('tract_edm', parametrisation='edm', teacher_steps=8,
                           time_schedule='8,2,1', loss_reduction='mean')
  _perturbed_student(edm_config, str(tmp_path / 'edm_run'))
  stdout = _export_command(
      f'--params={tmp_path / "edm_run"}', '--config=tests/tiny_job.py', '--config.method=tract_edm',
      '--config.parametrisation=edm', '--config.teacher_steps=8', '--config.time_schedule=8,2,1',
      f'--output={tmp_path / "edm.npz"}')
  assert '2-step EDM' in stdout
  _, meta = export.load_exported(str(tmp_path / 'edm.npz'))
  assert meta['parametrisation'] == 'edm' and len(meta['sampling_sigmas']) == 3
