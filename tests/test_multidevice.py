"""Slow tier: the driver on 8 simulated devices, every job on an FSDP 2x4 mesh (the session's
8-device subprocess, conftest `pod_run`), against the same jobs on this process's devices: the tiny
job (teacher, then TRACT) and BTD end to end within float tolerance (the sharded teacher, TRACT and
BTD steps: other reduction orders, the same updates), a run checkpointed on 8 devices resumed here,
a train state written here restored into FSDP shardings, and every restore going straight into the
target shardings."""
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config, tiny_job_config, tiny_job_final_state
from tract_jax import checkpoints, train

pytestmark = pytest.mark.slow


def _close(arrays, reference, rtol=1e-4):
  """Float arrays equal up to rtol times the reference's largest magnitude (leaf by leaf)."""
  floats = [(a, b) for a, b in zip(arrays, reference) if a.size and a.dtype.kind == 'f']
  assert len(arrays) == len(reference) and floats
  scale = max(float(np.max(np.abs(b))) for _, b in floats)
  worst = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in floats)
  assert worst < rtol * scale, (worst, scale)


def _tree(path):
  with ocp.StandardCheckpointer() as ckptr:
    return [np.asarray(x) for x in jax.tree.leaves(ckptr.restore(path))]


def _same(a, b):
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_driver_runs_on_8_devices(pod_run, tiny_job_run):
  """The FSDP tiny job ends where the session's job on this process's devices ends."""
  root, out, log = pod_run
  assert out['num_devices'] == 8
  assert log.count('mesh data=2 x fsdp=4 over 8 cpu device(s)') == 4  # tiny job, BTD x 3 modes
  assert os.path.isdir(os.path.join(root, 'tract', 'phase_1_ema'))
  _close(tiny_job_final_state(os.path.join(root, 'tract')), tiny_job_run.final_state())
  assert out['btd_result']['student_steps'] == 4
  assert out['btd_evaluate']['steps'] == 4 and out['btd_evaluate']['params'].endswith('phase_1_ema')
  assert out['btd_evaluate']['rmse_vs_teacher'] == pytest.approx(
      out['btd_result']['rmse_student_vs_teacher'], rel=1e-5)
  assert out['btd_samples_shape'] == [8, 8, 8, 1]


def test_train_state_written_here_restores_into_fsdp(pod_run):
  r = pod_run[1]['restore_into_fsdp']
  assert r['equal'] and r['target_shardings']
  assert 0 < r['sharded_leaves'] < r['leaves']  # the FSDP rule sharded the larger leaves only


def test_btd_phases_from_a_teacher_checkpoint(pod_run, tiny_teacher, tmp_path):
  """BTD 16 -> 8 -> 4 here: a student artefact and grid per phase; at the phase change the
  evaluation EMA became the teacher; BTD keeps no self-teacher; the student equals the FSDP run's
  (the same job on 8 devices) within float tolerance."""
  config = tiny_config('btd', teacher_checkpoint=tiny_teacher, time_schedule='16,8,4')
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result['student_steps'] == 4
  for k, steps in enumerate((8, 4)):
    assert os.path.isdir(tmp_path / f'phase_{k}_ema')
    assert os.path.exists(tmp_path / f'phase{k}_student_{steps}steps.png')
  with ocp.StandardCheckpointer() as ckptr:
    last = ckptr.restore(tmp_path / 'checkpoints' / '12' / 'default')
  assert last['sema_params'] is None or not jax.tree.leaves(last['sema_params'])
  assert int(last['phase']) == 1
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  assert _same(leaves(last['teacher_params']), _tree(tmp_path / 'phase_0_ema'))
  assert _same(leaves(last['ema_params']), _tree(tmp_path / 'phase_1_ema'))
  # The first phase's teacher was the checkpoint's: phase 0's student moved away from it.
  assert not _same(_tree(tmp_path / 'phase_0_ema'),
                   _tree(os.path.join(tiny_teacher, 'ema_params')))
  host = lambda path: [np.asarray(x) for x in jax.tree.leaves(checkpoints.load_params(str(path)))]
  _close(host(os.path.join(pod_run[0], 'btd', 'phase_1_ema')), host(tmp_path / 'phase_1_ema'))
  assert pod_run[1]['btd_result']['rmse_student_vs_teacher'] == pytest.approx(
      result['rmse_student_vs_teacher'], rel=1e-3)


def test_resume_here_from_an_8_device_checkpoint(pod_run, tiny_job_run, tmp_path, capsys):
  """The 8-device run's state at step 8 (mid phase 1), copied as a crash would have left it, resumes
  on this process's devices and ends within float tolerance of the 8-device run and of the
  session's run on this process's devices (the same job, other reduction orders)."""
  root, _, _ = pod_run
  workdir = str(tmp_path / 'tract')
  shutil.copytree(os.path.join(root, 'tract'), workdir)
  for name in os.listdir(os.path.join(workdir, 'checkpoints')):
    if name.isdigit() and int(name) > 8:
      shutil.rmtree(os.path.join(workdir, 'checkpoints', name))
  shutil.rmtree(os.path.join(workdir, 'phase_1_ema'))
  capsys.readouterr()
  train.train_and_evaluate(tiny_job_config(), workdir)
  out = capsys.readouterr().out
  assert 'Resumed tract at step 8' in out and 'Teacher already trained' in out
  resumed = tiny_job_final_state(workdir)
  for reference in (tiny_job_final_state(os.path.join(root, 'tract')), tiny_job_run.final_state()):
    _close(resumed, reference)


def test_fsdp_student_reads_on_this_process(pod_run):
  """The FSDP-sharded BTD workdir, evaluated here: the same score as on the 8-device mesh."""
  root, out, _ = pod_run
  config = tiny_config('btd', teacher_checkpoint='unused', mode='evaluate', time_schedule='16,8,4')
  scored = train.train_and_evaluate(config, os.path.join(root, 'btd'))
  assert scored['steps'] == 4
  assert scored['rmse_vs_teacher'] == pytest.approx(out['btd_evaluate']['rmse_vs_teacher'], rel=1e-4)
