"""The UNet of the published JAX/Flax diffusion teachers (spec TRACT.md section 7).

Module and parameter names follow the flat names of the published progressive-distillation teacher
checkpoints ("conv_in", "down_0.block_1", "mid.attn_1", "up_2.upsample", ...), so that their
"ema_params" subtree loads directly into this module's parameter tree.

Layout is NHWC throughout. The network is conditioned on the log-SNR (not on t), see section 1.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# The conditioning scalar u = arctan(exp(-logsnr / 2)) / (pi / 2) of spec section 1.
from tract_jax.diffusion import network_time_input as logsnr_to_input

__all__ = ['UNet', 'ResnetBlock', 'AttnBlock', 'timestep_embedding', 'logsnr_to_input',
           'im2col_conv_general_dilated', 'count_params']

GN_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------
# An im2col convolution (one matmul per conv; an alternative to XLA's conv on CPU)
# ----------------------------------------------------------------------------------------------------

def _is_channels_last(dimension_numbers, ndim: int) -> bool:
  """True when `dimension_numbers` (as built by nn.Conv) means NHWC / HWIO / NHWC."""
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    lhs, rhs, out = dimension_numbers
    spatial = tuple(range(1, ndim - 1))
    return (tuple(lhs) == (0, ndim - 1) + spatial and tuple(out) == tuple(lhs)
            and tuple(rhs) == (ndim - 1, ndim - 2) + tuple(range(ndim - 2)))
  if isinstance(dimension_numbers, (tuple, list)) and len(dimension_numbers) == 3:
    return tuple(dimension_numbers) == ('NHWC', 'HWIO', 'NHWC') and ndim == 4
  return False


def im2col_conv_general_dilated(lhs, rhs, window_strides=None, padding='SAME', lhs_dilation=None,
                                rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                                batch_group_count=1, precision=None, preferred_element_type=None):
  """Drop-in for `lax.conv_general_dilated` (as called by `nn.Conv`) using shifted slices + one matmul.

  Handles the NHWC/HWIO case with stride 1, no dilation and one feature group: the kh*kw shifted
  slices of the padded input are concatenated on the channel axis and multiplied with the kernel
  reshaped to (kh*kw*Cin, Cout). On CPU, XLA's weight gradient of this is a single large matmul,
  much faster than the gradient of `lax.conv_general_dilated` (DESIGN.md). Any other case falls back
  to `lax.conv_general_dilated`, so the result is always the same convolution.
  """
  nsp = lhs.ndim - 2
  ones = (1,) * nsp
  strides = tuple(window_strides) if window_strides is not None else ones
  lhs_dil = tuple(lhs_dilation) if lhs_dilation is not None else ones
  rhs_dil = tuple(rhs_dilation) if rhs_dilation is not None else ones
  simple = (nsp == 2 and strides == ones and lhs_dil == ones and rhs_dil == ones
            and feature_group_count == 1 and batch_group_count == 1
            and _is_channels_last(dimension_numbers, lhs.ndim))
  if not simple:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides=strides, padding=padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)

  kh, kw, cin, cout = rhs.shape
  b, h, w, c = lhs.shape
  assert c == cin, (lhs.shape, rhs.shape)
  if isinstance(padding, str):
    pads = lax.padtype_to_pads((h, w), (kh, kw), ones, padding)
  else:
    pads = [tuple(p) for p in padding]
  pads = [(int(lo), int(hi)) for lo, hi in pads]
  if any(p != (0, 0) for p in pads):
    if any(lo < 0 or hi < 0 for lo, hi in pads):  # negative padding: leave it to XLA
      return lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=dimension_numbers,
                                      precision=precision,
                                      preferred_element_type=preferred_element_type)
    xp = jnp.pad(lhs, [(0, 0), pads[0], pads[1], (0, 0)])
  else:
    xp = lhs
  ho = xp.shape[1] - kh + 1
  wo = xp.shape[2] - kw + 1
  if kh == 1 and kw == 1:
    patches = xp
  else:
    patches = jnp.concatenate(
        [xp[:, dy:dy + ho, dx:dx + wo, :] for dy in range(kh) for dx in range(kw)], axis=-1)
  out = lax.dot_general(
      patches.reshape(b * ho * wo, kh * kw * cin), rhs.reshape(kh * kw * cin, cout),
      (((1,), (0,)), ((), ())), precision=precision,
      preferred_element_type=preferred_element_type)
  return out.reshape(b, ho, wo, cout)


def _conv(features: int, name: str, conv_impl: str, zero_init: bool = False) -> nn.Conv:
  """A 3x3 SAME stride-1 convolution with the requested implementation (same parameter tree)."""
  kwargs: dict[str, Any] = {}
  if zero_init:
    kwargs['kernel_init'] = nn.initializers.zeros
  if conv_impl == 'im2col':
    kwargs['conv_general_dilated'] = im2col_conv_general_dilated
  elif conv_impl != 'xla':
    raise ValueError(f"conv_impl must be 'xla' or 'im2col', got {conv_impl!r}")
  return nn.Conv(features=features, kernel_size=(3, 3), strides=(1, 1), padding='SAME', name=name,
                 **kwargs)


# ----------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------

def timestep_embedding(timesteps, embedding_dim: int, dtype=jnp.float32):
  """Sinusoidal embedding: half sin, half cos, frequencies exp(-k * ln(10000) / (half - 1))."""
  assert timesteps.ndim == 1, timesteps.shape
  half = embedding_dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=dtype) * -(math.log(10000.) / (half - 1)))
  args = timesteps.astype(dtype)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


# ----------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------

def _group_norm(name: str, channels: int, num_groups: int) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=min(num_groups, channels), epsilon=GN_EPS, name=name)


def _avgpool_down(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _nearest_up(x):
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, h * 2, w * 2, c)


class ResnetBlock(nn.Module):
  """GN - swish - [resample both paths] - conv1 - FiLM(temb_proj) - swish - dropout - conv2 (+ skip)."""
  out_ch: Optional[int] = None
  dropout: float = 0.0
  resample: Optional[str] = None  # None, 'down' or 'up'
  num_groups: int = 32
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x, *, emb, train: bool):
    c = x.shape[-1]
    out_ch = c if self.out_ch is None else self.out_ch
    h = nn.swish(_group_norm('norm1', c, self.num_groups)(x))
    if self.resample is not None:
      fn = {'down': _avgpool_down, 'up': _nearest_up}[self.resample]
      h, x = fn(h), fn(x)
    h = _conv(out_ch, 'conv1', self.conv_impl)(h)
    emb_out = nn.Dense(2 * out_ch, name='temb_proj')(nn.swish(emb))[:, None, None, :]
    scale, shift = jnp.split(emb_out, 2, axis=-1)
    h = _group_norm('norm2', out_ch, self.num_groups)(h) * (1. + scale) + shift
    h = nn.swish(h)
    if train and self.dropout > 0:
      h = nn.Dropout(rate=self.dropout, deterministic=False)(h)  # uses the 'dropout' rng
    h = _conv(out_ch, 'conv2', self.conv_impl, zero_init=True)(h)
    if c != out_ch:
      x = nn.Dense(out_ch, name='nin_shortcut')(x)
    return x + h


class AttnBlock(nn.Module):
  """GN - q, k, v (heads, head_dim) - softmax(q k / sqrt(head_dim)) v - proj_out (zero init) + residual."""
  num_heads: Optional[int] = 1
  head_dim: Optional[int] = None
  num_groups: int = 32

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    if (self.num_heads is None) == (self.head_dim is None):
      raise ValueError('exactly one of num_heads / head_dim must be set')
    if self.head_dim is None:
      if c % self.num_heads:
        raise ValueError(f'channels {c} not divisible by num_heads {self.num_heads}')
      num_heads, head_dim = self.num_heads, c // self.num_heads
    else:
      if c % self.head_dim:
        raise ValueError(f'channels {c} not divisible by head_dim {self.head_dim}')
      num_heads, head_dim = c // self.head_dim, self.head_dim
    h = _group_norm('norm', c, self.num_groups)(x).reshape(b, hh * ww, c)
    q = nn.DenseGeneral((num_heads, head_dim), name='q')(h)
    k = nn.DenseGeneral((num_heads, head_dim), name='k')(h)
    v = nn.DenseGeneral((num_heads, head_dim), name='v')(h)
    h = nn.dot_product_attention(q, k, v)  # scales q by 1/sqrt(head_dim); (B, HW, heads, head_dim)
    h = nn.DenseGeneral(c, axis=(-2, -1), kernel_init=nn.initializers.zeros, name='proj_out')(h)
    return x + h.reshape(b, hh, ww, c)


# ----------------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------------

class UNet(nn.Module):
  """UNet of the published CIFAR-10 / ImageNet-64 teachers (flat parameter names as in their files)."""
  ch: int = 256              # base channels (also the sinusoidal embedding dim)
  emb_ch: int = 1024         # time-embedding channels
  ch_mult: Sequence[int] = (1, 1, 1)
  num_res_blocks: int = 3
  attn_resolutions: Sequence[int] = (16, 8)   # spatial sizes (h) where attention is applied
  num_heads: Optional[int] = 1     # exactly one of num_heads / head_dim is set (other None)
  head_dim: Optional[int] = None
  dropout: float = 0.0
  out_ch: int = 3
  num_classes: int = 0       # 0 = unconditional (no class_emb module at all)
  num_groups: int = 32       # GroupNorm groups, min(num_groups, channels) per norm
  conv_impl: str = 'xla'     # 'xla' = lax.conv_general_dilated, 'im2col' = one-matmul conv

  @nn.compact
  def __call__(self, x, logsnr, y=None, *, train: bool):
    """x: (B,H,W,C) float NHWC; logsnr: (B,) float; y: (B,) int labels or None.

    Returns the raw network output (B,H,W,out_ch).
    """
    b, height, width, _ = x.shape
    if height != width:
      raise ValueError(f'square inputs expected, got {x.shape}')
    logsnr = jnp.asarray(logsnr)
    if logsnr.shape != (b,):
      raise ValueError(f'logsnr must have shape ({b},), got {logsnr.shape}')
    if (self.num_heads is None) == (self.head_dim is None):
      raise ValueError('exactly one of num_heads / head_dim must be set')
    nres = len(self.ch_mult)
    block = functools.partial(ResnetBlock, dropout=self.dropout, num_groups=self.num_groups,
                              conv_impl=self.conv_impl)
    attn = functools.partial(AttnBlock, num_heads=self.num_heads, head_dim=self.head_dim,
                             num_groups=self.num_groups)

    # Log-SNR embedding.
    u = logsnr_to_input(logsnr.astype(jnp.float32))
    emb = timestep_embedding(1000. * u, self.ch)
    emb = nn.Dense(self.emb_ch, name='dense0')(emb)
    emb = nn.Dense(self.emb_ch, name='dense1')(nn.swish(emb))

    # Class embedding.
    if self.num_classes > 0:
      if y is None:
        raise ValueError(f'this UNet is class-conditional (num_classes={self.num_classes}): '
                         'pass integer labels y of shape (B,)')
      y = jnp.asarray(y)
      if y.shape != (b,):
        raise ValueError(f'labels must have shape ({b},), got {y.shape}')
      y_onehot = jax.nn.one_hot(y, self.num_classes, dtype=emb.dtype)
      emb = emb + nn.Dense(self.emb_ch, name='class_emb')(y_onehot)

    # Downsampling path.
    hs = [_conv(self.ch, 'conv_in', self.conv_impl)(x)]
    for i in range(nres):
      for j in range(self.num_res_blocks):
        h = block(out_ch=self.ch * self.ch_mult[i], name=f'down_{i}.block_{j}')(
            hs[-1], emb=emb, train=train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(name=f'down_{i}.attn_{j}')(h)
        hs.append(h)
      if i != nres - 1:
        hs.append(block(resample='down', name=f'down_{i}.downsample')(hs[-1], emb=emb, train=train))

    # Middle.
    h = hs[-1]
    h = block(name='mid.block_1')(h, emb=emb, train=train)
    h = attn(name='mid.attn_1')(h)
    h = block(name='mid.block_2')(h, emb=emb, train=train)

    # Upsampling path.
    for i in reversed(range(nres)):
      for j in range(self.num_res_blocks + 1):
        h = block(out_ch=self.ch * self.ch_mult[i], name=f'up_{i}.block_{j}')(
            jnp.concatenate([h, hs.pop()], axis=-1), emb=emb, train=train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(name=f'up_{i}.attn_{j}')(h)
      if i != 0:
        h = block(resample='up', name=f'up_{i}.upsample')(h, emb=emb, train=train)
    assert not hs, len(hs)

    # Output.
    h = nn.swish(_group_norm('norm_out', h.shape[-1], self.num_groups)(h))
    return _conv(self.out_ch, 'conv_out', self.conv_impl, zero_init=True)(h)


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))
