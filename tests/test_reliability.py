"""Runs that survive: kills and signals through the command line (slow tier), corrupt checkpoints,
non-finite losses, reused workdirs."""
import glob
import os
import random
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import (run_tiny_job, sigterm_mid_phase, start_tiny_job, tiny_config,
                      tiny_job_final_state, truncate_largest_data_file)
from tract_jax import checkpoints, state as state_lib, steps, train
from tract_jax.errors import ConfigError, NonFiniteError, Preempted
from tract_jax.models import factory

start_job = start_tiny_job
run_job = run_tiny_job
final_state = tiny_job_final_state


def latest_step(workdir):
  steps = [int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, 'checkpoints', '*'))
           if os.path.basename(p).isdigit()]
  return max(steps) if steps else None


@pytest.fixture
def reference(tiny_job_reference):
  return tiny_job_reference  # one uninterrupted run per session (conftest), shared with test_gcs


def _same(a, b):
  return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def _event_line(event):
  """Log line of the event-th update of the job: 6 teacher steps, then 12 distillation steps."""
  if event <= 6:
    return lambda line: line.startswith(f'[teacher] step {event}/')
  return lambda line: line.startswith('[tract phase') and f' step {event - 6}/' in line


@pytest.mark.slow
def test_sigkill_at_three_random_moments_then_resume_exactly(reference, tmp_path):
  """SIGKILL right after a random update (plus a random delay, so some kills land inside an async
  checkpoint save) three times; the resumed run ends bit-identical to an uninterrupted one."""
  seed = int(os.environ.get('TRACT_KILL_SEED', time.time_ns() % 10**6))
  rng = random.Random(seed)
  workdir = str(tmp_path)
  events = sorted(rng.sample(range(1, 18), 3))
  kills = []
  for event in events:
    proc = start_job(workdir)
    seen = _event_line(event)
    for line in proc.stdout:
      if seen(line):
        time.sleep(rng.uniform(0.0, 0.4))
        break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills.append({'after_update': event,
                  'teacher_ckpt': latest_step(os.path.join(workdir, 'teacher')),
                  'distill_ckpt': latest_step(workdir)})
  code, out = run_job(workdir)
  assert code == 0, out[-3000:]
  print(f'kill seed {seed}: {kills}')
  assert _same(final_state(workdir), reference), f'kill seed {seed}, kills {kills}'


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(reference, tmp_path):
  workdir = str(tmp_path)
  proc = start_job(workdir)
  returncode, out = sigterm_mid_phase(proc)
  assert returncode == 75, out[-3000:]
  message = [l for l in out.splitlines() if l.startswith('Interrupted: signal 15 at step')]
  assert message and 're-run the same command to resume' in message[0], out[-2000:]
  stopped_at = int(message[0].split('at step ')[1].split(':')[0])
  assert latest_step(workdir) == stopped_at  # saved exactly where it stopped
  code, out = run_job(workdir)
  assert code == 0 and f'Resumed tract at step {stopped_at}' in out, out[-3000:]
  assert _same(final_state(workdir), reference)


def _small_state():
  config = tiny_config()
  model = factory.build_model(config.model)
  params = factory.init_params(model, (8, 8, 1), 0)
  tx = state_lib.make_optimizer(1e-3)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  return state_lib.create_state(params, tx, 0, mesh)[0]


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, capsys):
  state = _small_state()
  directory = str(tmp_path / 'checkpoints')
  with checkpoints.StateCheckpoints(directory, max_to_keep=3) as ckpts:
    for step in (2, 4):
      ckpts.save(step, state.replace(step=state.step + step), wait=True)
  # A half-written save (interrupted before Orbax's rename) is not a checkpoint at all.
  os.makedirs(os.path.join(directory, '6.orbax-checkpoint-tmp-1234', 'default'))
  truncate_largest_data_file(os.path.join(directory, '4'))
  with checkpoints.StateCheckpoints(directory) as ckpts:
    restored = ckpts.restore_or_keep(state)
  out = capsys.readouterr().out
  assert int(restored.step) == 2
  assert 'checkpoint step 4' in out and 'resuming from step 2 instead' in out
  # Every checkpoint unreadable: an error, never a silent fresh start.
  truncate_largest_data_file(os.path.join(directory, '2'))
  with checkpoints.StateCheckpoints(directory) as ckpts:
    with pytest.raises(checkpoints.CheckpointError, match='none can be restored'):
      ckpts.restore_or_keep(state)


def nan_batch_at(monkeypatch, bad_step):
  """Train steps built from now on see a NaN image batch at update `bad_step`."""
  original = steps.make_train_step

  def make(*args, **kwargs):
    step_fn = original(*args, **kwargs)

    def wrapped(state, batch):
      if int(state.step) == bad_step:
        batch = dict(batch, image=batch['image'] * np.nan)
      return step_fn(state, batch)

    return wrapped

  monkeypatch.setattr(steps, 'make_train_step', make)


@pytest.mark.slow  # two teacher runs through train_teacher: 28 s cold on 2 cores
@pytest.mark.parametrize('mode', ['stop', 'skip'])
def test_non_finite_loss_stops_or_skips_without_writing_nans(tmp_path, monkeypatch, mode):
  config = tiny_config('teacher', nonfinite=mode, checkpoint_every=2, log_every=100)
  config.teacher_training.train_steps = 6
  nan_batch_at(monkeypatch, 3)
  workdir = str(tmp_path)
  if mode == 'stop':
    with pytest.raises(NonFiniteError) as info:
      train.train_teacher(config, workdir)
    message = str(info.value)
    assert 'at step 4 (teacher)' in message and 'last good checkpoint is step 2' in message
    assert latest_step(workdir) == 2  # nothing was saved after the bad update
  else:
    ema = train.train_teacher(config, workdir)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(ema))
    with ocp.StandardCheckpointer() as ckptr:
      state = ckptr.restore(os.path.join(workdir, 'checkpoints', '6', 'default'))
    assert int(state['nonfinite_count']) == 1 and int(state['first_nonfinite']) == 3


@pytest.mark.slow  # four runs of the driver (29 s cold); protect() itself is checked in-process below
def test_incompatible_workdir_is_refused_unless_overwrite(tmp_path, capsys):
  config = tiny_config('teacher')
  config.teacher_training.train_steps = 2
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir)
  # A compatible configuration (other logging) resumes: the teacher is already trained.
  config.log_every = 1
  train.train_and_evaluate(config, workdir)
  assert 'Teacher already trained' in capsys.readouterr().out
  config.seed = 7  # another run (the same model, so nothing new to compile)
  with pytest.raises(ConfigError, match='another configuration') as info:
    train.train_and_evaluate(config, workdir)
  assert 'seed: 0 -> 7' in str(info.value) and 'overwrite=True' in str(info.value)
  config.overwrite = True
  train.train_and_evaluate(config, workdir)
  assert 'deleting the previous run' in capsys.readouterr().out


class _Recorder:
  """Stands in for the checkpoint manager and the metric writer: records what the loop saves."""
  directory = '/nowhere'

  def __init__(self):
    self.saved = []

  def save(self, step, state, wait=False):
    self.saved.append(step)

  def latest_step(self):
    return self.saved[-1] if self.saved else None

  def scalars(self, step, values):
    pass


def test_signal_in_a_phase_last_update_waits_for_the_phase_end_save():
  """SIGTERM during the last update of a phase: run() returns normally (the caller writes the
  phase's artefact and saves), and the next run() saves and raises Preempted before any update."""
  from tract_jax import loop
  config = tiny_config(log_every=100, checkpoint_every=100)
  signals = loop.SignalFlag()
  recorder = _Recorder()

  def step_fn(state, batch):
    if int(state.step) == 3:
      signals.signum = 15  # arrives while the phase's last update (4 of 4) runs
    return state.replace(step=state.step + 1), {'loss': jax.numpy.zeros(())}

  state = _small_state()
  steps_loop = loop.StepLoop(config, step_fn, jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(
      1, 1), ('data', 'fsdp')), recorder, recorder, total=8, images_per_step=8, scalar_prefix='t',
      signals=signals)
  batches = iter((s, {'image': np.zeros((8, 8, 8, 1), np.float32), 'label': np.zeros(8, np.int32)})
                 for s in range(8))
  state = steps_loop.run(state, batches, until=4, label='phase 0')
  assert int(state.step) == 4 and recorder.saved == []
  steps_loop.save(4, state, 'phase 0')  # the caller's phase-end save, after the artefact
  with pytest.raises(Preempted, match='signal 15 at step 4'):
    steps_loop.run(state, batches, until=8, label='phase 1')
  assert recorder.saved == [4, 4]  # saved again (a no-op for Orbax), nothing past the boundary


def test_cpu_loop_waits_on_the_update_two_back_before_dispatching(monkeypatch):
  """On CPU devices the host stays at most MAX_UPDATES_IN_FLIGHT (2) updates ahead: before update k
  is dispatched, update k-2's outputs were waited on (unbounded, XLA:CPU with 2 devices deadlocked
  in the gradient all-reduce once the host got 32 updates ahead; loop.py says why)."""
  from tract_jax import loop
  assert loop.MAX_UPDATES_IN_FLIGHT == 2
  events = []
  real_wait = jax.block_until_ready

  def wait(tree):
    events.append(('wait', int(tree['update'])))
    return real_wait(tree)

  monkeypatch.setattr(jax, 'block_until_ready', wait)

  def step_fn(state, batch):
    k = int(state.step)
    events.append(('dispatch', k))
    return state.replace(step=state.step + 1), {'loss': np.float32(0), 'update': np.float32(k)}

  recorder = _Recorder()
  steps_loop = loop.StepLoop(tiny_config(log_every=100, checkpoint_every=100), step_fn,
                             jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1),
                                               ('data', 'fsdp')),
                             recorder, recorder, total=6, images_per_step=8, scalar_prefix='t',
                             signals=loop.SignalFlag())
  batches = iter((s, {'image': np.zeros((8, 8, 8, 1), np.float32), 'label': np.zeros(8, np.int32)})
                 for s in range(6))
  steps_loop.run(_small_state(), batches, until=6, label='phase 0')
  dispatched = [k for kind, k in events if kind == 'dispatch']
  assert dispatched == list(range(6))
  for k in range(6):
    before = events[:events.index(('dispatch', k))]
    waited = {j for kind, j in before if kind == 'wait'}
    assert waited == set(range(k - 1)), (k, events)  # 0..k-2 finished, k-1 may still run


def test_workdir_of_an_older_version_without_new_fields_is_not_refused(tmp_path):
  """A config.json written before a field existed (here data.image_size) resumes; a real change of
  a recorded field is still refused."""
  import json
  from tract_jax import workdir as workdirs
  config = tiny_config('teacher')
  saved = json.loads(config.to_json_best_effort())
  del saved['data']['image_size']
  del saved['optimizer']['warmup_samples']   # nested in a whole-dict field: compared leaf by leaf
  del saved['model']['edm']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  workdirs.protect(config, str(tmp_path))  # no error
  config.data.image_size = 16
  config.optimizer.warmup_samples = 1000
  workdirs.protect(config, str(tmp_path))  # still absent from the record: not compared
  config.optimizer.learning_rate = 0.5
  with pytest.raises(ConfigError, match=r'optimizer.learning_rate: [0-9.e-]+ -> 0.5'):
    workdirs.protect(config, str(tmp_path))
  config.optimizer.learning_rate = saved['optimizer']['learning_rate']
  config.seed = 7
  with pytest.raises(ConfigError, match='seed: 0 -> 7'):
    workdirs.protect(config, str(tmp_path))


def test_saves_leave_the_preemption_sync_counter_to_the_step_loop(tmp_path, monkeypatch):
  """JAX's preemption sync manager keeps one counter: the last number it was asked about. Orbax's
  CheckpointManager.save asks it with the step number, the step loop with its own call count; mixed,
  a SIGTERM handled during a save agreed on a number the loop never reached again and a 2-process
  job ran on to its end. Saves and restores must not ask it at all."""
  from jax.experimental import multihost_utils
  asked = []
  monkeypatch.setattr(multihost_utils, 'reached_preemption_sync_point',
                      lambda step: asked.append(step) or False)
  tree = {'w': np.arange(6, dtype=np.float32), 'step': np.asarray(3, np.int32)}
  with checkpoints.StateCheckpoints(str(tmp_path)) as ckpts:
    ckpts.save(3, tree, wait=True)
    ckpts.save(4, tree, wait=True)
    restored = ckpts.restore(tree)
  assert np.array_equal(restored['w'], tree['w'])
  assert asked == []
