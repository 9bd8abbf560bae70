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
import dataclasses
import json
import math
import os
import sys
from typing import Any, Dict, List, Tuple

import numpy as np

from tract_jax.errors import ConfigError

# Image shape (H, W, C) of each dataset name the configs use.
IMAGE_SHAPES = {
    'cifar10': (32, 32, 3),
    'imagenet64': (64, 64, 3),
    'digits': (8, 8, 1),
}

# Leaves listed per category in an error message before '... and N more'.
_MAX_LISTED = 12


def image_shape(config) -> Tuple[int, int, int]:
  """(H, W, C) of the images of config.data.name."""
  name = config.data.name
  if name not in IMAGE_SHAPES:
    raise ConfigError(f'data.name={name!r}: allowed values are '
                      f'{", ".join(map(repr, IMAGE_SHAPES))}')
  return IMAGE_SHAPES[name]


def abstract_params(config, shape=None):
  """The configured network's parameter tree as ShapeDtypeStructs (jax.eval_shape: nothing
  allocated)."""
  from tract_jax import config_checks
  from tract_jax.models import factory

  shape = tuple(shape or image_shape(config))
  if config.model.get('arch', 'ddpm') == 'ddpm' and (
      (config.model.num_heads is None) == (config.model.head_dim is None)):
    raise ConfigError('model.num_heads / model.head_dim: set exactly one of them (the other None)')
  config_checks.check_image_shape(config, shape)
  return factory.abstract_params(factory.build_model(config.model), shape)


# ----------------------------------------------------------------------------------------------------
# Reading the source
# ----------------------------------------------------------------------------------------------------

def read_source(source: str) -> bytes:
  """The bytes of a local file, or of a gs:// (any URL-like) path through etils.epath."""
  if '://' in source:
    try:
      from etils import epath
      return epath.Path(source).read_bytes()
    except Exception as e:  # noqa: BLE001 - missing gcsfs, no network, no permission, no such object
      detail = ' '.join(f'{type(e).__name__}: {e}'.split())[:300]
      raise ConfigError(
          f'source={source!r}: cannot read it ({detail}). Reading gs:// paths needs the gcsfs '
          'package (pip install gcsfs), network access and read permission on the bucket; or copy '
          f'the file first (gsutil cp {source} .) and pass the local path') from None
  path = os.path.expanduser(source)
  if not os.path.isfile(path):
    raise ConfigError(f'source={source!r}: no such file')
  with open(path, 'rb') as f:
    return f.read()


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
                      f'(top-level keys: {", ".join(sorted(map(str, tree))[:_MAX_LISTED])})')
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

@dataclasses.dataclass
class ImportReport:
  """What convert_params did: sizes, reshaped and cast leaves (names as 'module/param/leaf')."""
  num_leaves: int = 0
  num_params: int = 0
  reshaped: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = dataclasses.field(
      default_factory=list)
  cast: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
  ignored: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, why)
  subtree: str = ''

  def lines(self) -> List[str]:
    out = [f'{self.num_leaves} arrays, {self.num_params:,} parameters'
           + (f' from {self.subtree}' if self.subtree else '')]
    for name, old, new in self.reshaped:
      out.append(f'  reshaped {name}: {old} -> {new}')
    for name, old, new in self.cast:
      out.append(f'  cast {name}: {old} -> {new}')
    for name, why in self.ignored:
      out.append(f'  ignored {name}: {why}')
    return out

  def to_json(self) -> Dict[str, Any]:
    return {'num_leaves': self.num_leaves, 'num_params': self.num_params, 'subtree': self.subtree,
            'reshaped': [[n, list(a), list(b)] for n, a, b in self.reshaped],
            'cast': [list(c) for c in self.cast], 'ignored': [list(i) for i in self.ignored]}


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


def _listing(kind: str, entries: List[str]) -> str:
  shown = entries[:_MAX_LISTED]
  more = f' ... and {len(entries) - len(shown)} more' if len(entries) > len(shown) else ''
  return f'{len(entries)} {kind}: {", ".join(shown)}{more}'


def mismatch_error(missing: List[str], unexpected: List[str], wrong: List[str],
                   fields: str) -> ConfigError:
  """One ConfigError line listing the missing, unexpected and wrongly-shaped entries; `fields` names
  the config fields to check when the trees differ by more than a couple of entries."""
  parts = [_listing(kind, entries) for kind, entries in
           (('missing', missing), ('unexpected', unexpected), ('wrongly shaped', wrong)) if entries]
  hint = ''
  if len(missing) + len(unexpected) > 2:
    hint = f" (is --config the checkpoint's architecture? {fields})"
  return ConfigError('the source parameters do not match the configured model' + hint + ': '
                     + '; '.join(parts))


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

def write_import(output: str, params, source: str, config, report: ImportReport, **extra) -> None:
  """Writes output/ema_params (an Orbax params checkpoint) and output/import_info.json (source,
  model configuration, the report, and `extra` fields)."""
  from tract_jax import checkpoints, paths

  output = paths.resolve(output)  # local or gs://
  output.mkdir(parents=True, exist_ok=True)
  checkpoints.save_params(output / 'ema_params', params)
  info = {'source': source, 'data': config.data.name, 'image_shape': list(image_shape(config)),
          'model': json.loads(config.model.to_json_best_effort()), 'report': report.to_json(),
          **extra}
  paths.write_text(output / 'import_info.json', json.dumps(info, indent=2))


def import_teacher(source: str, config, output: str) -> ImportReport:
  """Reads `source`, converts its parameters to `config.model` and writes output/ema_params."""
  from tract_jax import paths

  if not output:
    raise ConfigError('output: give the directory to write the teacher checkpoint to')
  paths.check('output', output)
  if config.model.get('arch', 'ddpm') != 'ddpm':  # EDM's networks take EDM pickles
    from tract_jax import import_edm
    return import_edm.import_edm(source, config, output)
  target = abstract_params(config)  # before reading: a bad config fails without a download
  tree = parse_source(read_source(source), f'source={source!r}')
  params, where = select_params(tree)
  params, report = convert_params(params, target)
  report.subtree = where
  write_import(output, params, source, config, report)
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
