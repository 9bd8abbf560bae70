"""A fast offline quality metric for the embedded 8x8 digits (Inception-free FID).

Inception features mean nothing on 8x8 grey digits, and the real protocol needs a weight file that
cannot be downloaded offline. This module ships a tiny classifier trained on the digits themselves
(tract_jax/assets/digits_features.npz): an MLP 64 -> 128 -> 64 -> 10 with tanh hidden layers; the
features are the 64 pre-activations of the second hidden layer. The FID of a sample set is the
Frechet distance between its features and those of all 1,797 dataset images (statistics stored in
the same file; held-out accuracy of the classifier 98.9%). Inputs are snapped to uint8 levels first,
like the Inception protocol. Inference is NumPy float64 (deterministic on every platform, nothing
to compile).

Scale of the shipped weights (`python -m tract_jax.evaluation.digits_metric` prints it), against
the whole dataset unless noted:
  real half vs the other half (898/899 images)   0.55
  real half (898 images)                         0.14
  digits blurred, Gaussian sigma 0.5 / 1 pixel   2.8 / 35
  digits shifted right by 1 pixel                60
  N(0, 1) noise (clipped) / uniform noise        46 / 52
Like every FID it is biased upward at small sample counts (random real subsets: 5.1 +- 0.8 at 64
images, 1.06 +- 0.4 at 256, 0.17 at 900): compare sets of equal size.

Rebuild the weights (about 10 s on 2 CPU cores, fixed seed, 80/20 train/test split; the shipped
classifier saw only the training 80%):
  python -m tract_jax.evaluation.digits_metric --retrain
"""
import importlib.resources
from typing import Dict, Optional

import numpy as np

from tract_jax import writers
from tract_jax.evaluation import fid as fid_lib

ASSET = 'digits_features.npz'
HIDDEN = (128, 64)
NUM_CLASSES = 10
SEED = 0
TEST_FRACTION = 0.2


def quantize_uint8(images) -> np.ndarray:
  """[-1, 1] -> round((x + 1) * 127.5) clipped to 0..255, back to [-1, 1]; float64, same shape."""
  return writers.to_uint8(images).astype(np.float64) / 127.5 - 1.0


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


def _split(n: int, seed: int = SEED, test_fraction: float = TEST_FRACTION):
  perm = np.random.default_rng(seed).permutation(n)
  n_test = int(round(test_fraction * n))
  return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _forward_numpy(weights: Dict[str, np.ndarray], x: np.ndarray):
  """(N, 64) float64 inputs -> (features (N, 64), logits (N, 10)).

  The features are the second hidden layer BEFORE its tanh: linear features do not saturate, so
  images far from the data (noise) land far away instead of being squashed onto the data's range.
  """
  h = np.tanh(x @ weights['w1'] + weights['b1'])
  feats = h @ weights['w2'] + weights['b2']
  return feats, np.tanh(feats) @ weights['w3'] + weights['b3']


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

  @staticmethod
  def _inputs(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.shape[1:] != (8, 8, 1):
      raise ValueError(f'digits images must be (N, 8, 8, 1) in [-1, 1], got shape {images.shape}')
    return quantize_uint8(images).reshape(len(images), 64)

  def features(self, images) -> np.ndarray:
    """(N, 8, 8, 1) images in [-1, 1] (uint8-quantised first) -> (N, 64) float64 features."""
    return _forward_numpy(self.weights, self._inputs(images))[0]

  def logits(self, images) -> np.ndarray:
    """(N, 8, 8, 1) images in [-1, 1] -> (N, 10) class logits."""
    return _forward_numpy(self.weights, self._inputs(images))[1]

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


# ---------------------------------------------------------------------------------------------------
# Training (only for --retrain; JAX + optax, float32, full batch).
# ---------------------------------------------------------------------------------------------------
def train_feature_net(images, labels, seed: int = SEED, steps: int = 1000, lr: float = 3e-3,
                      l2: float = 1e-4, noise_std: float = 0.2,
                      label_smoothing: float = 0.1) -> Dict[str, np.ndarray]:
  """Trains the MLP on (N, 8, 8, 1) images in [-1, 1] and (N,) labels; returns float32 weights.

  Full-batch Adam (cosine decay) on cross-entropy with label smoothing, an L2 penalty on the kernels
  and Gaussian input noise (fixed seed): regularised so that the features vary smoothly around the
  data instead of collapsing every image onto its class prototype.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  x = jnp.asarray(DigitsMetric._inputs(images), jnp.float32)
  targets = optax.smooth_labels(jax.nn.one_hot(jnp.asarray(labels), NUM_CLASSES), label_smoothing)
  key = jax.random.PRNGKey(seed)
  sizes = (64,) + HIDDEN + (NUM_CLASSES,)
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
    key, sub = jax.random.split(key)
    params[f'w{i}'] = jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in)
    params[f'b{i}'] = jnp.zeros((fan_out,))

  def loss_fn(params, noise):
    h = jnp.tanh((x + noise) @ params['w1'] + params['b1'])
    h = jnp.tanh(h @ params['w2'] + params['b2'])
    logits = h @ params['w3'] + params['b3']
    penalty = sum(jnp.sum(jnp.square(params[f'w{i}'])) for i in range(1, len(sizes)))
    return optax.softmax_cross_entropy(logits, targets).mean() + l2 * penalty

  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))

  @jax.jit
  def run(params, key):
    def step(carry, key):
      params, opt_state = carry
      noise = noise_std * jax.random.normal(key, x.shape)
      loss, grads = jax.value_and_grad(loss_fn)(params, noise)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))
    return params, losses

  params, losses = run(params, key)
  print(f'  train loss {float(losses[0]):.3f} -> {float(losses[-1]):.4f} in {steps} steps')
  return {k: np.asarray(v, np.float32) for k, v in params.items()}


def blur(images, sigma: float = 1.0) -> np.ndarray:
  """Gaussian blur of (N, H, W, C) images (edge pixels repeated), for the scale report."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  return ndimage.gaussian_filter(np.asarray(images, np.float64), sigma=(0, sigma, sigma, 0),
                                 mode='nearest')


def scale_report(metric: DigitsMetric, images: np.ndarray, seed: int = SEED) -> Dict[str, float]:
  """FIDs that show the metric's scale: real halves, noise, blurred and shifted digits."""
  rng = np.random.default_rng(seed)
  n = len(images)
  perm = rng.permutation(n)
  half_a, half_b = images[perm[:n // 2]], images[perm[n // 2:]]
  mu_b, sigma_b = fid_lib.stats_from_features(metric.features(half_b))
  mu_a, sigma_a = fid_lib.stats_from_features(metric.features(half_a))
  noise = rng.standard_normal(images.shape)
  shifted = np.full_like(images, -1.0)
  shifted[:, :, 1:] = images[:, :, :-1]
  return {
      'real_half_vs_half': fid_lib.frechet_distance(mu_a, sigma_a, mu_b, sigma_b),
      'real_all_vs_dataset': metric.fid(images),
      'real_half_vs_dataset': metric.fid(half_a),
      'gaussian_noise_vs_dataset': metric.fid(noise),
      'uniform_noise_vs_dataset': metric.fid(rng.uniform(-1.0, 1.0, images.shape)),
      'blur_sigma0.5_vs_dataset': metric.fid(blur(images, 0.5)),
      'blur_sigma1_vs_dataset': metric.fid(blur(images, 1.0)),
      'shift_1px_vs_dataset': metric.fid(shifted),
  }


def retrain(output: str, seed: int = SEED, steps: int = 1000) -> Dict[str, np.ndarray]:
  """Trains on the 80% split, measures held-out accuracy, stores weights + full-dataset statistics."""
  from tract_jax import data  # pylint: disable=g-import-not-at-top
  source = data.load_digits()
  batch = source.get(np.arange(len(source)))
  images, labels = batch['image'], batch['label']
  train_idx, test_idx = _split(len(images), seed)
  weights = train_feature_net(images[train_idx], labels[train_idx], seed=seed, steps=steps)
  w64 = {k: v.astype(np.float64) for k, v in weights.items()}
  _, logits = _forward_numpy(w64, DigitsMetric._inputs(images))
  pred = logits.argmax(axis=1)
  test_acc = float(np.mean(pred[test_idx] == labels[test_idx]))
  train_acc = float(np.mean(pred[train_idx] == labels[train_idx]))
  feats, _ = _forward_numpy(w64, DigitsMetric._inputs(images))
  mu, sigma = fid_lib.stats_from_features(feats)
  arrays = dict(weights, mu=mu, sigma=sigma, n=np.asarray(len(images), np.int64),
                test_accuracy=np.asarray(test_acc), train_accuracy=np.asarray(train_acc),
                seed=np.asarray(seed), steps=np.asarray(steps),
                test_fraction=np.asarray(TEST_FRACTION))
  np.savez(output, **arrays)
  print(f'wrote {output}: train accuracy {train_acc:.4f}, held-out accuracy {test_acc:.4f} '
        f'({len(test_idx)} test images)')
  return arrays


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description='Digits feature network: retrain and/or report scale.')
  parser.add_argument('--retrain', action='store_true', help='train and write the weight file')
  parser.add_argument('--output', default=None,
                      help='weight file to write (default: the packaged asset)')
  parser.add_argument('--seed', type=int, default=SEED)
  parser.add_argument('--steps', type=int, default=1000)
  args = parser.parse_args(argv)
  path = args.output
  if args.retrain:
    if path is None:
      path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'assets',
                          ASSET)
    retrain(path, args.seed, args.steps)
  from tract_jax import data  # pylint: disable=g-import-not-at-top
  metric = DigitsMetric(path)
  source = data.load_digits()
  batch = source.get(np.arange(len(source)))
  print(f'held-out accuracy of the feature network: {metric.test_accuracy:.4f}')
  print('scale (Frechet distance of 64-d features; lower is better):')
  for name, value in scale_report(metric, batch['image']).items():
    print(f'  {name:28s} {value:10.4f}')
  acc = metric.accuracy_confidence(batch['image'], batch['label'])
  print('classifier on the whole dataset: ' + ', '.join(f'{k} {v:.4f}' for k, v in acc.items()))


if __name__ == '__main__':
  main()
