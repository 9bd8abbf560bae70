"""From config.model to a network: the UNet, the denoiser around it, and its parameters.

`abstract_params` is the restore target of every parameter checkpoint: ShapeDtypeStructs that carry
the shardings of the mesh, so Orbax writes each restored leaf straight onto the devices that own it
(a checkpoint saved on 8 devices restores onto 1 and the other way round).
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tract_jax import diffusion, parallel
from tract_jax.default_config import FSDP_MIN_SIZE
from tract_jax.errors import ConfigError
from tract_jax.models.edm_networks import DhariwalUNet, SongUNet
from tract_jax.models.unet import UNet

# model.arch -> what the network is (export's sidecar says it too).
ARCHS = {
    'ddpm': 'UNet of the published JAX/Flax diffusion-distillation teachers '
            '(tract_jax.models.unet.UNet); parameter names as in those teachers',
    'edm_song': "EDM's SongUNet (tract_jax.models.edm_networks); parameter names as EDM's below "
                "the preconditioner's `model.`",
    'edm_dhariwal': "EDM's DhariwalUNet (tract_jax.models.edm_networks); parameter names as EDM's "
                    "below the preconditioner's `model.`",
}


def build_model(model_config, dropout: float = 0.0, *, trained: bool = False,
                teacher: bool = False) -> nn.Module:
  """The network config.model describes: model.arch 'ddpm' is the UNet of spec section 7,
  'edm_song' / 'edm_dhariwal' EDM's networks (docs/SPEC_EDM.md section 5). Dropout only for training.

  trained=True: the network being differentiated, rematerialised as model.remat says (a network
  that is only run forward never is). teacher=True: the frozen teacher's and self-teacher's network,
  computing in model.teacher_dtype ('' = model.dtype). Parameters are float32 and named alike in
  every variant, so one parameter tree serves them all.
  """
  dtype = model_config.dtype
  if teacher:
    dtype = model_config.teacher_dtype or dtype
  remat = model_config.remat if trained else 'none'
  arch = model_config.arch
  if arch in ('edm_song', 'edm_dhariwal'):
    return _build_edm(model_config, arch, dropout, dtype, remat)
  if arch != 'ddpm':
    raise ConfigError(f'model.arch={arch!r}: allowed values are {", ".join(map(repr, ARCHS))}')
  return UNet(ch=model_config.ch, emb_ch=model_config.emb_ch, ch_mult=tuple(model_config.ch_mult),
              num_res_blocks=model_config.num_res_blocks,
              attn_resolutions=tuple(model_config.attn_resolutions),
              num_heads=model_config.num_heads, head_dim=model_config.head_dim, dropout=dropout,
              out_ch=model_config.out_ch, num_classes=model_config.num_classes,
              num_groups=model_config.num_groups, dtype=dtype, remat=remat)


def _build_edm(model_config, arch: str, dropout: float, dtype, remat):
  """EDM's SongUNet / DhariwalUNet (models/edm_networks.py) from model.edm, out_ch, num_classes."""
  edm = model_config.edm
  common = dict(out_ch=model_config.out_ch, num_classes=model_config.num_classes,
                augment_dim=edm.augment_dim, model_channels=edm.model_channels,
                channel_mult=tuple(edm.channel_mult), channel_mult_emb=edm.channel_mult_emb,
                num_blocks=edm.num_blocks, attn_resolutions=tuple(edm.attn_resolutions),
                dropout=dropout, dtype=dtype, remat=remat)
  if arch == 'edm_dhariwal':
    return DhariwalUNet(**common)
  return SongUNet(**common, embedding_type=edm.embedding_type,
                  channel_mult_noise=edm.channel_mult_noise, encoder_type=edm.encoder_type,
                  resample_filter=tuple(edm.resample_filter))


def make_denoiser(model: UNet, mean_type: str):
  """(params, z_t, t, labels, dropout_rng=None) -> x_hat: the network conditioned on logsnr(t).

  z_t: (B, H, W, C) float32; t: (B,) float32 in [0, 1]; labels: (B,) int32 or None.
  """

  def denoise(params, z_t, t, labels, dropout_rng=None):
    logsnr = diffusion.logsnr_schedule(t)
    train = dropout_rng is not None
    rngs = {'dropout': dropout_rng} if train else None
    out = model.apply({'params': params}, z_t, logsnr, labels, train=train, rngs=rngs)
    return diffusion.predict_x(out, z_t, t, mean_type)

  return denoise


def _init_fn(model: UNet, image_shape):
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  labels = jnp.zeros((1,), jnp.int32) if model.num_classes else None
  return lambda key: model.init(key, x, jnp.zeros((1,)), labels, train=False)['params']


def abstract_params(model: UNet, image_shape, mesh=None, fsdp_min_size: int = FSDP_MIN_SIZE):
  """The parameter tree as ShapeDtypeStructs (nothing allocated); with a mesh they carry the
  shardings parameters get on it (replicated, or FSDP-sharded when mesh.fsdp > 1)."""
  try:
    shapes = jax.eval_shape(_init_fn(model, image_shape), jax.random.PRNGKey(0))
  except ValueError as e:  # e.g. channels not divisible by the head count
    raise ConfigError(f'model: the configured UNet cannot be built ({e})') from None
  if mesh is None:
    return shapes
  shardings = parallel.tree_shardings(shapes, mesh, fsdp_min_size)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      shardings)


def init_params(model: UNet, image_shape, seed: int, like: Optional[object] = None):
  """Freshly initialised parameters; with `like` (abstract_params with shardings) they are created
  already sharded on the mesh."""
  init = _init_fn(model, image_shape)
  out_shardings = None if like is None else jax.tree.map(lambda s: s.sharding, like)
  return jax.jit(init, out_shardings=out_shardings)(jax.random.PRNGKey(seed))
