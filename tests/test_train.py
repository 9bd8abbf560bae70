"""The phase loop end to end on a tiny model: teacher training, TRACT and BTD, checkpoints, resume."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from tract_jax import checkpoints, config_checks, data, phases, state, steps, train
from tract_jax.models import factory


class Interrupt(Exception):
  pass


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A tiny teacher trained once for the module (teacher job, with dropout and EMA)."""
  workdir = str(tmp_path_factory.mktemp('teacher'))
  config = tiny_config('teacher')
  train.train_and_evaluate(config, workdir)
  return workdir


def interrupting_steps(monkeypatch, at_step):
  """Makes every train step built from now on raise Interrupt when asked for update `at_step`
  (a crash mid-run, after the checkpoints the loop saved so far)."""
  original = steps.make_train_step

  def make(*args, **kwargs):
    step_fn = original(*args, **kwargs)

    def wrapped(state, batch):
      if at_step is not None and int(state.step) == at_step:
        raise Interrupt()
      return step_fn(state, batch)

    return wrapped

  monkeypatch.setattr(steps, 'make_train_step', make)


def test_teacher_job_writes_params_and_resumes(teacher_dir, tmp_path, monkeypatch):
  assert os.path.isdir(os.path.join(teacher_dir, 'ema_params'))
  assert os.path.exists(os.path.join(teacher_dir, 'teacher_16steps.png'))
  config = tiny_config('teacher')
  model = factory.build_model(config.model)
  like = factory.init_params(model, (8, 8, 1), 0)
  params = checkpoints.load_params(teacher_dir, like)
  assert jax.tree.structure(params) == jax.tree.structure(like)
  assert not _leaves_equal(params, like)  # it trained
  # Interrupted teacher training resumes to the same EMA as an uninterrupted one.
  config.checkpoint_every = 2
  full = train.train_teacher(config, str(tmp_path / 'full'))
  source = data.load_source(config.data)
  with monkeypatch.context() as patch:
    interrupting_steps(patch, 3)
    with pytest.raises(Interrupt):
      train.train_teacher(config, str(tmp_path / 'cut'), source)
  resumed = train.train_teacher(config, str(tmp_path / 'cut'), source)
  assert _leaves_equal(full, resumed)


def _run_distill(config, workdir, teacher, monkeypatch, interrupt_at=None):
  plan = config_checks.validate_config(config)
  with monkeypatch.context() as patch:
    interrupting_steps(patch, interrupt_at)
    return train.train_distillation(config, workdir, plan, teacher)


@pytest.mark.parametrize('method', ['tract', 'btd'])
def test_phases_and_resume_to_identical_parameters(teacher_dir, tmp_path, method, monkeypatch):
  config = tiny_config(method, teacher_checkpoint=teacher_dir)
  if method == 'btd':
    config.time_schedule = '16,8,4'
  plan = config_checks.validate_config(config)
  like = factory.init_params(factory.build_model(config.model), (8, 8, 1), 0)
  teacher = checkpoints.load_params(teacher_dir, like)

  full = _run_distill(config, str(tmp_path / 'full'), teacher, monkeypatch)
  assert int(full.step) == plan.total_steps == 12
  assert int(full.phase) == plan.num_phases - 1
  cut = str(tmp_path / 'full')
  if method == 'tract':  # (the resume machinery is shared; BTD only checks its phases, to save time)
    # Interrupt mid-phase 1 (step 9, last checkpoint at 8 = 4 * 2) and restart the same job.
    cut = str(tmp_path / 'cut')
    with pytest.raises(Interrupt):
      _run_distill(config, cut, teacher, monkeypatch, interrupt_at=9)
    with checkpoints.StateCheckpoints(os.path.join(cut, 'checkpoints')) as ckpts:
      assert ckpts.latest_step() == 8
    resumed = _run_distill(config, cut, teacher, monkeypatch)
    chex.assert_trees_all_equal(full, resumed)  # every field, bit for bit

  # Each phase's evaluation EMA is kept as a loadable artefact; the last one is the final student.
  for k in range(plan.num_phases):
    assert os.path.isdir(os.path.join(cut, f'phase_{k}_ema'))
    assert os.path.exists(os.path.join(cut, f'phase{k}_student_{plan.schedule[k + 1]}steps.png'))
  final = checkpoints.load_params(os.path.join(cut, f'phase_{plan.num_phases - 1}_ema'), like)
  assert _leaves_equal(final, full.ema_params)
  # Phase change: the teacher of the last phase is the first phase's evaluation EMA.
  phase0 = checkpoints.load_params(os.path.join(cut, 'phase_0_ema'), like)
  assert _leaves_equal(phase0, full.teacher_params)
  assert (full.sema_params is not None) == (method == 'tract')


def test_ema_update_is_bias_corrected():
  ema = {'w': jnp.zeros(3)}
  count = jnp.int32(0)
  ema, count = state.ema_update(ema, {'w': jnp.ones(3) * 5}, count, np.log(0.5))
  np.testing.assert_allclose(ema['w'], 5.0)  # the first update copies
  ema, count = state.ema_update(ema, {'w': jnp.ones(3) * 8}, count, np.log(0.5))
  # n = 2: d = (1 - m) / (1 - m^2) = 2/3
  np.testing.assert_allclose(ema['w'], 5 + (8 - 5) * 2 / 3, rtol=1e-6)
  # Momentum close to 1 keeps its accuracy: after one phase the start keeps weight ema_residual.
  m = phases.make_plan('tract', 16, '16,1', 200 * 8, 8, 1e-3).ema_momentum
  ema, count = {'w': jnp.zeros(())}, jnp.int32(0)
  ema, count = state.ema_update(ema, {'w': jnp.float32(1.0)}, count, np.log(m))
  for _ in range(199):
    ema, count = state.ema_update(ema, {'w': jnp.float32(0.0)}, count, np.log(m))
  # Weight of the first value after n updates with bias correction: m^(n-1) (1 - m) / (1 - m^n).
  expected = m ** 199 * (1 - m) / (1 - m ** 200)
  np.testing.assert_allclose(float(ema['w']), expected, rtol=1e-4)


def test_end_to_end_chains_teacher_and_distillation(tmp_path):
  """The driver trains a teacher, runs every TRACT phase and reports the teacher agreement."""
  config = tiny_config('tract', train_samples=2 * 2 * 8)
  config.eval.metrics = ('agreement', 'digits_fid')
  config.eval_every = 1
  result = train.train_and_evaluate(config, str(tmp_path))
  assert os.path.isdir(tmp_path / 'teacher' / 'ema_params')
  assert os.path.exists(tmp_path / 'teacher_16steps.png')
  assert os.path.exists(tmp_path / 'phase1_student_1steps.png')
  for key in ('rmse_student_vs_teacher', 'rmse_undistilled_vs_teacher'):
    assert 0.0 < result[key] < 2.0
  assert os.path.exists(tmp_path / 'summary.jsonl')
  records = [json.loads(l) for l in open(tmp_path / 'summary.jsonl')]
  phase_ends = [r for r in records if r.get('eval/phase_end')]
  # Per phase: the student's offline FID and teacher agreement are recorded.
  assert [r['eval/phase'] for r in phase_ends] == [0, 1]
  assert all('eval/digits_fid' in r and 'eval/rmse_vs_teacher' in r for r in phase_ends)
  assert any('eval/digits_fid' in r and not r.get('eval/phase_end') for r in records)  # eval_every
  assert result['digits_fid_student'] > 0

  # mode=evaluate scores the newest student; mode=sample writes an .npz and a grid.
  config.mode = 'evaluate'
  scored = train.train_and_evaluate(config, str(tmp_path))
  assert scored['steps'] == 1 and scored['params'].endswith('phase_1_ema')
  assert abs(scored['rmse_vs_teacher'] - result['rmse_student_vs_teacher']) < 1e-6
  # FID and KID through the paper's protocol, on locally made Inception weights and statistics.
  from tract_jax.evaluation import convert_inception, stats_files
  weights = str(tmp_path / 'inception.npz')
  np.savez(weights, **convert_inception.convert_state_dict(convert_inception.synthetic_state_dict(0)))
  reference = np.random.default_rng(0).standard_normal((16, 2048)).astype(np.float32)
  stats = str(tmp_path / 'stats.npz')
  stats_files.save_stats(stats, reference.mean(0), np.cov(reference, rowvar=False), 16,
                         resize='torch', dataset='digits', split='train', features=reference)
  inception_config = config.copy_and_resolve_references()
  inception_config.eval.update(metrics=('fid', 'kid'), fid_samples=8, inception_batch=8,
                               inception_weights=weights,
                               reference_stats=stats, kid_subset_size=8, kid_subsets=4)
  scored = train.train_and_evaluate(inception_config, str(tmp_path))
  assert scored['fid0k'] > 0 and np.isfinite(scored['kid']) and scored['kid_std'] >= 0
  stats_files.save_stats(stats, reference.mean(0), np.cov(reference, rowvar=False), 16,
                         resize='tf1')
  with pytest.raises(config_checks.ConfigError, match="resize"):
    train.train_and_evaluate(inception_config, str(tmp_path))

  config.mode = 'sample'
  config.eval.steps = 4
  # sample/evaluate only read the workdir: training-only fields that differ are not refused.
  config.teacher_checkpoint = str(tmp_path / 'another_teacher')
  out = train.train_and_evaluate(config, str(tmp_path))
  samples = np.load(out['samples'])['images']
  assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8
  assert os.path.exists(str(out['samples'])[:-4] + '.png')


def test_class_conditional_labels_flow_and_label_grids(tmp_path):
  """A conditional model: labels reach teacher, self-teacher and student; grids carry class labels."""
  config = tiny_config('tract', train_samples=2 * 8)
  config.time_schedule = '16,1'
  config.model.num_classes = 10
  config.model.mean_type = 'both'
  config.model.out_ch = 2
  result = train.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= result['rmse_student_vs_teacher'] < 2.0
  from PIL import Image
  grid = np.asarray(Image.open(tmp_path / 'phase0_student_1steps.png'))
  plain = np.asarray(Image.open(tmp_path / 'teacher_16steps.png'))
  assert grid.shape == plain.shape
  # Labels differ between examples, so a labelled model's samples depend on them.
  model = factory.build_model(config.model)
  params = checkpoints.load_params(str(tmp_path / 'phase_0_ema'),
                                   factory.init_params(model, (8, 8, 1), 0))
  denoise = factory.make_denoiser(model, 'both')
  z = jnp.ones((2, 8, 8, 1))
  t = jnp.full((2,), 0.5)
  out = denoise(params, z, t, jnp.array([0, 7]))
  assert not np.allclose(out[0], out[1])
