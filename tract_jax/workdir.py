"""What a workdir holds between runs: protection against resuming it with an incompatible
configuration, and the configuration record (with the image shape the run trained on). The
read-only modes that score or sample its newest parameters are in modes.py."""
import json

import jax

from tract_jax import checkpoints, paths
from tract_jax.errors import ConfigError

# Fields that define a run: a workdir whose checkpoints came from other values cannot be resumed.
# (Mesh, logging, checkpoint and evaluation settings may change between restarts.)
RUN_FIELDS = ('method', 'seed', 'teacher_checkpoint', 'teacher_steps', 'time_schedule',
              'train_samples', 'batch_size', 'ema_residual', 'ema_reset', 'sema', 'loss_reduction',
              'clip_x', 'optimizer', 'teacher_training', 'model', 'data.name', 'data.image_size',
              'data.random_flip', 'parametrisation', 'student_dropout')
# model fields that change how the network computes, not its parameters: free to change on resume.
COMPUTE_FIELDS = ('dtype', 'teacher_dtype', 'remat', 'conv_impl')  # conv_impl: older records
IMAGE_SHAPE_KEY = 'image_shape'  # in config.json, next to the configuration's fields
ARTEFACTS = ('checkpoints', 'teacher', 'ema_params', 'result.json', 'summary.jsonl', 'tensorboard')


_ABSENT = object()


def _get(tree, dotted):
  for key in dotted.split('.'):
    tree = tree.get(key, _ABSENT) if isinstance(tree, dict) else _ABSENT
  return tree


def _leaves(name, value):
  """[(dotted name, value)] of the non-dict leaves under `name` ([] for an absent field)."""
  if value is _ABSENT:
    return []
  if isinstance(value, dict) and value:
    return [leaf for key, sub in value.items() for leaf in _leaves(f'{name}.{key}', sub)]
  return [(name, value)]


def protect(config, workdir) -> None:
  """Refuses to resume a workdir written by an incompatible configuration, unless overwrite=True
  (which deletes that run's checkpoints and artefacts first). `workdir`: local or gs://."""
  workdir = paths.resolve(workdir)
  saved_path = workdir / 'config.json'
  if not saved_path.exists():
    return
  saved = json.loads(saved_path.read_text())
  current = json.loads(config.to_json_best_effort())
  for record in (saved, current):
    for key in COMPUTE_FIELDS:
      record.get('model', {}).pop(key, None)
  # A field an older version did not record (e.g. data.image_size, optimizer.warmup_samples) is
  # not a difference: nested fields are compared leaf by leaf, over the leaves the record has.
  changed = []
  for k in RUN_FIELDS:
    for name, old in _leaves(k, _get(saved, k)):
      new = _get(current, name)
      if new != old:
        changed.append(f'{name}: {json.dumps(old)} -> '
                       f'{"(absent)" if new is _ABSENT else json.dumps(new)}')
  if not changed:
    return
  if not config.overwrite:
    raise ConfigError(f'workdir={str(workdir)!r} holds a run with another configuration ('
                      + '; '.join(changed)[:800] + '). Use another workdir, or '
                      '--config.overwrite=True to delete that run and start over')
  if jax.process_index() == 0:
    print(f'overwrite=True: deleting the previous run in {workdir} ({"; ".join(changed)[:300]})',
          flush=True)
    victims = [workdir / n for n in ARTEFACTS] + [
        paths.resolve(p) for p in checkpoints.phase_dirs(workdir).values()]
    victims += list(workdir.glob('teacher_samples_*.npz')) + list(workdir.glob('*.png'))
    for path in victims:
      if path.is_dir():
        path.rmtree()
      elif path.exists():
        path.unlink()


def record_config(config, workdir, image_shape=None) -> None:
  """workdir/config.json, written atomically: the configuration (what `protect` compares the next
  run with) and, next to its fields, 'image_shape' [H, W, C] of the data it trains on, so that the
  run's parameters can be exported and sampled where that data is not (`recorded_image_shape`)."""
  if jax.process_index() != 0:
    return
  record = json.loads(config.to_json_best_effort())
  if image_shape is not None:
    record[IMAGE_SHAPE_KEY] = [int(v) for v in image_shape]
  paths.write_text(paths.resolve(workdir) / 'config.json', json.dumps(record, indent=2))


def recorded_image_shape(path):
  """The image shape config.json records for the run that holds `path` (the workdir, a params
  checkpoint in it, or the teacher's in workdir/teacher), else None."""
  path = paths.resolve(path)
  for folder in (path, path.parent, path.parent.parent):
    record = folder / 'config.json'
    if record.exists():
      shape = json.loads(record.read_text()).get(IMAGE_SHAPE_KEY)
      if shape:
        return tuple(int(v) for v in shape)
  return None
