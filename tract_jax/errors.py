"""The exceptions a user sees. They sit at the bottom of the import graph so that every module, from
the data readers to the driver, can raise them without importing anything above itself.

`main.py` turns each into an exit code: ConfigError 2, Preempted 75, NonFiniteError and
CheckpointError 1.
"""


class ConfigError(ValueError):
  """A configuration value is invalid. The message names the field, the value and what is allowed."""


class CheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be restored."""


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; the state was saved. Re-running the same command resumes."""


class NonFiniteError(RuntimeError):
  """The loss or a gradient was not finite (the update was not applied)."""
