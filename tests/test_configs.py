"""Every job config in configs/: the commands its docstring gives pass the real flag parser and the
start-up checks, the run it describes is the one the spec states (schedule, total samples) with the
steps per phase and evaluation-EMA momentum that budget implies (as its docstring says), and the
paper configs build the published teachers (parameter counts, spec section 7)."""
import importlib.util
import os
import re

import pytest

from conftest import ROOT, parse_command_line
from tract_jax import config_checks, phases
from tract_jax.models import factory
from tract_jax.models.unet import count_params

CONFIGS = sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, 'configs')) if n.endswith('.py'))
# The runs the specs describe: schedule and TOTAL training samples (TRACT.md sections 4, 5, 9;
# TRACT_EDM.md: the release's 40,1 at 96M samples).
PAPER_RUNS = {
    'cifar10_tract': ((1024, 32, 1), 96 * 2**20),
    'cifar10_tract_1024_1': ((1024, 1), 96 * 2**20),
    'cifar10_btd': (tuple(1024 // 2**k for k in range(11)), 96 * 2**20),
    'imagenet64_tract': ((1024, 32, 1), 96 * 2**20),
    'cifar10_edm_tract': ((40, 1), 96 * 2**20),
    'imagenet64_edm_tract': ((40, 1), 96 * 2**20),
}
PAPER_FID = {'cifar10_tract': '3.78', 'cifar10_btd': '9.12', 'imagenet64_tract': '7.43'}


def load(name):
  spec = importlib.util.spec_from_file_location(f'config_{name}',
                                                os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def doc_text(module):
  return ' '.join(module.__doc__.replace('\\\n', ' ').split())  # continuation lines joined


def main_commands(module):
  """The argument lists of every `python -m tract_jax.main ...` command in the docstring."""
  commands = []
  for line in module.__doc__.replace('\\\n', ' ').splitlines():
    words = line.split()
    if words[:3] == ['python', '-m', 'tract_jax.main']:
      commands.append(words[3:])
  return commands


def stand_in_teacher(tmp_path):
  """A directory where a teacher checkpoint would be (the start-up check looks for it)."""
  (tmp_path / 'teacher' / 'ema_params').mkdir(parents=True)
  return str(tmp_path / 'teacher')


@pytest.mark.parametrize('name', CONFIGS)
def test_docstring_commands_pass_the_start_up_checks(name, tmp_path):
  module = load(name)
  commands = main_commands(module)
  assert commands, f'configs/{name}.py documents no python -m tract_jax.main command'
  for words in commands:
    assert words[0] == f'--config=configs/{name}.py' and words[1].startswith('--workdir=')
    config = parse_command_line(*words[2:], config_file=f'configs/{name}.py')
    if config.method != 'teacher' and config.teacher_checkpoint:
      # The teacher the docstring's import command writes (--output) is the one the job reads.
      outputs = re.findall(r'--output=(\S+)', doc_text(module))
      if outputs:
        assert config.teacher_checkpoint == outputs[0], (outputs, config.teacher_checkpoint)
      config.teacher_checkpoint = stand_in_teacher(tmp_path)
    plan = config_checks.validate_config(config)
    assert (plan is None) == (config.method == 'teacher')


@pytest.mark.parametrize('name', sorted(PAPER_RUNS))
def test_paper_configs_run_what_the_spec_describes(name):
  module = load(name)
  config = module.get_config()
  plan = phases.make_plan(config.method, config.teacher_steps, config.time_schedule,
                          config.train_samples, config.batch_size, config.ema_residual)
  schedule, samples = PAPER_RUNS[name]
  assert plan.schedule == schedule
  assert config.train_samples == samples  # the TOTAL over all phases (official train_len)
  # What the budget implies: equal phases using all but less than one batch per phase ...
  used = plan.total_steps * config.batch_size
  assert samples - plan.num_phases * config.batch_size < used <= samples
  # ... and an evaluation EMA that leaves ema_residual of the phase's start after a phase.
  assert plan.ema_momentum ** plan.steps_per_phase == pytest.approx(config.ema_residual, rel=1e-9)
  doc = doc_text(module)
  assert f'{plan.steps_per_phase:,} steps' in doc, 'the docstring states the steps per phase'
  assert 'Hardware' in doc and 'Expected result' in doc
  if name in PAPER_FID:
    assert PAPER_FID[name] in doc


@pytest.mark.parametrize('name,image_shape,expected', [
    ('cifar10_tract', (32, 32, 3), 60_004_099), ('imagenet64_tract', (64, 64, 3), 295_905_222)])
def test_paper_configs_build_the_published_teachers(name, image_shape, expected):
  """Parameter counts of the published cifar_original / imagenet_original teachers (spec section
  7); every CIFAR-10 config builds the same network (the teacher they all distil)."""
  config = load(name).get_config()
  params = factory.abstract_params(factory.build_model(config.model), image_shape)
  assert count_params(params) == expected
  assert ('class_emb' in params) == bool(config.model.num_classes)
  if name == 'cifar10_tract':
    for other in ('cifar10_teacher', 'cifar10_tract_1024_1', 'cifar10_btd'):
      assert load(other).get_config().model.to_dict() == config.model.to_dict(), other
