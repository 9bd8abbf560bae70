"""The two networks of NVIDIA's EDM (Karras et al. 2022, NVlabs/edm training/networks.py) in Flax.

- `SongUNet`: the DDPM++ / NCSN++ UNet of the CIFAR-10 EDM models (docs/SPEC_EDM.md section 5).
  Published CIFAR-10 configurations: model_channels 128, channel_mult (2, 2, 2), 4 blocks per level,
  attention at 16x16; NCSN++ ('ve' pickles): Fourier noise embedding, residual encoder,
  channel_mult_noise 2, resample filter (1, 3, 3, 1); DDPM++ ('vp' pickles): positional embedding,
  standard encoder, channel_mult_noise 1, filter (1, 1).
- `DhariwalUNet`: the ADM UNet of the ImageNet-64 EDM model: model_channels 192, channel_mult
  (1, 2, 3, 4), 3 blocks per level, attention at 32, 16 and 8, 1000 classes as one-hot vectors.

Parameter names follow EDM's module tree, so published weights map by name. The rule: a parameter's
Flax path joined with '.' is its name in EDM's state dict (below the preconditioner's `model.`):
the ModuleDict entries are Flax modules named 'enc.32x32_block0', 'dec.16x16_up', ... and every
layer keeps EDM's attribute names (norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj,
map_noise, map_layer0, ...) and leaf names ('weight', 'bias', 'freqs'). So Flax
('enc.32x32_block0', 'conv0', 'weight') is EDM's `model.enc.32x32_block0.conv0.weight`. Layout is
NHWC: convolution weights are HWIO (EDM: OIHW), linear weights (in, out) (EDM: (out, in));
tract_jax.import_edm transposes them.

The Fourier embedding's frequencies are a buffer in EDM (random, saved with the weights, never
trained); here they are the parameter map_noise/freqs behind a stop_gradient. The resampling
filters are constants of the configuration (EDM saves them as buffers; the importer checks them).

Call: `model.apply({'params': p}, x, noise_labels, labels, train=bool, rngs=...)` with x
(B, H, W, C) float32 (already scaled by c_in), noise_labels (B,) float32 (EDM's c_noise), labels
None, int (B,) class ids or float (B, num_classes) one-hot / probability vectors; returns
(B, H, W, out_ch) float32. `dtype='bfloat16'` computes the convolutions, attention matmuls and the
activations between them in bfloat16 (parameters, GroupNorm statistics, attention softmax, the
embedding MLP and the output stay float32), as models/unet.py does.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tract_jax.models.unet import canonical_dtype, canonical_remat

__all__ = ['SongUNet', 'DhariwalUNet', 'UNetBlock', 'Conv2d', 'Linear', 'GroupNorm',
           'FourierEmbedding', 'positional_embedding', 'edm_state_dict_name', 'EMBEDDING_TYPES',
           'ENCODER_TYPES', 'DECODER_TYPES']

EMBEDDING_TYPES = ('fourier', 'positional')
ENCODER_TYPES = ('standard', 'residual')   # EDM's 'skip' encoder is used by no published network
DECODER_TYPES = ('standard',)              # EDM's 'skip' decoder likewise


# ----------------------------------------------------------------------------------------------------
# Initialisation (EDM's weight_init: the scale depends on the layer's fan-in and fan-out)
# ----------------------------------------------------------------------------------------------------

def _edm_init(mode: str, fan_in: int, fan_out: int, gain: float):
  """An initializer drawing EDM's `weight_init(shape, mode, fan_in, fan_out) * gain`."""

  def init(key, shape, dtype=jnp.float32):
    if gain == 0:
      return jnp.zeros(shape, dtype)
    if mode == 'xavier_uniform':
      w = np.sqrt(6 / (fan_in + fan_out)) * jax.random.uniform(key, shape, dtype, -1., 1.)
    elif mode == 'xavier_normal':
      w = np.sqrt(2 / (fan_in + fan_out)) * jax.random.normal(key, shape, dtype)
    elif mode == 'kaiming_uniform':
      w = np.sqrt(3 / fan_in) * jax.random.uniform(key, shape, dtype, -1., 1.)
    elif mode == 'kaiming_normal':
      w = np.sqrt(1 / fan_in) * jax.random.normal(key, shape, dtype)
    else:
      raise ValueError(f'invalid init mode {mode!r}')
    return (w * gain).astype(dtype)

  return init


# (mode, weight gain, bias gain) of EDM's `init`, `init_zero` and `init_attn` per network.
_SONG_INIT = ('xavier_uniform', 1.0, 0.0)
_SONG_INIT_ZERO = ('xavier_uniform', 1e-5, 0.0)
_SONG_INIT_ATTN = ('xavier_uniform', float(np.sqrt(0.2)), 0.0)
_ADM_INIT = ('kaiming_uniform', float(np.sqrt(1 / 3)), float(np.sqrt(1 / 3)))
_ADM_INIT_ZERO = ('kaiming_uniform', 0.0, 0.0)


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------

class Linear(nn.Module):
  """x @ weight + bias; weight (in, out). Computes in float32 (it only maps embeddings)."""
  features: int
  use_bias: bool = True
  initializer: tuple = _SONG_INIT  # (EDM init_mode, weight gain, bias gain)

  @nn.compact
  def __call__(self, x):
    mode, gain_w, gain_b = self.initializer
    fan_in = x.shape[-1]
    weight = self.param('weight', _edm_init(mode, fan_in, self.features, gain_w),
                        (fan_in, self.features), jnp.float32)
    x = x.astype(jnp.float32) @ weight
    if self.use_bias:
      x = x + self.param('bias', _edm_init(mode, fan_in, self.features, gain_b),
                         (self.features,), jnp.float32)
    return x


def _resample_kernel(resample_filter: Sequence[float]) -> np.ndarray:
  """EDM's 2-D filter: the outer product of the 1-D taps, normalised to sum 1."""
  f = np.asarray(resample_filter, np.float32)
  return np.outer(f, f) / np.square(f.sum())


def _depthwise(x, kernel, *, stride=1, padding=0, lhs_dilation=1):
  """The same 2-D (kh, kw) kernel applied to every channel of NHWC x."""
  c = x.shape[-1]
  k = jnp.asarray(np.broadcast_to(kernel[:, :, None, None], kernel.shape + (1, c)), x.dtype)
  return lax.conv_general_dilated(
      x, k, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
      lhs_dilation=(lhs_dilation, lhs_dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=c)


def _upsample(x, f, padding):
  """torch conv_transpose2d(x, 4 f, stride 2, padding) per channel: a stride-1 convolution of the
  2x-dilated input, padded by k - 1 - padding (the filter is symmetric, so no flip is needed)."""
  pad = f.shape[0] - 1 - padding
  return _depthwise(x, 4 * f, padding=pad, lhs_dilation=2)


def _downsample(x, f, padding):
  return _depthwise(x, f, stride=2, padding=padding)


class Conv2d(nn.Module):
  """EDM's Conv2d: optional 2x up/down resampling with a fixed filter, then a kernel x kernel
  convolution (kernel 0: resampling only, no parameters). weight (k, k, in, out), bias (out,)."""
  features: int
  kernel: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[float] = (1, 1)
  fused_resample: bool = False
  initializer: tuple = _SONG_INIT  # (EDM init_mode, weight gain, bias gain)
  dtype: Any = jnp.float32
  float32_output: bool = False  # accumulate and return float32 (the network's last layer)

  @nn.compact
  def __call__(self, x):
    assert not (self.up and self.down)
    dtype = jnp.dtype(self.dtype)
    x = x.astype(dtype)
    cin = x.shape[-1]
    k = self.kernel
    mode, gain_w, gain_b = self.initializer
    fan_in, fan_out = cin * k * k, self.features * k * k
    w = None
    if k:
      w = self.param('weight', _edm_init(mode, fan_in, fan_out, gain_w), (k, k, cin, self.features),
                     jnp.float32).astype(dtype)
    f = _resample_kernel(self.resample_filter) if (self.up or self.down) else None
    w_pad = k // 2
    f_pad = (f.shape[0] - 1) // 2 if f is not None else 0
    out_type = jnp.float32 if self.float32_output and dtype != jnp.float32 else None

    def conv(h, padding):
      return lax.conv_general_dilated(h, w, (1, 1), ((padding, padding), (padding, padding)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      preferred_element_type=out_type)

    if self.fused_resample and self.up and w is not None:
      x = conv(_upsample(x, f, max(f_pad - w_pad, 0)), max(w_pad - f_pad, 0))
    elif self.fused_resample and self.down and w is not None:
      x = _downsample(conv(x, w_pad + f_pad), f, 0)
    else:
      if self.up:
        x = _upsample(x, f, f_pad)
      if self.down:
        x = _downsample(x, f, f_pad)
      if w is not None:
        x = conv(x, w_pad)
    if k and self.use_bias:
      bias = self.param('bias', _edm_init(mode, fan_in, fan_out, gain_b), (self.features,),
                        jnp.float32)
      x = x + bias.astype(x.dtype)
    return x


class GroupNorm(nn.Module):
  """EDM's GroupNorm: min(32, C // 4) groups; statistics in float32, output in `dtype`."""
  eps: float = 1e-5
  num_groups: int = 32
  min_channels_per_group: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    groups = min(self.num_groups, c // self.min_channels_per_group)
    weight = self.param('weight', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    h = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, c // groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = h.mean(axis=axes, keepdims=True)
    var = jnp.square(h - mean).mean(axis=axes, keepdims=True)
    h = ((h - mean) * lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (h * weight + bias).astype(self.dtype)


def _attention(qkv, num_heads: int):
  """EDM's attention on a (B, H, W, 3C) qkv map whose channels are laid out (head, C/heads, q|k|v);
  logits and softmax in float32. Returns (B, H, W, C) with channels (head, C/heads)."""
  b, hh, ww, c3 = qkv.shape
  c = c3 // 3
  d = c // num_heads
  qkv = qkv.reshape(b, hh * ww, num_heads, d, 3)
  q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k / np.sqrt(d).astype(k.dtype),
                      preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, hh, ww, c)


class UNetBlock(nn.Module):
  """EDM's UNetBlock: GN - SiLU - conv0 [resampled] - embedding (FiLM or add) - GN - SiLU -
  dropout - conv1, plus the (resampled / projected) skip, times skip_scale; optional
  self-attention after."""
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: Optional[int] = None
  channels_per_head: int = 64
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: Sequence[float] = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  init_main: tuple = _SONG_INIT    # EDM's `init` (a Module field may not be called init)
  init_zero: tuple = _SONG_INIT_ZERO
  init_attn: Optional[tuple] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    """x: (B, H, W, in) in `dtype`; emb: (B, emb_channels) float32."""
    dtype = jnp.dtype(self.dtype)
    cin, cout = x.shape[-1], self.out_channels
    norm = functools.partial(GroupNorm, eps=self.eps, dtype=dtype)
    conv = functools.partial(Conv2d, dtype=dtype)
    orig = x
    x = conv(cout, 3, up=self.up, down=self.down, resample_filter=self.resample_filter,
             initializer=self.init_main, name='conv0')(nn.silu(norm(name='norm0')(x)))
    params = Linear(cout * (2 if self.adaptive_scale else 1), initializer=self.init_main,
                    name='affine')(emb)[:, None, None, :]
    if self.adaptive_scale:  # FiLM: (1 + scale) and shift formed in float32, then cast
      scale, shift = jnp.split(params, 2, axis=-1)
      x = nn.silu(norm(name='norm1')(x) * (scale + 1).astype(dtype) + shift.astype(dtype))
    else:
      x = nn.silu(norm(name='norm1')(x + params.astype(dtype)))
    if train and self.dropout > 0:
      x = nn.Dropout(rate=self.dropout, deterministic=False)(x)  # uses the 'dropout' rng
    x = conv(cout, 3, initializer=self.init_zero, name='conv1')(x)
    if cout != cin or self.up or self.down:
      kernel = 1 if self.resample_proj or cout != cin else 0
      orig = conv(cout, kernel, up=self.up, down=self.down, resample_filter=self.resample_filter,
                  initializer=self.init_main, name='skip')(orig)
    x = (x + orig.astype(dtype)) * jnp.asarray(self.skip_scale, dtype)

    if self.attention:
      heads = self.num_heads if self.num_heads is not None else cout // self.channels_per_head
      if heads < 1 or cout % heads:
        raise ValueError(f'{cout} channels cannot be split into {heads} attention heads')
      qkv = conv(cout * 3, 1, initializer=self.init_attn or self.init_main, name='qkv')(
          norm(name='norm2')(x))
      a = conv(cout, 1, initializer=self.init_zero, name='proj')(_attention(qkv, heads))
      x = (a + x) * jnp.asarray(self.skip_scale, dtype)
    return x


# ----------------------------------------------------------------------------------------------------
# Embeddings and labels
# ----------------------------------------------------------------------------------------------------

def positional_embedding(x, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
  """EDM's PositionalEmbedding: [cos, sin] of x * max_positions^(-k / (half - endpoint))."""
  half = num_channels // 2
  freqs = np.arange(half, dtype=np.float32) / (half - (1 if endpoint else 0))
  freqs = jnp.asarray((1 / max_positions) ** freqs, jnp.float32)
  x = x.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
  """EDM's FourierEmbedding: [cos, sin] of 2 pi x freqs; freqs ~ N(0, scale^2), not trained."""
  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x):
    freqs = self.param('freqs', lambda key, shape: jax.random.normal(key, shape) * self.scale,
                       (self.num_channels // 2,))
    x = x.astype(jnp.float32)[:, None] * (2 * np.pi * lax.stop_gradient(freqs))[None, :]
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


def _label_vectors(labels, num_classes: int, batch: int):
  """None / int (B,) class ids / float (B, num_classes) -> (B, num_classes) float32."""
  if labels is None:
    raise ValueError(f'this network is class-conditional (num_classes={num_classes}): pass labels '
                     f'of shape ({batch},) or ({batch}, {num_classes})')
  labels = jnp.asarray(labels)
  if labels.shape == (batch,) and jnp.issubdtype(labels.dtype, jnp.integer):
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if labels.shape == (batch, num_classes):
    return labels.astype(jnp.float32)
  raise ValueError(f'labels must be int ({batch},) or float ({batch}, {num_classes}), got '
                   f'{labels.dtype} {labels.shape}')


def _check_inputs(x, noise_labels):
  b, h, w, _ = x.shape
  if h != w:
    raise ValueError(f'square inputs expected, got {x.shape}')
  noise_labels = jnp.asarray(noise_labels)
  if noise_labels.shape != (b,):
    raise ValueError(f'noise_labels must have shape ({b},), got {noise_labels.shape}')
  return noise_labels


def _block_class(remat):
  # `train` (argument 3, counting self) is a Python bool that selects dropout: static.
  if canonical_remat(remat) == 'blocks':
    return nn.remat(UNetBlock, static_argnums=(3,))
  return UNetBlock


# ----------------------------------------------------------------------------------------------------
# The networks
# ----------------------------------------------------------------------------------------------------

class SongUNet(nn.Module):
  """EDM's SongUNet (DDPM++ / NCSN++). Defaults: the CIFAR-10 NCSN++ network of the 've' pickles."""
  out_ch: int = 3
  num_classes: int = 0          # EDM's label_dim (0 = unconditional)
  augment_dim: int = 0          # EDM's augmentation labels (9 in the CIFAR-10 pickles; unused here)
  model_channels: int = 128
  channel_mult: Sequence[int] = (2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  embedding_type: str = 'fourier'
  channel_mult_noise: int = 2
  encoder_type: str = 'residual'
  decoder_type: str = 'standard'
  resample_filter: Sequence[float] = (1, 3, 3, 1)
  dtype: Any = jnp.float32
  remat: Any = 'none'

  @nn.compact
  def __call__(self, x, noise_labels, labels=None, *, train: bool, augment_labels=None):
    noise_labels = _check_inputs(x, noise_labels)
    if self.embedding_type not in EMBEDDING_TYPES:
      raise ValueError(f'embedding_type must be one of {EMBEDDING_TYPES}, got '
                       f'{self.embedding_type!r}')
    if self.encoder_type not in ENCODER_TYPES:
      raise ValueError(f'encoder_type must be one of {ENCODER_TYPES}, got {self.encoder_type!r}')
    if self.decoder_type not in DECODER_TYPES:
      raise ValueError(f'decoder_type must be one of {DECODER_TYPES}, got {self.decoder_type!r}')
    dtype = canonical_dtype(self.dtype)
    b, res0, _, _ = x.shape
    emb_channels = self.model_channels * self.channel_mult_emb
    noise_channels = self.model_channels * self.channel_mult_noise
    block = functools.partial(
        _block_class(self.remat), num_heads=1, dropout=self.dropout, skip_scale=float(np.sqrt(0.5)),
        eps=1e-6, resample_filter=tuple(self.resample_filter), resample_proj=True,
        adaptive_scale=False, init_main=_SONG_INIT, init_zero=_SONG_INIT_ZERO,
        init_attn=_SONG_INIT_ATTN, dtype=dtype)

    # Mapping (float32).
    if self.embedding_type == 'fourier':
      emb = FourierEmbedding(noise_channels, name='map_noise')(noise_labels)
    else:
      emb = positional_embedding(noise_labels, noise_channels, endpoint=True)
    emb = jnp.concatenate(jnp.split(emb, 2, axis=1)[::-1], axis=1)  # [cos, sin] -> [sin, cos]
    if self.num_classes:
      y = _label_vectors(labels, self.num_classes, b)
      emb = emb + Linear(noise_channels, name='map_label')(y * np.sqrt(self.num_classes))
    if self.augment_dim:  # created so the weights import; used only when labels are given
      aug = jnp.zeros((b, self.augment_dim)) if augment_labels is None else augment_labels
      aug_emb = Linear(noise_channels, use_bias=False, name='map_augment')(aug)
      if augment_labels is not None:
        emb = emb + aug_emb
    emb = nn.silu(Linear(emb_channels, name='map_layer0')(emb))
    emb = nn.silu(Linear(emb_channels, name='map_layer1')(emb))

    # Encoder.
    skips = []
    aux = x
    cout = x.shape[-1]
    for level, mult in enumerate(self.channel_mult):
      res = res0 >> level
      tag = f'{res}x{res}'
      if level == 0:
        cout = self.model_channels
        x = Conv2d(cout, 3, initializer=_SONG_INIT, dtype=dtype, name=f'enc.{tag}_conv')(x)
        skips.append(x)
      else:
        x = block(cout, down=True, name=f'enc.{tag}_down')(x, emb, train)
        skips.append(x)
        if self.encoder_type == 'residual':
          r = Conv2d(cout, 3, down=True, resample_filter=tuple(self.resample_filter),
                     fused_resample=True, initializer=_SONG_INIT, dtype=dtype,
                     name=f'enc.{tag}_aux_residual')(aux)
          x = skips[-1] = aux = (x + r) / jnp.asarray(np.sqrt(2), dtype)
      for idx in range(self.num_blocks):
        cout = self.model_channels * mult
        x = block(cout, attention=res in self.attn_resolutions, name=f'enc.{tag}_block{idx}')(
            x, emb, train)
        skips.append(x)

    # Decoder.
    out = None
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = res0 >> level
      tag = f'{res}x{res}'
      if level == len(self.channel_mult) - 1:
        x = block(cout, attention=True, name=f'dec.{tag}_in0')(x, emb, train)
        x = block(cout, name=f'dec.{tag}_in1')(x, emb, train)
      else:
        x = block(cout, up=True, name=f'dec.{tag}_up')(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
        cout = self.model_channels * mult
        attn = idx == self.num_blocks and res in self.attn_resolutions
        x = block(cout, attention=attn, name=f'dec.{tag}_block{idx}')(x, emb, train)
      if level == 0:  # the standard decoder's output head
        h = GroupNorm(eps=1e-6, dtype=dtype, name=f'dec.{tag}_aux_norm')(x)
        out = Conv2d(self.out_ch, 3, initializer=_SONG_INIT_ZERO, dtype=dtype, float32_output=True,
                     name=f'dec.{tag}_aux_conv')(nn.silu(h))
    assert not skips, len(skips)
    return out.astype(jnp.float32)


class DhariwalUNet(nn.Module):
  """EDM's DhariwalUNet (ADM). Defaults: the ImageNet-64 network (1000 classes)."""
  out_ch: int = 3
  num_classes: int = 1000
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)
  dropout: float = 0.0
  channels_per_head: int = 64
  dtype: Any = jnp.float32
  remat: Any = 'none'

  @nn.compact
  def __call__(self, x, noise_labels, labels=None, *, train: bool, augment_labels=None):
    noise_labels = _check_inputs(x, noise_labels)
    dtype = canonical_dtype(self.dtype)
    b, res0, _, _ = x.shape
    emb_channels = self.model_channels * self.channel_mult_emb
    block = functools.partial(
        _block_class(self.remat), channels_per_head=self.channels_per_head, dropout=self.dropout,
        init_main=_ADM_INIT, init_zero=_ADM_INIT_ZERO, dtype=dtype)

    # Mapping (float32).
    emb = positional_embedding(noise_labels, self.model_channels)
    if self.augment_dim:
      aug = jnp.zeros((b, self.augment_dim)) if augment_labels is None else augment_labels
      aug_emb = Linear(self.model_channels, use_bias=False, initializer=_ADM_INIT_ZERO,
                       name='map_augment')(aug)
      if augment_labels is not None:
        emb = emb + aug_emb
    emb = nn.silu(Linear(emb_channels, initializer=_ADM_INIT, name='map_layer0')(emb))
    emb = Linear(emb_channels, initializer=_ADM_INIT, name='map_layer1')(emb)
    if self.num_classes:
      y = _label_vectors(labels, self.num_classes, b)
      emb = emb + Linear(emb_channels, use_bias=False,
                         initializer=('kaiming_normal', float(np.sqrt(self.num_classes)), 0.0),
                         name='map_label')(y)
    emb = nn.silu(emb)

    # Encoder.
    skips = []
    cout = x.shape[-1]
    for level, mult in enumerate(self.channel_mult):
      res = res0 >> level
      tag = f'{res}x{res}'
      if level == 0:
        cout = self.model_channels * mult
        x = Conv2d(cout, 3, initializer=_ADM_INIT, dtype=dtype, name=f'enc.{tag}_conv')(x)
      else:
        x = block(cout, down=True, name=f'enc.{tag}_down')(x, emb, train)
      skips.append(x)
      for idx in range(self.num_blocks):
        cout = self.model_channels * mult
        x = block(cout, attention=res in self.attn_resolutions, name=f'enc.{tag}_block{idx}')(
            x, emb, train)
        skips.append(x)

    # Decoder.
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = res0 >> level
      tag = f'{res}x{res}'
      if level == len(self.channel_mult) - 1:
        x = block(cout, attention=True, name=f'dec.{tag}_in0')(x, emb, train)
        x = block(cout, name=f'dec.{tag}_in1')(x, emb, train)
      else:
        x = block(cout, up=True, name=f'dec.{tag}_up')(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
        cout = self.model_channels * mult
        x = block(cout, attention=res in self.attn_resolutions, name=f'dec.{tag}_block{idx}')(
            x, emb, train)
    assert not skips, len(skips)
    x = nn.silu(GroupNorm(dtype=dtype, name='out_norm')(x))
    x = Conv2d(self.out_ch, 3, initializer=_ADM_INIT_ZERO, dtype=dtype, float32_output=True,
               name='out_conv')(x)
    return x.astype(jnp.float32)


def edm_state_dict_name(path: Sequence[str]) -> str:
  """A Flax parameter path -> its name in EDM's state dict (below the preconditioner's 'model.')."""
  return '.'.join(path)
