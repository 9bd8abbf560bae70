"""Frechet distance between feature statistics (FID) and the streaming statistics themselves.

The protocol of the paper's code (spec section 8): features of N generated images against the
TRAINING-set statistics (mean and full covariance), Frechet distance
  ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))
with the matrix square root from `scipy.linalg.sqrtm` (1e-6 added to both diagonals when the product
is singular). Everything here is NumPy float64 on the host; only the features come from a device.

Statistics files are read and written by `stats_files`; KID is in `kid`.

FID at finite N is biased upward by a term close to k / N (the sample mean and covariance of N
features are noisy, and noise can only add distance). Published numbers are FID@50k; `fid_vs_n`
also fits FID(N) = FID_inf + k / N over random subsets and reports FID_inf beside FID@N. FID_inf is
our own estimate (after Chong & Forsyth, "Effectively Unbiased FID and Inception Score", 2020), not
a number the official code reports: compare published tables with FID@50k only.
"""
import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np
import scipy.linalg


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

  def to_array(self) -> np.ndarray:
    """The accumulator as one float64 vector [n, shift, sum, outer] (to send to other hosts)."""
    if self.n == 0:
      raise ValueError('no features accumulated')
    return np.concatenate([[float(self.n)], self._shift, self._sum, self._outer.ravel()])

  @classmethod
  def from_array(cls, flat) -> 'ActivationStats':
    """Inverse of `to_array`."""
    flat = np.asarray(flat, np.float64)
    dim = int(round((-2 + np.sqrt(4 + 4 * (len(flat) - 1))) / 2))  # 1 + 2 D + D^2 entries
    stats = cls(dim)
    stats.n = int(round(flat[0]))
    stats._shift = flat[1:1 + dim].copy()
    stats._sum = flat[1 + dim:1 + 2 * dim].copy()
    stats._outer = flat[1 + 2 * dim:].reshape(dim, dim).copy()
    return stats

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
