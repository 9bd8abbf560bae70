"""A fast offline quality metric for the embedded 8x8 digits (Inception-free FID).

Inception features mean nothing on 8x8 grey digits, and the real protocol needs a weight file that
cannot be downloaded offline. This module ships a tiny classifier trained on the digits themselves
(tract_jax/assets/digits_features.npz): an MLP 64 -> 128 -> 64 -> 10 with tanh hidden layers; the
features are the 64 pre-activations of the second hidden layer. The FID of a sample set is the
Frechet distance between its features and those of all 1,797 dataset images (statistics stored in
the same file; held-out accuracy of the classifier 98.9%). Inputs are snapped to uint8 levels first,
like the Inception protocol. Inference is NumPy float64 (deterministic on every platform, nothing
to compile).

Scale of the shipped weights (`python tools/digits_features.py` prints it), against
the whole dataset unless noted:
  real half vs the other half (898/899 images)   0.55
  real half (898 images)                         0.14
  digits blurred, Gaussian sigma 0.5 / 1 pixel   2.8 / 35
  digits shifted right by 1 pixel                60
  N(0, 1) noise (clipped) / uniform noise        46 / 52
Like every FID it is biased upward at small sample counts (random real subsets: 5.1 +- 0.8 at 64
images, 1.06 +- 0.4 at 256, 0.17 at 900): compare sets of equal size.

The classifier's trainer is a tool, not part of the runtime (about 10 s on 2 CPU cores, fixed seed,
80/20 train/test split; the shipped classifier saw only the training 80%):
  python tools/digits_features.py --retrain   # rebuild the weights; without --retrain: the scale
"""
import importlib.resources
from typing import Dict, Optional

import numpy as np

from tract_jax import quantize
from tract_jax.evaluation import fid as fid_lib

ASSET = 'digits_features.npz'


def quantize_uint8(images) -> np.ndarray:
  """[-1, 1] -> the nearest uint8 level (quantize.py), back to [-1, 1]; float64, same shape."""
  levels = quantize.uint8_levels(np.asarray(images, np.float32)).astype(np.float64)
  return quantize.from_levels(levels)


def teacher_agreement_rmse(student_images, teacher_images) -> float:
  """RMSE between two sample sets on the uint8 grid, in [-1, 1] units.

  Args:
    student_images: (N, H, W, C) in [-1, 1].
    teacher_images: (N, H, W, C) in [-1, 1], the same noise sampled by the teacher.

  Returns:
    sqrt(mean((q(student) - q(teacher))^2)) with q = `quantize_uint8`.
  """
  a, b = quantize_uint8(student_images), quantize_uint8(teacher_images)
  if a.shape != b.shape:
    raise ValueError(f'shape mismatch: {a.shape} vs {b.shape}')
  return float(np.sqrt(np.mean(np.square(a - b))))


def forward_numpy(weights: Dict[str, np.ndarray], x: np.ndarray):
  """(N, 64) float64 inputs -> (features (N, 64), logits (N, 10)).

  The features are the second hidden layer BEFORE its tanh: linear features do not saturate, so
  images far from the data (noise) land far away instead of being squashed onto the data's range.
  """
  h = np.tanh(x @ weights['w1'] + weights['b1'])
  feats = h @ weights['w2'] + weights['b2']
  return feats, np.tanh(feats) @ weights['w3'] + weights['b3']


def inputs(images) -> np.ndarray:
  """(N, 8, 8, 1) (or (N, 8, 8)) images in [-1, 1] -> the network's (N, 64) float64 inputs,
  snapped to uint8 levels first."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[1:] != (8, 8, 1):
    raise ValueError(f'digits images must be (N, 8, 8, 1) in [-1, 1], got shape {images.shape}')
  return quantize_uint8(images).reshape(len(images), 64)


class DigitsMetric:
  """Feature network, dataset statistics and scores for 8x8 digit samples.

  Args:
    path: weight file; default the packaged tract_jax/assets/digits_features.npz.
  """

  def __init__(self, path: Optional[str] = None):
    if path is None:
      ref = importlib.resources.files('tract_jax.assets').joinpath(ASSET)
      with ref.open('rb') as f:
        arrays = dict(np.load(f))
    else:
      with np.load(path) as f:
        arrays = dict(f)
    self.weights = {k: arrays[k].astype(np.float64) for k in ('w1', 'b1', 'w2', 'b2', 'w3', 'b3')}
    self.mu = arrays['mu'].astype(np.float64)
    self.sigma = arrays['sigma'].astype(np.float64)
    self.n = int(arrays['n'])
    self.test_accuracy = float(arrays['test_accuracy'])

  def features(self, images) -> np.ndarray:
    """(N, 8, 8, 1) images in [-1, 1] (uint8-quantised first) -> (N, 64) float64 features."""
    return forward_numpy(self.weights, inputs(images))[0]

  def logits(self, images) -> np.ndarray:
    """(N, 8, 8, 1) images in [-1, 1] -> (N, 10) class logits."""
    return forward_numpy(self.weights, inputs(images))[1]

  def fid(self, images) -> float:
    """Frechet distance of the images' features to the whole dataset's (needs N >= 2 images)."""
    mu, sigma = fid_lib.stats_from_features(self.features(images))
    return fid_lib.frechet_distance(mu, sigma, self.mu, self.sigma)

  def accuracy_confidence(self, images, labels=None) -> Dict[str, float]:
    """Classifier view of a sample set.

    Args:
      images: (N, 8, 8, 1) in [-1, 1].
      labels: optional (N,) int class labels (class-conditional samples).

    Returns:
      'confidence': mean max softmax probability (recognisable digits score high);
      'class_entropy': entropy (nats) of the mean predicted class distribution (diversity; ln 10 =
        2.303 when the classes are balanced); 'accuracy' (only with labels): fraction classified as
        their label.
    """
    logits = self.logits(images)
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    mean_p = probs.mean(axis=0)
    out = {'confidence': float(probs.max(axis=1).mean()),
           'class_entropy': float(-np.sum(mean_p * np.log(np.maximum(mean_p, 1e-12))))}
    if labels is not None:
      out['accuracy'] = float(np.mean(probs.argmax(axis=1) == np.asarray(labels)))
    return out
