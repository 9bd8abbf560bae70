"""Writes the golden file of the FID Inception test: pytorch-fid's own pool3 features of a few images.

The CI test (tests/test_inception.py::test_golden_pytorch_fid_synthetic_weights) must run without
PyTorch and without the real Inception weights (a download). So this script, run once where torch
and pytorch-fid are installed, loads deterministic synthetic weights
(`convert_inception.synthetic_state_dict(seed)`, regenerated from the seed, never stored) into
pytorch-fid's InceptionV3, used as the paper's code uses it (output block 3, resize_input=True,
normalize_input=False, inputs in [-1, 1] on uint8 levels), and stores its features of 4 images at
32x32, 64x64 (resized to 299x299 by pytorch-fid's F.interpolate) and 299x299. The test regenerates
the weights, runs our network and pipeline with resize='torch' and compares.

Made with (a separate venv; tract_jax itself does not need torch; only numpy is imported from it):

  python3 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch pytorch-fid numpy      # tested: torch 2.14.1, pytorch-fid 0.3.0
  /tmp/torchvenv/bin/python tools/make_fid_golden.py

With --pth=pt_inception-2015-12-05-6726825d.pth it uses the real weights instead (then write the
file elsewhere and point TRACT_INCEPTION_GOLDEN at it; the real weights are not redistributed here).
"""
import os
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tract_jax.evaluation import convert_inception  # noqa: E402  (NumPy only; no JAX needed)

DEFAULT_OUTPUT = os.path.join(ROOT, 'tract_jax', 'evaluation', 'golden', 'pytorch_fid_synthetic.npz')


FLAGS = flags.FLAGS
flags.DEFINE_integer('seed', 0, 'Seed of synthetic_state_dict.')
flags.DEFINE_string('pth', None, 'Real pytorch-fid weights instead of synthetic ones.')
flags.DEFINE_string('output', DEFAULT_OUTPUT, 'File to write.')
flags.DEFINE_integer('threads', 2, 'torch CPU threads.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = FLAGS

  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  if args.pth:
    if os.path.abspath(args.output) == DEFAULT_OUTPUT:
      raise SystemExit('--pth: give --output (the committed golden file is for synthetic weights)')
    state_dict = convert_inception.load_torch_state_dict(args.pth)
    extra = {'weights': np.asarray(os.path.basename(args.pth))}
  else:
    state_dict = convert_inception.synthetic_state_dict(args.seed)
    extra = {'weights': np.asarray('synthetic'), 'seed': np.asarray(args.seed)}
  start = time.time()
  out = convert_inception.write_golden(state_dict, args.output, extra=extra)
  print(f'torch {torch.__version__}, {time.time() - start:.1f} s')
  for size in (32, 64, 299):
    f32, f64 = out[f'features_{size}'].astype(np.float64), out[f'features64_{size}']
    print(f'  {size}x{size}: mean {f32.mean():.4f}, max {f32.max():.4f}, '
          f'std across images / mean {f32.std(0).mean() / f32.mean():.4f}, '
          f'float32 vs float64 max|diff|/max {np.abs(f32 - f64).max() / np.abs(f64).max():.2e}')
  print(f'  fingerprint {out["fingerprint"].tolist()}; {os.path.getsize(args.output):,} bytes')


if __name__ == '__main__':
  app.run(main)
