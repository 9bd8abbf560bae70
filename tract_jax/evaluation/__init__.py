"""Evaluation: FID (statistics, Frechet distance), KID, the FID Inception-v3 network, and the offline
digits metric.

  fid.py               ActivationStats, stats_from_features, frechet_distance
  stats_files.py       save/read/load_stats (recording the resize convention they were made with)
  kid.py               kid (kernel inception distance)
  inception.py         FIDInceptionV3 (Flax), InceptionFeatures, load_inception
  convert_inception.py pytorch-fid .pth -> our .npz (command; PyTorch only there)
  reference_stats.py   training-set statistics (command)
  digits_metric.py     DigitsMetric (64-d features of a tiny classifier), teacher_agreement_rmse

The names below are imported lazily (PEP 562): `import tract_jax.evaluation` costs nothing, Flax is
loaded only with the Inception network, and `python -m tract_jax.evaluation.<module>` runs cleanly.
"""
import importlib

_EXPORTS = {
    'ActivationStats': 'fid',
    'frechet_distance': 'fid', 'load_stats': 'stats_files', 'save_stats': 'stats_files',
    'stats_from_features': 'fid', 'read_stats': 'stats_files',
    'ReferenceStats': 'stats_files', 'check_stats_convention': 'stats_files',
    'FIDInceptionV3': 'inception', 'InceptionFeatures': 'inception', 'load_inception': 'inception',
    'DigitsMetric': 'digits_metric', 'teacher_agreement_rmse': 'digits_metric',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  return getattr(importlib.import_module(f'{__name__}.{module}'), name)


def __dir__():
  return sorted(list(globals()) + __all__)
