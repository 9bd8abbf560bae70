"""What a workdir holds between runs: protection against resuming it with an incompatible
configuration, the configuration record, and the read-only modes (`mode=evaluate|sample`) that score
or sample its newest parameters."""
import json

import jax

from tract_jax import checkpoints, paths, writers
from tract_jax.errors import ConfigError
from tract_jax.evaluator import Evaluator, save_grid
from tract_jax.models import factory

# Fields that define a run: a workdir whose checkpoints came from other values cannot be resumed.
# (Mesh, logging, checkpoint and evaluation settings may change between restarts.)
RUN_FIELDS = ('method', 'seed', 'teacher_checkpoint', 'teacher_steps', 'time_schedule',
              'train_samples', 'batch_size', 'ema_residual', 'ema_reset', 'sema', 'loss_reduction',
              'clip_x', 'optimizer', 'teacher_training', 'model', 'data.name', 'data.image_size',
              'data.random_flip', 'parametrisation', 'student_dropout')
# model fields that change how the network computes, not its parameters: free to change on resume.
COMPUTE_FIELDS = ('dtype', 'teacher_dtype', 'remat', 'conv_impl')
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


def record_config(config, workdir) -> None:
  """workdir/config.json, written atomically (what `protect` compares the next run with)."""
  if jax.process_index() != 0:
    return
  paths.write_text(paths.resolve(workdir) / 'config.json', config.to_json_best_effort(indent=2))


def evaluate_or_sample(config, workdir, plan, image_shape, mesh, evaluator: Evaluator):
  """mode=evaluate: the configured metrics of saved parameters; mode=sample: N samples to .npz+PNG.

  Reads the workdir's newest parameters (or eval.params) straight into the mesh's shardings; the
  sampling steps are eval.steps, else the student's, else teacher_steps.
  """
  workdir = paths.resolve(workdir)
  path, kind, phase = checkpoints.newest_params(config.eval.params or workdir)
  if not paths.resolve(path).is_dir():
    raise ConfigError(f'{"eval.params" if config.eval.params else "workdir"}={path!r}: no trained '
                      'parameters found (phase_<k>_ema/ or ema_params/); set eval.params')
  steps = config.eval.steps
  if not steps and kind == 'student' and plan is not None and phase < plan.num_phases:
    steps = plan.student_steps(phase)
  steps = steps or config.teacher_steps
  like = factory.abstract_params(factory.build_model(config.model), image_shape, mesh,
                                 config.mesh.fsdp_min_size)
  params = checkpoints.load_params(path, like, field='eval.params')
  if config.mode == 'sample':
    images = evaluator.samples(params, steps)
    out = str(paths.resolve(config.eval.output or workdir / f'samples_{steps}steps.npz'))
    out += '' if out.endswith('.npz') else '.npz'  # as np.savez names it
    if jax.process_index() == 0:
      labels = {} if evaluator.labels is None else {'labels': evaluator.labels}
      paths.save_npz(out, images=writers.to_uint8(images), **labels)
      out_path = paths.resolve(out)
      save_grid(out_path.parent, out_path.name[:-4] + '.png', images, evaluator.labels)
    print(f'Wrote {len(images)} samples ({steps} steps) from {path} to {out}', flush=True)
    return {'samples': out, 'steps': steps}
  reference_path = workdir / f'teacher_samples_{config.teacher_steps}.npz'
  reference = paths.load_npz(reference_path)['images'] if reference_path.exists() else None
  scores, _ = evaluator.score(params, steps, reference)
  result = {'params': path, 'steps': steps, **scores}
  if jax.process_index() == 0:
    paths.write_text(workdir / f'eval_{steps}steps.json', json.dumps(result, indent=2))
  print(f'Evaluation of {path} at {steps} step(s): '
        + (', '.join(f'{k} {v:.4f}' for k, v in scores.items()) or 'no metric applies '
           '(agreement needs the teacher samples of a distillation workdir)'), flush=True)
  return result
