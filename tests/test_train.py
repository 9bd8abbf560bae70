"""The driver end to end on the tiny model: a chained job (teacher, then TRACT 16 -> 4 -> 1) cut twice
and resumed in-process ends bit for bit where the session's command-line run ended; the read-only
modes; the bias-corrected EMA; and distillation that actually learns (a student much closer to the
teacher than the undistilled teacher at the same step count). BTD, class-conditional and other
driver runs are in the slow tier (test_driver_slow.py)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import same_arrays, tiny_config, tiny_job_config, tiny_job_final_state
from tract_jax import phases, state, steps, train


class Interrupt(Exception):
  pass


def interrupting_steps(monkeypatch, at_step):
  """Makes every train step built from now on raise Interrupt when asked for update `at_step`
  (a crash mid-run, after the checkpoints the loop saved so far)."""
  original = steps.make_train_step

  def make(*args, **kwargs):
    step_fn = original(*args, **kwargs)

    def wrapped(state, batch):
      if int(state.step) == at_step:
        raise Interrupt()
      return step_fn(state, batch)

    return wrapped

  monkeypatch.setattr(steps, 'make_train_step', make)


def checkpoint_steps(directory):
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def restore_tree(path):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


def test_cut_twice_and_resumed_in_process_equals_the_command_line_run(tiny_job_run, tmp_path,
                                                                     monkeypatch, capsys):
  config = tiny_job_config()
  config.eval.metrics = ('agreement', 'digits_fid')  # as the command-line run's override
  workdir = str(tmp_path)
  # A crash at teacher update 3 (its last checkpoint: 2) ...
  with monkeypatch.context() as patch:
    interrupting_steps(patch, 3)
    with pytest.raises(Interrupt):
      train.train_and_evaluate(config, workdir)
  assert checkpoint_steps(os.path.join(workdir, 'teacher', 'checkpoints'))[-1] == 2
  # ... then the re-run finishes the teacher and crashes at update 9, mid phase 1 ...
  with monkeypatch.context() as patch:
    interrupting_steps(patch, 9)
    with pytest.raises(Interrupt):
      train.train_and_evaluate(config, workdir)
  assert checkpoint_steps(os.path.join(workdir, 'checkpoints'))[-1] == 8
  assert os.path.isdir(os.path.join(workdir, 'phase_0_ema'))
  assert not os.path.exists(os.path.join(workdir, 'phase_1_ema'))
  capsys.readouterr()
  # ... and the third run ends exactly where the uninterrupted command-line run ended.
  result = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert 'Teacher already trained' in out and 'Resumed tract at step 8' in out
  assert same_arrays(tiny_job_final_state(workdir), tiny_job_run.final_state())
  reference = json.load(open(os.path.join(tiny_job_run.workdir, 'result.json')))
  for key in ('rmse_student_vs_teacher', 'rmse_undistilled_vs_teacher', 'digits_fid_student'):
    assert result[key] == pytest.approx(reference[key], rel=1e-6), key

  # Phases chain: phase 1's teacher is phase 0's evaluation EMA; the final student is the last
  # state's evaluation EMA.
  last = restore_tree(os.path.join(workdir, 'checkpoints', '12', 'default'))
  for a, b in ((last['teacher_params'], restore_tree(os.path.join(workdir, 'phase_0_ema'))),
               (last['ema_params'], restore_tree(os.path.join(workdir, 'phase_1_ema')))):
    assert same_arrays([np.asarray(x) for x in jax.tree.leaves(a)],
                       [np.asarray(x) for x in jax.tree.leaves(b)])
  # Per phase end: the student's teacher agreement and digits FID are recorded.
  records = [json.loads(l) for l in open(os.path.join(workdir, 'summary.jsonl'))]
  ends = [r for r in records if r.get('eval/phase_end')]
  assert [r['eval/phase'] for r in ends] == [0, 1]
  assert all('eval/digits_fid' in r and 'eval/rmse_vs_teacher' in r for r in ends)

  # mode=evaluate scores the newest student; mode=sample writes uint8 samples and a grid. Both only
  # read the workdir: a training-only field that differs is not refused.
  config.mode = 'evaluate'
  scored = train.train_and_evaluate(config, workdir)
  assert scored['steps'] == 1 and scored['params'].endswith('phase_1_ema')
  assert scored['rmse_vs_teacher'] == pytest.approx(result['rmse_student_vs_teacher'], rel=1e-6)
  config.mode = 'sample'
  config.eval.steps = 4
  config.teacher_checkpoint = str(tmp_path / 'another_teacher')
  sampled = train.train_and_evaluate(config, workdir)
  samples = np.load(sampled['samples'])['images']
  assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8
  assert os.path.exists(str(sampled['samples'])[:-4] + '.png')


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


# A teacher trained long enough to draw digits, and a TRACT budget long enough to distil it: the
# same compiled teacher step as the tiny job (only the step counts differ).
LEARN_TEACHER_STEPS = 600
LEARN_PHASE_STEPS = 150


@pytest.fixture(scope='module')
def learned_teacher(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('learned_teacher'))
  config = tiny_config('teacher')
  config.teacher_training.train_steps = LEARN_TEACHER_STEPS
  config.log_every = config.checkpoint_every = 10_000
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow  # 600 + 300 training steps: about 50 s
def test_tract_student_beats_the_undistilled_teacher(learned_teacher, tmp_path):
  """After TRACT 16 -> 4 -> 1 the 1-step student's samples are much closer (RMSE ratio below 0.6;
  0.48 when written) to the teacher's 16-step samples from the same noise than the teacher's own
  1-step samples, and its digits FID is at most 0.7x the undistilled teacher's (0.50 then)."""
  config = tiny_config('tract', teacher_checkpoint=learned_teacher,
                       train_samples=2 * LEARN_PHASE_STEPS * 8)
  config.log_every = config.checkpoint_every = 10_000
  config.eval.metrics = ('agreement', 'digits_fid')
  config.eval.num_samples = 64
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result['ratio'] < 0.6, result
  assert result['digits_fid_student'] < 0.7 * result['digits_fid_undistilled'], result
