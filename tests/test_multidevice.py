"""Slow tier: the driver on 8 simulated devices (the session's 8-device subprocess, conftest
`pod_run`): the tiny job on a data-8 mesh, BTD on an FSDP 2x4 mesh with evaluate and sample, and a
run checkpointed on 8 devices resumed on this process's devices, every restore going straight into
the target shardings."""
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import tiny_config, tiny_job_config, tiny_job_final_state
from tract_jax import train

pytestmark = pytest.mark.slow


def test_driver_runs_on_8_devices(pod_run):
  root, out, log = pod_run
  assert out['num_devices'] == 8
  assert 'mesh data=8 x fsdp=1 over 8 cpu device(s)' in log
  assert 'mesh data=2 x fsdp=4 over 8 cpu device(s)' in log
  assert os.path.isdir(os.path.join(root, 'tract', 'phase_1_ema'))
  assert out['btd_result']['student_steps'] == 4
  assert out['btd_evaluate']['steps'] == 4 and out['btd_evaluate']['params'].endswith('phase_1_ema')
  assert out['btd_evaluate']['rmse_vs_teacher'] == pytest.approx(
      out['btd_result']['rmse_student_vs_teacher'], rel=1e-5)
  assert out['btd_samples_shape'] == [8, 8, 8, 1]


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
    scale = max(float(np.max(np.abs(a))) for a in reference if a.size and a.dtype.kind == 'f')
    worst = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(resumed, reference)
                if a.size and a.dtype.kind == 'f')
    assert worst < 1e-4 * scale, (worst, scale)


def test_fsdp_student_reads_on_this_process(pod_run):
  """The FSDP-sharded BTD workdir, evaluated here: the same score as on the 8-device mesh."""
  root, out, _ = pod_run
  config = tiny_config('btd', teacher_checkpoint='unused', mode='evaluate', time_schedule='16,8,4')
  scored = train.train_and_evaluate(config, os.path.join(root, 'btd'))
  assert scored['steps'] == 4
  assert scored['rmse_vs_teacher'] == pytest.approx(out['btd_evaluate']['rmse_vs_teacher'], rel=1e-4)
