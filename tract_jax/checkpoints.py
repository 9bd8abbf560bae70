"""Orbax checkpoints: resumable train states and named parameter artefacts.

Layout of a workdir (a local folder or gs://...; see paths.py):
  checkpoints/<step>/     full train states (CheckpointManager; atomic: Orbax writes a temporary
                          folder and renames it when complete, in a bucket it writes
                          commit_success.txt last, so a crash never leaves a half checkpoint that
                          looks finished)
  ema_params/             teacher job: the final evaluation-EMA parameters
  phase_<k>_ema/          distillation: phase k's final evaluation EMA (an S_{k+1}-step student)
  teacher/                a teacher trained by the same command (a teacher-job workdir)
"""
import re
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from tract_jax import paths
from tract_jax.errors import CheckpointError, ConfigError

_PHASE_DIR = re.compile(r'^phase_(\d+)_ema$')


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


def load_params(path: str, like=None, field: str = 'teacher_checkpoint'):
  """Restores a parameter pytree saved by save_params (or by import_teacher).

  like: a pytree of arrays or ShapeDtypeStructs giving the expected structure, shapes and shardings.
  """
  path = resolve_params_path(path)
  if not paths.resolve(path).is_dir():
    raise ConfigError(f'{field}={path!r}: no such checkpoint directory (expected an Orbax params '
                      'checkpoint or a teacher workdir containing ema_params/)')
  if not is_complete(path):
    raise ConfigError(f'{field}={path!r}: an unfinished checkpoint (a save was interrupted: no '
                      'commit_success.txt); re-run the job that writes it')
  with ocp.StandardCheckpointer() as ckptr:
    if like is None:
      return ckptr.restore(paths.resolve(path))
    try:
      restored = ckptr.restore(paths.resolve(path), abstract_like(like))
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(f'{field}={path!r}: the checkpoint does not match the configured model '
                        f'({type(e).__name__}: {str(e)[:500]})') from None
  # Orbax may hand back the stored shapes when they differ from the target's: check them.
  wrong = [f'{jax.tree_util.keystr(k)}: {tuple(a.shape)} (expected {tuple(b.shape)})'
           for (k, a), b in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(like))
           if tuple(a.shape) != tuple(b.shape)]
  if wrong:
    raise ConfigError(f'{field}={path!r}: the checkpoint does not match the configured model: '
                      + '; '.join(wrong[:10]))
  return restored


class StateCheckpoints:
  """A CheckpointManager for the full train state; use as a context manager so that async saves are
  always finished before the interpreter exits."""

  def __init__(self, directory, max_to_keep: int = 2):
    self.directory = str(paths.resolve(directory))
    self.manager = ocp.CheckpointManager(
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
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore(self, state_like: Any, step: Optional[int] = None):
    step = self.manager.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_like(state_like)))

  def restore_or_keep(self, state: Any, what: str = 'run'):
    """The newest checkpoint that restores, else `state` when there is none at all.

    A truncated or otherwise unreadable newest checkpoint is skipped with a warning naming it and
    the one used instead; if checkpoints exist but none restores, this raises rather than silently
    starting from scratch.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return state
    failures = []
    for step in steps:
      try:
        restored = self.restore(state, step)
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, f'{type(e).__name__}: {str(e)[:300]}'))
        continue
      for bad, why in failures:
        print(f'WARNING: checkpoint step {bad} in {self.directory} is unreadable ({why}); '
              f'resuming from step {step} instead', flush=True)
      print(f'Resumed {what} at step {step} from {self.directory}', flush=True)
      return restored
    details = '; '.join(f'step {s}: {why}' for s, why in failures)
    raise CheckpointError(f'checkpoints exist in {self.directory} but none can be restored '
                          f'({details}). Move the folder away to start from scratch.')

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
