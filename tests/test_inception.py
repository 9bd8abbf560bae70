"""tract_jax.evaluation.inception / convert_inception / reference_stats, without the real weights.

The golden test compares our network and input pipeline with pytorch-fid's own, on synthetic weights
regenerated from a seed, against features committed in tract_jax/evaluation/golden/ (written once by
tools/make_fid_golden.py where torch and pytorch-fid were installed; no torch is needed here).
The real-weight test runs only when TRACT_INCEPTION_WEIGHTS names a converted file (and compares with
pytorch-fid when TRACT_INCEPTION_GOLDEN names the file `convert_inception --golden_output` wrote).
"""
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from tract_jax import data
from tract_jax.evaluation import convert_inception, inception, preprocess, reference_stats

# torchvision's inception_v3 has 27,161,264 parameters with the auxiliary head (3,326,696) and a
# 1000-way classifier; the FID graph has no auxiliary head and 1008 classes: 23,834,568 + 8 * 2049.
FID_INCEPTION_PARAMS = 27_161_264 - 3_326_696 + 8 * 2049


GOLDEN = os.path.join(os.path.dirname(inception.__file__), 'golden', 'pytorch_fid_synthetic.npz')
GOLDEN_RTOL = 1e-4  # max |ours - pytorch-fid| / max |pytorch-fid| (measured: about 5e-7)


def relative_error(got, want):
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


# ---- bilinear resizes -------------------------------------------------------------------------------
def tf1_resize_reference(images, out_h, out_w):
  """Float64 loops transcribing TF1's ResizeBilinear (align_corners=False, no half-pixel centres):
  in = out * (in_size / out_size), lower = floor(in), upper = min(ceil(in), in_size - 1)."""
  images = np.asarray(images, np.float64)
  b, h, w, c = images.shape
  out = np.zeros((b, out_h, out_w, c))
  for y in range(out_h):
    in_y = y * (h / out_h)
    y0, y1 = int(math.floor(in_y)), min(int(math.ceil(in_y)), h - 1)
    ly = in_y - math.floor(in_y)
    for x in range(out_w):
      in_x = x * (w / out_w)
      x0, x1 = int(math.floor(in_x)), min(int(math.ceil(in_x)), w - 1)
      lx = in_x - math.floor(in_x)
      top = images[:, y0, x0] + (images[:, y0, x1] - images[:, y0, x0]) * lx
      bottom = images[:, y1, x0] + (images[:, y1, x1] - images[:, y1, x0]) * lx
      out[:, y, x] = top + (bottom - top) * ly
  return out


def torch_resize_reference(images, out_h, out_w):
  """Float64 transcription of PyTorch's F.interpolate(mode='bilinear', align_corners=False) (the
  CPU kernel's rule): src = (dst + 0.5) * in_size / out_size - 0.5, set to 0 when negative;
  i0 = int(src), i1 = i0 + 1 unless i0 is the last pixel; l1 = src - i0, l0 = 1 - l1; the output is
  l0_y (l0_x x[i0y, i0x] + l1_x x[i0y, i1x]) + l1_y (l0_x x[i1y, i0x] + l1_x x[i1y, i1x])."""
  images = np.asarray(images, np.float64)
  b, h, w, c = images.shape

  def source(dst, in_size, out_size):
    src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
    i0 = int(src)
    i1 = i0 + 1 if i0 < in_size - 1 else i0
    return i0, i1, 1.0 - (src - i0), src - i0

  out = np.zeros((b, out_h, out_w, c))
  for y in range(out_h):
    y0, y1, ly0, ly1 = source(y, h, out_h)
    for x in range(out_w):
      x0, x1, lx0, lx1 = source(x, w, out_w)
      out[:, y, x] = (ly0 * (lx0 * images[:, y0, x0] + lx1 * images[:, y0, x1])
                      + ly1 * (lx0 * images[:, y1, x0] + lx1 * images[:, y1, x1]))
  return out


@pytest.mark.parametrize('in_hw,out_hw', [((32, 32), (299, 299)), ((5, 7), (11, 13)),
                                          ((10, 9), (4, 3)), ((8, 8), (8, 8))])
def test_resize_matches_numpy_tf1(in_hw, out_hw):
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, size=(2,) + in_hw + (3,)).astype(np.float32)
  got = np.asarray(preprocess.resize_bilinear_tf1(jnp.asarray(images), out_hw))
  assert got.shape == (2,) + out_hw + (3,) and got.dtype == np.float32
  np.testing.assert_allclose(got, tf1_resize_reference(images, *out_hw), atol=2e-6)


@pytest.mark.parametrize('in_hw,out_hw', [((32, 32), (299, 299)), ((64, 64), (299, 299)),
                                          ((5, 7), (11, 13)), ((10, 9), (4, 3)), ((8, 8), (8, 8))])
def test_resize_matches_numpy_torch(in_hw, out_hw):
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, size=(2,) + in_hw + (3,)).astype(np.float32)
  got = np.asarray(preprocess.resize_bilinear_torch(jnp.asarray(images), out_hw))
  assert got.shape == (2,) + out_hw + (3,) and got.dtype == np.float32
  np.testing.assert_allclose(got, torch_resize_reference(images, *out_hw), atol=2e-6)
  np.testing.assert_array_equal(
      got, np.asarray(preprocess.resize_bilinear(jnp.asarray(images), out_hw, 'torch')))


def test_resize_conventions_by_hand():
  row = jnp.asarray([0.0, 1.0]).reshape(1, 1, 2, 1)
  # TF1, 2 -> 4 pixels: source coordinates 0, 0.5, 1, 1.5 (clamped).
  np.testing.assert_allclose(np.asarray(preprocess.resize_bilinear_tf1(row, (1, 4))).ravel(),
                             [0.0, 0.5, 1.0, 1.0])
  # PyTorch (half-pixel centres): -0.25 (clamped to 0), 0.25, 0.75, 1.25 (upper neighbour clamped).
  np.testing.assert_allclose(np.asarray(preprocess.resize_bilinear_torch(row, (1, 4))).ravel(),
                             [0.0, 0.25, 0.75, 1.0])
  assert preprocess.DEFAULT_RESIZE == 'torch'
  with pytest.raises(ValueError, match="resize='bilinear': allowed values are"):
    preprocess.preprocess(np.zeros((1, 8, 8, 3)), size=16, resize='bilinear')


def test_preprocess_quantises_like_the_papers_code():
  # torch.round(127.5 * (x + 1)).clamp(0, 255) / 127.5 - 1 (float32, as the paper's code), then resize.
  levels = np.asarray([0.0, 1.2, 2.8, 127.4, 254.7, 255.0])
  x = np.concatenate([levels / 127.5 - 1, [-1.2, 1.3]]).astype(np.float32)
  want = np.asarray([0.0, 1.0, 3.0, 127.0, 255.0, 255.0, 0.0, 255.0]) / 127.5 - 1
  np.testing.assert_allclose(np.asarray(preprocess.quantize_uint8(jnp.asarray(x))), want, atol=1e-6)
  images = np.random.default_rng(2).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
  quantised = np.clip(np.round(127.5 * (images.astype(np.float64) + 1)), 0, 255) / 127.5 - 1
  got = np.asarray(preprocess.preprocess(images, size=20))  # default resize='torch'
  np.testing.assert_allclose(got, torch_resize_reference(np.repeat(quantised, 3, -1), 20, 20),
                             atol=2e-6)


# ---- the converter and the network -----------------------------------------------------------------
def fake_state_dict(seed=0):
  """The converter's synthetic weights plus a num_batches_tracked entry (dropped by the converter)."""
  state = convert_inception.synthetic_state_dict(seed)
  state['Conv2d_1a_3x3.bn.num_batches_tracked'] = np.asarray(0)
  return state


@pytest.fixture(scope='module')
def weight_file(tmp_path_factory):
  state = fake_state_dict()
  path = str(tmp_path_factory.mktemp('inception') / 'fake_inception.npz')
  np.savez(path, **convert_inception.convert_state_dict(state))
  return state, path


@pytest.fixture(scope='module')
def features_299(weight_file):
  return inception.load_inception(weight_file[1], batch_size=2)


def test_converter_tree_matches_network(weight_file):
  state, path = weight_file
  assert len(convert_inception.torch_conv_table()) == 94
  variables = inception.load_variables(path)
  want = jax.tree.map(lambda s: (tuple(s.shape), np.dtype(s.dtype)), inception.variable_shapes())
  got = jax.tree.map(lambda a: (a.shape, a.dtype), variables)
  assert got == want  # full 299x299 shapes, via jax.eval_shape
  n_params = sum(a.size for a in jax.tree.leaves(variables['params']))
  assert n_params == FID_INCEPTION_PARAMS
  # OIHW -> HWIO and (out, in) -> (in, out), and the BN leaves in the right collections.
  w = state['Mixed_6b.branch7x7_2.conv.weight']  # (128, 128, 1, 7)
  k = variables['params']['Mixed_6b']['branch7x7_2']['conv']['kernel']
  assert k.shape == (1, 7, 128, 128)
  np.testing.assert_array_equal(k[0, 5, 3, 7], w[7, 3, 0, 5])
  np.testing.assert_array_equal(variables['params']['fc']['kernel'], state['fc.weight'].T)
  bn = state['Mixed_7c.branch_pool.bn.running_var']
  np.testing.assert_array_equal(variables['batch_stats']['Mixed_7c']['branch_pool']['bn']['var'], bn)
  np.testing.assert_array_equal(variables['params']['Mixed_5b']['branch1x1']['bn']['scale'],
                                state['Mixed_5b.branch1x1.bn.weight'])


def test_converter_rejects_wrong_files():
  state = fake_state_dict()
  bad = dict(state)
  del bad['Mixed_5b.branch1x1.conv.weight']
  bad['Mixed_5c.branch_pool.conv.weight'] = np.zeros((32, 256, 1, 1), np.float32)
  bad['something.else'] = np.zeros(3)
  with pytest.raises(ValueError) as err:
    convert_inception.convert_state_dict(bad)
  message = str(err.value)
  assert 'missing Mixed_5b.branch1x1.conv.weight' in message
  assert 'Mixed_5c.branch_pool.conv.weight: shape (32, 256, 1, 1), expected (64, 256, 1, 1)' in message
  assert 'unexpected something.else' in message
  # DataParallel prefixes and auxiliary-head leaves are tolerated.
  ok = {'module.' + k: v for k, v in state.items()}
  ok['module.AuxLogits.fc.weight'] = np.zeros((1008, 768), np.float32)
  assert len(convert_inception.convert_state_dict(ok)) == 94 * 5 + 2


@pytest.mark.slow
def test_network_runs_and_batches_consistently(features_299):
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, size=(3, 16, 16, 3)).astype(np.float32)
  feats = features_299(images)  # batch 2: the last call is zero-padded
  assert feats.shape == (3, inception.FEATURE_DIM) and feats.dtype == np.float32
  assert np.all(np.isfinite(feats)) and np.all(feats >= 0)  # mean of ReLU outputs
  assert np.std(feats) > 1e-3
  np.testing.assert_allclose(features_299(images[2:]), feats[2:], rtol=1e-5, atol=1e-5)
  # Grey images are repeated to 3 channels; inputs are snapped to uint8 levels first.
  grey = images[:2, ..., :1]
  np.testing.assert_allclose(features_299(grey), features_299(np.repeat(grey, 3, -1)), rtol=1e-6)
  snapped = np.round((images[:2] + 1) * 127.5) / 127.5 - 1
  np.testing.assert_allclose(features_299(snapped + 1e-3), feats[:2], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sharded_feature_function_matches(weight_file, features_299):
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  sharded = inception.load_inception(weight_file[1], mesh=mesh, batch_size=2)
  images = np.random.default_rng(2).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(sharded(images), features_299(images), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='at least 75'):
    inception.InceptionFeatures(inception.load_variables(weight_file[1]), size=64)


@pytest.mark.slow
def test_golden_pytorch_fid_synthetic_weights(weight_file, features_299):
  """Our network and pipeline (resize='torch') against pytorch-fid's own InceptionV3 as the paper's
  code uses it, on the same synthetic weights, at 32x32, 64x64 (resized to 299 by each) and 299x299.
  One compiled network serves all three sizes (the resize is a separate jitted function)."""
  start = time.time()
  golden = np.load(GOLDEN)
  seed = int(golden['seed'])
  assert seed == 0 and str(golden['weights']) == 'synthetic'
  # The weights are regenerated, not stored: a changed generator would show here first.
  np.testing.assert_allclose(convert_inception.fingerprint(weight_file[0]), golden['fingerprint'],
                             rtol=1e-12)
  assert features_299.resize == 'torch'
  tf1 = inception.load_inception(weight_file[1], batch_size=2, resize='tf1')
  for size in (32, 64, 299):
    images = golden[f'images_{size}'].astype(np.float32) / 127.5 - 1  # uint8 -> [-1, 1]
    want = golden[f'features_{size}'].astype(np.float64)
    assert want.shape == (4, 2048) and np.all(np.isfinite(want))
    # Non-degenerate: the features vary across features and across images.
    assert want.std() > 0.5 * want.mean() > 0.1
    assert want.std(axis=0).mean() > 0.02 * want.mean()
    got = features_299(images)
    error = relative_error(got, want)
    print(f'{size}x{size}: ours vs pytorch-fid {error:.2e}', end='; ')
    assert error < GOLDEN_RTOL, f'{size}x{size}: relative error {error:.3g}'
    if size != 299:  # the test can tell the two conventions apart, by a wide margin
      assert relative_error(tf1(images), want) > 50 * GOLDEN_RTOL
  print(f'{time.time() - start:.1f} s')


def test_reference_stats_accumulates_a_source():
  source = data.load_digits()
  flat = lambda images: images.reshape(len(images), -1)[:, :20]  # stand-in feature function
  stats, kept = reference_stats.dataset_stats(source, flat, batch_size=256, log_every=0,
                                              keep_features=100, seed=3)
  images = source.get(np.arange(len(source)))['image']
  want = np.repeat(images, 3, -1).reshape(len(source), -1)[:, :20].astype(np.float64)
  mu, sigma, n = stats.finalize()
  assert n == len(source) == 1797
  np.testing.assert_allclose(mu, want.mean(0), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(want, rowvar=False), rtol=1e-9, atol=1e-12)
  assert kept.shape == (100, 20) and kept.dtype == np.float32

  class IndexSource:  # image i is filled with the value i / 1000: rows name their index
    def __len__(self):
      return 500

    def get(self, indices):
      return {'image': np.broadcast_to(np.asarray(indices, np.float32)[:, None, None, None] / 1000,
                                       (len(indices), 2, 2, 1))}

  _, kept = reference_stats.dataset_stats(IndexSource(), lambda x: x[:, 0, 0, :1], batch_size=64,
                                          log_every=0, keep_features=50, seed=3)
  rows = np.round(kept[:, 0] * 1000).astype(int)
  assert len(rows) == 50 and np.all(np.diff(rows) > 0)  # distinct, in index order
  assert rows[-1] - rows[0] > 250  # spread over the set, not its first rows
  # max_images: a random subset, the same for the same seed.
  sub, none = reference_stats.dataset_stats(source, flat, batch_size=300, max_images=1000,
                                            log_every=0, seed=3)
  assert sub.n == 1000 and none is None
  again, _ = reference_stats.dataset_stats(source, flat, batch_size=77, max_images=1000,
                                           log_every=0, seed=3)
  np.testing.assert_allclose(again.mean(), sub.mean(), rtol=1e-12)
  assert not np.allclose(sub.mean(), want[:1000].mean(0))  # not simply the first 1000


# ---- real weights (optional) -----------------------------------------------------------------------
@pytest.mark.skipif(not os.environ.get('TRACT_INCEPTION_WEIGHTS'),
                    reason='set TRACT_INCEPTION_WEIGHTS to a converted FID Inception .npz')
@pytest.mark.slow
def test_golden_features_with_real_weights():
  features = inception.load_inception(os.environ['TRACT_INCEPTION_WEIGHTS'], batch_size=4)
  golden_path = os.environ.get('TRACT_INCEPTION_GOLDEN')
  golden = np.load(golden_path) if golden_path else convert_inception.golden_inputs()
  for size in (32, 64, 299):
    images = golden[f'images_{size}'].astype(np.float32) / 127.5 - 1
    got = features(images)
    assert got.shape == (len(images), 2048) and np.all(np.isfinite(got)) and np.all(got >= 0)
    # pool3 features of the real network are sparse-ish and O(0.1-1) on average.
    assert 0.05 < got.mean() < 5.0
    if golden_path:
      assert relative_error(got, golden[f'features_{size}'].astype(np.float64)) < GOLDEN_RTOL
