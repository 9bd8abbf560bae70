"""The read-only modes: `mode=evaluate` scores a workdir's (or eval.params') newest parameters with
the configured metrics, `mode=sample` writes N samples from the evaluator's fixed noise."""
import json

import jax

from tract_jax import checkpoints, paths, writers
from tract_jax.errors import ConfigError
from tract_jax.evaluator import Evaluator
from tract_jax.models import factory


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
      grid = writers.save_grid(out_path.parent / (out_path.name[:-4] + '.png'), images,
                               labels=evaluator.labels)
      print(f'  wrote {grid}', flush=True)
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
