"""EDM's SongUNet and DhariwalUNet in Flax (models/edm_networks.py): parameter counts of the
published networks (jax.eval_shape: nothing allocated or compiled), EDM's parameter names, one
forward of a tiny configuration of each, the resampling and attention arithmetic against direct
transcriptions of EDM's PyTorch code, and the config/factory dispatch on model.arch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from tract_jax import config_checks
from tract_jax.errors import ConfigError
from tract_jax.models import edm_networks, factory
from tract_jax.models.unet import count_params

# ----------------------------------------------------------------------------------------------------
# Parameter counts, derived by hand from EDM's training/networks.py.
#
# UNetBlock(i -> o, emb e): norm0 2i; conv0 9io + o; affine e*o + o (SongUNet) or e*2o + 2o (ADM's
# adaptive scale); norm1 2o; conv1 9o^2 + o; skip io + o when i != o, or (SongUNet, resample_proj)
# on every up/down block (ADM's up/down skip with i == o is a parameter-free resampling);
# attention: norm2 2o + qkv 3o^2 + 3o + proj o^2 + o.
#
# CIFAR-10 NCSN++ (model_channels 128, mult (2, 2, 2), 4 blocks, attention at 16, e = 512,
# noise channels 256):
#   B = block 256->256 = 512 + 590,080 + 131,328 + 512 + 590,080          = 1,312,512
#   first block 128->256 = 256 + 295,168 + 131,328 + 512 + 590,080 + 33,024 = 1,050,368
#   down/up block = B + 1x1 skip 65,792 = 1,378,304; attention A = 512 + 197,376 + 65,792 = 263,680
#   decoder block 512->256 = 1,024 + 1,179,904 + 131,328 + 512 + 590,080 + 131,328 = 2,034,176
#   last decoder block 384->256 (the 128-channel conv skip) = 1,706,240
#   mapping: map_layer0 256*512 + 512 + map_layer1 512*512 + 512        =   394,240
#   enc 32: conv 3,584 + 1,050,368 + 3 B                               = 4,991,488
#   enc 16: down + aux_residual (3 -> 256, 3x3) 7,168 + 4 (B + A)       = 7,690,240
#   enc 8:  down + aux_residual (256 -> 256) 590,080 + 4 B              = 7,218,432
#   dec 8:  in0 (B + A) + in1 B + 5 x 2,034,176                         = 13,059,584
#   dec 16: up + 5 x 2,034,176 + A                                      = 11,812,864
#   dec 32: up + 4 x 2,034,176 + 1,706,240 + aux_norm 512 + aux_conv 6,915 = 11,228,675
#   total 56,395,523 trainable parameters, + 128 Fourier frequencies (a buffer in EDM, a frozen
#   parameter here) = 56,395,651; augment_dim 9 adds map_augment 9 * 256 = 2,304.
# CIFAR-10 DDPM++ (positional embedding of 128 channels, standard encoder, filter (1, 1)):
#   56,395,523 - 65,536 (map_layer0 takes 128, not 256, inputs) - 7,168 - 590,080 (no aux_residual)
#   = 55,732,739, the published "55.7M".
# ImageNet-64 ADM (model_channels 192, mult (1, 2, 3, 4), 3 blocks, attention at 32, 16, 8, e = 768,
# 1000 classes), per part with the block formula above (adaptive scale, heads of 64 channels):
#   mapping 148,224 + 590,592 + map_label 768,000 = 1,506,816; enc 64: 2,885,376;
#   enc 32: 11,887,872; enc 16: 27,048,768; enc 8: 48,476,544; dec 8: 107,121,792;
#   dec 16: 59,175,168; dec 32: 28,710,912; dec 64: 9,080,448; out_norm + out_conv 384 + 5,187
#   = 5,571
#   total 295,899,267, the published "296M".
# ----------------------------------------------------------------------------------------------------
NCSNPP_PARAMS = 56_395_523 + 128
DDPMPP_PARAMS = 55_732_739
ADM_PARAMS = 295_899_267


def edm_config(arch='edm_song', **edm):
  config = tiny_config()
  config.model.arch = arch
  config.model.out_ch = 3
  if arch == 'edm_dhariwal':
    config.model.num_classes = 1000
    edm = dict(dict(model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
                    attn_resolutions=(32, 16, 8)), **edm)
  for key, value in edm.items():
    config.model.edm[key] = value
  return config


def abstract(config, shape):
  return factory.abstract_params(factory.build_model(config.model), shape)


def test_published_parameter_counts_and_names():
  ncsnpp = abstract(edm_config(), (32, 32, 3))
  assert count_params(ncsnpp) == NCSNPP_PARAMS
  # EDM's names: the Flax path joined with '.' is the state-dict name below EDM's `model.`.
  assert ncsnpp['enc.32x32_conv']['weight'].shape == (3, 3, 3, 128)        # HWIO of (128, 3, 3, 3)
  assert ncsnpp['enc.16x16_aux_residual']['weight'].shape == (3, 3, 3, 256)
  assert ncsnpp['enc.16x16_block0']['qkv']['weight'].shape == (1, 1, 256, 768)
  assert ncsnpp['map_layer0']['weight'].shape == (256, 512)               # (in, out)
  assert ncsnpp['map_noise']['freqs'].shape == (128,)
  assert ncsnpp['dec.32x32_aux_conv']['weight'].shape == (3, 3, 256, 3)
  assert 'skip' in ncsnpp['dec.16x16_up'] and 'norm2' in ncsnpp['dec.16x16_block4']
  assert 'norm2' not in ncsnpp['dec.16x16_block3']

  assert count_params(abstract(edm_config(augment_dim=9), (32, 32, 3))) == NCSNPP_PARAMS + 2_304
  ddpmpp = abstract(edm_config(embedding_type='positional', channel_mult_noise=1,
                               encoder_type='standard', resample_filter=(1, 1)), (32, 32, 3))
  assert count_params(ddpmpp) == DDPMPP_PARAMS and 'map_noise' not in ddpmpp

  adm = abstract(edm_config('edm_dhariwal'), (64, 64, 3))
  assert count_params(adm) == ADM_PARAMS
  assert adm['map_label']['weight'].shape == (1000, 768) and 'bias' not in adm['map_label']
  assert 'skip' not in adm['enc.32x32_down']        # a parameter-free resampling skip
  assert adm['enc.32x32_block0']['skip']['weight'].shape == (1, 1, 192, 384)
  assert adm['out_conv']['weight'].shape == (3, 3, 192, 3)


# ----------------------------------------------------------------------------------------------------
# Tiny networks: one jitted init + forward each
# ----------------------------------------------------------------------------------------------------

TINY_SONG = dict(out_ch=1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                 attn_resolutions=(4,))
TINY_ADM = dict(out_ch=2, num_classes=10, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                attn_resolutions=(4,), channels_per_head=8)


def random_params(model, *args, seed=0, **kwargs):
  """The module's parameter tree (jax.eval_shape: no compiled init) with random values in every
  leaf, so that no zero-initialised layer hides a wrong connection."""
  shapes = jax.eval_shape(lambda k: model.init(k, *args, **kwargs)['params'], jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


def _apply(model, params, x, noise, labels, train):
  rngs = {'dropout': jax.random.PRNGKey(1)} if train else None
  return jax.jit(lambda p: model.apply({'params': p}, x, noise, labels, train=train, rngs=rngs))(
      params)


def test_tiny_song_unet_forward():
  model = edm_networks.SongUNet(**TINY_SONG)
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 1))
  noise = jnp.array([-1.5, 0.7])
  params = random_params(model, x, noise, None, train=False)
  out = _apply(model, params, x, noise, None, train=False)
  assert out.shape == (2, 8, 8, 1) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and np.any(out != 0)
  assert sorted(params) == [
      'dec.4x4_block0', 'dec.4x4_block1', 'dec.4x4_in0', 'dec.4x4_in1', 'dec.8x8_aux_conv',
      'dec.8x8_aux_norm', 'dec.8x8_block0', 'dec.8x8_block1', 'dec.8x8_up', 'enc.4x4_aux_residual',
      'enc.4x4_block0', 'enc.4x4_down', 'enc.8x8_block0', 'enc.8x8_conv', 'map_layer0',
      'map_layer1', 'map_noise']
  with pytest.raises(ValueError, match=r'noise_labels must have shape \(2,\)'):
    model.init(jax.random.PRNGKey(0), x, jnp.zeros((3,)), None, train=False)


def test_tiny_dhariwal_unet_forward():
  model = edm_networks.DhariwalUNet(**TINY_ADM)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 3))
  noise, labels = jnp.array([0.1, -2.0]), jnp.array([3, 9])
  params = random_params(model, x, noise, labels, train=False)
  out = _apply(model, params, x, noise, labels, train=False)
  assert out.shape == (2, 8, 8, 2) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and np.any(out != 0)
  assert params['map_label']['weight'].shape == (10, 64)
  # 16 / 32 channels with 8 channels per head: 2 / 4 heads.
  assert params['enc.4x4_block0']['qkv']['weight'].shape == (1, 1, 32, 96)
  with pytest.raises(ValueError, match='class-conditional'):
    model.init(jax.random.PRNGKey(0), x, jnp.zeros((2,)), None, train=False)


def test_block_dropout():
  """Dropout acts in training only (one block: the full network's dropout RNG compiles slowly)."""
  block = edm_networks.UNetBlock(8, dropout=0.5, attention=True, num_heads=2)
  x, emb = jnp.ones((1, 4, 4, 8)), jnp.ones((1, 16))
  params = random_params(block, x, emb, None)
  run = jax.jit(lambda p, train: block.apply({'params': p}, x, emb, train,
                                             rngs={'dropout': jax.random.PRNGKey(0)}),
                static_argnums=1)
  evaluation, training = run(params, False), run(params, True)
  assert np.all(np.isfinite(training)) and not np.allclose(evaluation, training)
  deterministic = edm_networks.UNetBlock(8, dropout=0.0, attention=True, num_heads=2)
  np.testing.assert_allclose(deterministic.apply({'params': params}, x, emb, True), evaluation,
                             atol=1e-5)


def test_edm_initialisation():
  """EDM's init modes and gains on single layers (eager, no network compile)."""
  x = jnp.ones((1, 4, 4, 8))
  zero = edm_networks.Conv2d(5, 3, initializer=edm_networks._ADM_INIT_ZERO)
  leaves = jax.tree.leaves(zero.init(jax.random.PRNGKey(0), x))
  assert leaves and not any(np.any(leaf) for leaf in leaves)   # ADM's out_conv, conv1, proj
  conv = edm_networks.Conv2d(64, 3, initializer=edm_networks._SONG_INIT)
  p = conv.init(jax.random.PRNGKey(0), x)['params']
  bound = np.sqrt(6 / (8 * 9 + 64 * 9))                                     # xavier_uniform
  assert 0.9 * bound < np.abs(p['weight']).max() <= bound and not np.any(p['bias'])
  norm = edm_networks.GroupNorm().init(jax.random.PRNGKey(0), x)['params']
  np.testing.assert_array_equal(norm['weight'], np.ones(8))


def test_labels_as_ids_or_vectors():
  ids = jnp.array([0, 2])
  onehot = edm_networks._label_vectors(ids, 3, 2)
  np.testing.assert_array_equal(onehot, [[1, 0, 0], [0, 0, 1]])
  probs = jnp.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
  np.testing.assert_array_equal(edm_networks._label_vectors(probs, 3, 2), probs)
  with pytest.raises(ValueError, match='labels must be int'):
    edm_networks._label_vectors(jnp.zeros((2, 4)), 3, 2)


# ----------------------------------------------------------------------------------------------------
# The arithmetic against transcriptions of EDM's PyTorch code (NCHW, direct loops)
# ----------------------------------------------------------------------------------------------------

def _torch_conv2d(x, w, stride=1, padding=0, groups=1):
  """torch.nn.functional.conv2d on NCHW numpy arrays (cross-correlation)."""
  n, c, h, wd = x.shape
  o, ci, kh, kw = w.shape
  x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  ho, wo = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
  out = np.zeros((n, o, ho, wo))
  per = o // groups
  for oc in range(o):
    g = oc // per
    xs = x[:, g * ci:(g + 1) * ci]
    for i in range(ho):
      for j in range(wo):
        patch = xs[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
        out[:, oc, i, j] = np.einsum('nchw,chw->n', patch, w[oc])
  return out


def _torch_conv_transpose2d(x, w, stride, padding, groups):
  """torch.nn.functional.conv_transpose2d (w: (in, out / groups, k, k)) by scattering."""
  n, c, h, wd = x.shape
  _, per, kh, kw = w.shape
  full = np.zeros((n, per * groups, (h - 1) * stride + kh, (wd - 1) * stride + kw))
  cin_per = c // groups
  for ic in range(c):
    g = ic // cin_per
    for i in range(h):
      for j in range(wd):
        full[:, g * per:(g + 1) * per, i * stride:i * stride + kh, j * stride:j * stride + kw] += (
            x[:, ic, i, j][:, None, None, None] * w[ic][None])
  return full[:, :, padding:full.shape[2] - padding, padding:full.shape[3] - padding]


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.parametrize('taps', [(1, 1), (1, 3, 3, 1)])
def test_resampling_matches_edm_conv2d(taps):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 8, 8, 2)).astype(np.float32)
  f = edm_networks._resample_kernel(taps)
  f_pad = (len(taps) - 1) // 2
  ft = np.tile(f[None, None], (2, 1, 1, 1))          # EDM: f.tile([channels, 1, 1, 1])
  up = edm_networks._upsample(jnp.asarray(x), f, f_pad)
  np.testing.assert_allclose(_nchw(up), _torch_conv_transpose2d(_nchw(x), 4 * ft, 2, f_pad, 2),
                             atol=1e-5)
  down = edm_networks._downsample(jnp.asarray(x), f, f_pad)
  np.testing.assert_allclose(_nchw(down), _torch_conv2d(_nchw(x), ft, 2, f_pad, 2), atol=1e-5)

  # The fused 3x3 convolution + downsampling of the residual encoder (Conv2d fused_resample).
  conv = edm_networks.Conv2d(3, 3, down=True, resample_filter=taps, fused_resample=True)
  params = conv.init(jax.random.PRNGKey(0), jnp.asarray(x))['params']
  w = np.asarray(params['weight']).transpose(3, 2, 0, 1)   # HWIO -> OIHW
  expected = _torch_conv2d(_torch_conv2d(_nchw(x), w, 1, 1 + f_pad),
                           np.tile(f[None, None], (3, 1, 1, 1)), 2, 0, 3)
  expected += np.asarray(params['bias'])[None, :, None, None]
  np.testing.assert_allclose(_nchw(conv.apply({'params': params}, jnp.asarray(x))), expected,
                             atol=1e-4)


def test_attention_matches_edm_layout():
  """EDM: qkv(B, 3C, H, W).reshape(B * heads, C / heads, 3, HW); w = softmax(q^T k / sqrt(C/heads));
  a = v w^T reshaped to (B, C, H, W)."""
  rng = np.random.default_rng(1)
  b, h, w, c, heads = 2, 2, 3, 8, 2
  qkv = rng.standard_normal((b, h, w, 3 * c)).astype(np.float32)
  t = _nchw(qkv).reshape(b * heads, c // heads, 3, h * w)
  q, k, v = t[:, :, 0], t[:, :, 1], t[:, :, 2]
  logits = np.einsum('ncq,nck->nqk', q, k / np.sqrt(k.shape[1]))
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum('nqk,nck->ncq', weights, v).reshape(b, c, h, w)
  got = edm_networks._attention(jnp.asarray(qkv), heads)
  np.testing.assert_allclose(_nchw(got), expected, atol=1e-5)


def test_embeddings_match_edm():
  x = jnp.array([0.25, -1.0])
  emb = edm_networks.positional_embedding(x, 8, endpoint=True)
  freqs = (1 / 10000) ** (np.arange(4) / 3)
  np.testing.assert_allclose(emb, np.concatenate([np.cos(np.outer(x, freqs)),
                                                  np.sin(np.outer(x, freqs))], 1), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Config and factory
# ----------------------------------------------------------------------------------------------------

def test_arch_config_checks():
  config = tiny_config()
  config.model.arch = 'unet3d'
  with pytest.raises(ConfigError) as info:
    config_checks.validate_config(config)
  assert str(info.value) == ("model.arch='unet3d': allowed values are 'ddpm', 'edm_song', "
                             "'edm_dhariwal'")
  with pytest.raises(ConfigError, match="model.arch='unet3d'"):
    factory.build_model(config.model)

  config = edm_config()
  config.model.edm.encoder_type = 'skip'
  with pytest.raises(ConfigError, match="model.edm.encoder_type='skip': allowed values are "
                                        "'standard', 'residual'"):
    config_checks.validate_config(config)
  with pytest.raises(ConfigError, match=r'model.edm.channel_mult=\(2, 2, 2\): 3 levels'):
    config_checks.check_image_shape(edm_config(), (6, 6, 3))

  model = factory.build_model(edm_config('edm_dhariwal').model, dropout=0.1,
                              trained=True)
  assert isinstance(model, edm_networks.DhariwalUNet) and model.dropout == 0.1
  assert isinstance(factory.build_model(edm_config().model), edm_networks.SongUNet)
