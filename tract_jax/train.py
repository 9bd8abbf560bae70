"""The driver: `train_and_evaluate(config, workdir)` runs the whole job a config describes.

Read top to bottom: validate -> mesh -> data -> evaluator -> teacher (train or load) -> for phase
in plan: for step in phase -> final evaluation. The pieces live one hop away: config_checks
(start-up checks), parallel (mesh), data (input pipeline), methods (what each method trains and
how), steps (the one builder of the jitted update), loop (the step loop), checkpoints (Orbax),
evaluator (samples and metrics), workdir (protection), modes (mode=evaluate|sample).
"""
import json
import time

import jax

from tract_jax import (checkpoints, config_checks, data, devices, methods, parallel, paths, phases,
                       steps, writers)
from tract_jax.evaluator import Evaluator
from tract_jax.loop import SignalFlag, StepLoop
from tract_jax.models import factory
from tract_jax.modes import evaluate_or_sample
from tract_jax.state import advance_phase
from tract_jax.workdir import protect, record_config


def _pipeline(config, source, batch_size: int, seed: int, start_step: int):
  """The batches of steps start_step, start_step + 1, ... of this process (see data.make_pipeline)."""
  return data.make_pipeline(source, batch_size, seed, start_step, process_index=jax.process_index(),
                            process_count=jax.process_count(), random_flip=config.data.random_flip,
                            workers=config.data.workers, prefetch=config.data.prefetch)


def _param_target(config, image_shape, mesh):
  """Restore target of parameter checkpoints: shapes with the mesh's shardings."""
  return factory.abstract_params(factory.build_model(config.model), image_shape, mesh,
                                 config.mesh.fsdp_min_size)


def train_teacher(config, workdir: str, source=None, mesh=None):
  """Trains a teacher (spec section 6; EDM's loss with parametrisation 'edm') in `workdir`;
  returns its evaluation-EMA parameters.

  Resumes from workdir/checkpoints; the finished EMA is written to workdir/ema_params (and read
  from there, without training, when it exists).
  """
  tc = config.teacher_training
  source = source or data.load_source(config.data)
  mesh = mesh or parallel.mesh_from_config(config)
  workdir = paths.resolve(workdir)  # local or gs://
  workdir.mkdir(parents=True, exist_ok=True)
  final_path = workdir / 'ema_params'
  like = _param_target(config, source.image_shape, mesh)
  if checkpoints.is_complete(final_path):
    print(f'Teacher already trained: {final_path}', flush=True)
    return checkpoints.load_params(final_path, like)

  params = factory.init_params(factory.build_model(config.model), source.image_shape, config.seed,
                               like)
  train_step = steps.build_train_step(config, methods.teacher_of(config), mesh, params)
  total, batch_size = int(tc.train_steps), train_step.batch_size
  print(f'Teacher training: {total} steps, batch {batch_size}, '
        f'{sum(x.size for x in jax.tree.leaves(params)):,} parameters', flush=True)
  with writers.MetricWriter(workdir, enabled=jax.process_index() == 0) as writer, \
      checkpoints.StateCheckpoints(workdir / 'checkpoints', config.keep_checkpoints) as ckpts, \
      SignalFlag() as signals:
    state = ckpts.restore_or_keep(train_step.state, what='teacher training')
    loop = StepLoop(config, train_step.step, mesh, ckpts, writer, total=total,
                    images_per_step=batch_size, scalar_prefix='teacher', signals=signals)
    with _pipeline(config, source, batch_size, train_step.seed, int(state.step)) as batches:
      state = loop.run(state, batches, until=total, label='teacher')
    loop.save(total, state, 'teacher')
  checkpoints.save_params(final_path, state.ema_params)
  return state.ema_params


def train_distillation(config, workdir: str, plan: phases.PhasePlan, teacher_params, source=None,
                       mesh=None, evaluator=None):
  """Runs every phase of `plan` (its method's record says how) from `teacher_params`; returns the
  final state.

  Phase k ends by writing workdir/phase_<k>_ema (its evaluation EMA, an S_{k+1}-step student) and
  its grid, then a resumable checkpoint; the next phase starts with that EMA as its teacher.
  """
  source = source or data.load_source(config.data)
  mesh = mesh or parallel.mesh_from_config(config)
  workdir = paths.resolve(workdir)  # local or gs://
  workdir.mkdir(parents=True, exist_ok=True)
  evaluator = evaluator or Evaluator(config, factory.build_model(config.model), source.image_shape,
                                     workdir, mesh)
  # The student starts from the teacher; the EMAs too (their first update copies the student).
  train_step = steps.build_train_step(config, methods.get(plan.method), mesh, teacher_params, plan)
  if evaluator.reference is None and 'agreement' in evaluator.metrics:
    evaluator.teacher_reference(teacher_params, plan.teacher_steps)  # cached in the workdir
  batch_size = train_step.batch_size
  print(f'{plan.method.upper()}: schedule {",".join(map(str, plan.schedule))}, {plan.num_phases} '
        f'phase(s) of {plan.steps_per_phase} steps, batch {batch_size}, evaluation-EMA '
        f'momentum {plan.ema_momentum:.8f}', flush=True)
  with writers.MetricWriter(workdir, enabled=jax.process_index() == 0) as writer, \
      checkpoints.StateCheckpoints(workdir / 'checkpoints', config.keep_checkpoints) as ckpts, \
      SignalFlag() as signals:
    state = ckpts.restore_or_keep(train_step.state, what=plan.method)
    loop = StepLoop(config, train_step.step, mesh, ckpts, writer, total=plan.total_steps,
                    images_per_step=batch_size, scalar_prefix=plan.method, signals=signals)
    done = int(state.step)
    with _pipeline(config, source, batch_size, train_step.seed, done) as batches:
      for phase in range(plan.phase_of_step(done), plan.num_phases):
        end = (phase + 1) * plan.steps_per_phase
        if done >= end:  # resumed at this phase's end: its artefact was written before the save
          continue
        if phase > int(state.phase):
          state = advance_phase(state, reset_ema=config.ema_reset == 'phase')
        student_steps = plan.student_steps(phase)
        label = f'{plan.method} phase {phase}: {plan.schedule[phase]}->{student_steps} steps'

        def on_eval(step, state, phase=phase, student_steps=student_steps):
          evaluator.report(writer, step, state.ema_params, student_steps, phase, phase_end=False)

        state = loop.run(state, batches, until=end, label=label, on_eval=on_eval)
        # The phase's artefact first, then the resumable state (which marks the phase as done).
        checkpoints.save_params(workdir / f'phase_{phase}_ema', state.ema_params)
        evaluator.report(writer, end, state.ema_params, student_steps, phase, phase_end=True)
        loop.save(end, state, label)
  return state


def train_and_evaluate(config, workdir: str):
  """The whole job the config describes: (teacher training), every distillation phase, evaluation."""
  start = time.time()
  devices.configure(config)  # CPU device count, before JAX starts (no-op once it runs)
  paths.check('workdir', workdir)  # a local folder or a bucket (gs://...): see paths.py
  paths.check_folder('workdir', workdir)
  plan = config_checks.validate_config(config)               # validate
  parallel.use_compilation_cache(config.compilation_cache_dir)
  parallel.maybe_initialize_distributed(config)               # mesh
  mesh = parallel.mesh_from_config(config)
  config_checks.check_device_sizes(config, mesh)
  source = data.load_source(config.data)                      # data
  config_checks.check_image_shape(config, source.image_shape)
  data.check_labels(source, config.model.num_classes, log=jax.process_index() == 0)
  workdir = paths.resolve(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  print(parallel.describe(mesh), flush=True)
  evaluator = Evaluator(config, factory.build_model(config.model), source.image_shape, workdir,
                        mesh)                                   # evaluator
  if config.mode != 'train':
    return evaluate_or_sample(config, workdir, plan, source.image_shape, mesh, evaluator)
  protect(config, workdir)  # process 0 may delete an incompatible run (overwrite=True) ...
  record_config(config, workdir, source.image_shape)
  parallel.barrier('workdir ready')  # ... before any host reads the workdir

  distils = plan is not None
  if not distils or not config.teacher_checkpoint:            # teacher: train or load
    if distils:
      print('No teacher_checkpoint: training a teacher first (workdir/teacher)', flush=True)
    teacher = train_teacher(config, workdir / 'teacher' if distils else workdir, source, mesh)
  else:
    teacher = checkpoints.load_params(config.teacher_checkpoint,
                                      _param_target(config, source.image_shape, mesh))
  evaluator.teacher_reference(teacher, config.teacher_steps)
  if not distils:
    print(f'Done in {time.time() - start:.0f}s', flush=True)
    return {'wall_time_s': time.time() - start}

  state = train_distillation(config, workdir, plan, teacher, source, mesh, evaluator)   # phases

  result = evaluator.final_agreement(teacher, state.ema_params, plan.teacher_steps,   # final eval
                                     plan.schedule[-1])
  result['wall_time_s'] = time.time() - start
  if jax.process_index() == 0:
    paths.write_text(workdir / 'result.json', json.dumps(result, indent=2))
  print(f'Teacher agreement at {result["student_steps"]} step(s) (RMSE against the '
        f'{plan.teacher_steps}-step teacher, same noise): student '
        f'{result["rmse_student_vs_teacher"]:.4f}, undistilled teacher '
        f'{result["rmse_undistilled_vs_teacher"]:.4f} (ratio {result["ratio"]:.2f})', flush=True)
  if 'digits_fid_student' in result:
    print(f'Offline digits FID ({len(evaluator.noise)} samples): teacher at {plan.teacher_steps} '
          f'steps {result["digits_fid_teacher"]:.2f}, student at {result["student_steps"]} step(s) '
          f'{result["digits_fid_student"]:.2f}, undistilled teacher at {result["student_steps"]} '
          f'step(s) {result["digits_fid_undistilled"]:.2f}', flush=True)
  print(f'Done in {result["wall_time_s"]:.0f}s', flush=True)
  return result
