"""What a workdir holds between runs: protection against resuming it with an incompatible
configuration, the configuration record, and the read-only modes (`mode=evaluate|sample`) that score
or sample its newest parameters."""
import glob
import json
import os
import shutil

import jax
import numpy as np

from tract_jax import checkpoints, writers
from tract_jax.errors import ConfigError
from tract_jax.evaluator import Evaluator, save_grid
from tract_jax.models import factory

# Fields that define a run: a workdir whose checkpoints came from other values cannot be resumed.
# (Mesh, logging, checkpoint and evaluation settings may change between restarts.)
RUN_FIELDS = ('method', 'seed', 'teacher_checkpoint', 'teacher_steps', 'time_schedule',
              'train_samples', 'batch_size', 'ema_residual', 'ema_reset', 'sema', 'loss_reduction',
              'clip_x', 'optimizer', 'teacher_training', 'model', 'data.name', 'data.image_size',
              'data.random_flip')
# model fields that change how the network computes, not its parameters: free to change on resume.
COMPUTE_FIELDS = ('dtype', 'teacher_dtype', 'remat', 'conv_impl')
ARTEFACTS = ('checkpoints', 'teacher', 'ema_params', 'result.json', 'summary.jsonl', 'tensorboard')


_ABSENT = object()


def _get(tree, dotted):
  for key in dotted.split('.'):
    tree = tree.get(key, _ABSENT) if isinstance(tree, dict) else _ABSENT
  return tree


def protect(config, workdir: str) -> None:
  """Refuses to resume a workdir written by an incompatible configuration, unless overwrite=True
  (which deletes that run's checkpoints and artefacts first)."""
  saved_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(saved_path):
    return
  with open(saved_path) as f:
    saved = json.load(f)
  current = json.loads(config.to_json_best_effort())
  for record in (saved, current):
    for key in COMPUTE_FIELDS:
      record.get('model', {}).pop(key, None)
  # A field an older version did not record (e.g. data.image_size) is not a difference.
  changed = [f'{k}: {json.dumps(_get(saved, k))} -> {json.dumps(_get(current, k))}'
             for k in RUN_FIELDS
             if _get(saved, k) is not _ABSENT and _get(saved, k) != _get(current, k)]
  if not changed:
    return
  if not config.overwrite:
    raise ConfigError(f'workdir={workdir!r} holds a run with another configuration ('
                      + '; '.join(changed)[:800] + '). Use another workdir, or '
                      '--config.overwrite=True to delete that run and start over')
  if jax.process_index() == 0:
    print(f'overwrite=True: deleting the previous run in {workdir} ({"; ".join(changed)[:300]})',
          flush=True)
    victims = [os.path.join(workdir, n) for n in ARTEFACTS] + list(
        checkpoints.phase_dirs(workdir).values())
    victims += glob.glob(os.path.join(workdir, 'teacher_samples_*.npz'))
    victims += glob.glob(os.path.join(workdir, '*.png'))
    for path in victims:
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)


def record_config(config, workdir: str) -> None:
  """workdir/config.json, written atomically (what `protect` compares the next run with)."""
  if jax.process_index() != 0:
    return
  tmp = os.path.join(workdir, 'config.json.tmp')
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, os.path.join(workdir, 'config.json'))


def evaluate_or_sample(config, workdir: str, plan, image_shape, mesh, evaluator: Evaluator):
  """mode=evaluate: the configured metrics of saved parameters; mode=sample: N samples to .npz+PNG.

  Reads the workdir's newest parameters (or eval.params) straight into the mesh's shardings; the
  sampling steps are eval.steps, else the student's, else teacher_steps.
  """
  path, kind, phase = checkpoints.newest_params(config.eval.params or workdir)
  if not os.path.isdir(path):
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
    out = config.eval.output or os.path.join(workdir, f'samples_{steps}steps.npz')
    if jax.process_index() == 0:
      labels = {} if evaluator.labels is None else {'labels': evaluator.labels}
      np.savez(out, images=writers.to_uint8(images), **labels)
      save_grid(os.path.dirname(os.path.abspath(out)), os.path.basename(out)[:-4] + '.png', images,
                evaluator.labels)
    print(f'Wrote {len(images)} samples ({steps} steps) from {path} to {out}', flush=True)
    return {'samples': out, 'steps': steps}
  reference_path = os.path.join(workdir, f'teacher_samples_{config.teacher_steps}.npz')
  reference = np.load(reference_path)['images'] if os.path.exists(reference_path) else None
  scores, _ = evaluator.score(params, steps, reference)
  result = {'params': path, 'steps': steps, **scores}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f'eval_{steps}steps.json'), 'w') as f:
      json.dump(result, f, indent=2)
  print(f'Evaluation of {path} at {steps} step(s): '
        + (', '.join(f'{k} {v:.4f}' for k, v in scores.items()) or 'no metric applies '
           '(agreement needs the teacher samples of a distillation workdir)'), flush=True)
  return result
