"""The FLOP counter of the benchmarks (benchmarks/flops.py): the lowered program's cost analysis, and
the jaxpr count used where that analysis is missing."""
import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import flops  # noqa: E402  (benchmarks/flops.py)
from tract_jax.models import factory  # noqa: E402
from tract_jax.models.unet import count_params  # noqa: E402


def test_lowered_flops_of_the_cifar10_forward():
  """The known count of the paper's CIFAR-10 UNet forward (60,004,099 params) at batch 1: 34.06
  GFLOP, from the lowered program of abstract parameters (nothing allocated, nothing compiled)."""
  spec = importlib.util.spec_from_file_location('cifar10_tract', os.path.join(ROOT, 'configs',
                                                                               'cifar10_tract.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  model_config = module.get_config().model
  model = factory.build_model(model_config)
  assert count_params(factory.abstract_params(model, (32, 32, 3))) == 60_004_099
  forward = flops.forward_flops(model_config, (32, 32, 3), batch=1)
  assert forward == pytest.approx(34.06e9, rel=2e-4), forward
  # The jaxpr count (convolutions and matmuls, valid taps only), used where the lowered analysis
  # returns None (jax 0.11 on GPU), misses only the elementwise work: 99.7% here.
  apply = lambda p, x, l: model.apply({'params': p}, x, l, train=False)
  shapes = (factory.abstract_params(model, (32, 32, 3)),
            jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32), jax.ShapeDtypeStruct((1,), np.float32))
  assert 0.995 < flops.jaxpr_flops(apply, *shapes) / forward < 1.0
  # lowered_flops itself on a matmul: 2 n^3 (a multiply-add is 2 FLOPs).
  a = jax.ShapeDtypeStruct((64, 64), np.float32)
  assert flops.lowered_flops(lambda x, y: x @ y, a, a) == 2 * 64 ** 3


class _Analysed:
  def __init__(self, analysis):
    self.analysis = analysis

  def cost_analysis(self):
    if isinstance(self.analysis, Exception):
      raise self.analysis
    return self.analysis


@pytest.mark.parametrize('analysis,expected', [
    ({'flops': 12.0}, 12.0), ([{'flops': 7.0}], 7.0), (None, None), ([], None), ({}, None),
    ({'flops': -1.0}, None), (NotImplementedError('no'), None)])
def test_cost_flops_shapes(analysis, expected):
  assert flops.cost_flops(_Analysed(analysis)) == expected
