"""tract_jax.evaluation.inception / convert_inception / reference_stats, without the real weights.

The real-weight test runs only when TRACT_INCEPTION_WEIGHTS names a converted file (and compares with
pytorch-fid when TRACT_INCEPTION_GOLDEN names the file `convert_inception --golden_output` wrote).
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from tract_jax import data
from tract_jax.evaluation import convert_inception, fid, inception, reference_stats

# torchvision's inception_v3 has 27,161,264 parameters with the auxiliary head (3,326,696) and a
# 1000-way classifier; the FID graph has no auxiliary head and 1008 classes: 23,834,568 + 8 * 2049.
FID_INCEPTION_PARAMS = 27_161_264 - 3_326_696 + 8 * 2049


# ---- TF1 bilinear resize ---------------------------------------------------------------------------
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


@pytest.mark.parametrize('in_hw,out_hw', [((32, 32), (299, 299)), ((5, 7), (11, 13)),
                                          ((10, 9), (4, 3)), ((8, 8), (8, 8))])
def test_resize_matches_numpy_tf1(in_hw, out_hw):
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, size=(2,) + in_hw + (3,)).astype(np.float32)
  got = np.asarray(inception.resize_bilinear_tf1(jnp.asarray(images), out_hw))
  assert got.shape == (2,) + out_hw + (3,) and got.dtype == np.float32
  np.testing.assert_allclose(got, tf1_resize_reference(images, *out_hw), atol=2e-6)


def test_resize_tf1_convention_by_hand():
  # 2 -> 4 pixels: source coordinates 0, 0.5, 1, 1.5 (clamped), not the half-pixel -0.25, 0.25, ...
  row = jnp.asarray([0.0, 1.0]).reshape(1, 1, 2, 1)
  got = inception.resize_bilinear_tf1(row, (1, 4))
  np.testing.assert_allclose(np.asarray(got).ravel(), [0.0, 0.5, 1.0, 1.0])


# ---- the converter and the network -----------------------------------------------------------------
def fake_state_dict(seed=0):
  """The converter's expected keys and shapes, random values scaled to keep activations O(1)."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in convert_inception.expected_torch_shapes().items():
    if key.endswith('conv.weight'):
      value = rng.normal(size=shape) * math.sqrt(2.0 / np.prod(shape[1:]))
    elif key.endswith(('bn.weight', 'running_var')):
      value = rng.uniform(0.5, 1.5, size=shape)
    else:
      value = 0.1 * rng.normal(size=shape)
    state[key] = value.astype(np.float32)
  state['Conv2d_1a_3x3.bn.num_batches_tracked'] = np.asarray(0)  # dropped by the converter
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


def test_sharded_feature_function_matches(weight_file, features_299):
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  sharded = inception.load_inception(weight_file[1], mesh=mesh, batch_size=2)
  images = np.random.default_rng(2).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(sharded(images), features_299(images), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='at least 75'):
    inception.InceptionFeatures(inception.load_variables(weight_file[1]), size=64)


def test_reference_stats_accumulates_a_source():
  source = data.load_digits()
  flat = lambda images: images.reshape(len(images), -1)[:, :20]  # stand-in feature function
  stats = reference_stats.dataset_stats(source, flat, batch_size=256, max_images=1000, log_every=0)
  images = source.get(np.arange(1000))['image']
  want = np.repeat(images, 3, -1).reshape(1000, -1)[:, :20].astype(np.float64)
  mu, sigma, n = stats.finalize()
  assert n == 1000
  np.testing.assert_allclose(mu, want.mean(0), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(want, rowvar=False), rtol=1e-9, atol=1e-12)


# ---- real weights (optional) -----------------------------------------------------------------------
@pytest.mark.skipif(not os.environ.get('TRACT_INCEPTION_WEIGHTS'),
                    reason='set TRACT_INCEPTION_WEIGHTS to a converted FID Inception .npz')
def test_golden_features_with_real_weights():
  features = inception.load_inception(os.environ['TRACT_INCEPTION_WEIGHTS'], batch_size=4)
  golden_path = os.environ.get('TRACT_INCEPTION_GOLDEN')
  if golden_path:
    golden = np.load(golden_path)
    images, want = golden['images'], golden['features']
  else:
    images, want = convert_inception.golden_images(4), None
  got = features(images)
  assert got.shape == (len(images), 2048) and np.all(np.isfinite(got)) and np.all(got >= 0)
  # pool3 features of the real network are sparse-ish and O(0.1-1) on average.
  assert 0.05 < got.mean() < 5.0
  if want is not None:
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    mu, sigma = fid.stats_from_features(np.concatenate([got, got + 1e-3]))
    mu2, sigma2 = fid.stats_from_features(np.concatenate([want, want + 1e-3]))
    assert np.linalg.norm(mu - mu2) < 1e-3 * np.linalg.norm(mu2)
