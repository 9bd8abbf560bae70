"""The step loop shared by the teacher and distillation jobs: batches in, updates, progress lines,
checkpoint cadence, SIGTERM/SIGINT and the non-finite policy. The phase structure is the caller's
(train.py): `run(state, batches, until=...)` does the updates up to one boundary and returns.

The loop keeps the step number on the host, so an update costs no device round trip: the state is
read back only at log points and saves. With asynchronous dispatch, the next batch is read and copied
to the devices while the current update runs; on CPU devices the host stays at most
MAX_UPDATES_IN_FLIGHT updates ahead (see there why).
"""
import collections
import itertools
import signal
import threading

import jax

from tract_jax import parallel, writers
from tract_jax.errors import ConfigError, NonFiniteError, Preempted


# Calls of reached_preemption_sync_point in this process: it needs a number that grows by one per
# call and is the same on every process at the same call. Steps are not: the teacher's loop and the
# distillation loop both count from 0, and a resumed run starts in the middle.
_SYNC_CALLS = itertools.count()

# How many dispatched updates may be unfinished when the next one is dispatched. Unbounded
# asynchronous dispatch deadlocks XLA:CPU with several CPU devices (cpu_devices='auto' on a 2-core
# machine; measured with JAX/jaxlib 0.10.2): each device's execution holds a thread of the CPU
# client's worker pool (as many threads as cores, PJRT_NPROC overrides) for its whole run, including
# the wait in the gradient all-reduce, and a launch blocked on the per-device in-flight limit (32)
# holds one too. Once the host is 32 updates ahead, that launch and device 0's execution can take
# both threads of a 2-core machine while device 1's half of the all-reduce never gets one: the job
# hung, or aborted after XLA's 40 s collective timeout ("Termination timeout for all reduce ...
# only 1 of them arrived"); 2 of about 14 concurrent 600-update runs under load did. Waiting on the
# update two back keeps one update queued behind the running one, so the devices do not idle between
# updates. The bound applies to CPU devices only: GPU and TPU runtimes do not run a collective's
# halves on a shared host thread pool, and a deeper queue hides host stalls there.
MAX_UPDATES_IN_FLIGHT = 2


class DispatchBound:
  """Keeps the host at most MAX_UPDATES_IN_FLIGHT updates ahead on CPU devices (no bound elsewhere):
  `wait_for_room()` before dispatching an update, `dispatched(outputs)` with any of its outputs."""

  def __init__(self, platform: str):
    self.bound = MAX_UPDATES_IN_FLIGHT if platform == 'cpu' else None
    self._in_flight = collections.deque()  # outputs of dispatched updates, oldest first

  def wait_for_room(self):
    if self.bound is not None and len(self._in_flight) >= self.bound:
      jax.block_until_ready(self._in_flight.popleft())

  def dispatched(self, outputs):
    if self.bound is not None:
      self._in_flight.append(outputs)


class SignalFlag:
  """Turns SIGTERM/SIGINT into something the loop checks before each step (so that it can save first).

  One process: a flag; a second signal stops at once. Several processes (jax.distributed with its
  preemption service): SIGTERM is left to JAX, whose notifier catches it and tells the other
  processes through the coordination service; SIGINT (Ctrl-C) is handed to the same notifier as a
  SIGTERM, and a second SIGINT stops at once. A Python SIGTERM handler would replace JAX's (measured:
  with one installed, reached_preemption_sync_point never turned True), so none is installed then.
  """

  def __init__(self):
    self.signum = None
    self.coordinated = False
    self._old = {}

  def __enter__(self):
    self.coordinated = parallel.preemption_service() is not None
    if jax.process_count() > 1 and not self.coordinated:
      raise ConfigError('jax_enable_preemption_service is off: a multi-process job needs it to '
                        'agree on the step where every process stops after a SIGTERM')
    if threading.current_thread() is threading.main_thread():
      sigs = (signal.SIGINT,) if self.coordinated else (signal.SIGTERM, signal.SIGINT)
      for sig in sigs:
        self._old[sig] = signal.signal(sig, self._handler)
    return self

  def _handler(self, signum, frame):
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    if self.coordinated:
      signal.raise_signal(signal.SIGTERM)  # to JAX's preemption notifier

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
  entered the next gradient all-reduce would hang the job. So the hosts agree through JAX's
  coordination service (multihost_utils.reached_preemption_sync_point, asked before every step; no
  device collective): once any host got SIGTERM, all of them reach the same sync point a step or
  two later, save that step and raise Preempted together.
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
    dispatch = DispatchBound(self.mesh.devices.flat[0].platform)
    while step < until:
      self._stop_if_signalled(step, state, label)
      batch_step, batch = next(batches)
      if batch_step != step:
        raise RuntimeError(f'input pipeline out of step: batch {batch_step} for update {step}')
      global_batch = parallel.global_batch(batch, self.mesh)
      dispatch.wait_for_room()
      state, metrics = self.step_fn(state, global_batch)
      dispatch.dispatched(metrics)
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
    if self.signals.coordinated:
      if not parallel.reached_preemption_sync_point(next(_SYNC_CALLS)):
        return
      where = ("signal to a process of this job (SIGTERM or Ctrl-C, agreed through JAX's "
               'coordination service)')
    elif self.signals.signum is None:
      return
    else:
      where = f'signal {self.signals.signum}'
    self.save(step, state, label, wait=True)
    raise Preempted(f'{where} at step {step}: checkpoint saved in {self.ckpts.directory}; '
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
