"""Training-set Inception statistics, the reference of every FID (spec section 8).

The paper's code (apple/ml-tract fid/compute_fid_stats.py) takes the statistics over the WHOLE
training split, less the last partial batch of its shuffled loader (batch 256): 49,920 of CIFAR-10's
50,000 training images, and about 1.28 million ImageNet-64 training images (not a 50,000 subset).
The commands for the same protocol with our pipeline (all training images, resize='torch'):

  python -m tract_jax.evaluation.reference_stats --dataset=cifar10 \
      --inception=inception_fid.npz --output=cifar10_train_stats.npz [--data_dir=DIR]
  python -m tract_jax.evaluation.reference_stats --dataset=imagenet64 \
      --inception=inception_fid.npz --output=imagenet64_train_stats.npz [--data_dir=DIR]

A 50,000-image subset (a uniformly random one, --seed) is `--max_images=50000`; for CIFAR-10 it is
the whole training set. Measured on one H200 (jax 0.11.2, precision HIGHEST, batch 500): about
2,600 images/s and an 18 s first call (compile), so CIFAR-10 takes well under a minute and the
1.28 million ImageNet-64 images about 8 minutes plus the reading.

Images come from `tract_jax.data.load_source` (the training split, no flips), in [-1, 1]; grey
images are repeated to 3 channels; the feature pipeline is `inception.InceptionFeatures` (quantise to
uint8 levels, resize to 299x299 with --resize, default 'torch' = the paper's code). The batch is
split over all local devices; run it in a single process. The output is a `stats_files.save_stats` file:
mu (2048,), sigma (2048, 2048), n, the record {resize, num_images, dataset, split, quantize,
input_size, inception_weights, kid_features}, and the features of --kid_features images (default
10,000, a uniformly random subset, 82 MB in float32; 0 to leave them out) for KID.
"""
import os
from typing import Callable, Optional, Tuple

import numpy as np

from tract_jax.evaluation import fid as fid_lib
from tract_jax.evaluation import stats_files

DEFAULT_KID_FEATURES = 10_000


def dataset_stats(source, features: Callable[[np.ndarray], np.ndarray], batch_size: int = 500,
                  max_images: Optional[int] = None, log_every: int = 10, keep_features: int = 0,
                  seed: int = 0) -> Tuple[fid_lib.ActivationStats, Optional[np.ndarray]]:
  """Accumulates feature statistics over a random-access source, reading in index order.

  Args:
    source: has `len()` and `.get(indices) -> {'image': (B, H, W, C) float32 in [-1, 1], ...}`.
    features: (B, H, W, 3) images -> (B, D) features (e.g. an `inception.InceptionFeatures`).
    batch_size: images read and featurised at a time.
    max_images: use only this many images, a uniformly random subset drawn with
      np.random.default_rng(seed) (default: all images).
    log_every: print progress every this many batches (0: never).
    keep_features: also return the features of this many images (a uniformly random subset of the
      images used, drawn with np.random.default_rng(seed + 1)), for KID; 0: none.
    seed: seed of the two subsets.

  Returns:
    The `fid.ActivationStats` accumulator (float64) and the kept (K, D) float32 features in index
    order (None when keep_features is 0).
  """
  total = len(source)
  if max_images is None or int(max_images) >= total:
    indices = np.arange(total)
  else:
    indices = np.sort(np.random.default_rng(seed).choice(total, int(max_images), replace=False))
  n = len(indices)
  keep = np.zeros(n, bool)
  if keep_features:
    keep[np.random.default_rng(seed + 1).choice(n, min(int(keep_features), n), replace=False)] = True
  stats = fid_lib.ActivationStats()
  kept = []
  for i, start in enumerate(range(0, n, batch_size)):
    images = np.asarray(source.get(indices[start:start + batch_size])['image'])
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    feats = np.asarray(features(images))
    stats.update(feats)
    if keep_features:
      kept.append(feats[keep[start:start + batch_size]].astype(np.float32))
    if log_every and (i + 1) % log_every == 0:
      print(f'  {stats.n}/{n} images', flush=True)
  return stats, (np.concatenate(kept) if keep_features else None)


def _define_flags():
  """Flags are defined only when run as a program (no clash with other modules' flags)."""
  from absl import flags
  flags.DEFINE_string('dataset', None, "tract_jax.data dataset name (data.name), e.g. 'cifar10'.")
  flags.DEFINE_string('inception', None, 'Converted FID Inception weights (.npz).')
  flags.DEFINE_string('output', None, 'Statistics file to write (.npz).')
  flags.DEFINE_string('data_dir', None, 'TFDS data directory.')
  flags.DEFINE_integer('max_images', None, 'A uniformly random subset of N images (default: the '
                       'whole split).')
  flags.DEFINE_enum('resize', 'torch', ['torch', 'tf1'],
                    "'torch': PyTorch half-pixel bilinear, the paper's code (default).")
  flags.DEFINE_integer('kid_features', DEFAULT_KID_FEATURES,
                       'Features of this many random images kept for KID (0: none).')
  flags.DEFINE_integer('seed', 0, 'Seed of the random subsets.')
  flags.DEFINE_integer('batch_size', 500, 'Images per Inception call (rounded up to the devices).')
  flags.mark_flags_as_required(['dataset', 'inception', 'output'])


def main(argv):
  import sys

  import jax
  import ml_collections
  from absl import app, flags
  from jax.sharding import Mesh
  from tract_jax import data
  from tract_jax.errors import ConfigError
  from tract_jax.evaluation import inception

  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  config = ml_collections.ConfigDict({'name': args.dataset, 'data_dir': args.data_dir,
                                      'random_flip': False})
  try:
    source = data.load_source(config)
  except ConfigError as e:
    print(f'Configuration error: {e}', file=sys.stderr)
    sys.exit(2)
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), ('data',)) if len(devices) > 1 else None
  batch_size = -(-args.batch_size // len(devices)) * len(devices)  # round up to the device count
  features = inception.load_inception(args.inception, mesh=mesh, batch_size=batch_size,
                                      resize=args.resize)
  n = len(source) if args.max_images is None else min(args.max_images, len(source))
  print(f'{args.dataset}: {n} of {len(source)} training images, resize={args.resize!r}, batch '
        f'{batch_size} over {len(devices)} {devices[0].platform} device(s)', flush=True)
  stats, kept = dataset_stats(source, features, batch_size, args.max_images,
                              keep_features=args.kid_features, seed=args.seed)
  mu, sigma, count = stats.finalize()
  stats_files.save_stats(args.output, mu, sigma, count, resize=args.resize,
                         dataset=args.dataset, split='train', features=kept,
                         meta={'quantize': True, 'input_size': inception.INPUT_SIZE,
                               'inception_weights': os.path.basename(args.inception),
                               'subset_seed': args.seed if n < len(source) else None})
  print(f'wrote {args.output}: n={count}, |mu|={np.linalg.norm(mu):.4f}, '
        f'tr(sigma)={np.trace(sigma):.4f}, {0 if kept is None else len(kept)} KID features')


if __name__ == '__main__':
  from absl import app as _app
  _define_flags()
  _app.run(main)
