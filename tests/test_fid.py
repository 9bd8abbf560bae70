"""tract_jax.evaluation.fid: Frechet distance, streaming statistics, files, KID, 1/N extrapolation."""
import warnings

import numpy as np
import pytest
import scipy.linalg

from tract_jax.errors import ConfigError
from tract_jax.evaluation import fid, kid, stats_files


def random_stats(rng, n, d, shift=0.0):
  feats = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + shift
  return feats.mean(axis=0), np.cov(feats, rowvar=False)


def reference_frechet(mu1, s1, mu2, s2):
  """The paper code's (pytorch-fid's) float64 route: scipy.linalg.sqrtm of the non-symmetric product,
  its round-off imaginary part dropped."""
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


@pytest.mark.parametrize('d', [1, 16, 64])
def test_frechet_distance_matches_scipy_reference(d):
  rng = np.random.default_rng(d)
  mu1, s1 = random_stats(rng, 4 * d + 10, d)
  mu2, s2 = random_stats(rng, 4 * d + 10, d, shift=0.3)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  want = reference_frechet(np.atleast_1d(mu1), np.atleast_2d(s1), np.atleast_1d(mu2),
                           np.atleast_2d(s2))
  assert isinstance(got, float)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The reference covariance's root given (the evaluator keeps it for the run): the same distance.
  root = fid.psd_sqrt(np.atleast_2d(s2))
  np.testing.assert_allclose(root @ root, np.atleast_2d(s2), atol=1e-10 * np.abs(s2).max())
  assert fid.frechet_distance(mu1, s1, mu2, s2, root) == pytest.approx(got, rel=1e-12)


def test_frechet_distance_identical_singular_and_bad_statistics():
  rng = np.random.default_rng(0)
  mu, sigma = random_stats(rng, 200, 32)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
  # Fewer samples than dimensions: both covariances singular. No ridge needed; sqrtm with the spec's
  # 1e-6 ridge on both diagonals differs by O(sqrt(1e-6)) per singular direction (here 1.5e-5).
  mu1, s1 = random_stats(rng, 10, 32)
  mu2, s2 = random_stats(rng, 10, 32)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  ridge = 1e-6 * np.eye(32)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # sqrtm's "Matrix is singular" for the unridged product
    np.testing.assert_allclose(got, reference_frechet(mu1, s1 + ridge, mu2, s2 + ridge), rtol=1e-4)
  with pytest.raises(ValueError, match='shape'):
    fid.frechet_distance(mu1, s1, mu2[:5], s2[:5, :5])
  with pytest.raises(ValueError, match='sigma2 is not positive semi-definite'):
    fid.frechet_distance(mu1, s1 + np.eye(32), mu2, s2 - np.eye(32))
  with pytest.raises(ValueError, match='sigma1 is not positive semi-definite'):
    fid.frechet_distance(mu1, -s1 - np.eye(32), mu2, s2)
  with pytest.raises(ValueError, match='not finite'):
    fid.frechet_distance(mu1 * np.nan, s1, mu2, s2)


def test_activation_stats_over_batches_equal_np_cov():
  rng = np.random.default_rng(1)
  # Large offset: the naive sum(x x^T)/n - mu mu^T would lose digits here.
  feats = (rng.normal(size=(1000, 24)) * rng.uniform(0.1, 3, size=24) + 1e3).astype(np.float32)
  stats = fid.ActivationStats()
  for start in range(0, 1000, 137):  # uneven batches, last one short
    stats.update(feats[start:start + 137])
  mu, sigma, n = stats.finalize()
  f64 = feats.astype(np.float64)
  assert n == 1000 and mu.dtype == np.float64 and sigma.dtype == np.float64
  np.testing.assert_allclose(mu, f64.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(f64, rowvar=False), rtol=1e-9, atol=1e-9)
  # Merging two accumulators (e.g. two hosts) gives the same statistics.
  a = fid.ActivationStats().update(feats[:300])
  b = fid.ActivationStats().update(feats[300:])
  # ... also after travelling as one float64 vector (how hosts exchange them).
  a.merge(fid.ActivationStats.from_array(b.to_array()))
  np.testing.assert_allclose(a.mean(), mu, rtol=1e-12)
  np.testing.assert_allclose(a.covariance(), sigma, rtol=1e-9, atol=1e-9)
  mu2, sigma2 = fid.stats_from_features(feats)
  np.testing.assert_allclose(sigma2, sigma, rtol=1e-12)
  with pytest.raises(ValueError, match='dimension'):
    stats.update(np.zeros((2, 5)))


def test_save_load_stats_roundtrip(tmp_path):
  rng = np.random.default_rng(2)
  mu, sigma = random_stats(rng, 50, 8)
  feats = rng.normal(size=(20, 8))
  path = str(tmp_path / 'stats.npz')
  stats_files.save_stats(path, mu, sigma, 50, resize='torch', dataset='cifar10', split='train',
                 features=feats, meta={'inception_weights': 'inception_fid.npz'})
  mu2, sigma2, n = stats_files.load_stats(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  assert n == 50
  assert sorted(np.load(path).files) == ['features', 'meta', 'mu', 'n', 'sigma']  # no pickles
  stats = stats_files.read_stats(path)
  assert stats.meta == {'format_version': 1, 'resize': 'torch', 'num_images': 50,
                        'dataset': 'cifar10', 'split': 'train', 'kid_features': 20,
                        'inception_weights': 'inception_fid.npz'}
  assert stats.features.dtype == np.float32
  np.testing.assert_allclose(stats.features, feats, rtol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    stats_files.load_stats(path, resize='torch')  # same convention: silent
  with pytest.raises(ValueError, match=r'features must be \(K, 8\)'):
    stats_files.save_stats(path, mu, sigma, 50, features=feats[:, :3])


def test_stats_of_another_resize_convention_are_refused(tmp_path):
  rng = np.random.default_rng(3)
  mu, sigma = random_stats(rng, 30, 4)
  path = str(tmp_path / 'tf1.npz')
  stats_files.save_stats(path, mu, sigma, 30, resize='tf1', dataset='cifar10', split='train')
  with pytest.raises(ConfigError) as info:
    stats_files.load_stats(path, resize='torch')
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith("eval.fid_resize='torch' but the reference statistics ")
  assert "made with resize='tf1'" in message and '--resize=torch' in message
  with pytest.raises(ConfigError, match='fid_resize'):
    stats_files.check_stats_convention(stats_files.read_stats(path).meta, 'torch', path)
  assert stats_files.load_stats(path, resize='tf1')[2] == 30
  # An old file (mu, sigma, n only) is accepted with a warning, and has no meta or features.
  old = str(tmp_path / 'old.npz')
  np.savez(old, mu=mu, sigma=sigma, n=np.asarray(30))
  with pytest.warns(UserWarning, match='do not record their resize convention'):
    mu2, _, n = stats_files.load_stats(old, resize='torch')
  np.testing.assert_array_equal(mu2, mu)
  stats = stats_files.read_stats(old)
  assert stats.meta == {} and stats.features is None and stats.n == 30
  # A file written without a convention records None: also a warning, not an error.
  unknown = str(tmp_path / 'unknown.npz')
  stats_files.save_stats(unknown, mu, sigma, 30)
  with pytest.warns(UserWarning):
    stats_files.load_stats(unknown, resize='tf1')


# ---- KID ---------------------------------------------------------------------------------------------
def mmd2_direct(x, y):
  """O(m^2) double loops of the unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, in float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  m, d = x.shape
  k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_matches_direct_formula():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(15, 6))
  b = rng.normal(size=(12, 6)) + 0.3
  want = mmd2_direct(a[:12], b)
  np.testing.assert_allclose(kid.polynomial_mmd2_unbiased(a[:12], b), want, rtol=1e-12)
  # Subsets: each draws rows of a, then rows of b, without replacement from default_rng(seed).
  mean, std = kid.kid(a, b, num_subsets=5, subset_size=8, seed=7)
  draws = np.random.default_rng(7)
  values = []
  for _ in range(5):
    rows_a = draws.choice(15, 8, replace=False)
    rows_b = draws.choice(12, 8, replace=False)
    values.append(mmd2_direct(a[rows_a], b[rows_b]))
  np.testing.assert_allclose([mean, std], [np.mean(values), np.std(values)], rtol=1e-10)
  # The subset size is clipped to the smaller set: with all rows the subsets are the whole sets.
  mean, std = kid.kid(a[:12], b, num_subsets=3, subset_size=1000)
  np.testing.assert_allclose(mean, want, rtol=1e-12)
  assert std < 1e-12
  assert kid.kid(a, b, num_subsets=4, subset_size=8, seed=1) == kid.kid(a, b, num_subsets=4,
                                                                           subset_size=8, seed=1)
  with pytest.raises(ValueError, match='same D'):
    kid.kid(a, b[:, :5])


def test_kid_is_zero_for_one_distribution_and_positive_for_shifted():
  rng = np.random.default_rng(5)
  d = 64
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  sample = lambda n, shift=0.0: np.maximum(rng.normal(size=(n, d)) @ mix + 0.5 + shift, 0)
  same_mean, same_std = kid.kid(sample(2000), sample(2000), num_subsets=20, subset_size=500)
  shifted_mean, shifted_std = kid.kid(sample(2000), sample(2000, 0.1), num_subsets=20,
                                      subset_size=500)
  # Unbiased: about 0, well within the spread over subsets (single estimates can be negative).
  assert abs(same_mean) < 0.5 * same_std
  # A shift of 0.1 (features are O(1)) stands out of the spread, and is 20x the same-set value.
  assert shifted_mean > 3 * shifted_std and shifted_mean > 20 * abs(same_mean)
