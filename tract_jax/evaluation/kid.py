"""Kernel inception distance (Binkowski et al. 2018): the unbiased MMD^2 between generated and
reference features with the cubic polynomial kernel, averaged over random subsets. Less biased than
FID at the few hundred samples of small runs."""
from typing import Tuple

import numpy as np

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
