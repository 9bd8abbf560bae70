"""Converts pytorch-fid's FID Inception weights to our .npz tree.

  python -m tract_jax.evaluation.convert_inception \
      --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz

The input is the PyTorch state_dict of pytorch-fid's `fid_inception_v3()` (download it on a machine
with internet from pytorch-fid's release page, FID_WEIGHTS_URL in pytorch_fid/inception.py). Only
this command needs PyTorch (`pip install torch`, CPU build is enough); the conversion itself is the
pure function `convert_state_dict` on a dict of NumPy arrays.

Key mapping (PyTorch -> ours, '/'-separated in the .npz):
  X.conv.weight (O, I, kh, kw)  -> params/X/conv/kernel (kh, kw, I, O)
  X.bn.weight / X.bn.bias       -> params/X/bn/scale / params/X/bn/bias
  X.bn.running_mean / _var      -> batch_stats/X/bn/mean / batch_stats/X/bn/var
  fc.weight (1008, 2048)        -> params/fc/kernel (2048, 1008); fc.bias -> params/fc/bias
where X is e.g. 'Conv2d_1a_3x3' or 'Mixed_5b.branch1x1' (dots become '/'). num_batches_tracked and
AuxLogits.* entries (if a file has them) are dropped.

With --golden_output=golden.npz (and pytorch-fid installed) it also stores pytorch-fid's features of
a few fixed 299x299 images; point TRACT_INCEPTION_WEIGHTS and TRACT_INCEPTION_GOLDEN at the two files
to run the golden test of tests/test_inception.py.
"""
from typing import Dict, List, Tuple

import numpy as np

NUM_LOGITS = 1008


def _inception_a(block: str, cin: int, pool_features: int):
  return [(f'{block}.branch1x1', 64, cin, 1, 1),
          (f'{block}.branch5x5_1', 48, cin, 1, 1), (f'{block}.branch5x5_2', 64, 48, 5, 5),
          (f'{block}.branch3x3dbl_1', 64, cin, 1, 1), (f'{block}.branch3x3dbl_2', 96, 64, 3, 3),
          (f'{block}.branch3x3dbl_3', 96, 96, 3, 3),
          (f'{block}.branch_pool', pool_features, cin, 1, 1)]


def _inception_b(block: str, cin: int):
  return [(f'{block}.branch3x3', 384, cin, 3, 3),
          (f'{block}.branch3x3dbl_1', 64, cin, 1, 1), (f'{block}.branch3x3dbl_2', 96, 64, 3, 3),
          (f'{block}.branch3x3dbl_3', 96, 96, 3, 3)]


def _inception_c(block: str, cin: int, c7: int):
  return [(f'{block}.branch1x1', 192, cin, 1, 1),
          (f'{block}.branch7x7_1', c7, cin, 1, 1), (f'{block}.branch7x7_2', c7, c7, 1, 7),
          (f'{block}.branch7x7_3', 192, c7, 7, 1),
          (f'{block}.branch7x7dbl_1', c7, cin, 1, 1), (f'{block}.branch7x7dbl_2', c7, c7, 7, 1),
          (f'{block}.branch7x7dbl_3', c7, c7, 1, 7), (f'{block}.branch7x7dbl_4', c7, c7, 7, 1),
          (f'{block}.branch7x7dbl_5', 192, c7, 1, 7),
          (f'{block}.branch_pool', 192, cin, 1, 1)]


def _inception_d(block: str, cin: int):
  return [(f'{block}.branch3x3_1', 192, cin, 1, 1), (f'{block}.branch3x3_2', 320, 192, 3, 3),
          (f'{block}.branch7x7x3_1', 192, cin, 1, 1), (f'{block}.branch7x7x3_2', 192, 192, 1, 7),
          (f'{block}.branch7x7x3_3', 192, 192, 7, 1), (f'{block}.branch7x7x3_4', 192, 192, 3, 3)]


def _inception_e(block: str, cin: int):
  return [(f'{block}.branch1x1', 320, cin, 1, 1),
          (f'{block}.branch3x3_1', 384, cin, 1, 1), (f'{block}.branch3x3_2a', 384, 384, 1, 3),
          (f'{block}.branch3x3_2b', 384, 384, 3, 1),
          (f'{block}.branch3x3dbl_1', 448, cin, 1, 1), (f'{block}.branch3x3dbl_2', 384, 448, 3, 3),
          (f'{block}.branch3x3dbl_3a', 384, 384, 1, 3), (f'{block}.branch3x3dbl_3b', 384, 384, 3, 1),
          (f'{block}.branch_pool', 192, cin, 1, 1)]


def torch_conv_table() -> List[Tuple[str, int, int, int, int]]:
  """Every BasicConv2d of pytorch-fid's FID Inception-v3: (module name, out_ch, in_ch, kh, kw).

  Written from the torchvision Inception3 definition with pytorch-fid's replacements
  (independently of the Flax module, so the two can be checked against each other).
  """
  return ([('Conv2d_1a_3x3', 32, 3, 3, 3), ('Conv2d_2a_3x3', 32, 32, 3, 3),
           ('Conv2d_2b_3x3', 64, 32, 3, 3), ('Conv2d_3b_1x1', 80, 64, 1, 1),
           ('Conv2d_4a_3x3', 192, 80, 3, 3)]
          + _inception_a('Mixed_5b', 192, 32) + _inception_a('Mixed_5c', 256, 64)
          + _inception_a('Mixed_5d', 288, 64) + _inception_b('Mixed_6a', 288)
          + _inception_c('Mixed_6b', 768, 128) + _inception_c('Mixed_6c', 768, 160)
          + _inception_c('Mixed_6d', 768, 160) + _inception_c('Mixed_6e', 768, 192)
          + _inception_d('Mixed_7a', 768) + _inception_e('Mixed_7b', 1280)
          + _inception_e('Mixed_7c', 2048))


def expected_torch_shapes() -> Dict[str, Tuple[int, ...]]:
  """{state_dict key: shape} that `convert_state_dict` requires (num_batches_tracked excluded)."""
  shapes = {}
  for name, cout, cin, kh, kw in torch_conv_table():
    shapes[f'{name}.conv.weight'] = (cout, cin, kh, kw)
    for leaf in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{name}.bn.{leaf}'] = (cout,)
  shapes['fc.weight'] = (NUM_LOGITS, 2048)
  shapes['fc.bias'] = (NUM_LOGITS,)
  return shapes


_BN_LEAVES = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
              'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def _ignored(key: str) -> bool:
  return key.endswith('num_batches_tracked') or key.startswith('AuxLogits.')


def convert_state_dict(state_dict: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """PyTorch state_dict (NumPy arrays) -> flat {'params/...': array, 'batch_stats/...': array}.

  Args:
    state_dict: every key of `expected_torch_shapes()` with that shape (extra num_batches_tracked /
      AuxLogits.* keys are dropped; an optional 'module.' prefix from DataParallel is stripped).

  Returns:
    float32 arrays under '/'-separated keys; conv kernels HWIO (kh, kw, in, out), fc kernel (in, out).

  Raises:
    ValueError: listing missing, unexpected and mis-shaped keys.
  """
  state_dict = {k[len('module.'):] if k.startswith('module.') else k: np.asarray(v)
                for k, v in state_dict.items()}
  expected = expected_torch_shapes()
  problems = [f'missing {k} {s}' for k, s in expected.items() if k not in state_dict]
  problems += [f'unexpected {k} {tuple(v.shape)}' for k, v in state_dict.items()
               if k not in expected and not _ignored(k)]
  problems += [f'{k}: shape {tuple(state_dict[k].shape)}, expected {s}'
               for k, s in expected.items() if k in state_dict and tuple(state_dict[k].shape) != s]
  if problems:
    raise ValueError('not a pytorch-fid FID Inception state_dict:\n  ' + '\n  '.join(problems[:20])
                     + (f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''))
  out = {}
  for key in expected:
    value = state_dict[key].astype(np.float32)
    module, kind, leaf = key.rsplit('.', 2) if key.count('.') >= 2 else ('', *key.split('.'))
    path = module.replace('.', '/')
    if key == 'fc.weight':
      out['params/fc/kernel'] = np.ascontiguousarray(value.T)
    elif key == 'fc.bias':
      out['params/fc/bias'] = value
    elif kind == 'conv':
      out[f'params/{path}/conv/kernel'] = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    else:  # bn
      collection, name = _BN_LEAVES[leaf]
      out[f'{collection}/{path}/bn/{name}'] = value
  return out


def _load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit('convert_inception needs PyTorch to read the .pth file: pip install torch '
                     '(the CPU build is enough; nothing else in tract_jax uses it)') from e
  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  if 'state_dict' in state_dict and not any(k.endswith('.weight') for k in state_dict):
    state_dict = state_dict['state_dict']
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def golden_images(num: int = 4, seed: int = 0) -> np.ndarray:
  """Deterministic (num, 299, 299, 3) float32 test images on uint8 levels in [-1, 1]: smooth colour
  gradients plus blocks and noise, already 299x299 so that no resize is involved."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, 299), np.linspace(0, 1, 299), indexing='ij')
  images = []
  for _ in range(num):
    freq = rng.uniform(1, 6, size=(3, 2))
    phase = rng.uniform(0, 2 * np.pi, size=3)
    img = np.stack([np.sin(2 * np.pi * (f[0] * yy + f[1] * xx) + p) for f, p in zip(freq, phase)], -1)
    y0, x0 = rng.integers(0, 200, size=2)
    img[y0:y0 + 80, x0:x0 + 80] = rng.uniform(-1, 1, size=3)
    img = 0.8 * img + 0.2 * rng.uniform(-1, 1, size=img.shape)
    images.append(np.clip(np.round((img + 1) * 127.5), 0, 255) / 127.5 - 1)
  return np.asarray(images, np.float32)


def write_golden(pth_path: str, output: str, num: int = 4) -> None:
  """pytorch-fid's pool3 features of `golden_images()` -> .npz {'images', 'features'}.

  Needs torch and pytorch-fid (`pip install pytorch-fid`); reads the weights from `pth_path` instead
  of downloading them. tests/test_inception.py compares our network against this file when
  TRACT_INCEPTION_GOLDEN names it.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from pytorch_fid import inception as pt_inception  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit('--golden_output needs torch and pytorch-fid: '
                     'pip install torch pytorch-fid') from e
  # fid_inception_v3() fetches FID_WEIGHTS_URL through this module-level name: serve the local file.
  pt_inception.load_state_dict_from_url = (
      lambda *args, **kwargs: torch.load(pth_path, map_location='cpu', weights_only=True))
  model = pt_inception.InceptionV3([pt_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                                   resize_input=False, normalize_input=False,
                                   use_fid_inception=True).eval()
  images = golden_images(num)
  with torch.no_grad():
    feats = model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))[0]
  np.savez(output, images=images, features=feats.reshape(num, -1).numpy().astype(np.float32))
  print(f'wrote {output}: pytorch-fid features of {num} golden images')


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--input', required=True, help='pt_inception-2015-12-05-6726825d.pth')
  parser.add_argument('--output', required=True, help='.npz to write')
  parser.add_argument('--golden_output', default=None,
                      help='also write pytorch-fid features of fixed images here (needs pytorch-fid)')
  args = parser.parse_args(argv)
  flat = convert_state_dict(_load_torch_state_dict(args.input))
  from tract_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  inception.check_variables(inception.unflatten_tree(flat))
  np.savez(args.output, **flat)
  n = sum(int(np.prod(v.shape)) for k, v in flat.items() if k.startswith('params/'))
  print(f'wrote {args.output}: {len(flat)} arrays, {n:,} parameters')
  if args.golden_output:
    write_golden(args.input, args.golden_output)


if __name__ == '__main__':
  main()
