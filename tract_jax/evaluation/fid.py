"""Frechet distance between feature statistics (FID), the statistics themselves and their files.

The protocol of the paper's code (spec section 8): features of N generated images against the
TRAINING-set statistics (mean and full covariance), Frechet distance
  ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))
with the matrix square root from `scipy.linalg.sqrtm` (1e-6 added to both diagonals when the product
is singular). Everything here is NumPy float64 on the host; only the features come from a device.

Statistics files record how they were made (the resize convention of the features, the number of
images, the dataset and split) and optionally keep a random subset of the features for KID
(`kid`, the unbiased polynomial-kernel MMD^2 over subsets). `load_stats(path, resize=...)` refuses a
file made with another resize convention than the evaluation's.

FID at finite N is biased upward by a term close to k / N (the sample mean and covariance of N
features are noisy, and noise can only add distance). Published numbers are FID@50k; `fid_vs_n`
also fits FID(N) = FID_inf + k / N over random subsets and reports FID_inf beside FID@N. FID_inf is
our own estimate (after Chong & Forsyth, "Effectively Unbiased FID and Inception Score", 2020), not
a number the official code reports: compare published tables with FID@50k only.
"""
import dataclasses
import io
import json
from typing import Any, Dict, Optional, Sequence, Tuple
import warnings

import numpy as np
import scipy.linalg

from tract_jax.errors import ConfigError


class ActivationStats:
  """Streaming mean and full covariance of feature batches, accumulated in float64.

  Keeps the count, the sum and the sum of outer products of the features minus a fixed shift (the
  mean of the first batch): the covariance does not depend on the shift, and centring near the mean
  avoids the cancellation of sum(x x^T) / n - mu mu^T when the mean is large against the spread.

  Usage:
    stats = ActivationStats()
    for batch in batches:
      stats.update(features(batch))     # (B, D)
    mu, sigma = stats.mean(), stats.covariance()
  """

  def __init__(self, dim: Optional[int] = None):
    self.dim = dim
    self.n = 0
    self._shift = None   # (D,) float64
    self._sum = None     # (D,) float64, sum of (x - shift)
    self._outer = None   # (D, D) float64, sum of (x - shift)(x - shift)^T

  def update(self, feats) -> 'ActivationStats':
    """Adds a batch of features.

    Args:
      feats: (B, D) array (any float dtype; converted to float64).

    Returns:
      self, for chaining.
    """
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2:
      raise ValueError(f'features must be (B, D), got shape {feats.shape}')
    if self.dim is None:
      self.dim = feats.shape[1]
    if feats.shape[1] != self.dim:
      raise ValueError(f'feature dimension {feats.shape[1]} != {self.dim} of earlier batches')
    if len(feats) == 0:
      return self
    if self._shift is None:
      self._shift = feats.mean(axis=0)
      self._sum = np.zeros(self.dim, np.float64)
      self._outer = np.zeros((self.dim, self.dim), np.float64)
    centred = feats - self._shift
    self._sum += centred.sum(axis=0)
    self._outer += centred.T @ centred
    self.n += len(feats)
    return self

  def merge(self, other: 'ActivationStats') -> 'ActivationStats':
    """Adds the batches accumulated by `other` (e.g. another host's) to this accumulator."""
    if other.n == 0:
      return self
    if self.n == 0:
      self.dim, self.n = other.dim, other.n
      self._shift, self._sum, self._outer = other._shift.copy(), other._sum.copy(), other._outer.copy()
      return self
    if other.dim != self.dim:
      raise ValueError(f'cannot merge statistics of dimension {other.dim} into {self.dim}')
    # Re-centre other's sums from its shift to ours: x - s = (x - s_o) + d, d = s_o - s.
    d = other._shift - self._shift
    self._outer += (other._outer + np.outer(other._sum, d) + np.outer(d, other._sum)
                    + other.n * np.outer(d, d))
    self._sum += other._sum + other.n * d
    self.n += other.n
    return self

  def mean(self) -> np.ndarray:
    """(D,) float64 mean of all features seen."""
    if self.n == 0:
      raise ValueError('no features accumulated')
    return self._shift + self._sum / self.n

  def covariance(self) -> np.ndarray:
    """(D, D) float64 unbiased covariance (divides by n - 1, as np.cov)."""
    if self.n < 2:
      raise ValueError(f'a covariance needs at least 2 features, have {self.n}')
    centred_mean = self._sum / self.n
    cov = (self._outer - self.n * np.outer(centred_mean, centred_mean)) / (self.n - 1)
    return 0.5 * (cov + cov.T)

  def finalize(self) -> Tuple[np.ndarray, np.ndarray, int]:
    """(mu (D,), sigma (D, D), n)."""
    return self.mean(), self.covariance(), self.n


def stats_from_features(feats) -> Tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of a feature matrix.

  Args:
    feats: (N, D) array.

  Returns:
    mu (D,) and sigma (D, D), float64; sigma divides by N - 1 (np.cov(feats, rowvar=False)).
  """
  return ActivationStats().update(feats).finalize()[:2]


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

  Args:
    mu1: (D,) mean of the first set.
    sigma1: (D, D) covariance of the first set.
    mu2: (D,) mean of the second set.
    sigma2: (D, D) covariance of the second set.
    eps: added to both diagonals when sqrtm of the product is not finite (singular product, e.g. fewer
      samples than dimensions).

  Returns:
    The distance as a Python float (float64 arithmetic).

  Raises:
    ValueError: on shape mismatch, or when the square root has a non-negligible imaginary part.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / '
                     f'{sigma2.shape}')
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    # Singular product: the standard fix is a small ridge on both covariances.
    ridge = eps * np.eye(len(mu1))
    covmean = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    if not np.all(np.isfinite(covmean)):
      raise ValueError(f'matrix square root is not finite even with eps={eps} on the diagonals')
  if np.iscomplexobj(covmean):
    # Round-off gives the square root of a (near) PSD-similar matrix a tiny imaginary part.
    imag = np.max(np.abs(np.diagonal(covmean).imag))
    if imag > 1e-3:
      raise ValueError(f'matrix square root has an imaginary component of {imag:.3g}')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------------
# Statistics files.
# ---------------------------------------------------------------------------------------------------
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


def _read_bytes(path: str) -> bytes:
  if '://' in str(path):
    from etils import epath  # pylint: disable=g-import-not-at-top  (gs:// and other remote paths)
    return epath.Path(path).read_bytes()
  with open(path, 'rb') as f:
    return f.read()


def _write_bytes(path: str, data: bytes) -> None:
  if '://' in str(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    epath.Path(path).write_bytes(data)
    return
  with open(path, 'wb') as f:
    f.write(data)


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
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  _write_bytes(path, buffer.getvalue())


def read_stats(path: str) -> ReferenceStats:
  """Reads a `save_stats` file (also old ones with only mu, sigma and maybe n) into a
  `ReferenceStats`."""
  with np.load(io.BytesIO(_read_bytes(path))) as f:
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


# ---------------------------------------------------------------------------------------------------
# Kernel inception distance.
# ---------------------------------------------------------------------------------------------------
def polynomial_mmd2_unbiased(x, y) -> float:
  """Unbiased MMD^2 between two equal-size samples with the kernel k(a, b) = (a.b / d + 1)^3.

    MMD^2 = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2

  Args:
    x: (m, d) features, m >= 2.
    y: (m, d) features.

  Returns:
    The estimate (float64 arithmetic); it can be slightly negative.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  m, d = x.shape
  if y.shape != x.shape or m < 2:
    raise ValueError(f'need two (m, d) samples of the same shape with m >= 2, got {x.shape} and '
                     f'{y.shape}')
  k_xx = (x @ x.T / d + 1.0) ** 3
  k_yy = (y @ y.T / d + 1.0) ** 3
  k_xy = (x @ y.T / d + 1.0) ** 3
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(feats_a, feats_b, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> Tuple[float, float]:
  """Kernel inception distance (Binkowski et al. 2018), as the standard implementations compute it.

  Over `num_subsets` subsets, each draws m = min(subset_size, N_a, N_b) rows of each set without
  replacement (np.random.default_rng(seed): rows of a, then rows of b, subset after subset) and
  takes `polynomial_mmd2_unbiased`; returns the mean and the standard deviation (ddof 0) over the
  subsets. Values are in the units of the features' kernel (often reported x 1e3).

  Args:
    feats_a: (N_a, D) features, e.g. of generated images.
    feats_b: (N_b, D) features, e.g. the reference file's `ReferenceStats.features`.
    num_subsets: number of subsets (100 by default).
    subset_size: rows per subset and set (1000 by default), clipped to min(N_a, N_b).
    seed: seed of the subset draws (deterministic results).

  Returns:
    (mean, std) of MMD^2 over the subsets, Python floats.
  """
  feats_a, feats_b = np.asarray(feats_a), np.asarray(feats_b)
  if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
    raise ValueError(f'features must be (N, D) with the same D, got {feats_a.shape} and '
                     f'{feats_b.shape}')
  m = min(int(subset_size), len(feats_a), len(feats_b))
  if m < 2 or num_subsets < 1:
    raise ValueError(f'KID needs at least 2 rows per set and 1 subset, got subset size {m}, '
                     f'{num_subsets} subsets')
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_subsets):
    rows_a = rng.choice(len(feats_a), m, replace=False)
    rows_b = rng.choice(len(feats_b), m, replace=False)
    values.append(polynomial_mmd2_unbiased(feats_a[rows_a], feats_b[rows_b]))
  return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------------------------------------
# Sample-count extrapolation.
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FidVsN:
  """FID at the full sample count and its 1/N extrapolation.

  Attributes:
    fid: FID@N with all N features (what the official code reports, at N = 50,000).
    fid_inf: our estimate of FID with infinitely many samples: the intercept of the least-squares fit
      FID(N_i) = fid_inf + k / N_i.
    k: the fitted slope (the bias at N is about k / N).
    n: N, the number of generated features.
    sizes: (M,) the subset sizes N_i used for the fit (the last one is N).
    fids: (M,) FID at each size (averaged over `repeats` random subsets).
  """
  fid: float
  fid_inf: float
  k: float
  n: int
  sizes: np.ndarray
  fids: np.ndarray


def fit_inverse_n(sizes, fids) -> Tuple[float, float]:
  """Least-squares fit of fids = fid_inf + k / sizes.

  Args:
    sizes: (M,) sample counts, at least two distinct.
    fids: (M,) FID values measured at those counts.

  Returns:
    (fid_inf, k).
  """
  sizes = np.asarray(sizes, np.float64)
  fids = np.asarray(fids, np.float64)
  if len(np.unique(sizes)) < 2:
    raise ValueError(f'need at least two distinct sizes to fit FID(N) = FID_inf + k/N, got {sizes}')
  design = np.stack([np.ones_like(sizes), 1.0 / sizes], axis=1)
  (fid_inf, k), *_ = np.linalg.lstsq(design, fids, rcond=None)
  return float(fid_inf), float(k)


def default_sizes(n: int, num: int = 8, min_fraction: float = 0.2) -> np.ndarray:
  """`num` subset sizes from min_fraction * n to n, equally spaced in 1/N (where the fit is linear)."""
  n_min = max(2, int(round(min_fraction * n)))
  inv = np.linspace(1.0 / n_min, 1.0 / n, num)
  return np.unique(np.round(1.0 / inv).astype(np.int64))


def fid_vs_n(feats, mu_ref, sigma_ref, sizes: Optional[Sequence[int]] = None, repeats: int = 1,
             seed: int = 0, eps: float = 1e-6) -> FidVsN:
  """FID@N of generated features against reference statistics, and FID_inf by 1/N extrapolation.

  Each size N_i < N is measured on `repeats` random subsets (without replacement, drawn from
  np.random.default_rng(seed), so the result is deterministic) and averaged; N_i = N uses all
  features once. Then FID(N_i) = FID_inf + k / N_i is fitted by least squares.

  Args:
    feats: (N, D) generated features.
    mu_ref: (D,) reference (training-set) mean.
    sigma_ref: (D, D) reference covariance.
    sizes: subset sizes, each in [2, N]; default `default_sizes(N)` (8 sizes from N/5 to N).
    repeats: random subsets per size below N.
    seed: seed of the subset draws.
    eps: passed to `frechet_distance`.

  Returns:
    A `FidVsN`; `fid` is FID@N (all features), `fid_inf` the extrapolated estimate.
  """
  feats = np.asarray(feats)
  n = len(feats)
  sizes = default_sizes(n) if sizes is None else np.unique(np.asarray(sizes, np.int64))
  if sizes.min() < 2 or sizes.max() > n:
    raise ValueError(f'subset sizes must lie in [2, {n}], got {sizes}')
  rng = np.random.default_rng(seed)
  fids = []
  for size in sizes:
    draws = 1 if size == n else repeats
    values = []
    for _ in range(draws):
      subset = feats if size == n else feats[np.sort(rng.choice(n, size, replace=False))]
      mu, sigma = stats_from_features(subset)
      values.append(frechet_distance(mu, sigma, mu_ref, sigma_ref, eps))
    fids.append(np.mean(values))
  fids = np.asarray(fids)
  fid_n = fids[-1] if sizes[-1] == n else frechet_distance(*stats_from_features(feats), mu_ref,
                                                            sigma_ref, eps)
  fid_inf, k = fit_inverse_n(sizes, fids)
  return FidVsN(fid=float(fid_n), fid_inf=fid_inf, k=k, n=n, sizes=sizes, fids=fids)
