"""Tests of the teacher UNet (spec TRACT.md section 7): parameter counts, names, shapes,
mixed precision (bf16 compute, float32 parameters and output) and rematerialisation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tract_jax.models.unet import (UNet, canonical_dtype, count_params, logsnr_to_input,
                                   timestep_embedding)

CIFAR = dict(ch=256, emb_ch=1024, ch_mult=(1, 1, 1), num_res_blocks=3, attn_resolutions=(16, 8),
             num_heads=1, head_dim=None, out_ch=3)
IMAGENET = dict(ch=192, emb_ch=768, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                attn_resolutions=(32, 16, 8), num_heads=None, head_dim=64, out_ch=6, num_classes=1000)
TINY = dict(ch=32, emb_ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_heads=2,
            head_dim=None, out_ch=1)


def _abstract_params(model, hw, c, conditional):
  """Parameter shapes without allocating anything."""
  x = jax.ShapeDtypeStruct((1, hw, hw, c), jnp.float32)
  logsnr = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32) if conditional else None
  fn = lambda x, l, y: model.init({'params': jax.random.key(0)}, x, l, y, train=False)
  return jax.eval_shape(fn, x, logsnr, y)['params']


def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


@pytest.fixture(scope='module')
def cifar_params():
  return _shapes(_abstract_params(UNet(**CIFAR), 32, 3, False))


@pytest.fixture(scope='module')
def imagenet_params():
  return _shapes(_abstract_params(UNet(**IMAGENET), 64, 3, True))


def _count(shapes):
  return sum(math.prod(s) for s in jax.tree_util.tree_leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)))


def test_cifar_param_count_and_names(cifar_params):
  p = cifar_params
  assert _count(p) == 60_004_099
  assert p['conv_in']['kernel'] == (3, 3, 3, 256)
  assert p['dense0']['kernel'] == (256, 1024)
  assert p['dense1']['kernel'] == (1024, 1024)
  assert p['down_0.block_0']['temb_proj']['kernel'] == (1024, 512)
  assert 'nin_shortcut' not in p['down_0.block_0']
  assert 'class_emb' not in p
  # Attention at 16 and 8 px (levels 1, 2) and in the middle; 1 head of 256.
  assert 'down_0.attn_0' not in p and 'up_0.attn_0' not in p
  for name in ['down_1.attn_0', 'down_2.attn_2', 'mid.attn_1', 'up_1.attn_3', 'up_2.attn_0']:
    a = p[name]
    assert a['q']['kernel'] == (256, 1, 256) and a['q']['bias'] == (1, 256)
    assert a['k']['kernel'] == (256, 1, 256) and a['v']['bias'] == (1, 256)
    assert a['proj_out']['kernel'] == (1, 256, 256) and a['proj_out']['bias'] == (256,)
    assert set(a) == {'norm', 'q', 'k', 'v', 'proj_out'}
  assert 'down_1.attn_3' not in p
  # Resampling blocks: none at the last level down, none at level 0 up.
  assert 'down_0.downsample' in p and 'down_1.downsample' in p and 'down_2.downsample' not in p
  assert 'up_0.upsample' not in p and 'up_1.upsample' in p and 'up_2.upsample' in p
  assert 'mid.block_1' in p and 'mid.block_2' in p
  # num_res_blocks + 1 up blocks per level, each with a skip concatenated (512 -> 256).
  for i in range(3):
    assert f'up_{i}.block_3' in p and f'up_{i}.block_4' not in p
    for j in range(4):
      assert p[f'up_{i}.block_{j}']['nin_shortcut']['kernel'] == (512, 256)
  assert set(p['up_0.block_0']) == {'norm1', 'conv1', 'temb_proj', 'norm2', 'conv2', 'nin_shortcut'}
  assert p['norm_out']['scale'] == (256,)
  assert p['conv_out']['kernel'] == (3, 3, 256, 3)


def test_imagenet_param_count_and_names(imagenet_params):
  p = imagenet_params
  assert _count(p) == 295_905_222
  assert p['conv_in']['kernel'] == (3, 3, 3, 192)
  assert p['dense0']['kernel'] == (192, 768)
  assert p['class_emb']['kernel'] == (1000, 768) and p['class_emb']['bias'] == (768,)
  assert p['down_1.block_0']['nin_shortcut']['kernel'] == (192, 384)
  assert p['down_1.block_0']['temb_proj']['kernel'] == (768, 768)
  # Attention at 32, 16, 8 px (levels 1..3) with head_dim 64: 384 ch -> 6 heads, 768 ch -> 12 heads.
  assert 'down_0.attn_0' not in p
  assert p['down_1.attn_0']['q']['kernel'] == (384, 6, 64)
  assert p['down_1.attn_0']['proj_out']['kernel'] == (6, 64, 384)
  assert p['mid.attn_1']['v']['kernel'] == (768, 12, 64)
  assert p['up_3.attn_3']['k']['bias'] == (12, 64)
  assert 'down_3.downsample' not in p and 'down_2.downsample' in p
  # Skip channels of level-3 up blocks: 768 + 768 (x3), then 768 + 576 from down_2.downsample.
  assert p['up_3.block_0']['nin_shortcut']['kernel'] == (1536, 768)
  assert p['up_3.block_3']['nin_shortcut']['kernel'] == (1344, 768)
  assert p['up_0.block_0']['nin_shortcut']['kernel'] == (576, 192)
  assert p['up_0.block_3']['nin_shortcut']['kernel'] == (384, 192)
  assert p['conv_out']['kernel'] == (3, 3, 192, 6)


def test_count_params_on_arrays():
  tree = {'a': jnp.zeros((3, 4)), 'b': {'c': np.zeros(5)}}
  assert count_params(tree) == 17


def test_embedding_formula():
  logsnr = jnp.array([-30., -20., 0., 20.])
  u = logsnr_to_input(logsnr)
  np.testing.assert_allclose(u[0], u[1])  # clipped to [-20, 20]
  np.testing.assert_allclose(u[2], 0.5, atol=1e-7)
  np.testing.assert_allclose(u[1], np.arctan(np.exp(10.)) / (np.pi / 2), rtol=1e-6)
  emb = timestep_embedding(jnp.array([0., 3.]), 8)
  freqs = np.exp(-np.arange(4) * np.log(10000.) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.sin(3 * freqs), np.cos(3 * freqs)]),
                             rtol=1e-6)


def _random_params(model, seed, conditional=False):
  """Random parameters of the tiny model's tree (numpy RNG, no init compile); zero-init leaves too."""
  shapes = _abstract_params(model, 8, 1, conditional)
  rng = np.random.default_rng(seed)

  def leaf(s):
    fan_in = math.prod(s.shape[:-1]) if len(s.shape) > 1 else 1
    val = rng.normal(size=s.shape) / math.sqrt(fan_in) + 0.05 * rng.normal(size=s.shape)
    return jnp.asarray(val, jnp.float32)
  return jax.tree_util.tree_map(leaf, shapes)


def _tiny_inputs(b=2):
  x = jax.random.normal(jax.random.key(2), (b, 8, 8, 1))
  logsnr = jnp.linspace(-15., 15., b)
  return x, logsnr


def _fwd(model, train, y=None):
  """Jitted forward (jit compiles faster here than eager dispatch of every op)."""
  def f(params, x, logsnr, rng):
    return model.apply({'params': params}, x, logsnr, y, train=train, rngs={'dropout': rng})
  return jax.jit(f)


def test_init_zero_heads():
  # Smallest model with every block kind (one level: no resampling), real init.
  x, logsnr = _tiny_inputs()
  model = UNet(ch=8, emb_ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), num_heads=1,
               out_ch=1)
  variables = jax.jit(lambda k: model.init({'params': k}, x, logsnr, train=False))(jax.random.key(0))
  p = variables['params']
  assert set(variables) == {'params'}
  for leaf in [p['conv_out']['kernel'], p['conv_out']['bias'], p['mid.block_1']['conv2']['kernel'],
               p['up_0.block_1']['conv2']['kernel'], p['down_0.attn_0']['proj_out']['kernel']]:
    np.testing.assert_array_equal(leaf, 0.)
  assert float(jnp.std(p['conv_in']['kernel'])) > 0
  assert float(jnp.std(p['down_0.attn_0']['q']['kernel'])) > 0
  out = _fwd(model, False)(p, x, logsnr, jax.random.key(0))
  assert out.shape == (2, 8, 8, 1)
  np.testing.assert_array_equal(out, 0.)  # conv_out is zero-initialised


def test_tiny_forward_shapes_and_dropout():
  x, logsnr = _tiny_inputs()
  model = UNet(**TINY)
  pp = _random_params(model, 0)
  assert set(pp) >= {'down_0.block_0', 'down_0.downsample', 'down_1.attn_0', 'mid.attn_1',
                     'up_1.block_1', 'up_1.attn_1', 'up_1.upsample', 'up_0.block_1'}
  assert 'down_0.attn_0' not in pp and 'down_1.downsample' not in pp and 'up_0.upsample' not in pp
  rng = jax.random.key(4)
  out_eval = _fwd(model, False)(pp, x, logsnr, rng)
  assert out_eval.shape == (2, 8, 8, 1)
  assert float(jnp.std(out_eval)) > 0
  # dropout 0: train=True is the same function.
  out_train = _fwd(model, True)(pp, x, logsnr, rng)
  np.testing.assert_allclose(out_train, out_eval, rtol=1e-5, atol=1e-6)
  # dropout > 0: train=True draws from the 'dropout' rng; train=False is deterministic.
  dmodel = UNet(**TINY, dropout=0.5)
  np.testing.assert_allclose(_fwd(dmodel, False)(pp, x, logsnr, rng), out_eval, rtol=1e-5, atol=1e-6)
  dtrain = _fwd(dmodel, True)
  d1 = dtrain(pp, x, logsnr, jax.random.key(4))
  d2 = dtrain(pp, x, logsnr, jax.random.key(5))
  assert d1.shape == (2, 8, 8, 1)
  assert not np.allclose(d1, d2) and not np.allclose(d1, out_eval)


def test_tiny_conditional_needs_labels():
  x, logsnr = _tiny_inputs()
  model = UNet(**TINY, num_classes=5)
  with pytest.raises(ValueError, match='conditional'):
    jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, x, logsnr, train=False))
  pp = _random_params(model, 3, conditional=True)
  assert _shapes(pp['class_emb']) == {'kernel': (5, 64), 'bias': (64,)}
  with pytest.raises(ValueError, match='conditional'):
    model.apply({'params': pp}, x, logsnr, train=False)

  @jax.jit
  def f(params, y):
    return model.apply({'params': params}, x, logsnr, y, train=False)
  out = f(pp, jnp.array([0, 4]))
  out2 = f(pp, jnp.array([1, 4]))
  assert out.shape == (2, 8, 8, 1)
  assert not np.allclose(out[0], out2[0])
  np.testing.assert_allclose(out[1], out2[1], rtol=1e-5, atol=1e-6)


@functools.lru_cache(maxsize=None)
def _tiny_value_and_grad(**unet_kwargs):
  """((loss, out), (param grads, input grads)) of the tiny model on fixed random params and inputs,
  computed once per UNet variant and shared by the tests below (each variant is one ~8 s compile)."""
  x, logsnr = _tiny_inputs()
  pp = _random_params(UNet(**TINY), 6)  # every leaf non-zero, zero-init ones included
  target = jax.random.normal(jax.random.key(7), (2, 8, 8, 1))
  model = UNet(**TINY, **unet_kwargs)

  def loss(params, x):
    out = model.apply({'params': params}, x, logsnr, train=False)
    return jnp.mean((out - target) ** 2), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(pp, x)


def _rel_l2(a, b):
  """||a - b|| / ||b|| over all leaves of two pytrees, in float64."""
  flat = lambda t: np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(t)])
  a, b = flat(a), flat(b)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_dtype_and_remat_keep_the_parameter_tree():
  """Published teachers load by name: bf16 compute and remat must not rename, add or recast leaves."""
  ref = _abstract_params(UNet(**TINY), 8, 1, False)
  for kwargs in [dict(dtype=jnp.bfloat16), dict(dtype='bfloat16', remat='blocks'), dict(remat=True)]:
    tree = _abstract_params(UNet(**TINY, **kwargs), 8, 1, False)
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(ref), kwargs
    assert _shapes(tree) == _shapes(ref), kwargs
    assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}, kwargs
  assert canonical_dtype('bfloat16') == jnp.bfloat16 and canonical_dtype(jnp.float32) == jnp.float32
  with pytest.raises(ValueError, match='dtype'):
    canonical_dtype('float16')
  with pytest.raises(ValueError, match='remat'):
    jax.eval_shape(lambda: UNet(**TINY, remat='all').init(
        {'params': jax.random.key(0)}, *_tiny_inputs(), train=False))


@pytest.mark.slow  # compiles the UNet's gradient in bf16 and f32: 19 s cold on 2 cores
def test_bf16_forward_backward_close_to_f32():
  """bf16 has an 8-bit significand: each rounding is off by at most u = 2**-9 = 1.95e-3 relative.
  The tiny network chains ~20 roundings (convs, norms, attention, residual adds) on every path, and
  independent roundings add up like a random walk, so about sqrt(20) u = 0.9% relative L2 error is
  expected (measured: output 1.2%, parameter gradients 1.4%, input gradients 3.6%, the input
  gradient being one more long chain). The bounds are ~2.5x the measurements (5u-20u); the lower
  bound (100x float32's round-off) shows bf16 is really used."""
  (l32, out32), (g32, gin32) = _tiny_value_and_grad()
  (l16, out16), (g16, gin16) = _tiny_value_and_grad(dtype='bfloat16')
  assert out16.dtype == jnp.float32 and l16.dtype == jnp.float32
  assert {g.dtype for g in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}
  assert bool(jnp.all(jnp.isfinite(out16))) and bool(jnp.isfinite(l16))
  err_out, err_grad, err_in = _rel_l2(out16, out32), _rel_l2(g16, g32), _rel_l2(gin16, gin32)
  assert 1e-5 < err_out < 3e-2, err_out
  assert err_grad < 4e-2, err_grad
  assert err_in < 8e-2, err_in
  np.testing.assert_allclose(l16, l32, rtol=2e-2)


@pytest.mark.slow  # compiles the UNet's gradient with and without remat: 11 s cold
def test_remat_gives_the_same_gradients():
  """nn.remat recomputes each block's forward in the backward pass: the same operations on the same
  values, so exact arithmetic gives identical gradients. XLA fuses the recomputed (optimisation-
  barriered) forward differently, which reorders a few float32 reductions (GroupNorm means), so the
  results differ by float32 round-off: measured 7e-7 relative (L2) on parameter gradients, 2e-6 on
  input gradients, i.e. a few ulps (float32 u = 6e-8). Bounds: 5e-6 (~80 u)."""
  (l32, out32), (g32, gin32) = _tiny_value_and_grad()
  (lr, outr), (gr, ginr) = _tiny_value_and_grad(remat='blocks')
  assert jax.tree_util.tree_structure(gr) == jax.tree_util.tree_structure(g32)
  assert _rel_l2(outr, out32) < 5e-6
  assert _rel_l2(gr, g32) < 5e-6
  assert _rel_l2(ginr, gin32) < 5e-6
  # Per leaf, with a global floor for the leaves whose exact gradient is zero (see above).
  gmax = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g32))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gr), jax.tree.leaves(g32)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-7 * gmax,
                               err_msg=jax.tree_util.keystr(path))
