"""Orbax checkpoints: resumable train states and named parameter artefacts.

Layout of a workdir (a local folder or gs://...; see paths.py):
  checkpoints/<step>/     full train states (CheckpointManager; atomic: Orbax writes a temporary
                          folder and renames it when complete, in a bucket it writes
                          commit_success.txt last, so a crash never leaves a half checkpoint that
                          looks finished)
  ema_params/             teacher job: the final evaluation-EMA parameters
  phase_<k>_ema/          distillation: phase k's final evaluation EMA (an S_{k+1}-step student)
  teacher/                a teacher trained by the same command (a teacher-job workdir)
  checkpoints/corrupt/<step>/  a train state that could not be read, set aside (never a step to
                          Orbax: it only takes the names of checkpoints/ itself that are numbers)

A restore that fails is one of two things. The data is unreadable (a missing or short file, bytes
that do not decode, a shape that does not match): the step is corrupt, and re-reading it cannot
help. Anything else (an I/O or network error, a timeout, a permission): the data may be fine, so the
read is retried with backoff and, if it keeps failing, the job stops with nothing moved or deleted.
"""
import json
import re
import time
import zlib
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from tract_jax import parallel, paths
from tract_jax.errors import CheckpointError, ConfigError

_PHASE_DIR = re.compile(r'^phase_(\d+)_ema$')
CORRUPT_DIR = 'corrupt'
# Seconds between the attempts of a read that failed for another reason than corrupt data.
RETRY_DELAYS_S = (2.0, 8.0, 30.0)

# Tensorstore (Orbax's array storage) raises ValueError for every failure, its message starting with
# the absl status code; Orbax wraps a failed array read in a bare Exception raised from it.
_STATUS = re.compile(r'\b([A-Z_]+): ')
# What the file, local or in a bucket, holds is wrong: missing, short, undecodable.
CORRUPT_STATUSES = frozenset({'NOT_FOUND', 'OUT_OF_RANGE', 'DATA_LOSS', 'FAILED_PRECONDITION',
                              'INVALID_ARGUMENT'})
# Reading it failed: the network, the storage service, a deadline, a quota, the credentials.
OTHER_STATUSES = frozenset({'CANCELLED', 'UNKNOWN', 'DEADLINE_EXCEEDED', 'PERMISSION_DENIED',
                            'RESOURCE_EXHAUSTED', 'ABORTED', 'UNIMPLEMENTED', 'INTERNAL',
                            'UNAVAILABLE', 'UNAUTHENTICATED', 'ALREADY_EXISTS'})
# Exceptions that show the bytes themselves are bad (missing files included). ValueError covers
# JSON and msgpack decoding and Orbax's shape and structure checks (KeyError, TypeError: a tree
# that is not the expected one); tensorstore's ValueErrors are sorted by their status code first.
_CORRUPT_TYPES = (FileNotFoundError, NotADirectoryError, IsADirectoryError, EOFError, zlib.error,
                  ValueError, KeyError, IndexError, TypeError)


def _exception_chain(error: BaseException):
  """`error` and what caused it, as Python's traceback shows them (an explicit cause, else the
  exception being handled unless suppressed), and the members of exception groups, each once."""
  seen, todo = set(), [error]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo += [e.__cause__ if e.__cause__ is not None or e.__suppress_context__ else e.__context__,
             *getattr(e, 'exceptions', ())]


def _status(error: BaseException) -> Optional[str]:
  m = _STATUS.match(str(error)) if isinstance(error, ValueError) else None
  return m.group(1) if m and m.group(1) in CORRUPT_STATUSES | OTHER_STATUSES else None


def is_corrupt(error: BaseException) -> bool:
  """True when a failed restore shows the checkpoint's data is unreadable (see the module note);
  False for I/O, network and other errors that a later attempt may not meet. Any sign of the
  latter in the chain of causes wins: a network error is never taken for corruption."""
  chain = list(_exception_chain(error))
  for e in chain:
    if _status(e) in OTHER_STATUSES or isinstance(e, (ConnectionError, TimeoutError)):
      return False
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, NotADirectoryError,
                                                     IsADirectoryError)):
      return False
  return any(_status(e) in CORRUPT_STATUSES
             or (_status(e) is None and isinstance(e, _CORRUPT_TYPES))
             or isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)) for e in chain)


def describe_error(error: BaseException, limit: int = 300) -> str:
  """One line: the error, or the tensorstore error under Orbax's wrapper of a failed array read
  (whose own message is a page of specification)."""
  best = next((e for e in _exception_chain(error) if _status(e)), None)
  if best is None:  # Orbax's wrapper is a bare Exception, never a subclass
    wrapper = type(error) is Exception  # pylint: disable=unidiomatic-typecheck
    best = error.__cause__ if wrapper and error.__cause__ is not None else error
  text = ' '.join(str(best).split())
  return f'{type(best).__name__}: {text[:limit]}'


def _retrying(read: Callable[[], Any], what: str, agree: bool = False):
  """read(), again after RETRY_DELAYS_S when it fails for another reason than corrupt data.

  Returns (value, None), or (None, why) when the data is corrupt. Raises CheckpointError when the
  other failures outlast the retries. agree: every process calls this at the same point and takes
  the worst outcome of all (a step one process cannot read is corrupt for all of them).
  """
  attempts = len(RETRY_DELAYS_S) + 1
  for attempt in range(attempts):
    value, outcome, why = None, 0, ''
    try:
      value = read()
    except Exception as e:  # pylint: disable=broad-except  (sorted just below)
      outcome, why = (1 if is_corrupt(e) else 2), describe_error(e)
      if jax.process_index():  # process 0 reports what every process agrees; the details are here
        print(f'WARNING: process {jax.process_index()}: reading {what} failed ({why})', flush=True)
    if agree:
      agreed = parallel.max_over_processes(outcome)
      if agreed != outcome:
        why = why or ('unreadable' if agreed == 1 else 'failed') + ' on another process'
      outcome = agreed
    if outcome == 0:
      return value, None
    if outcome == 1:
      return None, why
    if attempt + 1 == attempts:
      raise CheckpointError(f'cannot read {what} ({why}) after {attempts} attempts; nothing was '
                            'moved or deleted: re-run the same command once the storage is '
                            'reachable')
    delay = RETRY_DELAYS_S[attempt]
    if jax.process_index() == 0:
      print(f'WARNING: reading {what} failed ({why}); retrying in {delay:g}s (attempt '
            f'{attempt + 2} of {attempts})', flush=True)
    time.sleep(delay)


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a pytree, the restore target Orbax wants."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save_params(path, params) -> None:
  """Writes a parameter pytree as a standalone Orbax checkpoint (overwriting an older one); `path`
  local or gs://."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(paths.resolve(path), params, force=True)
    ckptr.wait_until_finished()


def is_complete(path) -> bool:
  """A finished Orbax checkpoint directory: locally one renamed from its temporary name, in a
  bucket one holding commit_success.txt (a crash during a save leaves neither)."""
  path = paths.resolve(path)
  return path.is_dir() and bool(ocp.path.step.is_path_finalized(path))


def resolve_params_path(path) -> str:
  """Accepts a params checkpoint or a teacher-job workdir (then its ema_params/)."""
  path = paths.resolve(path)
  if (path / 'ema_params').is_dir():
    return str(path / 'ema_params')
  return str(path)


def phase_dirs(workdir) -> Dict[int, str]:
  """{k: workdir/phase_<k>_ema} for every finished phase of a distillation workdir."""
  workdir = paths.resolve(workdir)
  if not workdir.is_dir():
    return {}
  out = {}
  for entry in workdir.iterdir():
    m = _PHASE_DIR.match(entry.name)
    if m and is_complete(entry):
      out[int(m.group(1))] = str(entry)
  return out


def newest_params(path) -> Tuple[str, str, Optional[int]]:
  """(params checkpoint, kind, phase) for a workdir or a params checkpoint.

  kind is 'student' (phase k's evaluation EMA: the newest phase of a distillation workdir, or a
  phase_<k>_ema directory), 'teacher' (a teacher job's ema_params, also the teacher/ a distillation
  job trained) or 'checkpoint' (any other params directory; phase None unless a student).
  """
  path = paths.resolve(path)
  phases_done = phase_dirs(path)
  if phases_done:
    k = max(phases_done)
    return phases_done[k], 'student', k
  for teacher in (path / 'ema_params', path / 'teacher' / 'ema_params'):
    if teacher.is_dir():
      return str(teacher), 'teacher', None
  m = _PHASE_DIR.match(path.name)
  if m:
    return str(path), 'student', int(m.group(1))
  return str(path), 'teacher' if path.name == 'ema_params' else 'checkpoint', None


def read_host_arrays(path: str):
  """The checkpoint's whole tree as host numpy arrays, whatever topology wrote it: the restore
  target comes from the checkpoint's metadata, every array restored as an np.ndarray, so the
  shardings and devices it records (which may not exist here) are never used."""
  path = paths.resolve(path)
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def load_params(path: str, like=None, field: str = 'teacher_checkpoint', mesh=None):
  """Restores a parameter pytree saved by save_params (or by import_teacher).

  like: a pytree of arrays or ShapeDtypeStructs giving the expected structure, shapes and shardings.
  Without it, any params checkpoint loads whatever processes, devices or shardings wrote it: as
  host numpy arrays, or, given `mesh`, as jax.Arrays placed by parallel.tree_shardings (replicated
  when mesh.fsdp is 1).
  """
  path = resolve_params_path(path)
  if not paths.resolve(path).is_dir():
    raise ConfigError(f'{field}={path!r}: no such checkpoint directory (expected an Orbax params '
                      'checkpoint or a teacher workdir containing ema_params/)')
  if not is_complete(path):
    raise ConfigError(f'{field}={path!r}: an unfinished checkpoint (a save was interrupted: no '
                      'commit_success.txt); re-run the job that writes it')
  what = f'the parameters in {path}'
  host_target = like is not None and not any(
      getattr(x, 'sharding', None) is not None for x in jax.tree.leaves(like))
  if like is None or host_target:
    # Host arrays from the checkpoint's own metadata: the devices it records are never used, so
    # a target without shardings (export, a laptop) reads what any topology wrote.
    restored, why = _retrying(lambda: read_host_arrays(path), what)
    if why is not None:
      raise ConfigError(f'{field}={path!r}: the checkpoint is unreadable ({why})')
    if host_target:
      return _checked(restored, like, path, field)
    if mesh is None:
      return restored
    like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), restored,
                        parallel.tree_shardings(restored, mesh))

  def read():
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(paths.resolve(path), abstract_like(like))

  restored, why = _retrying(read, what)
  if why is not None:  # a missing leaf or another shape: the wrong model, or a damaged checkpoint
    raise ConfigError(f'{field}={path!r}: the checkpoint does not match the configured model '
                      f'or is unreadable ({why[:500]})')
  # Orbax may hand back the stored shapes when they differ from the target's: check them.
  return _checked(restored, like, path, field)


def _checked(restored, like, path: str, field: str):
  """`restored` when its tree and every shape are `like`'s, else one ConfigError line."""
  if jax.tree.structure(restored) != jax.tree.structure(like):
    have = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(restored)[0]}
    want = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(like)[0]}
    raise ConfigError(f'{field}={path!r}: the checkpoint does not match the configured model '
                      f'(missing {sorted(want - have)[:5]}, unexpected {sorted(have - want)[:5]})')
  wrong = [f'{jax.tree_util.keystr(k)}: {tuple(a.shape)} (expected {tuple(b.shape)})'
           for (k, a), b in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(like))
           if tuple(a.shape) != tuple(b.shape)]
  if wrong:
    raise ConfigError(f'{field}={path!r}: the checkpoint does not match the configured model: '
                      + '; '.join(wrong[:10]))
  return restored


def _host_copy_is_cheaper() -> bool:
  """True for one process on CPU devices, where the state is already in host memory."""
  return jax.process_count() == 1 and jax.default_backend() == 'cpu'


class _Manager(ocp.CheckpointManager):
  """Orbax's CheckpointManager without its own preemption check.

  CheckpointManager.save asks multihost_utils.reached_preemption_sync_point(step) with the step
  number, while the step loop (loop.py) asks the same JAX sync manager with its own call count. The
  manager keeps one counter, the last number it was given, and agrees on a sync point from it: a
  SIGTERM handled while a save ran made the processes agree on a save's step + 1, a number the loop's
  count never takes again, and the job ran on as if no signal had come (measured: a 2-process tiny
  job, SIGTERM during the step-4 save, ran to its end and exited 0). The loop decides when to save
  on a signal and saves with force=True, so Orbax's check is not needed."""

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


class StateCheckpoints:
  """A CheckpointManager for the full train state; use as a context manager so that async saves are
  always finished before the interpreter exits."""

  def __init__(self, directory, max_to_keep: int = 2):
    self.directory = str(paths.resolve(directory))
    self.manager = _Manager(
        paths.resolve(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=True))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, wait: bool = False) -> None:
    if step in self.manager.all_steps():  # already saved (a resumed run at a boundary)
      return
    if _host_copy_is_cheaper():
      # On CPU devices of one process, Orbax slices each replicated array per replica with eager
      # device ops (thousands of dispatches for a train state): measured on the demo's TRACT state
      # (2 CPU devices) 0.5-0.9 s blocking and 2 s in all per save, against 0.08 s and 0.7 s for one
      # device_get of the whole state saved as NumPy arrays. Restores are the same (into the
      # target's shardings, on any topology).
      state = jax.device_get(state)
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore(self, state_like: Any, step: Optional[int] = None):
    """The train state of `step` (default: the newest), into the shardings of `state_like`.

    Each process reads its own shards with no cross-process barrier (CheckpointManager.restore ends
    with one): a process whose read fails must not leave the others waiting there, and
    restore_or_keep agrees on the outcome itself. The step's folder is the manager's: <step>/ with
    the train state as its 'default' item.
    """
    step = self.manager.latest_step() if step is None else step
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckptr:
      return ckptr.restore(paths.resolve(self.directory) / str(step) / 'default',
                           abstract_like(state_like))

  def restore_or_keep(self, state: Any, what: str = 'run'):
    """The newest checkpoint that restores, else `state` when there is none at all.

    Every process calls it. Steps that are unreadable (see the module note) are skipped, and once
    an older one restores they are moved to checkpoints/corrupt/, with a warning naming each and
    why: the run saves those steps afresh when it reaches them, and a later restart does not meet
    them again. If checkpoints exist but none restores, this raises and moves nothing rather than
    silently starting from scratch. Other read errors are retried, then raise (nothing moved).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return state
    failures = []
    for step in steps:
      restored, why = _retrying(lambda step=step: self.restore(state, step),
                                f'checkpoint step {step} in {self.directory}', agree=True)
      if why is not None:
        failures.append((step, why))
        continue
      self._set_aside(failures, step)
      print(f'Resumed {what} at step {step} from {self.directory}', flush=True)
      return restored
    details = '; '.join(f'step {s}: {why}' for s, why in failures)
    raise CheckpointError(f'checkpoints exist in {self.directory} but none can be restored '
                          f'({details}). Move the folder away to start from scratch.')

  def _set_aside(self, failures, good_step: int) -> None:
    """Moves the unreadable steps to corrupt/ (process 0; the others wait), then re-lists the
    steps."""
    if not failures:
      return
    if jax.process_index() == 0:
      root = paths.resolve(self.directory)
      for step, why in failures:
        target = root / CORRUPT_DIR / str(step)
        n = 1
        while target.exists():  # the same step was set aside before
          target, n = root / CORRUPT_DIR / f'{step}.{n}', n + 1
        try:
          paths.move_folder(root / str(step), target)
        except OSError as e:
          raise CheckpointError(f'checkpoint step {step} in {self.directory} is unreadable ({why})'
                                f' and could not be moved to {target}: {describe_error(e)}'
                                ) from None
        print(f'WARNING: checkpoint step {step} in {self.directory} is unreadable ({why}); moved '
              f'to {target}; resuming from step {good_step} instead', flush=True)
    parallel.barrier('tract_jax: corrupt checkpoints set aside')
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
