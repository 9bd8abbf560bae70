"""Shared test setup: CPU only, a per-session persistent compilation cache (many tests build the same
tiny models), and tiny configs."""
import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.environ.get('TRACT_TEST_JAX_CACHE') or os.path.join(tempfile.gettempdir(),
                                                                  'tract_jax_test_cache')
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def tiny_config(method='tract', **overrides):
  """A config that trains in seconds on 8x8 digits: one-level UNet with 16 channels."""
  from tract_jax import default_config
  config = default_config.get_config()
  config.method = method
  config.teacher_steps = 16
  config.time_schedule = '16,4,1'
  config.batch_size = 8
  config.train_samples = 2 * 6 * 8  # two phases of 6 steps
  config.checkpoint_every = 4
  config.log_every = 2
  config.model.ch = 16
  config.model.emb_ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.out_ch = 1
  config.model.num_groups = 4
  config.teacher_training.train_steps = 4
  config.teacher_training.batch_size = 8
  config.teacher_training.warmup_steps = 2
  config.teacher_training.dropout = 0.1
  config.data.name = 'digits'
  config.data.random_flip = False
  config.eval.num_samples = 8
  config.eval.sample_batch = 8
  for key, value in overrides.items():
    target = config
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return config


@pytest.fixture
def tiny():
  return tiny_config


# tests/tiny_job.py run through the real command line: the teacher (6 steps), then TRACT 16 -> 4 -> 1.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_JOB_TOTAL = 12  # distillation steps of tests/tiny_job.py


def start_tiny_job(workdir, *overrides, env=None):
  """`python -m tract_jax.main --config=tests/tiny_job.py --workdir=WORKDIR` (local or gs://),
  stdout and stderr merged into one text pipe."""
  import subprocess
  import sys
  cmd = [sys.executable, '-m', 'tract_jax.main', '--config=tests/tiny_job.py',
         f'--workdir={workdir}', *overrides]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
                                   **(env or {})))


def sigterm_mid_phase(proc, timeout=120):
  """Reads a started tiny job's output until TRACT phase 0 logs step 3, sends it SIGTERM and waits;
  returns (exit code, all of its output)."""
  import signal
  lines = []
  for line in proc.stdout:  # wait until distillation runs, then ask it to stop
    lines.append(line)
    if line.startswith('[tract phase 0') and 'step 3/' in line:
      proc.send_signal(signal.SIGTERM)
      break
  out = ''.join(lines) + proc.stdout.read()
  proc.wait(timeout=timeout)
  return proc.returncode, out


def run_tiny_job(workdir, *overrides, env=None, timeout=300):
  proc = start_tiny_job(workdir, *overrides, env=env)
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def tiny_job_final_state(workdir):
  """Every array of the last train state and of the final student artefact, as numpy (the workdir
  local or gs://)."""
  import numpy as np
  import orbax.checkpoint as ocp
  from etils import epath
  workdir = epath.Path(str(workdir))
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(workdir / 'checkpoints' / str(TINY_JOB_TOTAL) / 'default')
    student = ckptr.restore(workdir / 'phase_1_ema')
  return ([np.asarray(x) for x in jax.tree.leaves(state)]
          + [np.asarray(x) for x in jax.tree.leaves(student)])


@pytest.fixture(scope='session')
def tiny_job_reference(tmp_path_factory):
  """The final arrays of one uninterrupted tiny job in a local workdir: what every interrupted and
  resumed run (test_reliability, test_gcs) must reproduce bit for bit. Run once per session."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  code, out = run_tiny_job(workdir)
  assert code == 0, out[-3000:]
  return tiny_job_final_state(workdir)
