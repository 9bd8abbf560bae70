"""The step loop shared by the teacher and distillation jobs: batches in, updates, progress lines,
checkpoint cadence, SIGTERM/SIGINT and the non-finite policy. The phase structure is the caller's
(train.py): `run(state, batches, until=...)` does the updates up to one boundary and returns.

The loop keeps the step number on the host, so an update costs no device round trip: the state is
read back only at log points and saves. With asynchronous dispatch, the next batch is read and copied
to the devices while the current update runs.
"""
import signal
import threading

import jax

from tract_jax import parallel, writers
from tract_jax.errors import NonFiniteError, Preempted


class SignalFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step (so that it can save first).
  A second signal stops at once."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handler)
    return self

  def _handler(self, signum, frame):
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


class StepLoop:
  """Runs jitted updates `step_fn(state, global_batch) -> (state, metrics)`.

  Logs every `log_every` steps (and at step 1 and at each `until`), saves every `checkpoint_every`
  steps except at `until` (the caller saves there, after writing what belongs to that boundary), and
  on a signal saves and raises Preempted. Skipped non-finite updates are checked (one device sync)
  only at log points and saves: config.nonfinite 'stop' raises NonFiniteError, 'skip' warns.

  With several processes a signal reaches one host at a time, and a host that saved while the others
  entered the next gradient all-reduce would hang the job. So the hosts agree: every
  `preemption_check_every` steps (the same steps everywhere) they exchange their signal flags, and if
  any host was signalled they all save that step and raise Preempted together.
  """

  def __init__(self, config, step_fn, mesh, ckpts, writer, *, total: int, images_per_step: int,
               scalar_prefix: str, signals: SignalFlag):
    self.config = config
    self.step_fn = step_fn
    self.mesh = mesh
    self.ckpts = ckpts
    self.writer = writer
    self.total = total
    self.scalar_prefix = scalar_prefix
    self.signals = signals
    self.images_per_step = images_per_step
    self.check_every = 1 if jax.process_count() == 1 else int(config.preemption_check_every)
    self.progress = None
    self.reported = 0  # non-finite updates already warned about

  def run(self, state, batches, until: int, label: str, on_eval=None):
    """Updates from state.step up to `until`; `batches` yields (step, host-local batch) in order.

    on_eval(step, state) runs every config.eval_every steps (not at `until`).
    """
    step = int(state.step)
    if self.progress is None:
      self.progress = writers.Progress(self.total, self.images_per_step)
    config = self.config
    while step < until:
      self._stop_if_signalled(step, state, label)
      batch_step, batch = next(batches)
      if batch_step != step:
        raise RuntimeError(f'input pipeline out of step: batch {batch_step} for update {step}')
      state, metrics = self.step_fn(state, parallel.global_batch(batch, self.mesh))
      step += 1
      if step % config.log_every == 0 or step in (1, until):
        self.check_finite(state, label)
        values = {k: float(v) for k, v in metrics.items()}
        self.writer.scalars(step, {f'{self.scalar_prefix}/{k}': v for k, v in values.items()})
        print(f'[{label}] step {step}/{self.total} loss {values["loss"]:.4f} '
              f'({self.progress.line(step)})', flush=True)
      if step == until:
        break
      if on_eval is not None and config.eval_every and step % config.eval_every == 0:
        on_eval(step, state)
      if step % config.checkpoint_every == 0:
        self.save(step, state, label)
    # A signal that arrived during the last update is handled at the start of the next run(), after
    # the caller has written what belongs to this boundary (a phase's artefact) and saved: saving
    # here would mark the phase done without its artefact.
    return state

  def save(self, step: int, state, label: str, wait: bool = False):
    self.check_finite(state, label)
    self.ckpts.save(step, state, wait=wait)

  def _stop_if_signalled(self, step, state, label):
    if step % self.check_every:
      return
    if not parallel.any_process(self.signals.signum is not None):
      return
    self.save(step, state, label, wait=True)
    where = self.signals.signum if self.signals.signum is not None else 'on another process'
    raise Preempted(f'signal {where} at step {step}: checkpoint saved in {self.ckpts.directory}; '
                    're-run the same command to resume')

  def check_finite(self, state, where: str):
    """Host-side policy for skipped non-finite updates (a new one since the last check)."""
    count = int(state.nonfinite_count)
    if count <= self.reported:
      return
    self.reported = count
    first = int(state.first_nonfinite)
    last_good = self.ckpts.latest_step()
    good = (f'the last good checkpoint is step {last_good} in {self.ckpts.directory}'
            if last_good is not None else 'no checkpoint was saved yet')
    message = (f'non-finite loss or gradients at step {first + 1} ({where}); {count} update(s) '
               f'skipped so far, parameters unchanged by them; {good}')
    if self.config.nonfinite == 'stop':
      raise NonFiniteError(message + '. Set --config.nonfinite=skip to skip such updates and go on.')
    if jax.process_index() == 0:
      print(f'WARNING: {message}', flush=True)
