"""The UNet of the published JAX/Flax diffusion teachers (spec TRACT.md section 7).

Module and parameter names follow the flat names of the published progressive-distillation teacher
checkpoints ("conv_in", "down_0.block_1", "mid.attn_1", "up_2.upsample", ...), so that their
"ema_params" subtree loads directly into this module's parameter tree.

Layout is NHWC throughout. The network is conditioned on the log-SNR (not on t), see section 1.

Mixed precision (`UNet(dtype=jnp.bfloat16)`): parameters stay float32 (`param_dtype`), the
convolutions, the dense layers of the blocks and the attention matmuls take their inputs in `dtype`
(MXU / tensor-core speed, half the activation memory), and the activations between them are kept in
`dtype`. What stays float32, and why:
  - GroupNorm statistics and the normalisation itself (Flax reduces in float32; the mean of a bf16
    tensor over thousands of values would otherwise lose digits), its output is cast to `dtype`;
  - attention logits (q.k accumulated and returned in float32) and the softmax: a logit of size ~10
    rounded to bf16 moves by ~0.03, i.e. a 3% change of its weight;
  - the time/class embedding MLP (dense0, dense1, class_emb) and the FiLM projections (temb_proj):
    per-example vectors, a negligible share of the FLOPs, and they carry the log-SNR conditioning
    that must tell 1/1024 grid gaps apart;
  - conv_out accumulates and returns float32, so the network output is float32 and the DDIM
    arithmetic, the targets and the loss downstream stay float32.
`dtype=jnp.float32` (the default) computes exactly what it did before the option existed.

Rematerialisation (`UNet(remat='blocks')`): every ResnetBlock and AttnBlock is wrapped in `nn.remat`,
so its backward pass recomputes the block's activations from the block input instead of keeping them.
The activations JAX saves for the backward shrink ~9x (CIFAR-10 UNet, batch 256: 52 -> 6 GiB in
float32) for ~12% more FLOPs in a TRACT step (the student's blocks run forward twice). XLA:CPU
removes the recomputation again (it CSEs it once the optimisation barriers are gone), so the saving
is real on GPU/TPU only. Parameter names do not change.
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
           'count_params', 'canonical_dtype', 'canonical_remat',
           'DTYPES', 'REMAT_MODES']

GN_EPS = 1e-6
REMAT_MODES = ('none', 'blocks')
DTYPES = ('float32', 'bfloat16')


def canonical_dtype(dtype) -> jnp.dtype:
  """'float32' | 'bfloat16' | jnp.float32 | jnp.bfloat16 -> the numpy dtype (ValueError otherwise)."""
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or dt.name not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
  return dt


def canonical_remat(remat) -> str:
  """True/False or 'none'/'blocks' -> 'none' | 'blocks' (ValueError otherwise)."""
  if remat is True:
    return 'blocks'
  if remat is False or remat is None:
    return 'none'
  if remat not in REMAT_MODES:
    raise ValueError(f'remat must be one of {REMAT_MODES} (or a bool), got {remat!r}')
  return remat


def _conv(features: int, name: str, zero_init: bool = False, dtype=jnp.float32,
          float32_output: bool = False) -> nn.Conv:
  """A 3x3 SAME stride-1 convolution (XLA's: on CPU an im2col matmul measured slower, DESIGN.md).

  Computes in `dtype` with float32 parameters; `float32_output` accumulates and returns float32
  (used for conv_out, so a bf16 network still returns float32 without a last bf16 rounding).
  """
  kwargs: dict[str, Any] = {}
  if zero_init:
    kwargs['kernel_init'] = nn.initializers.zeros
  if float32_output and jnp.dtype(dtype) != jnp.float32:
    kwargs['conv_general_dilated'] = functools.partial(lax.conv_general_dilated,
                                                       preferred_element_type=jnp.float32)
  return nn.Conv(features=features, kernel_size=(3, 3), strides=(1, 1), padding='SAME', name=name,
                 dtype=dtype, param_dtype=jnp.float32, **kwargs)


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

def _group_norm(name: str, channels: int, num_groups: int, dtype=jnp.float32) -> nn.GroupNorm:
  """GroupNorm whose statistics and normalisation run in float32 (Flax's float32 reductions) and
  whose output is cast to `dtype`."""
  return nn.GroupNorm(num_groups=min(num_groups, channels), epsilon=GN_EPS, name=name, dtype=dtype,
                      param_dtype=jnp.float32)


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
  dtype: Any = jnp.float32        # computation dtype of convs / nin_shortcut / activations

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    """x: (B, H, W, C) in `dtype` (or float32); emb: (B, emb_ch) float32 embedding."""
    dtype = jnp.dtype(self.dtype)
    x = x.astype(dtype)
    c = x.shape[-1]
    out_ch = c if self.out_ch is None else self.out_ch
    h = nn.swish(_group_norm('norm1', c, self.num_groups, dtype)(x))
    if self.resample is not None:
      fn = {'down': _avgpool_down, 'up': _nearest_up}[self.resample]
      h, x = fn(h), fn(x)
    h = _conv(out_ch, 'conv1', dtype=dtype)(h)
    # FiLM from the float32 embedding; (1 + scale) and shift are formed in float32, then cast.
    emb_out = nn.Dense(2 * out_ch, name='temb_proj', dtype=jnp.float32,
                       param_dtype=jnp.float32)(nn.swish(emb))[:, None, None, :]
    scale, shift = jnp.split(emb_out, 2, axis=-1)
    h = (_group_norm('norm2', out_ch, self.num_groups, dtype)(h) * (1. + scale).astype(dtype)
         + shift.astype(dtype))
    h = nn.swish(h)
    if train and self.dropout > 0:
      h = nn.Dropout(rate=self.dropout, deterministic=False)(h)  # uses the 'dropout' rng
    h = _conv(out_ch, 'conv2', zero_init=True, dtype=dtype)(h)
    if c != out_ch:
      x = nn.Dense(out_ch, name='nin_shortcut', dtype=dtype, param_dtype=jnp.float32)(x)
    return x + h


class AttnBlock(nn.Module):
  """GN - q, k, v (heads, head_dim) - softmax(q k / sqrt(head_dim)) v - proj_out (zero init) + residual."""
  num_heads: Optional[int] = 1
  head_dim: Optional[int] = None
  num_groups: int = 32
  dtype: Any = jnp.float32        # computation dtype of q, k, v, proj_out and the two matmuls

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
    dtype = jnp.dtype(self.dtype)
    x = x.astype(dtype)
    dense = functools.partial(nn.DenseGeneral, dtype=dtype, param_dtype=jnp.float32)
    h = _group_norm('norm', c, self.num_groups, dtype)(x).reshape(b, hh * ww, c)
    q = dense((num_heads, head_dim), name='q')(h)
    k = dense((num_heads, head_dim), name='k')(h)
    v = dense((num_heads, head_dim), name='v')(h)
    h = _attention(q, k, v)  # (B, HW, heads, head_dim) in dtype
    h = dense(c, axis=(-2, -1), kernel_init=nn.initializers.zeros, name='proj_out')(h)
    return x + h.reshape(b, hh, ww, c)


def _attention(q, k, v):
  """softmax(q k^T / sqrt(head_dim)) v over (B, L, heads, head_dim) inputs, as
  nn.dot_product_attention computes it (q scaled first), with float32 logits and softmax.

  In float32 this is nn.dot_product_attention's arithmetic. In bf16 the logits are accumulated and
  kept in float32 (`preferred_element_type`), the softmax runs in float32, and the probabilities are
  cast back to the inputs' dtype for the second matmul.
  """
  q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)  # 1/8 or 1/16 for head_dim 64 / 256: exact in bf16
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


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
  dtype: Any = jnp.float32   # computation dtype: jnp.float32 / 'float32' or jnp.bfloat16 / 'bfloat16'
  remat: Any = 'none'        # 'none' | 'blocks' (or False | True): nn.remat on every res/attn block

  @nn.compact
  def __call__(self, x, logsnr, y=None, *, train: bool):
    """x: (B,H,W,C) float NHWC; logsnr: (B,) float; y: (B,) int labels or None.

    Returns the raw network output (B,H,W,out_ch), float32 whatever `dtype` is.
    """
    b, height, width, _ = x.shape
    if height != width:
      raise ValueError(f'square inputs expected, got {x.shape}')
    logsnr = jnp.asarray(logsnr)
    if logsnr.shape != (b,):
      raise ValueError(f'logsnr must have shape ({b},), got {logsnr.shape}')
    if (self.num_heads is None) == (self.head_dim is None):
      raise ValueError('exactly one of num_heads / head_dim must be set')
    dtype = canonical_dtype(self.dtype)
    remat = canonical_remat(self.remat)
    nres = len(self.ch_mult)
    block_cls, attn_cls = ResnetBlock, AttnBlock
    if remat == 'blocks':
      # `train` (argument 3, counting self) is a Python bool that selects dropout: static.
      block_cls = nn.remat(ResnetBlock, static_argnums=(3,))
      attn_cls = nn.remat(AttnBlock)
    block = functools.partial(block_cls, dropout=self.dropout, num_groups=self.num_groups,
                              dtype=dtype)
    attn = functools.partial(attn_cls, num_heads=self.num_heads, head_dim=self.head_dim,
                             num_groups=self.num_groups, dtype=dtype)

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
    hs = [_conv(self.ch, 'conv_in', dtype=dtype)(x)]
    for i in range(nres):
      for j in range(self.num_res_blocks):
        h = block(out_ch=self.ch * self.ch_mult[i], name=f'down_{i}.block_{j}')(
            hs[-1], emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(name=f'down_{i}.attn_{j}')(h)
        hs.append(h)
      if i != nres - 1:
        hs.append(block(resample='down', name=f'down_{i}.downsample')(hs[-1], emb, train))

    # Middle.
    h = hs[-1]
    h = block(name='mid.block_1')(h, emb, train)
    h = attn(name='mid.attn_1')(h)
    h = block(name='mid.block_2')(h, emb, train)

    # Upsampling path.
    for i in reversed(range(nres)):
      for j in range(self.num_res_blocks + 1):
        h = block(out_ch=self.ch * self.ch_mult[i], name=f'up_{i}.block_{j}')(
            jnp.concatenate([h, hs.pop()], axis=-1), emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(name=f'up_{i}.attn_{j}')(h)
      if i != 0:
        h = block(resample='up', name=f'up_{i}.upsample')(h, emb, train)
    assert not hs, len(hs)

    # Output.
    h = nn.swish(_group_norm('norm_out', h.shape[-1], self.num_groups, dtype)(h))
    out = _conv(self.out_ch, 'conv_out', zero_init=True, dtype=dtype,
                float32_output=True)(h)
    return out.astype(jnp.float32)


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))
