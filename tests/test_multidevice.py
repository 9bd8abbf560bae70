"""The driver on 8 simulated devices, end to end (a data-8 and an FSDP 2x4 mesh), and a resume on
1 device of a run checkpointed on 8: every restore goes straight into the target shardings."""
import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from tract_jax import train

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def pod_run(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('pod'))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, os.path.join(HERE, 'multidevice_job.py'), root],
                        capture_output=True, text=True, timeout=900, env=env)
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-4000:])
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return root, json.loads(line[len('RESULT '):]), proc.stdout


def test_distils_a_teacher_checkpoint_on_8_devices(pod_run):
  root, out, log = pod_run
  assert out['num_devices'] == 8
  assert 'mesh data=8 x fsdp=1 over 8 cpu device(s)' in log
  assert 'mesh data=2 x fsdp=4 over 8 cpu device(s)' in log
  assert out['tract_interrupted']
  assert 0.0 <= out['btd_rmse'] < 2.0
  assert out['btd_evaluate']['steps'] == 4 and out['btd_evaluate']['params'].endswith('phase_1_ema')
  assert out['btd_samples_shape'] == [8, 8, 8, 1]


def test_resumes_on_1_device_from_8_device_checkpoints(pod_run, capsys):
  root, _, _ = pod_run
  config = tiny_config('tract', teacher_checkpoint=os.path.join(root, 'teacher'))
  result = train.train_and_evaluate(config, os.path.join(root, 'tract'))
  out = capsys.readouterr().out
  assert 'Resumed tract at step 8' in out and 'over 1 cpu device(s)' in out
  assert result['student_steps'] == 1 and 0.0 <= result['rmse_student_vs_teacher'] < 2.0
  assert os.path.isdir(os.path.join(root, 'tract', 'phase_1_ema'))
  # The FSDP-sharded BTD student, read on 1 device.
  config = tiny_config('btd', teacher_checkpoint=os.path.join(root, 'teacher'), mode='evaluate',
                       time_schedule='16,8,4')
  scored = train.train_and_evaluate(config, os.path.join(root, 'btd'))
  assert scored['steps'] == 4
