"""Shared test setup: CPU only, one persistent compilation cache for the tests and every process
they start (so a program is compiled once per cache, whichever process needs it first), the tiny
model (tests/tiny.py) and the session's reference run of the tiny job through the command line,
whose teacher every other test distils from."""
import glob
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get('TRACT_TEST_JAX_CACHE') or os.path.join(tempfile.gettempdir(),
                                                                 'tract_jax_test_cache')
# Through the environment, so that subprocesses (the CLI, 8-device and 2-process jobs, the notebook
# kernel, benchmark scripts) share the cache; JAX reads these when it is imported.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['JAX_COMPILATION_CACHE_DIR'] = CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
# The tests run few steps of tiny programs, so compiling dominates: LLVM's -O0 halves XLA:CPU compile
# times (measured on the then two-level tiny TRACT step: 16.0 s -> 9.2 s, at 22.5 -> 37.2 ms per call)
# and gives the same printed results of the tiny job. Checks of speed live in benchmarks/, which do
# not get this.
# TRACT_TEST_XLA_OPTIMIZE=1 runs the tests with XLA's default optimisation instead.
if os.environ.get('TRACT_TEST_XLA_OPTIMIZE') != '1' and '--xla_backend_optimization_level' not in (
    os.environ.get('XLA_FLAGS', '')):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
                             ).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Also here, in case JAX was imported before this file (a plugin): the in-process tests use it too.
jax.config.update('jax_compilation_cache_dir', CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import TINY_JOB_TOTAL, tiny_config, tiny_job_config  # noqa: E402,F401
from tract_jax import devices  # noqa: E402

# The in-process tests use the CPU devices a tiny job gets by default (config.cpu_devices='auto': one
# per core dividing the batches), as the command-line runs they are compared with do.
devices.configure(tiny_config())


@pytest.fixture
def tiny():
  return tiny_config


def start_tiny_job(workdir, *overrides, env=None):
  """`python -m tract_jax.main --config=tests/tiny_job.py --workdir=WORKDIR` (local or gs://),
  stdout and stderr merged into one text pipe."""
  cmd = [sys.executable, '-m', 'tract_jax.main', '--config=tests/tiny_job.py',
         f'--workdir={workdir}', *overrides]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED='1', **(env or {})))


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
  local or gs://, written by any number of processes and devices)."""
  from tract_jax import checkpoints
  workdir = str(workdir).rstrip('/')
  state = checkpoints.read_host_arrays(f'{workdir}/checkpoints/{TINY_JOB_TOTAL}/default')
  student = checkpoints.read_host_arrays(f'{workdir}/phase_1_ema')
  return ([np.asarray(x) for x in jax.tree.leaves(state)]
          + [np.asarray(x) for x in jax.tree.leaves(student)])


def truncate_largest_data_file(directory):
  """Truncates the largest array-data file (OCDBT's d/ folders) of a checkpoint step to a third: a
  read past its end (OUT_OF_RANGE). Not the _METADATA JSON, which can be about as large."""
  files = [p for p in glob.glob(os.path.join(directory, '**', 'd', '*'), recursive=True)
           if os.path.isfile(p)]
  target = max(files, key=os.path.getsize)
  with open(target, 'r+b') as f:
    f.truncate(os.path.getsize(target) // 3)


DIGITS_FID_OVERRIDE = "--config.eval.metrics=('agreement','digits_fid')"


class TinyJobRun:
  """The session's uninterrupted tiny job through the command line."""

  def __init__(self, workdir, returncode, output):
    self.workdir = workdir
    self.returncode = returncode
    self.output = output
    self.teacher = os.path.join(workdir, 'teacher')  # a teacher workdir: a teacher_checkpoint

  def final_state(self):
    return tiny_job_final_state(self.workdir)


@pytest.fixture(scope='session')
def tiny_job_run(tmp_path_factory):
  """`python -m tract_jax.main --config=tests/tiny_job.py` once per session: the reference every
  interrupted and resumed run must reproduce bit for bit, and (its teacher/) the trained teacher
  every other distillation test starts from. Its compiles fill the cache for the rest."""
  workdir = str(tmp_path_factory.mktemp('tiny_job'))
  # An override on the command line (evaluation only: the trained arrays are the same without it).
  code, out = run_tiny_job(workdir, DIGITS_FID_OVERRIDE)
  assert code == 0, out[-3000:]
  return TinyJobRun(workdir, code, out)


@pytest.fixture(scope='session')
def tiny_job_reference(tiny_job_run):
  """The final arrays of the session's uninterrupted tiny job (test_reliability, test_gcs)."""
  return tiny_job_run.final_state()


@pytest.fixture(scope='session')
def tiny_teacher(tiny_job_run):
  """The session's trained tiny teacher: a teacher workdir, usable as teacher_checkpoint."""
  return tiny_job_run.teacher


def parse_command_line(*overrides, config_file='configs/demo.py'):
  """The config `python -m tract_jax.main --config=FILE OVERRIDES...` would run, parsed in-process
  by the same absl / ml_collections flags as tract_jax.main."""
  from absl import flags
  from ml_collections import config_flags
  argv = ['main', f'--config={os.path.join(ROOT, config_file)}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'job config', flag_values=fv, lock_config=True)
  saved, sys.argv = sys.argv, argv  # config_flags registers the overrides it finds in sys.argv
  try:
    fv(argv)
  finally:
    sys.argv = saved
  return fv.config


def same_arrays(a, b) -> bool:
  """Two lists of numpy arrays equal bit for bit (shapes included)."""
  return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope='session')
def pod_run(tmp_path_factory, tiny_teacher):
  """Slow tier: tests/pod_job.py once per session, in a subprocess with 8 simulated CPU devices
  (the tiny job and BTD on an FSDP 2x4 mesh, evaluate and sample, a restore into FSDP shardings).
  Returns (root folder, its JSON results, its output)."""
  import json
  root = str(tmp_path_factory.mktemp('pod'))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'pod_job.py'), root,
                         tiny_teacher], capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-4000:])
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return root, json.loads(line[len('RESULT '):]), proc.stdout


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Groups for pytest-xdist's `--dist loadgroup` (.ci/run's slow tier on 2 workers), so that no
  shared job runs twice: every test of the session's 8-device `pod_run` goes to one worker, and so do
  the tests of a module that share a module-scoped fixture (a trained teacher, a 2-process job, the
  GCS emulator). The other tests go to whichever worker is free."""
  del config
  for item in items:
    if 'pod_run' in getattr(item, 'fixturenames', ()):
      group = 'pod_run'
    else:
      defs = getattr(getattr(item, '_fixtureinfo', None), 'name2fixturedefs', {})
      shared = sorted(name for name, fixturedefs in defs.items()
                      if fixturedefs and fixturedefs[-1].scope == 'module')
      group = f'{item.module.__name__}:{shared[0]}' if shared else None
    if group:
      item.add_marker(pytest.mark.xdist_group(group))
