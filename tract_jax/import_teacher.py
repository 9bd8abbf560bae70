"""Teacher import: a published JAX/Flax msgpack train state -> an Orbax params checkpoint (spec section 7).

  python -m tract_jax.import_teacher \
      --source=gs://gresearch/diffusion-distillation/cifar_original \
      --config=configs/cifar10_tract.py --output=~/tract_teachers/cifar10
  python -m tract_jax.main --config=configs/cifar10_tract.py --workdir=DIR \
      --config.teacher_checkpoint=~/tract_teachers/cifar10

The source is a Flax msgpack file (flax.serialization) of a train state whose 'ema_params' subtree
holds the teacher under flat module names ('conv_in', 'down_0.block_1', 'mid.attn_1', ...), exactly
the names of tract_jax.models.unet.UNet. A bare parameter dict, a state that only has 'params', an
old Flax optimizer ({'optimizer': {'target': ...}}) and a variables dict ({'params': {...}}) are
accepted too. The configured model (--config, with any --config.model.* overrides) decides the
expected tree: every leaf must be there with the freshly initialised leaf's shape, or with the same
number of elements (older Flax versions saved some leaves, e.g. DenseGeneral kernels and biases, with
other shapes; those are reshaped). Anything else fails with one message that lists the missing,
unexpected and wrongly-shaped entries.

The output directory gets ema_params/ (what checkpoints.load_params and --config.teacher_checkpoint
accept) and import_info.json (source, model configuration, what was reshaped or cast).

With config.model.arch 'edm_song' or 'edm_dhariwal' the source is an NVlabs/edm network pickle
instead, read without executing it (tract_jax/import_edm.py).

gs:// sources are read with etils.epath, which needs the gcsfs package and access to the bucket;
without them, copy the file first (gsutil cp gs://... .) and pass the local path.
"""
import math
import os
import sys
from typing import Any, Dict, Tuple

import numpy as np

from tract_jax import data, import_edm, paths
from tract_jax.errors import ConfigError
from tract_jax.import_common import (MAX_LISTED, ImportReport, abstract_params, mismatch_error,
                                     write_import)

__all__ = ['import_teacher', 'parse_source', 'select_params', 'convert_params', 'abstract_params']

# ----------------------------------------------------------------------------------------------------
# Reading the source
# ----------------------------------------------------------------------------------------------------

def parse_source(data: bytes, source: str = 'source') -> Dict[str, Any]:
  """flax.serialization.msgpack_restore of the bytes, with a readable error for other files."""
  from flax import serialization
  try:
    tree = serialization.msgpack_restore(data)
  except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types
    hint = ''
    if data[:1] == b'\x80' and data[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05'):
      hint = (' (it looks like a Python pickle: an EDM network pickle needs '
              "--config.model.arch=edm_song or edm_dhariwal)")
    raise ConfigError(f'{source}: not a Flax msgpack file ({type(e).__name__}: '
                      f'{str(e)[:200]}){hint}') from None
  if not isinstance(tree, dict):
    raise ConfigError(f'{source}: expected a Flax train state or parameter dict, found a '
                      f'{type(tree).__name__}')
  return tree


def _looks_like_params(tree) -> bool:
  """True when the dict's keys are UNet module names rather than train-state fields."""
  return isinstance(tree, dict) and any(
      k in ('conv_in', 'conv_out', 'dense0', 'norm_out') or k.startswith(('down_', 'up_', 'mid'))
      for k in tree)


def select_params(tree: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
  """The parameter subtree of a restored file and a description of where it was found.

  Preference: 'ema_params' (the published teachers: the EMA is what was evaluated), a bare parameter
  dict, 'params' (a state without EMA), an old flax.optim optimizer's 'target'. A variables dict
  {'params': {...}} around any of them is unwrapped.
  """
  where = []
  if 'ema_params' in tree:
    tree, desc = tree['ema_params'], "'ema_params'"
  elif _looks_like_params(tree):
    desc = 'the whole file (a bare parameter dict)'
  elif 'params' in tree:
    tree, desc = tree['params'], "'params' (the file has no 'ema_params': these are raw weights)"
  elif isinstance(tree.get('optimizer'), dict) and 'target' in tree['optimizer']:
    tree, desc = tree['optimizer']['target'], "'optimizer/target' (no 'ema_params': raw weights)"
  else:
    raise ConfigError("the file holds neither 'ema_params', 'params' nor UNet module names "
                      f'(top-level keys: {", ".join(sorted(map(str, tree))[:MAX_LISTED])})')
  where.append(desc)
  # Older files nest the parameters as a variables dict: {'params': {...}}.
  while isinstance(tree, dict) and set(tree) == {'params'}:
    tree = tree['params']
    where.append("'params'")
  if not isinstance(tree, dict):
    raise ConfigError(f'the parameter subtree {" / ".join(where)} is a {type(tree).__name__}, '
                      'not a dict of modules')
  return tree, ' / '.join(where)


# ----------------------------------------------------------------------------------------------------
# Mapping onto the configured model
# ----------------------------------------------------------------------------------------------------

def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  """Nested dicts -> {path tuple: leaf}. Keys are taken as strings."""
  out = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    if isinstance(value, dict):
      out.update(_flatten(value, path))
    else:
      out[path] = value
  return out


def _normalise(path: Tuple[str, ...]) -> str:
  """One spelling for the flat names ('down_0.block_1') and nested ones ('down_0' / 'block_1')."""
  return '/'.join(path).replace('.', '/')


def convert_params(source_tree: Dict[str, Any], target_abstract) -> Tuple[Dict[str, Any], ImportReport]:
  """Maps a parameter dict onto the structure, shapes and dtypes of `target_abstract`.

  source_tree: nested dicts of arrays (flat module names as in the published files, or nested).
  target_abstract: the model's parameter tree (arrays or ShapeDtypeStructs, e.g. from jax.eval_shape).
  Returns (params, report): params has exactly target_abstract's structure (nested dicts of
  jax arrays); leaves whose shape drifted but whose size matches are reshaped, other dtypes cast.
  Raises ConfigError naming every missing, unexpected and wrongly-shaped entry.
  """
  import jax.numpy as jnp
  from flax import traverse_util

  if not isinstance(source_tree, dict):
    raise ConfigError(f'expected a dict of modules, found a {type(source_tree).__name__}')
  source = {}
  for path, leaf in _flatten(source_tree).items():
    source[_normalise(path)] = ('/'.join(path), leaf)
  target = traverse_util.flatten_dict(target_abstract)

  report = ImportReport()
  flat_params, missing, wrong = {}, [], []
  for path, spec in target.items():
    name = '/'.join(path)
    key = _normalise(path)
    if key not in source:
      missing.append(f'{name} {tuple(spec.shape)}')
      continue
    src_name, leaf = source.pop(key)
    array = np.asarray(leaf)
    shape = tuple(spec.shape)
    if array.shape != shape:
      if array.size != math.prod(shape):
        wrong.append(f'{src_name} {array.shape} (expected {shape})')
        continue
      report.reshaped.append((name, array.shape, shape))
      array = array.reshape(shape)
    if array.dtype != np.dtype(spec.dtype):
      if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == 'bfloat16'):
        wrong.append(f'{src_name} dtype {array.dtype} (expected {np.dtype(spec.dtype)})')
        continue
      report.cast.append((name, str(array.dtype), str(np.dtype(spec.dtype))))
    flat_params[path] = jnp.asarray(array, dtype=spec.dtype)
  unexpected = [f'{name} {tuple(np.shape(leaf))}' for name, leaf in source.values()]

  if missing or unexpected or wrong:
    raise mismatch_error(missing, unexpected, wrong,
                         'check model.ch, ch_mult, num_res_blocks, attn_resolutions, num_classes')
  report.num_leaves = len(flat_params)
  report.num_params = int(sum(a.size for a in flat_params.values()))
  return traverse_util.unflatten_dict(flat_params), report


# ----------------------------------------------------------------------------------------------------
# The whole import
# ----------------------------------------------------------------------------------------------------

def import_teacher(source: str, config, output: str) -> ImportReport:
  """Reads `source`, converts its parameters to `config.model` and writes output/ema_params."""
  if not output:
    raise ConfigError('output: give the directory to write the teacher checkpoint to')
  paths.check('output', output)
  if config.model.arch in import_edm.ARCHS:  # EDM's networks come as EDM pickles
    return import_edm.import_edm(source, config, output)
  image_shape = data.image_shape(config.data)
  target = abstract_params(config, image_shape)  # before reading: a bad config fails early
  tree = parse_source(paths.read_bytes(source, 'source'), f'source={source!r}')
  params, where = select_params(tree)
  params, report = convert_params(params, target)
  report.subtree = where
  write_import(output, params, source, config, image_shape, report)
  return report


def _define_flags():
  """Flags are defined only when run as a program, so importing this module never clashes with
  tract_jax.main's --config in the same process."""
  from absl import flags
  from ml_collections import config_flags
  flags.DEFINE_string('source', None, 'Flax msgpack file of the teacher, or an EDM network pickle '
                      'with model.arch edm_song / edm_dhariwal (local path or gs://...).')
  config_flags.DEFINE_config_file('config', None, 'Job configuration file (configs/*.py) whose '
                                  'model the teacher is mapped onto.', lock_config=True)
  flags.DEFINE_string('output', None, 'Directory to write (ema_params/ inside).')
  flags.mark_flags_as_required(['source', 'config', 'output'])


def main(argv):
  from absl import app, flags, logging
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  FLAGS = flags.FLAGS
  try:
    report = import_teacher(FLAGS.source, FLAGS.config, FLAGS.output)
  except ConfigError as e:
    print(f'Import error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'Imported {FLAGS.source} -> {os.path.join(FLAGS.output, "ema_params")}')
  print('\n'.join(report.lines()))


if __name__ == '__main__':
  from absl import app as _app
  _define_flags()
  _app.run(main)
