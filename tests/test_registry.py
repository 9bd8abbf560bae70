"""The method registry (tract_jax/methods): what every record provides, the one-line errors of the
lookup, and that a new method is one record plus one registry entry."""
import numpy as np
import pytest

from conftest import tiny_config
from tract_jax import config_checks, data, methods, parallel, phases, steps
from tract_jax.errors import ConfigError
from tract_jax.methods import base, parametrisations, tract
from tract_jax.models import factory


def test_every_record_is_complete():
  assert methods.names() == ('teacher', 'tract', 'btd', 'tract_edm')
  assert methods.parametrisation_names() == ('ddim', 'edm')
  keys = [(m.name, m.parametrisation.name) for m in methods.REGISTRY]
  assert len(keys) == len(set(keys))
  for method in methods.REGISTRY:
    assert callable(method.make_optimizer) and callable(method.make_loss)
    assert method.distils == (method.default_schedule is not None)
    if method.distils:
      schedule = method.default_schedule(16)
      assert method.schedule(schedule, 16) == tuple(schedule) and schedule[0] == 16
  assert methods.teacher_of(tiny_config(parametrisation='edm')).parametrisation.name == 'edm'


@pytest.mark.parametrize('method,parametrisation,match', [
    ('tract_edm', 'ddim', "allowed with method 'teacher', 'tract' or 'btd', not 'tract_edm' "
                          r"\(set parametrisation='edm' for it\)"),
    ('btd', 'edm', "allowed with method 'teacher' or 'tract_edm', not 'btd'"),
    ('consistency', 'ddim', "method='consistency': allowed values are 'teacher', 'tract', 'btd', "
                            "'tract_edm'"),
    ('tract', 'vp', "parametrisation='vp': allowed values are 'ddim', 'edm'"),
])
def test_lookup_errors_are_one_line(method, parametrisation, match):
  with pytest.raises(ConfigError, match=match) as info:
    methods.get(method, parametrisation)
  assert '\n' not in str(info.value)


def _tract_without_self_teacher():
  """docs/METHODS.md's example: TRACT whose second step is the frozen teacher's too (an ablation)."""

  def make_loss(config, model, teacher_model, plan):
    tract_loss = tract.make_loss(config, model, teacher_model, plan)

    def loss_fn(params, state, batch, rng):  # the teacher stands in for the self-teacher
      return tract_loss(params, state.replace(sema_params=state.teacher_params), batch, rng)
    return loss_fn

  return base.Method(name='tract_no_sema', parametrisation=parametrisations.DDIM,
                     make_optimizer=base.distillation_optimizer, make_loss=make_loss,
                     schedule=tract.validate_schedule, default_schedule=tract.one_phase)


@pytest.mark.slow
def test_a_new_method_is_one_record_and_one_registry_entry(monkeypatch):
  record = _tract_without_self_teacher()
  monkeypatch.setattr(methods, 'REGISTRY', methods.REGISTRY + (record,))
  config = tiny_config('tract_no_sema', time_schedule='16,4,1')
  plan = config_checks.validate_config(config)       # checks and schedule rule: the record's
  assert plan.method == 'tract_no_sema' and plan.schedule == (16, 4, 1)
  with pytest.raises(ConfigError, match='entries must be strictly decreasing'):
    phases.make_plan('tract_no_sema', 16, '16,4,8', 96, 8, 1e-3)
  mesh = parallel.mesh_from_config(config)
  params = factory.init_params(factory.build_model(config.model), (8, 8, 1), 0)
  train_step = steps.build_train_step(config, record, mesh, params)   # the shared builder
  assert train_step.state.sema_params is None  # no self-teacher EMA: the record says so
  batch = parallel.global_batch(data.load_digits().get(np.arange(8)), mesh)
  state, metrics = train_step.step(train_step.state, batch)
  assert int(state.step) == 1 and np.isfinite(float(metrics['loss']))
