"""Training-set Inception statistics, the reference of every FID (spec section 8).

  python -m tract_jax.evaluation.reference_stats --dataset=cifar10 \
      --inception=inception_fid.npz --output=cifar10_train_stats.npz [--data_dir=...] [--max_images=N]

Images come from `tract_jax.data.load_source` (the training split, no flips), in [-1, 1]; grey
images are repeated to 3 channels. The batch is split over all local devices. The output is a
`fid.save_stats` file (mu (2048,), sigma (2048, 2048), n). Run it in a single process.
"""
from typing import Callable, Optional

import numpy as np

from tract_jax.evaluation import fid as fid_lib


def dataset_stats(source, features: Callable[[np.ndarray], np.ndarray], batch_size: int = 500,
                  max_images: Optional[int] = None, log_every: int = 10) -> fid_lib.ActivationStats:
  """Accumulates feature statistics over a random-access source, in index order.

  Args:
    source: has `len()` and `.get(indices) -> {'image': (B, H, W, C) float32 in [-1, 1], ...}`.
    features: (B, H, W, 3) images -> (B, D) features (e.g. an `inception.InceptionFeatures`).
    batch_size: images read and featurised at a time.
    max_images: use only the first max_images images (default: all).
    log_every: print progress every this many batches (0: never).

  Returns:
    The `fid.ActivationStats` accumulator (float64).
  """
  n = len(source) if max_images is None else min(int(max_images), len(source))
  stats = fid_lib.ActivationStats()
  for i, start in enumerate(range(0, n, batch_size)):
    images = np.asarray(source.get(np.arange(start, min(start + batch_size, n)))['image'])
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    stats.update(features(images))
    if log_every and (i + 1) % log_every == 0:
      print(f'  {stats.n}/{n} images', flush=True)
  return stats


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description='Training-set Inception statistics for FID.')
  parser.add_argument('--dataset', required=True, help="tract_jax.data dataset name, e.g. 'cifar10'")
  parser.add_argument('--inception', required=True, help='converted FID Inception weights (.npz)')
  parser.add_argument('--output', required=True, help='statistics file to write (.npz)')
  parser.add_argument('--data_dir', default=None, help='TFDS data directory')
  parser.add_argument('--max_images', type=int, default=None, help='only the first N images')
  parser.add_argument('--batch_size', type=int, default=500)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from tract_jax import data  # pylint: disable=g-import-not-at-top
  from tract_jax.evaluation import inception  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict({'name': args.dataset, 'data_dir': args.data_dir,
                                      'random_flip': False})
  source = data.load_source(config)
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), ('data',)) if len(devices) > 1 else None
  batch_size = -(-args.batch_size // len(devices)) * len(devices)  # round up to the device count
  features = inception.load_inception(args.inception, mesh=mesh, batch_size=batch_size)
  n = len(source) if args.max_images is None else min(args.max_images, len(source))
  print(f'{args.dataset}: {n} of {len(source)} training images, batch {batch_size} over '
        f'{len(devices)} {devices[0].platform} device(s)', flush=True)
  stats = dataset_stats(source, features, batch_size, args.max_images)
  mu, sigma, count = stats.finalize()
  fid_lib.save_stats(args.output, mu, sigma, count)
  print(f'wrote {args.output}: n={count}, |mu|={np.linalg.norm(mu):.4f}, '
        f'tr(sigma)={np.trace(sigma):.4f}')


if __name__ == '__main__':
  main()
