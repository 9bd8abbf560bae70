"""Student export: evaluation-EMA parameters -> a plain Flax msgpack (or npz) file plus a JSON sidecar.

  python -m tract_jax.export --params=~/tract_runs/cifar10_tract \
      --config=configs/cifar10_tract.py --output=cifar10_tract_1step.msgpack

--params takes a params checkpoint (workdir/phase_<k>_ema: the S_{k+1}-step student of phase k; a
teacher's ema_params), a teacher workdir (its ema_params/) or a distillation workdir (its last
phase_<k>_ema). The step count to sample with follows from the phase and the config's schedule;
--steps overrides it (and is needed for a checkpoint directory of any other name).

The parameters are written as flax.serialization.msgpack_serialize of the nested dict (module names
as in the published teachers: 'conv_in', 'down_0.block_1', ...), or, for a .npz output, as one array
per leaf under '/'-joined keys ('down_0.block_1/conv1/kernel'). The sidecar (same name, .json) holds
the model configuration, the image shape (as the run recorded it in its config.json, else that of
config.data), the number of sampling steps and what the method's parametrisation says the sampler
is (methods/parametrisations.py): for DDIM the mean_type, the log-SNR schedule (formula, constants,
values on the sampling grid) and the DDIM step; for EDM the preconditioning, the sigma grid, the
sigmas of the sampling path and the step rule. So the file can be sampled without this project's
training code (tests/test_export_sampling.py does). `load_exported(path)` reads both back.
"""
import json
import os
import sys
from typing import Any, Dict, Optional, Tuple

import numpy as np
from flax import traverse_util

from tract_jax import paths
from tract_jax.errors import ConfigError

FORMAT = 'tract_jax.export/1'
EXTENSIONS = ('.msgpack', '.npz')


def sidecar_path(path: str) -> str:
  """student.msgpack -> student.json (local or gs://)."""
  return os.path.splitext(str(path))[0] + '.json'


def resolve_student(path: str, config, steps: int = 0) -> Tuple[str, int, str]:
  """(checkpoint directory, sampling steps, description) for --params / --steps.

  The step count comes from, in order: `steps` if > 0; phase k's student S_{k+1} of the config's
  schedule for a phase_<k>_ema directory; teacher_steps for a teacher's ema_params.
  """
  from tract_jax import checkpoints, methods, phases

  paths.check('params', path)
  if not paths.resolve(path).is_dir():
    raise ConfigError(f'params={path!r}: no such directory')
  path, kind, phase = checkpoints.newest_params(path)
  if steps and steps > 0:
    return path, int(steps), f'{kind} (--steps={steps})'
  if kind == 'teacher':
    return path, int(config.teacher_steps), 'teacher'
  if kind == 'student':
    if not methods.for_config(config).distils:
      raise ConfigError(f'params={path!r} is a distillation phase but method={config.method!r}: '
                        'give the distillation config, or --steps')
    plan = phases.plan_of(config)
    if phase >= plan.num_phases:
      raise ConfigError(f'params={path!r}: phase {phase}, but time_schedule '
                        f'{",".join(map(str, plan.schedule))} has {plan.num_phases} phase(s): is '
                        '--config the run\'s config?')
    return path, plan.student_steps(phase), f'phase {phase} student of {plan.method} ' + \
        ','.join(map(str, plan.schedule))
  raise ConfigError(f'params={path!r}: cannot tell how many steps this model samples with (not a '
                    'phase_<k>_ema or ema_params directory): pass --steps')


def image_shape_of(params_path: str, config) -> Tuple[int, int, int]:
  """(H, W, C) the exported network samples: what the run's config.json recorded next to the
  parameters (so the data need not be here), else that of config.data (data.image_shape)."""
  from tract_jax import data, workdir

  return workdir.recorded_image_shape(params_path) or data.image_shape(config.data)


def _metadata(config, image_shape, num_steps: int, num_params: int, description: str,
              params_file: str, params_format: str) -> Dict[str, Any]:
  from tract_jax import methods
  from tract_jax.models import factory

  parametrisation = methods.for_config(config).parametrisation
  return {
      'format': FORMAT,
      'params_file': params_file,
      'params_format': params_format,
      'model': json.loads(config.model.to_json_best_effort()),
      'architecture': factory.ARCHS[config.model.arch] + '; NHWC',
      'parametrisation': parametrisation.name,
      'image_shape': list(image_shape),
      'image_range': [-1.0, 1.0],
      'num_classes': int(config.model.num_classes),
      'sample_steps': int(num_steps),
      'teacher_steps': int(config.teacher_steps),
      'clip_x': bool(config.clip_x),
      **parametrisation.sampler_sidecar(config, int(num_steps)),
      'num_params': int(num_params),
      'method': config.method,
      'time_schedule': config.time_schedule,
      'source': description,
  }


def _flatten(tree):
  return traverse_util.flatten_dict(dict(tree), sep='/')


def _unflatten(flat):
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def export_params(params_dir: str, config, output: str, steps: int = 0) -> Dict[str, Any]:
  """Loads the checkpoint (checked against config.model), writes `output` and its sidecar JSON.

  Returns the metadata written to the sidecar.
  """
  import jax
  from flax import serialization
  from tract_jax import checkpoints, import_common
  from tract_jax.models.unet import count_params

  ext = os.path.splitext(output)[1].lower()
  if ext not in EXTENSIONS:
    raise ConfigError(f'output={output!r}: the file name must end in .msgpack or .npz')
  paths.check('output', output)
  path, num_steps, description = resolve_student(params_dir, config, steps)
  image_shape = image_shape_of(path, config)
  like = import_common.abstract_params(config, image_shape)
  params = checkpoints.load_params(path, like, field='params')
  params = _to_plain_dict(jax.tree.map(np.asarray, jax.device_get(params)))
  _check_shapes(params, like, path)
  output = str(paths.resolve(output))  # local or gs://
  if ext == '.msgpack':
    paths.write_bytes(output, serialization.msgpack_serialize(params))
  else:
    paths.save_npz(output, **_flatten(params))
  meta = _metadata(config, image_shape, num_steps, count_params(params), f'{description}: {path}',
                   paths.resolve(output).name, ext[1:])
  paths.write_text(sidecar_path(output), json.dumps(meta, indent=2))
  return meta


def _check_shapes(params, like, path: str) -> None:
  """Orbax restores a checkpoint saved from numpy arrays with its stored shapes whatever the target
  says, so the restored leaves are compared with the configured model here."""
  got, want = _flatten(params), _flatten(_to_plain_dict(like))
  wrong = [f'{k} {np.shape(got[k])} (expected {tuple(want[k].shape)})' for k in want
           if k in got and np.shape(got[k]) != tuple(want[k].shape)]
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  if wrong or missing or unexpected:
    parts = [f'{len(v)} {kind}: {", ".join(v[:8])}' + (' ...' if len(v) > 8 else '')
             for kind, v in (('wrongly shaped', wrong), ('missing', missing),
                             ('unexpected', unexpected)) if v]
    raise ConfigError(f'params={path!r}: the checkpoint does not match the configured model '
                      f'({"; ".join(parts)})')


def _to_plain_dict(tree):
  """Nested mappings (dict, FrozenDict) -> nested plain dicts, as msgpack_serialize expects."""
  if hasattr(tree, 'items'):
    return {str(k): _to_plain_dict(v) for k, v in tree.items()}
  return tree


def load_exported(path: str) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
  """(params, meta) of an exported file: nested dicts of numpy arrays and the sidecar (None if absent)."""
  from flax import serialization

  path = str(paths.resolve(path))  # local or gs://
  ext = os.path.splitext(path)[1].lower()
  if ext == '.msgpack':
    params = serialization.msgpack_restore(paths.resolve(path).read_bytes())
  elif ext == '.npz':
    with paths.load_npz(path) as data:
      params = _unflatten({k: data[k] for k in data.files})
  else:
    raise ConfigError(f'{path!r}: expected a .msgpack or .npz file')
  meta = None
  if paths.resolve(sidecar_path(path)).exists():
    meta = json.loads(paths.resolve(sidecar_path(path)).read_text())
  return params, meta


def _define_flags():
  """Flags are defined only when run as a program (no clash with tract_jax.main's --config)."""
  from absl import flags
  from ml_collections import config_flags
  flags.DEFINE_string('params', None, 'Params checkpoint (phase_<k>_ema, ema_params) or workdir.')
  config_flags.DEFINE_config_file('config', None, 'The run\'s configuration file (configs/*.py).',
                                  lock_config=True)
  flags.DEFINE_string('output', None, 'File to write: .msgpack or .npz (sidecar: same name .json).')
  flags.DEFINE_integer('steps', 0, 'Sampling steps to record (0: from the phase and the schedule).')
  flags.mark_flags_as_required(['params', 'config', 'output'])


def main(argv):
  from absl import app, flags, logging
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  FLAGS = flags.FLAGS
  try:
    meta = export_params(FLAGS.params, FLAGS.config, FLAGS.output, FLAGS.steps)
  except ConfigError as e:
    print(f'Export error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'Exported {meta["source"]} -> {FLAGS.output} ({meta["num_params"]:,} parameters, '
        f'{meta["sample_steps"]}-step {meta["parametrisation"].upper()}); metadata: '
        f'{sidecar_path(FLAGS.output)}')


if __name__ == '__main__':
  from absl import app as _app
  _define_flags()
  _app.run(main)
