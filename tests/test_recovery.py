"""Recovery from damaged or unreachable storage: an unreadable checkpoint step is set aside and
saved afresh, an I/O error is retried and never taken for corruption, a params checkpoint loads
whatever topology wrote it, and the statistics file is written whole or not at all."""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import (ROOT, run_tiny_job, tiny_config, tiny_job_final_state,
                      truncate_largest_data_file)
from tract_jax import checkpoints, state as state_lib
from tract_jax.errors import CheckpointError
from tract_jax.evaluation import stats_files
from tract_jax.models import factory


def _mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))


@pytest.fixture(scope='module')
def small_state():
  """A train state of tests/conftest.py's tiny model (the model every test shares)."""
  model = factory.build_model(tiny_config().model)
  params = factory.init_params(model, (8, 8, 1), 0)
  return state_lib.create_state(params, state_lib.make_optimizer(1e-3), 0, _mesh())[0]


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _same(a, b):
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _save(directory, states):
  with checkpoints.StateCheckpoints(directory, max_to_keep=5) as ckpts:
    for step, state in states.items():
      ckpts.save(step, state, wait=True)


def test_unreadable_newest_step_is_set_aside_then_saved_afresh(tmp_path, small_state, capsys):
  directory = str(tmp_path / 'checkpoints')
  states = {s: small_state.replace(step=small_state.step + s) for s in (2, 4)}
  _save(directory, states)
  truncate_largest_data_file(os.path.join(directory, '4'))

  with checkpoints.StateCheckpoints(directory) as ckpts:
    restored = ckpts.restore_or_keep(small_state)
    assert int(restored.step) == 2 and ckpts.manager.all_steps() == [2]
    ckpts.save(4, states[4], wait=True)  # the re-run reaches step 4 again: saved, not skipped
  out = capsys.readouterr().out
  warning = [line for line in out.splitlines() if line.startswith('WARNING: checkpoint step 4')]
  assert len(warning) == 1 and 'OUT_OF_RANGE' in warning[0], out
  assert f'moved to {directory}/corrupt/4; resuming from step 2 instead' in warning[0]
  assert os.path.isdir(os.path.join(directory, 'corrupt', '4', 'default'))

  # corrupt/ is never taken for a step; the next restart meets no unreadable step.
  with ocp.CheckpointManager(directory) as manager:
    assert manager.all_steps() == [2, 4]
  with checkpoints.StateCheckpoints(directory) as ckpts:
    again = ckpts.restore_or_keep(small_state)
  out = capsys.readouterr().out
  assert 'WARNING' not in out and 'Resumed run at step 4' in out
  assert _same(_leaves(again), _leaves(states[4]))

  # The same step unreadable a second time: set aside next to the first copy.
  truncate_largest_data_file(os.path.join(directory, '4'))
  with checkpoints.StateCheckpoints(directory) as ckpts:
    assert int(ckpts.restore_or_keep(small_state).step) == 2
  assert sorted(os.listdir(os.path.join(directory, 'corrupt'))) == ['4', '4.1']


def test_every_step_unreadable_moves_nothing(tmp_path, small_state):
  directory = str(tmp_path / 'checkpoints')
  _save(directory, {s: small_state for s in (2, 4)})
  for step in ('2', '4'):
    truncate_largest_data_file(os.path.join(directory, step))
  with checkpoints.StateCheckpoints(directory) as ckpts:
    with pytest.raises(CheckpointError, match='none can be restored'):
      ckpts.restore_or_keep(small_state)
  assert sorted(os.listdir(directory)) == ['2', '4']  # left for the user to look at


def _tensorstore_failure(status):
  """What Orbax raises when tensorstore fails to read an array: a bare Exception from tensorstore's
  ValueError, whose message starts with the status code."""
  try:
    raise ValueError(f'{status}: Error reading "params.conv_in.kernel/0.0" in OCDBT database')
  except ValueError as e:
    try:
      raise Exception(  # pylint: disable=broad-exception-raised
          'Encountered error while reading array index: (slice(0, 3, 1),).') from e
    except Exception as wrapped:  # pylint: disable=broad-except
      return wrapped


@pytest.mark.parametrize('error,corrupt', [
    (_tensorstore_failure('OUT_OF_RANGE'), True),       # a short file
    (_tensorstore_failure('DATA_LOSS'), True),          # bytes that do not decode
    (_tensorstore_failure('NOT_FOUND'), True),          # a missing file
    (json.JSONDecodeError('Unterminated string', '{"a', 1), True),
    (FileNotFoundError(errno.ENOENT, 'no such file'), True),
    (ValueError('Requested shape: (3, 16) is not compatible with the stored shape: (16,).'), True),
    (_tensorstore_failure('UNAVAILABLE'), False),       # the storage service is down
    (_tensorstore_failure('DEADLINE_EXCEEDED'), False),
    (_tensorstore_failure('PERMISSION_DENIED'), False),
    (OSError(errno.EIO, 'Input/output error'), False),
    (ConnectionResetError(errno.ECONNRESET, 'reset by peer'), False),
    (TimeoutError('read timed out'), False),
])
def test_only_unreadable_data_counts_as_corrupt(error, corrupt):
  assert checkpoints.is_corrupt(error) is corrupt
  assert '\n' not in checkpoints.describe_error(error)


def _flaky(restore, failures, error):
  """`restore`, failing with `error` the first `failures` times."""
  calls = []

  def call(*args, **kwargs):
    calls.append(args)
    if len(calls) <= failures:
      raise error
    return restore(*args, **kwargs)

  return call, calls


def test_io_errors_during_a_restore_are_retried_not_set_aside(tmp_path, small_state, monkeypatch,
                                                              capsys):
  monkeypatch.setattr(checkpoints, 'RETRY_DELAYS_S', (0.0, 0.0, 0.0))
  directory = str(tmp_path / 'checkpoints')
  _save(directory, {s: small_state.replace(step=small_state.step + s) for s in (2, 4)})

  # Two failures, then the read works: the newest step is restored, nothing moved.
  with checkpoints.StateCheckpoints(directory) as ckpts:
    flaky, calls = _flaky(ckpts.restore, 2, OSError(errno.EIO, 'Input/output error'))
    monkeypatch.setattr(ckpts, 'restore', flaky)
    assert int(ckpts.restore_or_keep(small_state).step) == 4
  out = capsys.readouterr().out
  assert len(calls) == 3 and out.count('retrying in 0s') == 2, out
  assert 'OSError: [Errno 5] Input/output error' in out

  # The storage stays unreachable: a one-line CheckpointError, and every step stays in place.
  with checkpoints.StateCheckpoints(directory) as ckpts:
    flaky, calls = _flaky(ckpts.restore, 99, _tensorstore_failure('UNAVAILABLE'))
    monkeypatch.setattr(ckpts, 'restore', flaky)
    with pytest.raises(CheckpointError, match='after 4 attempts; nothing was moved') as info:
      ckpts.restore_or_keep(small_state)
  assert len(calls) == 4 and '\n' not in str(info.value) and 'UNAVAILABLE' in str(info.value)
  assert sorted(os.listdir(directory)) == ['2', '4']


def _claim_eight_devices(path):
  """Rewrites a checkpoint's recorded shardings as an 8-device, 2 x 4 mesh wrote them (devices this
  process does not have), as a pod's checkpoint records them."""
  sharding_file = os.path.join(path, '_sharding')
  with open(sharding_file) as f:
    shardings = json.load(f)
  for key, text in shardings.items():
    record = json.loads(text)
    record['shape'] = [2, 4]
    record['device_mesh'] = {'mesh': [[{'id': 4 * r + c} for c in range(4)] for r in range(2)]}
    shardings[key] = json.dumps(record)
  with open(sharding_file, 'w') as f:
    json.dump(shardings, f)


def test_load_params_without_a_target_loads_another_topology(tmp_path, small_state):
  path = str(tmp_path / 'phase_0_ema')
  checkpoints.save_params(path, small_state.ema_params)
  _claim_eight_devices(path)
  with ocp.StandardCheckpointer() as ckptr:  # what load_params(path) did before
    with pytest.raises(ValueError, match='Topology mismatch'):
      ckptr.restore(path)
  expected = _leaves(small_state.ema_params)

  host = checkpoints.load_params(path)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
  assert _same(_leaves(host), expected)
  placed = checkpoints.load_params(path, mesh=_mesh())
  assert all(isinstance(x, jax.Array) and x.sharding.mesh.shape == {'data': 1, 'fsdp': 1}
             for x in jax.tree.leaves(placed))
  assert _same(_leaves(placed), expected)
  # The targeted restore (the training path) reads the same values.
  assert _same(_leaves(checkpoints.load_params(path, small_state.ema_params)), expected)


def test_statistics_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
  path = str(tmp_path / 'stats.npz')
  stats_files.save_stats(path, np.zeros(4), np.eye(4), 10, resize='torch')

  def die(*args):  # the process dies after writing the new bytes, before they replace the file
    raise KeyboardInterrupt

  monkeypatch.setattr(os, 'replace', die)
  with pytest.raises(KeyboardInterrupt):
    stats_files.save_stats(path, np.ones(4), 2 * np.eye(4), 20, resize='torch')
  monkeypatch.undo()
  kept = stats_files.read_stats(path)
  assert kept.n == 10 and np.array_equal(kept.mu, np.zeros(4))


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_replaced_through_the_command_line(tmp_path, tiny_job_run):
  """The session's finished tiny job (a copy); its newest checkpoint truncated; the same command
  re-trains that step (a warning names it) and the next run meets no corrupt checkpoint; every final
  array is bit-identical to the uninterrupted run's."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_job_run.workdir, workdir)
  uninterrupted = tiny_job_run.final_state()
  newest = os.path.join(workdir, 'checkpoints', '12')
  truncate_largest_data_file(newest)

  code, out = run_tiny_job(workdir)
  assert code == 0, out[-3000:]
  warnings = [line for line in out.splitlines() if line.startswith('WARNING: checkpoint')]
  assert len(warnings) == 1, out[-3000:]
  assert warnings[0].startswith(
      f'WARNING: checkpoint step 12 in {workdir}/checkpoints is unreadable')
  assert f'moved to {workdir}/checkpoints/corrupt/12; resuming from step 10' in warnings[0]
  assert 'Resumed tract at step 10' in out and '[tract phase 1: 4->1 steps] step 12/12' in out

  code, out = run_tiny_job(workdir)
  assert code == 0, out[-3000:]
  assert 'WARNING' not in out and 'Resumed tract at step 12' in out, out[-3000:]
  assert _same(tiny_job_final_state(workdir), uninterrupted)


@pytest.mark.slow
def test_two_processes_agree_on_what_to_set_aside(tmp_path):
  """tests/restore_worker.py on 2 processes: a step unreadable on one process only is set aside for
  both, a read error on one process only is retried by both, a truncated step is set aside."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = str(s.getsockname()[1])
  directory = str(tmp_path / 'checkpoints')
  procs = [subprocess.Popen([sys.executable, 'tests/restore_worker.py', str(i), port, directory],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  results = [json.loads(line[len('RESULT '):]) for out in outs for line in out.splitlines()
             if line.startswith('RESULT ')]
  assert results[0] == results[1] == {
      'one_process_corrupt': 4.0, 'steps_after': [2, 4], 'one_process_io_error': 4.0,
      'truncated': 2.0, 'steps_at_end': [2], 'set_aside': ['4', '6']}, results
  assert 'unreadable on another process' in outs[0]  # process 0 moved step 6 for process 1
  assert 'retrying in 0s' in outs[0]


@pytest.mark.slow
def test_unreadable_step_in_a_bucket_is_set_aside(tmp_path, small_state, capsys):
  """The same on gs:// (the GCS emulator): a bucket has no rename, so the step is copied to
  corrupt/ and deleted, and Orbax no longer lists it."""
  from etils import epath
  from gcs_emulator import Emulator, available
  if available():
    pytest.skip(f'GCS emulator {available()}')
  with Emulator() as emulator, pytest.MonkeyPatch.context() as env:
    for key, value in emulator.env.items():
      env.setenv(key, value)
    directory = f'gs://{emulator.bucket}/run/checkpoints'
    _save(directory, {s: small_state.replace(step=small_state.step + s) for s in (2, 4)})
    step4 = epath.Path(directory) / '4'
    data = max((p for p in (step4 / 'default' / 'ocdbt.process_0' / 'd').iterdir()),
               key=lambda p: len(p.read_bytes()))
    data.write_bytes(data.read_bytes()[:len(data.read_bytes()) // 3])
    with checkpoints.StateCheckpoints(directory) as ckpts:
      assert int(ckpts.restore_or_keep(small_state).step) == 2
    assert f'moved to {directory}/corrupt/4; resuming from step 2' in capsys.readouterr().out
    assert not step4.exists()
    assert (epath.Path(directory) / 'corrupt' / '4' / 'commit_success.txt').exists()
    with ocp.CheckpointManager(epath.Path(directory)) as manager:
      assert manager.all_steps() == [2]
