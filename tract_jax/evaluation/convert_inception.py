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
a few fixed images at 32x32, 64x64 and 299x299 (resized by pytorch-fid itself); point
TRACT_INCEPTION_WEIGHTS and TRACT_INCEPTION_GOLDEN at the two files to run the real-weight golden
test of tests/test_inception.py. tools/make_fid_golden.py writes the same kind of file for the
synthetic weights of `synthetic_state_dict` (the committed golden file of the CI test).
"""
from typing import Dict, List, Optional, Tuple

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


def synthetic_state_dict(seed: int = 0) -> Dict[str, np.ndarray]:
  """Deterministic stand-in weights in pytorch-fid's state_dict layout (float32 NumPy, OIHW kernels).

  Made for tests that must run without the real (non-redistributable, downloaded) weights: the
  golden test compares our network with pytorch-fid's on these weights (tools/make_fid_golden.py),
  so the generator must give the same numbers wherever it runs: it uses only
  np.random.default_rng(seed) (PCG64) draws, stable in practice across NumPy versions, and the
  golden file records `fingerprint` of the weights, so that a change would fail loudly.

  Scaled so that activations stay O(1) through the 94 conv layers: He-normal kernels
  (std sqrt(2 / fan_in)) keep the second moment through conv + ReLU, and each BatchNorm has
  running_var = scale^2 * U(0.9, 1.1) (positive), so that scale / sqrt(running_var) is close to 1;
  running_mean and bias are small (0.1 N(0, 1)).
  """
  rng = np.random.default_rng(seed)
  state = {}
  for name, cout, cin, kh, kw in torch_conv_table():
    fan_in = cin * kh * kw
    state[f'{name}.conv.weight'] = (rng.standard_normal((cout, cin, kh, kw))
                                    * np.sqrt(2.0 / fan_in)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, cout)
    state[f'{name}.bn.weight'] = scale.astype(np.float32)
    state[f'{name}.bn.bias'] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    state[f'{name}.bn.running_mean'] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    state[f'{name}.bn.running_var'] = (scale ** 2 * rng.uniform(0.9, 1.1, cout)).astype(np.float32)
  state['fc.weight'] = (rng.standard_normal((NUM_LOGITS, 2048)) / np.sqrt(2048)).astype(np.float32)
  state['fc.bias'] = np.zeros(NUM_LOGITS, np.float32)
  return state


def fingerprint(state_dict: Dict[str, np.ndarray]) -> np.ndarray:
  """(3,) float64 checksum of a state_dict: the sums of all values, of their squares, and of the
  values times their position within each array (sensitive to order and layout)."""
  total, squares, weighted = 0.0, 0.0, 0.0
  for key in sorted(state_dict):
    if _ignored(key):
      continue
    flat = np.asarray(state_dict[key], np.float64).ravel()
    total += flat.sum()
    squares += (flat * flat).sum()
    weighted += (flat * np.arange(1, flat.size + 1) / flat.size).sum()
  return np.asarray([total, squares, weighted])


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit('convert_inception needs PyTorch to read the .pth file: pip install torch '
                     '(the CPU build is enough; nothing else in tract_jax uses it)') from e
  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  if 'state_dict' in state_dict and not any(k.endswith('.weight') for k in state_dict):
    state_dict = state_dict['state_dict']
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def golden_images(num: int = 4, size: int = 299, seed: int = 0) -> np.ndarray:
  """Deterministic (num, size, size, 3) uint8 test images: smooth colour gradients, a flat block and
  an increasing share of noise (image i is (1 - 0.15 i) gradients + 0.15 i noise)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing='ij')
  images = []
  for i in range(num):
    freq = rng.uniform(0.5, 3, size=(3, 2))
    phase = rng.uniform(0, 2 * np.pi, size=3)
    img = np.stack([np.sin(2 * np.pi * (f[0] * yy + f[1] * xx) + p) for f, p in zip(freq, phase)], -1)
    y0, x0 = rng.integers(0, size // 2, size=2)
    img[y0:y0 + size // 3, x0:x0 + size // 3] = rng.uniform(-1, 1, size=3)
    img = (1 - 0.15 * i) * img + 0.15 * i * rng.uniform(-1, 1, size=img.shape)
    images.append(np.clip(np.round((img + 1) * 127.5), 0, 255).astype(np.uint8))
  return np.stack(images)


def golden_inputs(num: int = 4) -> Dict[str, np.ndarray]:
  """The inputs of the golden file: {'images_32', 'images_64', 'images_299'}, (num, S, S, 3) uint8.

  The 299x299 images are the 64x64 ones upsampled by pixel repetition (rows (i * 64) // 299), so
  that no resize is involved there but the content is not the 32x32 / 64x64 one resized.
  """
  small, large = golden_images(num, 32, seed=1), golden_images(num, 64, seed=2)
  rows = (np.arange(299) * 64) // 299
  return {'images_32': small, 'images_64': large, 'images_299': large[:, rows][:, :, rows]}


def pytorch_fid_features(state_dict: Dict[str, np.ndarray], images: np.ndarray,
                         double: bool = False) -> np.ndarray:
  """pool3 features of pytorch-fid's own InceptionV3 loaded with `state_dict`, used as the paper's
  code uses it (apple/ml-tract lib/eval): output block 3 (2048-d), resize_input=True (F.interpolate
  to 299x299, bilinear, align_corners=False), normalize_input=False, inputs in [-1, 1] quantised to
  uint8 levels. Needs torch and pytorch-fid.

  Args:
    state_dict: pytorch-fid layout, NumPy arrays (e.g. `synthetic_state_dict()` or a real .pth).
    images: (N, H, W, 3) uint8.
    double: run the network in float64 (to measure float32 round-off); default float32 as in FID.

  Returns:
    (N, 2048) float64 array.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from pytorch_fid import inception as pt_inception  # pylint: disable=g-import-not-at-top
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()
             if not _ignored(k)}
  for name, *_ in torch_conv_table():  # strict loading wants BatchNorm's step counters too
    tensors[f'{name}.bn.num_batches_tracked'] = torch.tensor(0)
  # fid_inception_v3() fetches FID_WEIGHTS_URL through this module-level name: serve our weights.
  original = pt_inception.load_state_dict_from_url
  pt_inception.load_state_dict_from_url = lambda *args, **kwargs: tensors
  try:
    model = pt_inception.InceptionV3([pt_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                                     resize_input=True, normalize_input=False,
                                     use_fid_inception=True).eval()
  finally:
    pt_inception.load_state_dict_from_url = original
  dtype = torch.float64 if double else torch.float32
  model = model.to(dtype)
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(dtype) / 127.5 - 1
  x = torch.round(127.5 * (x + 1)).clamp(0, 255) / 127.5 - 1  # the paper's quantisation (a no-op here)
  with torch.no_grad():
    feats = model(x)[0]
  return feats.reshape(len(images), -1).double().numpy()


def write_golden(state_dict: Dict[str, np.ndarray], output: str, num: int = 4,
                 extra: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
  """pytorch-fid's pool3 features of `golden_inputs()` at 32x32, 64x64 and 299x299 -> .npz.

  Keys: images_S (num, S, S, 3) uint8 and features_S (num, 2048) float32 for S in 32, 64, 299,
  fingerprint (3,) of the weights, torch_version, pytorch_fid_version, and `extra`. Needs torch and
  pytorch-fid (`pip install torch pytorch-fid`). Returns what it wrote, plus float64 features under
  features64_S (not written; to measure float32 round-off).
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import pytorch_fid  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit('writing golden features needs torch and pytorch-fid: '
                     'pip install torch pytorch-fid') from e
  out = dict(golden_inputs(num))
  out['fingerprint'] = fingerprint(state_dict)
  out['torch_version'] = np.asarray(torch.__version__)
  out['pytorch_fid_version'] = np.asarray(getattr(pytorch_fid, '__version__', 'unknown'))
  out.update(extra or {})
  float64 = {}
  for size in (32, 64, 299):
    images = out[f'images_{size}']
    out[f'features_{size}'] = pytorch_fid_features(state_dict, images).astype(np.float32)
    float64[f'features64_{size}'] = pytorch_fid_features(state_dict, images, double=True)
  np.savez_compressed(output, **out)
  print(f'wrote {output}: pytorch-fid features of {num} images at 32x32, 64x64 and 299x299')
  return {**out, **float64}


def _define_flags():
  """Flags are defined only when run as a program (no clash with other modules' flags)."""
  from absl import flags
  flags.DEFINE_string('input', None, 'pt_inception-2015-12-05-6726825d.pth')
  flags.DEFINE_string('output', None, '.npz to write')
  flags.DEFINE_string('golden_output', None, 'Also write pytorch-fid features of fixed images here '
                      '(needs pytorch-fid).')
  flags.mark_flags_as_required(['input', 'output'])


def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  flat = convert_state_dict(load_torch_state_dict(args.input))
  from tract_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  inception.check_variables(inception.unflatten_tree(flat))
  np.savez(args.output, **flat)
  n = sum(int(np.prod(v.shape)) for k, v in flat.items() if k.startswith('params/'))
  print(f'wrote {args.output}: {len(flat)} arrays, {n:,} parameters')
  if args.golden_output:
    write_golden(load_torch_state_dict(args.input), args.golden_output)


if __name__ == '__main__':
  from absl import app as _app
  _define_flags()
  _app.run(main)
