"""Entry point: python -m tract_jax.main --config=configs/<job>.py --workdir=DIR [--config.x=y ...]"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tract_jax.errors import CheckpointError, ConfigError, NonFiniteError, Preempted

FLAGS = flags.FLAGS
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: interrupted with the state saved; re-run the same command
config_flags.DEFINE_config_file('config', None, 'Job configuration file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, samples and summaries.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from tract_jax import devices  # after flag parsing: importing JAX is slow
  try:
    devices.configure(FLAGS.config)  # before anything starts JAX's backend
    from tract_jax import train
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except ConfigError as e:
    print(f'Configuration error: {e}', file=sys.stderr)
    sys.exit(2)
  except Preempted as e:
    print(f'Interrupted: {e}', file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  except (NonFiniteError, CheckpointError) as e:
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
