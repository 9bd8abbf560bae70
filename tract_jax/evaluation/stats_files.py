"""Reference statistics files: mean and covariance of training-set features, with a record of how
they were made (the resize convention of the features, the number of images, the dataset and split)
and optionally a random subset of the features for KID. `load_stats(path, resize=...)` refuses a
file made with another resize convention than the evaluation's. Local or gs:// paths."""
import dataclasses
import json
import warnings
from typing import Any, Dict, Optional, Tuple

import numpy as np

from tract_jax import paths
from tract_jax.errors import ConfigError

STATS_FORMAT_VERSION = 1


@dataclasses.dataclass
class ReferenceStats:
  """The contents of a statistics file.

  Attributes:
    mu: (D,) float64 mean.
    sigma: (D, D) float64 covariance (divides by n - 1).
    n: number of images the statistics were computed over (0 if an old file did not say).
    meta: what the file records about how it was made: 'resize' ('torch' / 'tf1'), 'num_images',
      'dataset', 'split', 'quantize', 'input_size', 'inception_weights', 'kid_features',
      'format_version' (only those given when it was written; {} for files written before
      tract_jax recorded them).
    features: optional (K, D) float32 features of K images drawn uniformly at random (without
      replacement) from the N, for KID (`kid`); None if the file has none.
  """
  mu: np.ndarray
  sigma: np.ndarray
  n: int
  meta: Dict[str, Any]
  features: Optional[np.ndarray] = None


def save_stats(path: str, mu, sigma, n: int, *, resize: Optional[str] = None,
               dataset: Optional[str] = None, split: Optional[str] = None, features=None,
               meta: Optional[Dict[str, Any]] = None) -> None:
  """Writes statistics to an .npz (local or gs:// path).

  Keys: mu (D,) and sigma (D, D) float64, n (scalar), meta (a JSON string: resize, num_images,
  dataset, split and the entries of `meta`), and features (K, D) float32 if given.

  Args:
    path: file to write.
    mu: (D,) mean.
    sigma: (D, D) covariance.
    n: number of images behind mu and sigma.
    resize: the resize convention of the features ('torch' or 'tf1'); scoring with another
      convention is refused by `load_stats(..., resize=...)`. None records 'unknown' (a warning
      when the file is used).
    dataset: dataset name, e.g. 'cifar10'.
    split: split, e.g. 'train'.
    features: optional (K, D) features of a uniformly random subset of the images, kept for KID.
    meta: further JSON-serialisable entries (e.g. 'inception_weights', 'quantize', 'input_size').
  """
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  record = {'format_version': STATS_FORMAT_VERSION, 'resize': resize, 'num_images': int(n),
            'dataset': dataset, 'split': split}
  record.update(meta or {})
  arrays = {'mu': mu, 'sigma': sigma, 'n': np.asarray(int(n), np.int64)}
  if features is not None:
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[1] != mu.shape[0]:
      raise ValueError(f'features must be (K, {mu.shape[0]}), got shape {features.shape}')
    arrays['features'] = features
    record['kid_features'] = len(features)
  arrays['meta'] = np.asarray(json.dumps(record, sort_keys=True))
  paths.save_npz(path, **arrays)  # whole or not at all, as every other artefact


def read_stats(path: str) -> ReferenceStats:
  """Reads a `save_stats` file (also old ones with only mu, sigma and maybe n) into a
  `ReferenceStats`."""
  with paths.load_npz(path) as f:
    mu, sigma = f['mu'].astype(np.float64), f['sigma'].astype(np.float64)
    n = int(f['n']) if 'n' in f.files else 0
    meta = json.loads(str(f['meta'])) if 'meta' in f.files else {}
    features = np.asarray(f['features'], np.float32) if 'features' in f.files else None
  if sigma.shape != mu.shape * 2:
    raise ValueError(f'{path}: sigma shape {sigma.shape} does not match mu shape {mu.shape}')
  return ReferenceStats(mu=mu, sigma=sigma, n=n, meta=meta, features=features)


def check_stats_convention(stats_meta: Dict[str, Any], resize: str, path: str = '') -> None:
  """Refuses reference statistics made with another resize convention than the evaluation's.

  Args:
    stats_meta: `ReferenceStats.meta` of the reference file.
    resize: the convention the generated images' features are computed with (eval.fid_resize).
    path: the file, for the messages.

  Raises:
    ConfigError: (one line) the file records a different convention. Files that record none
      (written before tract_jax recorded it) are accepted with a warning.
  """
  recorded = (stats_meta or {}).get('resize')
  where = f' {path}' if path else ''
  if recorded is None:
    warnings.warn(f'reference statistics{where} do not record their resize convention (an older '
                  f'file): assuming eval.fid_resize={resize!r}; remake them with python -m '
                  f'tract_jax.evaluation.reference_stats to record it', stacklevel=2)
    return
  if recorded != resize:
    raise ConfigError(f'eval.fid_resize={resize!r} but the reference statistics{where} were made '
                      f'with resize={recorded!r}: FIDs across conventions are not comparable; set '
                      f'eval.fid_resize={recorded!r} or remake the statistics with '
                      f'--resize={resize}')


def load_stats(path: str, resize: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray, int]:
  """Reads `save_stats` files: returns (mu (D,), sigma (D, D), n).

  Args:
    path: the file (local or gs://).
    resize: if given, the evaluation's resize convention: `check_stats_convention` refuses a file
      made with another one (ConfigError) and warns on a file that records none.
  """
  stats = read_stats(path)
  if resize is not None:
    check_stats_convention(stats.meta, resize, path)
  return stats.mu, stats.sigma, stats.n
