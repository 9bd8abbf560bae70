"""Slow tier: a real multi-host run, 2 processes x 1 CPU device joined by jax.distributed (gloo
collectives on 127.0.0.1), through `python -m tract_jax.main`. SIGTERM reaches ONE process
mid-phase: both agree on the step (JAX's coordination service), save it and exit 75; the re-run
resumes on both and ends bit for bit where the session's 1-process run on 2 CPU devices ends
(conftest `tiny_job_run`: the same mesh, data=2; on a machine whose session runs on another device
count, within float tolerance). The re-run also scores FID and KID at its phase ends, each process
scoring its own samples: equal to the same scores computed in this one process."""
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, tiny_job_config, tiny_job_final_state
from tract_jax import checkpoints, parallel, train
from tract_jax.models import factory

pytestmark = pytest.mark.slow

JOB = ['-m', 'tract_jax.main', '--config=tests/tiny_job.py']


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(workdir, extra=()):
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, PYTHONUNBUFFERED='1', JAX_NUM_CPU_DEVICES='1',
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, *JOB, f'--workdir={workdir}', *extra], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  return procs


def finish(procs, timeout=600):
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  return [p.returncode for p in procs], outs


def inception_files(directory):
  """Locally made FID Inception weights and reference statistics (with KID features)."""
  from tract_jax.evaluation import convert_inception, stats_files
  weights = os.path.join(directory, 'inception.npz')
  np.savez(weights, **convert_inception.convert_state_dict(convert_inception.synthetic_state_dict(0)))
  reference = np.random.default_rng(0).standard_normal((32, 2048)).astype(np.float32)
  stats = os.path.join(directory, 'stats.npz')
  stats_files.save_stats(stats, reference.mean(0), np.cov(reference, rowvar=False), 32,
                         resize='torch', features=reference)
  return weights, stats


def test_two_processes_preempt_together_resume_exactly_and_score_fid(tmp_path, tiny_job_run):
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

  # The re-run (evaluation settings may change between restarts) also scores FID and KID.
  weights, stats = inception_files(str(tmp_path))
  scoring = ["--config.eval.metrics=('agreement','fid','kid')", '--config.eval.fid_samples=16',
             '--config.eval.inception_batch=8', '--config.eval.kid_subset_size=8',
             '--config.eval.kid_subsets=4', f'--config.eval.inception_weights={weights}',
             f'--config.eval.reference_stats={stats}']
  codes, outs = finish(start(workdir, scoring))
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert all(f'Resumed tract at step {step}' in out for out in outs)
  assert all('mesh data=2 x fsdp=1 over 2 cpu device(s), 2 process(es)' in out for out in outs)
  resumed, reference = tiny_job_final_state(workdir), tiny_job_run.final_state()
  if 'over 2 cpu device(s), 1 process(es)' in tiny_job_run.output:  # the same mesh in one process
    assert all(np.array_equal(a, b) for a, b in zip(resumed, reference))
  else:
    floats = [(a, b) for a, b in zip(resumed, reference) if a.size and a.dtype.kind == 'f']
    scale = max(float(np.max(np.abs(b))) for _, b in floats)
    assert max(float(np.max(np.abs(a - b))) for a, b in floats) < 1e-4 * scale
  # No target tree: the 2-process student loads here as host arrays, equal to the
  # restore into this process's model and shardings.
  student_path = os.path.join(workdir, 'phase_1_ema')
  anywhere = checkpoints.load_params(student_path)
  config = tiny_job_config()
  like = factory.abstract_params(factory.build_model(config.model), (8, 8, 1),
                                 parallel.mesh_from_config(config))
  targeted = checkpoints.load_params(student_path, like)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(anywhere))
  assert jax.tree.structure(anywhere) == jax.tree.structure(targeted)
  assert all(np.array_equal(a, np.asarray(b))
             for a, b in zip(jax.tree.leaves(anywhere), jax.tree.leaves(targeted)))

  # FID and KID of the final student, each process scoring its own samples (float64 statistics
  # combined), equal this single process's scores of the same student.
  records = [json.loads(l) for l in open(os.path.join(workdir, 'summary.jsonl'))]
  final = [r for r in records if r.get('eval/phase_end') and r['eval/phase'] == 1][-1]
  config = tiny_job_config()
  config.mode = 'evaluate'
  config.eval.update(metrics=('fid', 'kid'), fid_samples=16, inception_batch=8, kid_subset_size=8,
                     kid_subsets=4, inception_weights=weights, reference_stats=stats)
  here = train.train_and_evaluate(config, workdir)
  for key in ('fid0k', 'kid', 'kid_std'):
    assert abs(here[key] - final[f'eval/{key}']) <= 1e-4 * abs(here[key]), (key, here, final)
  assert here['kid'] != 0.0
