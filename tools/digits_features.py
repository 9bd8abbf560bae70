"""The digits metric's feature network (tract_jax/evaluation/digits_metric.py): retrain it, and print
the scale of its FID.

  python tools/digits_features.py              # scale of the shipped weights
  python tools/digits_features.py --retrain [--output=FILE] [--seed=0] [--steps=1000]

--retrain trains the MLP 64 -> 128 -> 64 -> 10 on the 80% split of the embedded digits (about 10 s
on 2 CPU cores, fixed seed), measures the held-out accuracy and writes the weights with the whole
dataset's feature statistics (default: the packaged tract_jax/assets/digits_features.npz).
"""
import os
import sys
from typing import Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from scipy import ndimage  # noqa: E402

from tract_jax import data  # noqa: E402
from tract_jax.evaluation import digits_metric  # noqa: E402
from tract_jax.evaluation import fid as fid_lib  # noqa: E402
from tract_jax.evaluation.digits_metric import DigitsMetric  # noqa: E402

HIDDEN = (128, 64)
NUM_CLASSES = 10
SEED = 0
TEST_FRACTION = 0.2

FLAGS = flags.FLAGS
if __name__ == '__main__':
  flags.DEFINE_bool('retrain', False, 'Train and write the weight file.')
  flags.DEFINE_string('output', None, 'Weight file to write (default: the packaged asset).')
  flags.DEFINE_integer('seed', SEED, 'Seed of the split, the initialisation and the input noise.')
  flags.DEFINE_integer('steps', 1000, 'Full-batch Adam steps.')


def _split(n: int, seed: int = SEED, test_fraction: float = TEST_FRACTION):
  perm = np.random.default_rng(seed).permutation(n)
  n_test = int(round(test_fraction * n))
  return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def train_feature_net(images, labels, seed: int = SEED, steps: int = 1000, lr: float = 3e-3,
                      l2: float = 1e-4, noise_std: float = 0.2,
                      label_smoothing: float = 0.1) -> Dict[str, np.ndarray]:
  """Trains the MLP on (N, 8, 8, 1) images in [-1, 1] and (N,) labels; returns float32 weights.

  Full-batch Adam (cosine decay) on cross-entropy with label smoothing, an L2 penalty on the kernels
  and Gaussian input noise (fixed seed): regularised so that the features vary smoothly around the
  data instead of collapsing every image onto its class prototype.
  """
  x = jnp.asarray(digits_metric.inputs(images), jnp.float32)
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
  source = data.load_digits()
  batch = source.get(np.arange(len(source)))
  images, labels = batch['image'], batch['label']
  train_idx, test_idx = _split(len(images), seed)
  weights = train_feature_net(images[train_idx], labels[train_idx], seed=seed, steps=steps)
  w64 = {k: v.astype(np.float64) for k, v in weights.items()}
  _, logits = digits_metric.forward_numpy(w64, digits_metric.inputs(images))
  pred = logits.argmax(axis=1)
  test_acc = float(np.mean(pred[test_idx] == labels[test_idx]))
  train_acc = float(np.mean(pred[train_idx] == labels[train_idx]))
  feats, _ = digits_metric.forward_numpy(w64, digits_metric.inputs(images))
  mu, sigma = fid_lib.stats_from_features(feats)
  arrays = dict(weights, mu=mu, sigma=sigma, n=np.asarray(len(images), np.int64),
                test_accuracy=np.asarray(test_acc), train_accuracy=np.asarray(train_acc),
                seed=np.asarray(seed), steps=np.asarray(steps),
                test_fraction=np.asarray(TEST_FRACTION))
  np.savez(output, **arrays)
  print(f'wrote {output}: train accuracy {train_acc:.4f}, held-out accuracy {test_acc:.4f} '
        f'({len(test_idx)} test images)')
  return arrays


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  path = FLAGS.output
  if FLAGS.retrain:
    path = path or os.path.join(ROOT, 'tract_jax', 'assets', digits_metric.ASSET)
    retrain(path, FLAGS.seed, FLAGS.steps)
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
  app.run(main)
