"""The command line itself: the session's tiny job through `python -m tract_jax.main` (exit code,
what it prints, an override reaching the job), and one bad config through it (exit 2, one line).
Every other configuration error is checked in-process (test_config_errors.py)."""
import os
import subprocess
import sys

from conftest import ROOT, TINY_JOB_TOTAL


def test_tiny_job_through_the_command_line(tiny_job_run):
  """The chained job exits 0 and prints the teacher's and every phase's progress and the final
  agreement; the --config.eval.metrics override given on the command line reached the job."""
  out = tiny_job_run.output
  assert tiny_job_run.returncode == 0
  assert '[teacher] step 6/6' in out
  assert f'[tract phase 1: 4->1 steps] step {TINY_JOB_TOTAL}/{TINY_JOB_TOTAL}' in out
  assert 'Teacher agreement at 1 step(s) (RMSE against the 16-step teacher' in out
  assert 'Offline digits FID (8 samples)' in out  # only with the override's 'digits_fid'
  assert '"digits_fid"' in open(os.path.join(tiny_job_run.workdir, 'config.json')).read()
  for name in ('teacher/ema_params', 'phase_0_ema', 'phase_1_ema', 'result.json',
               'teacher_16steps.png', 'phase0_student_4steps.png', 'phase1_student_1steps.png',
               'teacher_1steps.png', 'summary.jsonl'):
    assert os.path.exists(os.path.join(tiny_job_run.workdir, name)), name


def test_a_bad_config_exits_2_with_one_line(tmp_path):
  cmd = [sys.executable, '-m', 'tract_jax.main', '--config=tests/tiny_job.py',
         f'--workdir={tmp_path}', '--config.time_schedule=16,5,1']
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert lines == ["Configuration error: time_schedule='16,5,1': every entry must divide "
                   'teacher_steps=16; [5] do not'], result.stderr[-2000:]
  assert not os.listdir(tmp_path)  # nothing written
