"""A real multi-host run: 2 processes x 4 simulated CPU devices joined by jax.distributed (gloo
collectives on 127.0.0.1), through `python -m tract_jax.main`. SIGTERM reaches ONE process mid-phase:
both agree on the step (JAX's coordination service), save it and exit 75; re-run, both resume, and
the final student equals an uninterrupted 2-process run bit for bit (and a 1-process run within
float tolerance), and loads in this 1-device process without a target tree."""
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config
from tract_jax import checkpoints
from tract_jax.models import factory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = ['-m', 'tract_jax.main', '--config=tests/tiny_job.py']


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(workdir, processes=2, extra=()):
  port = _free_port()
  procs = []
  for i in range(processes):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={8 // processes}')
    if jax.config.jax_compilation_cache_dir:  # the tests' persistent compilation cache
      env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, *JOB, f'--workdir={workdir}', *extra], cwd=ROOT,
                                  env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def finish(procs, timeout=600):
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  return [p.returncode for p in procs], outs


def student(workdir):
  """The final student, restored onto this (1-device) process whatever topology saved it."""
  config = tiny_config()
  like = factory.init_params(factory.build_model(config.model), (8, 8, 1), 0)
  tree = checkpoints.load_params(os.path.join(workdir, 'phase_1_ema'), like)
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope='module')
def one_process_run(tmp_path_factory):
  """One uninterrupted 1-process job (8 simulated devices), run once for both tests: the
  float-tolerance reference of the 2-process runs, and the student the FID/KID test scores."""
  workdir = str(tmp_path_factory.mktemp('one_process'))
  codes, outs = finish(start(workdir, processes=1))
  assert codes == [0], outs[0][-3000:]
  return workdir


def test_two_processes_preempt_together_and_resume_exactly(tmp_path, one_process_run):
  codes, outs = finish(start(str(tmp_path / 'reference')))
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert 'over 8 cpu device(s), 2 process(es)' in outs[0]

  workdir = str(tmp_path / 'preempted')
  procs = start(workdir)
  lines = []
  for line in procs[1].stdout:  # SIGTERM to process 1 only, in the middle of phase 0
    lines.append(line)
    if line.startswith('[tract phase 0') and 'step 3/' in line:
      procs[1].send_signal(signal.SIGTERM)
      break
  out1 = ''.join(lines) + procs[1].communicate(timeout=600)[0]
  out0 = procs[0].communicate(timeout=600)[0]
  assert (procs[0].returncode, procs[1].returncode) == (75, 75), out0[-3000:] + out1[-3000:]
  stops = [[l for l in out.splitlines() if l.startswith('Interrupted: signal')][0]
           for out in (out0, out1)]
  assert all("agreed through JAX's coordination service" in stop for stop in stops), stops
  steps = {int(s.split('at step ')[1].split(':')[0]) for s in stops}
  assert len(steps) == 1, stops  # both saved the same step
  step = steps.pop()
  codes, outs = finish(start(workdir))
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert all(f'Resumed tract at step {step}' in out for out in outs)
  resumed, reference = student(workdir), student(str(tmp_path / 'reference'))
  assert all(np.array_equal(a, b) for a, b in zip(resumed, reference))
  # No target tree: the 2-process, 8-device checkpoint loads here as host arrays all the same.
  anywhere = checkpoints.load_params(os.path.join(workdir, 'phase_1_ema'))
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(anywhere))
  assert len(jax.tree.leaves(anywhere)) == len(resumed)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(anywhere), resumed))

  single = student(one_process_run)
  scale = max(float(np.max(np.abs(a))) for a in single)
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(single, reference)) < 1e-4 * scale


def test_fid_and_kid_from_each_process_share_equal_one_process(tmp_path, one_process_run):
  """mode=evaluate with FID and KID on 2 processes: each scores its own samples, the float64
  statistics and the KID features are combined, and the scores equal a 1-process evaluation."""
  from tract_jax.evaluation import convert_inception, stats_files
  weights = str(tmp_path / 'inception.npz')
  np.savez(weights, **convert_inception.convert_state_dict(convert_inception.synthetic_state_dict(0)))
  reference = np.random.default_rng(0).standard_normal((32, 2048)).astype(np.float32)
  stats = str(tmp_path / 'stats.npz')
  stats_files.save_stats(stats, reference.mean(0), np.cov(reference, rowvar=False), 32,
                         resize='torch', features=reference)
  workdir = one_process_run  # a trained student to score (mode=evaluate only adds eval JSON)
  extra = ['--config.mode=evaluate', "--config.eval.metrics=('fid','kid')",
           '--config.eval.fid_samples=16', '--config.eval.inception_batch=8',
           '--config.eval.kid_subset_size=8', '--config.eval.kid_subsets=4',
           f'--config.eval.inception_weights={weights}', f'--config.eval.reference_stats={stats}']
  scores = {}
  for processes in (1, 2):
    codes, outs = finish(start(workdir, processes, extra))
    assert codes == [0] * processes, outs[0][-3000:]
    with open(os.path.join(workdir, 'eval_1steps.json')) as f:
      scores[processes] = json.load(f)
  for key in ('fid0k', 'kid', 'kid_std'):
    assert abs(scores[1][key] - scores[2][key]) <= 1e-4 * abs(scores[1][key]), (key, scores)
  assert scores[1]['kid'] != 0.0
