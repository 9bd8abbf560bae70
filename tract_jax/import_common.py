"""What both teacher importers share (import_teacher.py: the published Flax msgpack files;
import_edm.py: EDM's network pickles): the configured network's expected parameter tree, the
report of what was converted, the one-line mismatch error, and the written checkpoint."""
import dataclasses
import json
from typing import Any, Dict, List, Tuple

from tract_jax import checkpoints, config_checks, data, paths
from tract_jax.errors import ConfigError
from tract_jax.models import factory

# Leaves listed per category in an error message before '... and N more'.
MAX_LISTED = 12


def abstract_params(config, image_shape=None):
  """The configured network's parameter tree as ShapeDtypeStructs (jax.eval_shape: nothing
  allocated). image_shape: (H, W, C) of the data; default that of config.data (data.image_shape:
  a TFDS name answers from its dataset info, without the data)."""
  shape = tuple(image_shape or data.image_shape(config.data))
  config_checks.check_model(config)
  config_checks.check_image_shape(config, shape)
  return factory.abstract_params(factory.build_model(config.model), shape)


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


def _listing(kind: str, entries: List[str]) -> str:
  shown = entries[:MAX_LISTED]
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


def write_import(output: str, params, source: str, config, image_shape, report: ImportReport,
                 **extra) -> None:
  """Writes output/ema_params (an Orbax params checkpoint) and output/import_info.json (source,
  model configuration, image shape, the report, and `extra` fields)."""
  output = paths.resolve(output)  # local or gs://
  output.mkdir(parents=True, exist_ok=True)
  checkpoints.save_params(output / 'ema_params', params)
  info = {'source': source, 'data': config.data.name, 'image_shape': list(image_shape),
          'model': json.loads(config.model.to_json_best_effort()), 'report': report.to_json(),
          **extra}
  paths.write_text(output / 'import_info.json', json.dumps(info, indent=2))
