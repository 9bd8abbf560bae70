"""tract_jax.evaluation.digits_metric: the shipped feature network, its FID scale, teacher agreement."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))

from digits_features import blur  # noqa: E402  (tools/digits_features.py)
from tract_jax import data  # noqa: E402
from tract_jax.evaluation import digits_metric, fid  # noqa: E402


@pytest.fixture(scope='module')
def digits():
  source = data.load_digits()
  return source.get(np.arange(len(source)))


@pytest.fixture(scope='module')
def metric():
  return digits_metric.DigitsMetric()


def test_shipped_network_classifies_and_stats_match(metric, digits):
  assert metric.test_accuracy >= 0.97  # held-out 20% split, recorded by --retrain
  assert metric.n == len(digits['image']) == 1797
  feats = metric.features(digits['image'])
  assert feats.shape == (1797, 64) and feats.dtype == np.float64
  mu, sigma = fid.stats_from_features(feats)
  np.testing.assert_allclose(mu, metric.mu, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sigma, metric.sigma, rtol=1e-6, atol=1e-6)
  scores = metric.accuracy_confidence(digits['image'], digits['label'])
  assert scores['accuracy'] > 0.97 and scores['confidence'] > 0.8
  assert abs(scores['class_entropy'] - np.log(10)) < 0.01  # classes are balanced


def test_real_digits_score_far_better_than_noise(metric, digits):
  images = digits['image']
  rng = np.random.default_rng(0)
  half = images[rng.permutation(len(images))[:900]]
  real = metric.fid(half)
  noise = metric.fid(rng.standard_normal(half.shape))
  uniform = metric.fid(rng.uniform(-1, 1, half.shape))
  blurred = metric.fid(blur(half, 0.5))
  assert real < 0.5
  assert noise > 20 and uniform > 20
  assert real < blurred < noise
  assert metric.accuracy_confidence(rng.standard_normal(half.shape))['confidence'] < 0.7


def test_metric_is_deterministic(metric, digits):
  images = digits['image'][:300]
  other = digits_metric.DigitsMetric()
  np.testing.assert_array_equal(metric.features(images), other.features(images))
  assert metric.fid(images) == other.fid(images)
  # (N, 8, 8) and (N, 8, 8, 1) are the same input; other shapes are refused.
  np.testing.assert_array_equal(metric.features(images[..., 0]), metric.features(images))
  with pytest.raises(ValueError, match='8, 8, 1'):
    metric.features(np.zeros((2, 16, 16, 3)))


def test_teacher_agreement_rmse_on_uint8_grid():
  rng = np.random.default_rng(0)
  levels = rng.integers(0, 256, size=(4, 8, 8, 1))
  teacher = levels / 127.5 - 1.0
  assert digits_metric.teacher_agreement_rmse(teacher, teacher) == 0.0
  # Offsets under half a level vanish in the quantisation.
  assert digits_metric.teacher_agreement_rmse(teacher + 0.3 / 127.5, teacher) == 0.0
  # Two levels up, clipped at 255: the RMSE counts the levels actually moved.
  student = teacher + 2.0 / 127.5
  moved = np.minimum(levels + 2, 255) - levels
  want = np.sqrt(np.mean(np.square(moved / 127.5)))
  np.testing.assert_allclose(digits_metric.teacher_agreement_rmse(student, teacher), want, rtol=1e-12)
  np.testing.assert_allclose(digits_metric.quantize_uint8([-2.0, -1.0, 1.0, 3.0]), [-1, -1, 1, 1])
  with pytest.raises(ValueError, match='shape'):
    digits_metric.teacher_agreement_rmse(teacher, teacher[:2])
