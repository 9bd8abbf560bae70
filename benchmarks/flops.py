"""Counting FLOPs of a jitted program without running it: XLA's cost analysis of the LOWERED
program, and a jaxpr count of the convolutions and matmuls where that analysis is missing.

Why the lowered program: it is the whole (global, unpartitioned) computation before XLA's
optimisations, so it counts convolutions that the GPU backend later turns into cuDNN custom calls
(the compiled program's analysis omits those and undercounts a UNet ~40x) and needs no scaling by
the device count; lowering needs no compile, and its arguments may be jax.ShapeDtypeStructs, so the
FLOPs of a paper-size model are counted without allocating it. jax 0.11.2 on GPU returns no lowered
analysis: there the count is the jaxpr's (valid taps only; 99.7% of the lowered count on the
CIFAR-10 UNet, the rest being elementwise work). A multiply-add counts as 2 FLOPs.
"""
import jax
import jax.numpy as jnp
import numpy as np

from tract_jax.models import factory


def cost_flops(stage):
  """FLOPs from XLA's cost analysis of a jax `Lowered` or `Compiled` stage, or None.

  `cost_analysis()` returns a dict in recent JAX, a list with one dict per program in older ones,
  or None on some backends.
  """
  try:
    analysis = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None
  flops = analysis.get('flops')
  return float(flops) if flops is not None and flops >= 0 else None


def _prod(values):
  out = 1
  for v in values:
    out *= int(v)
  return out


def _sub_jaxprs(value):
  """Jaxprs held by an equation parameter (a Jaxpr, a ClosedJaxpr, or a tuple of them)."""
  if hasattr(value, 'eqns'):
    return [value]
  if hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    return [value.jaxpr]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _valid_taps(in_size, kernel, out_size, stride, pad_lo, lhs_dil, rhs_dil):
  """Number of (output position, kernel tap) pairs of one spatial dimension that read a real input
  element (not padding, not a hole of lhs dilation): XLA counts only those multiply-adds."""
  pos = (np.arange(out_size)[:, None] * stride + np.arange(kernel)[None, :] * rhs_dil - pad_lo)
  valid = (pos >= 0) & (pos <= (in_size - 1) * lhs_dil) & (pos % lhs_dil == 0)
  return int(valid.sum())


def _conv_flops(eqn) -> float:
  """2 x the multiply-adds of a conv_general_dilated equation that touch real input elements."""
  p = eqn.params
  lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  dn = p['dimension_numbers']
  lhs_spatial, rhs_spatial, out_spatial = dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:]
  nsp = len(lhs_spatial)
  strides = p['window_strides'] or (1,) * nsp
  lhs_dil = p['lhs_dilation'] or (1,) * nsp
  rhs_dil = p['rhs_dilation'] or (1,) * nsp
  taps = 1
  for i in range(nsp):
    taps *= _valid_taps(lhs[lhs_spatial[i]], rhs[rhs_spatial[i]], out[out_spatial[i]], strides[i],
                        p['padding'][i][0], lhs_dil[i], rhs_dil[i])
  # Per (output batch, output feature): taps x input features per group.
  return 2.0 * out[dn.out_spec[0]] * out[dn.out_spec[1]] * rhs[dn.rhs_spec[1]] * taps


def _jaxpr_matmul_flops(jaxpr) -> float:
  """2 x multiply-adds of every dot_general and conv_general_dilated in a jaxpr, nested ones
  included (scan bodies times their length; while bodies once, as XLA counts them; the costliest
  branch of a cond)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * _prod(eqn.outvars[0].aval.shape) * _prod(lhs[d] for d in lhs_contract)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    if name == 'cond':
      total += max((_jaxpr_matmul_flops(j) for j in _sub_jaxprs(eqn.params.get('branches', ()))),
                   default=0.0)
      continue
    factor = float(eqn.params.get('length', 1)) if name == 'scan' else 1.0
    for key, value in eqn.params.items():
      if name == 'while' and key == 'cond_jaxpr':
        continue
      for sub in _sub_jaxprs(value):
        total += factor * _jaxpr_matmul_flops(sub)
  return total


def jaxpr_flops(fn, *args, **kwargs):
  """FLOPs of the convolutions and matmuls of `fn(*args)` counted from its jaxpr (2 per
  multiply-add; elementwise work not counted). The fallback of `lowered_flops` where JAX's lowered
  cost analysis returns nothing (jax 0.11 on GPU); within 1% of it on the UNet (elementwise ops are
  the difference; a test checks both on the CIFAR-10 forward)."""
  return _jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def lowered_flops(fn, *args, **kwargs):
  """FLOPs of one call of `fn(*args, **kwargs)`, from the cost analysis of the lowered program.

  Lowering only (no XLA compile): the arguments may be jax.ShapeDtypeStructs, so the FLOPs of a
  paper-size model are counted without allocating it. The lowered program is the whole (global,
  unpartitioned) computation before XLA's optimisations, so, unlike the compiled program's
  analysis, it counts convolutions that the GPU backend turns into cuDNN custom calls and needs no
  scaling by the device count. A multiply-add counts as 2 FLOPs. `fn` may be jitted already.
  Where the lowered analysis is unavailable (it returns None in jax 0.11.2 on GPU), the count
  falls back to `jaxpr_flops` (convolutions and matmuls only).
  """
  return flops_with_source(fn, *args, **kwargs)[0]


def flops_with_source(fn, *args, lowered=None, **kwargs):
  """(FLOPs, 'lowered' | 'jaxpr') of one call of `fn(*args)`; see lowered_flops. Pass `lowered`
  when the program has been lowered already."""
  jitted = fn if hasattr(fn, 'lower') else jax.jit(fn)
  flops = cost_flops(lowered if lowered is not None else jitted.lower(*args, **kwargs))
  if flops:
    return flops, 'lowered'
  return jaxpr_flops(jitted, *args, **kwargs), 'jaxpr'


def forward_flops(model_config, image_shape, batch=1, with_source=False):
  """Lowered FLOPs of one forward of config.model's network at `batch` (nothing allocated, nothing
  compiled); with `with_source`, (FLOPs, 'lowered' | 'jaxpr')."""
  model = factory.build_model(model_config)
  params = factory.abstract_params(model, image_shape)
  x = jax.ShapeDtypeStruct((batch,) + tuple(image_shape), jnp.float32)
  logsnr = jax.ShapeDtypeStruct((batch,), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32) if model.num_classes else None
  apply = lambda p, x, l, y: model.apply({'params': p}, x, l, y, train=False)
  flops, source = flops_with_source(apply, params, x, logsnr, labels)
  return (flops, source) if with_source else flops
