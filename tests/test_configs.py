"""The paper configurations: model sizes (jax.eval_shape, nothing allocated) and phase plans."""
import importlib.util
import os
import re

import pytest

from tract_jax import import_teacher, phases
from tract_jax.models.unet import count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIGS = ('cifar10_teacher', 'cifar10_tract', 'cifar10_tract_1024_1', 'cifar10_btd',
                 'imagenet64_tract')


def load(name):
  spec = importlib.util.spec_from_file_location(f'config_{name}',
                                                os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def plan_of(config):
  return phases.make_plan(config.method, config.teacher_steps, config.time_schedule,
                          config.train_samples, config.batch_size, config.ema_residual)


@pytest.mark.parametrize('name,expected', [('cifar10_tract', 60_004_099),
                                           ('imagenet64_tract', 295_905_222)])
def test_parameter_counts(name, expected):
  assert count_params(import_teacher.abstract_params(load(name).get_config())) == expected


def test_every_config_builds_the_cifar10_or_imagenet_teacher():
  for name in PAPER_CONFIGS:
    config = load(name).get_config()
    params = import_teacher.abstract_params(config)
    conditional = name.startswith('imagenet')
    assert ('class_emb' in params) == conditional, name
    assert config.model.mean_type == ('both' if conditional else 'x'), name


def test_cifar10_tract_plan():
  config = load('cifar10_tract').get_config()
  plan = plan_of(config)
  assert plan.schedule == (1024, 32, 1)
  assert plan.steps_per_phase == 196_608
  assert round(plan.ema_momentum, 8) == 0.99996487
  assert (config.batch_size, config.train_samples, config.sema, config.ema_residual) == (
      256, 96 * 2**20, 0.5, 1e-3)
  assert config.loss_reduction == 'sum' and config.clip_x
  assert config.optimizer.learning_rate == 2e-4


def test_one_phase_and_btd_plans():
  one = plan_of(load('cifar10_tract_1024_1').get_config())
  assert one.schedule == (1024, 1) and one.num_phases == 1
  assert one.steps_per_phase == 96 * 2**20 // 256

  btd = plan_of(load('cifar10_btd').get_config())
  assert btd.method == 'btd' and btd.num_phases == 10
  assert btd.schedule == tuple(1024 // 2**k for k in range(11))
  assert btd.steps_per_phase == 96 * 2**20 // (256 * 10)

  imagenet = plan_of(load('imagenet64_tract').get_config())
  assert imagenet.schedule == (1024, 32, 1)


def test_teacher_config():
  config = load('cifar10_teacher').get_config()
  tt = config.teacher_training
  assert config.method == 'teacher' and tt.train_steps > 0
  assert (tt.batch_size, tt.learning_rate, tt.warmup_steps, tt.ema_decay, tt.dropout) == (
      128, 2e-4, 1000, 0.9999, 0.2)
  assert tt.loss_reduction == 'mean' and config.data.random_flip


def test_imagenet_config_fields():
  config = load('imagenet64_tract').get_config()
  m = config.model
  assert (m.ch, m.emb_ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions)) == (
      192, 768, (1, 2, 3, 4), 3, (32, 16, 8))
  assert (m.num_heads, m.head_dim, m.out_ch, m.num_classes) == (None, 64, 6, 1000)
  assert config.data.name == 'imagenet64' and config.data.random_flip


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_docstring_gives_command_and_expectations(name):
  module = load(name)
  doc = module.__doc__
  command = ' '.join(doc.replace('\\\n', ' ').split())  # shell line continuations joined
  assert f'python -m tract_jax.main --config=configs/{name}.py' in command
  assert 'Hardware' in doc and 'Expected result' in doc
  config = module.get_config()
  if config.method != 'teacher':
    # The teacher_checkpoint placeholder is the import command's --output.
    outputs = re.findall(r'--output=(\S+)', doc)
    assert outputs and config.teacher_checkpoint == outputs[0], (outputs, config.teacher_checkpoint)
  fid = {'cifar10_tract': '3.78', 'cifar10_btd': '9.12', 'imagenet64_tract': '7.43'}.get(name)
  if fid:
    assert fid in doc
