"""The method registry: every training method is one record (methods/base.py), listed once below.

config.method and config.parametrisation pick a record; phases, config_checks, steps, train, the
evaluator, export and the benchmarks ask it for everything method-specific. Adding a method is one
module in this package that defines `METHOD = base.Method(...)`, plus one line in REGISTRY.
"""
from typing import Tuple

from tract_jax.errors import ConfigError
from tract_jax.methods import btd, edm_teacher, teacher, tract, tract_edm
from tract_jax.methods.base import Method, Parametrisation

__all__ = ['Method', 'Parametrisation', 'REGISTRY', 'get', 'for_config', 'teacher_of', 'names',
           'parametrisation_names', 'distilling_names']

REGISTRY: Tuple[Method, ...] = (
    teacher.METHOD,      # DDIM teacher training
    edm_teacher.METHOD,  # EDM teacher training
    tract.METHOD,
    btd.METHOD,
    tract_edm.METHOD,
)

TEACHER = teacher.METHOD.name  # the name of teacher training, whatever the parametrisation


def _unique(values) -> tuple:
  return tuple(dict.fromkeys(values))


def names() -> Tuple[str, ...]:
  """The values config.method takes."""
  return _unique(m.name for m in REGISTRY)


def distilling_names() -> Tuple[str, ...]:
  """The methods that distil (have a phase plan)."""
  return _unique(m.name for m in REGISTRY if m.distils)


def parametrisation_names() -> Tuple[str, ...]:
  """The values config.parametrisation takes."""
  return _unique(m.parametrisation.name for m in REGISTRY)


def _quoted(values, last='or') -> str:
  values = [repr(v) for v in values]
  return values[0] if len(values) == 1 else f'{", ".join(values[:-1])} {last} {values[-1]}'


def get(name: str, parametrisation=None) -> Method:
  """The record of method `name` with `parametrisation` (None: the first record of that name;
  every distillation method has only one). ConfigError (one line) for an unknown name or a
  parametrisation the method does not have."""
  candidates = [m for m in REGISTRY if m.name == name]
  if not candidates:
    raise ConfigError(f'method={name!r}: allowed values are {", ".join(map(repr, names()))}')
  if parametrisation is None:
    return candidates[0]
  if parametrisation not in parametrisation_names():
    raise ConfigError(f'parametrisation={parametrisation!r}: allowed values are '
                      f'{", ".join(map(repr, parametrisation_names()))}')
  for method in candidates:
    if method.parametrisation.name == parametrisation:
      return method
  users = [m.name for m in REGISTRY if m.parametrisation.name == parametrisation]
  own = _unique(m.parametrisation.name for m in candidates)
  raise ConfigError(f'parametrisation={parametrisation!r}: allowed with method '
                    f'{_quoted(_unique(users))}, not {name!r} (set parametrisation='
                    f'{_quoted(own)} for it)')


def for_config(config) -> Method:
  """The record config.method and config.parametrisation name."""
  return get(config.method, config.parametrisation)


def teacher_of(config) -> Method:
  """Teacher training in config.parametrisation: the teacher job, and the teacher a distillation
  run trains first when it has no teacher_checkpoint."""
  return get(TEACHER, config.parametrisation)
