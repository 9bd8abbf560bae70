"""Every start-up check: a bad value stops the job before anything compiles, with one line that names
the field, the value and what is allowed (ConfigError, exit code 2 from main.py)."""
from tract_jax import checkpoints, data, diffusion, losses, methods, parallel, paths, phases
from tract_jax.errors import ConfigError

__all__ = ['ConfigError', 'validate_config', 'check_method', 'check_model', 'check_image_shape',
           'check_device_sizes', 'MODES', 'METRICS']

MODES = ('train', 'evaluate', 'sample')
METRICS = ('agreement', 'digits_fid', 'fid', 'kid')


def _choice(name, value, allowed):
  if value not in allowed:
    raise ConfigError(f'{name}={value!r}: allowed values are {", ".join(map(repr, allowed))}')


def _check_eval(config):
  for metric in config.eval.metrics:
    _choice('eval.metrics entry', metric, METRICS)
  if 'digits_fid' in config.eval.metrics and config.data.name != 'digits':
    raise ConfigError(f"eval.metrics: 'digits_fid' scores the embedded digits only, not "
                      f'data.name={config.data.name!r}')
  inception_metrics = [m for m in config.eval.metrics if m in ('fid', 'kid')]
  if inception_metrics:
    _choice('eval.fid_resize', config.eval.fid_resize, ('torch', 'tf1'))
    for field in ('inception_weights', 'reference_stats'):
      if not config.eval[field] or not paths.resolve(config.eval[field]).exists():
        raise ConfigError(f"eval.{field}={config.eval[field]!r}: {inception_metrics[0]!r} in "
                          'eval.metrics needs this file (see README, "FID protocol")')
    from tract_jax.evaluation import stats_files  # the statistics' record, not the network
    reference = stats_files.read_stats(str(paths.resolve(config.eval.reference_stats)))
    stats_files.check_stats_convention(reference.meta, config.eval.fid_resize,
                                       config.eval.reference_stats)
    if 'kid' in inception_metrics and reference.features is None:
      raise ConfigError(f'eval.reference_stats={config.eval.reference_stats!r}: holds no reference '
                        "features, which 'kid' needs; remake it with reference_stats --kid_features")
  if config.eval_every < 0:
    raise ConfigError(f'eval_every={config.eval_every}: must be >= 0 (0 = only at phase ends)')


def _check_arch(config):
  """model.arch and, for EDM's networks, the model.edm fields (models/edm_networks.py)."""
  from tract_jax.models import edm_networks, factory
  arch = config.model.arch
  _choice('model.arch', arch, factory.ARCHS)
  if arch == 'ddpm':
    return
  edm = config.model.edm
  for field in ('model_channels', 'channel_mult_emb', 'num_blocks', 'channel_mult_noise'):
    if int(edm[field]) < 1:
      raise ConfigError(f'model.edm.{field}={edm[field]}: must be a positive integer')
  if not edm.channel_mult or min(edm.channel_mult) < 1:
    raise ConfigError(f'model.edm.channel_mult={tuple(edm.channel_mult)}: one positive multiplier '
                      'per resolution')
  if edm.augment_dim < 0:
    raise ConfigError(f'model.edm.augment_dim={edm.augment_dim}: must be >= 0')
  if arch == 'edm_song':
    _choice('model.edm.embedding_type', edm.embedding_type, edm_networks.EMBEDDING_TYPES)
    _choice('model.edm.encoder_type', edm.encoder_type, edm_networks.ENCODER_TYPES)
    if not edm.resample_filter or sum(edm.resample_filter) <= 0:
      raise ConfigError(f'model.edm.resample_filter={tuple(edm.resample_filter)}: the 1-D taps of '
                        'the resampling filter, with a positive sum')


def check_model(config):
  """config.model: the architecture and the fields every network reads (no I/O)."""
  _check_arch(config)
  _choice('model.mean_type', config.model.mean_type, diffusion.MEAN_TYPES)
  _choice('model.dtype', config.model.dtype, ('float32', 'bfloat16'))
  _choice('model.teacher_dtype', config.model.teacher_dtype, ('', 'float32', 'bfloat16'))
  _choice('model.remat', config.model.remat, ('none', 'blocks'))
  if (config.model.num_heads is None) == (config.model.head_dim is None):
    raise ConfigError('model.num_heads / model.head_dim: set exactly one of them (the other None)')
  if config.model.mean_type == 'both' and config.model.out_ch % 2:
    raise ConfigError(f"model.out_ch={config.model.out_ch}: mean_type 'both' needs an even number "
                      '(an x head and an eps head)')


def _check_training(config):
  tc = config.teacher_training
  _choice('loss_reduction', config.loss_reduction, losses.REDUCTIONS)
  _choice('teacher_training.loss_reduction', tc.loss_reduction, losses.REDUCTIONS)
  _choice('teacher_training.time_sampling', tc.time_sampling, ('continuous', 'grid'))
  _choice('ema_reset', config.ema_reset, ('none', 'phase'))
  _choice('nonfinite', config.nonfinite, ('stop', 'skip'))
  if not 0.0 <= config.sema < 1.0:
    raise ConfigError(f'sema={config.sema}: must be in [0, 1)')
  if not 0.0 < tc.ema_decay < 1.0:
    raise ConfigError(f'teacher_training.ema_decay={tc.ema_decay}: must be in (0, 1)')
  for name in ('checkpoint_every', 'log_every'):
    if int(config[name]) < 1:
      raise ConfigError(f'{name}={config[name]}: must be a positive integer')


def _check_method_fields(config, method) -> None:
  """The fields only some methods read: each is refused with the others, not ignored."""
  dropout_methods = [m.name for m in methods.REGISTRY if m.student_dropout]
  if not 0.0 <= config.student_dropout < 1.0:
    raise ConfigError(f'student_dropout={config.student_dropout}: must be in [0, 1)')
  if config.student_dropout > 0 and not method.student_dropout:
    raise ConfigError(f'student_dropout={config.student_dropout}: only method '
                      f'{" or ".join(dropout_methods)} has it (the others distil with dropout 0)')
  warmup_samples = config.optimizer.warmup_samples
  sample_methods = ' or '.join(m.name for m in methods.REGISTRY if m.warmup_in_samples)
  if warmup_samples < 0 or (warmup_samples > 0 and not method.warmup_in_samples):
    raise ConfigError(f'optimizer.warmup_samples={warmup_samples}: must be >= 0, and > 0 only '
                      f'with method {sample_methods} (the others count optimizer.warmup_steps)')
  if method.warmup_in_samples and config.optimizer.warmup_steps:
    raise ConfigError(f'optimizer.warmup_steps={config.optimizer.warmup_steps}: {method.name} '
                      'counts its warm-up in training samples; set optimizer.warmup_samples '
                      'instead')


def check_method(config):
  """config.method and config.parametrisation, and the fields that depend on them; returns the
  method's record (methods.REGISTRY)."""
  method = methods.for_config(config)  # the parametrisation, and whether the method has it
  _check_method_fields(config, method)
  method.parametrisation.check_config(config)
  method.check_config(config)
  return method


def validate_config(config):
  """Checks the fields; returns the phase plan (None for teacher training)."""
  _choice('method', config.method, methods.names())
  _choice('mode', config.mode, MODES)
  data.check_name(config.data.name)
  # Local or gs:// (paths.py): refused here only if no installed package can reach the scheme.
  for field in ('teacher_checkpoint', 'eval.params', 'eval.output', 'eval.inception_weights',
                'eval.reference_stats', 'data.data_dir'):
    section, _, name = field.rpartition('.')
    paths.check(field, (config[section] if section else config).get(name, ''))
  _check_eval(config)
  check_model(config)
  _check_training(config)
  method = check_method(config)
  if not method.distils:
    return None
  if config.mode == 'train':  # evaluate/sample only read the workdir: no teacher is needed
    if not config.teacher_checkpoint and config.teacher_training.train_steps < 1:
      raise ConfigError("teacher_checkpoint='': give a teacher checkpoint, or set "
                        'teacher_training.train_steps > 0 to train a teacher first')
    if config.teacher_checkpoint and not paths.resolve(
        checkpoints.resolve_params_path(config.teacher_checkpoint)).is_dir():
      raise ConfigError(f'teacher_checkpoint={config.teacher_checkpoint!r}: no such checkpoint '
                        'directory')
  return phases.plan_of(config)


def check_image_shape(config, image_shape):
  """The UNet halves the resolution len(ch_mult) - 1 times; the channels must match the output."""
  h, w, c = image_shape
  field, ch_mult = 'model.ch_mult', tuple(config.model.ch_mult)
  if config.model.arch != 'ddpm':
    field, ch_mult = 'model.edm.channel_mult', tuple(config.model.edm.channel_mult)
  levels = len(ch_mult) - 1
  if h != w or h % (2 ** levels):
    raise ConfigError(f'{field}={ch_mult}: {len(ch_mult)} levels need square images whose side is '
                      f'divisible by {2 ** levels}; the data has {h}x{w}')
  expected = 2 * c if config.model.mean_type == 'both' else c
  if config.model.out_ch != expected:
    raise ConfigError(f'model.out_ch={config.model.out_ch}: mean_type {config.model.mean_type!r} '
                      f'on {c}-channel images needs {expected}')


def check_device_sizes(config, mesh):
  """Every batch against the mesh's devices and the processes, before anything compiles."""
  parallel.check_batch(config.batch_size, mesh, 'batch_size')
  parallel.check_batch(config.teacher_training.batch_size, mesh, 'teacher_training.batch_size')
  parallel.check_batch(config.eval.sample_batch, mesh, 'eval.sample_batch')
  if any(m in config.eval.metrics for m in ('fid', 'kid')):
    parallel.check_batch(config.eval.inception_batch, mesh, 'eval.inception_batch')
  if config.eval.num_samples % config.eval.sample_batch:
    raise ConfigError(f'eval.num_samples={config.eval.num_samples}: must be a multiple of '
                      f'eval.sample_batch={config.eval.sample_batch}')
