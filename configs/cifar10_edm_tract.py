"""CIFAR-10 TRACT with EDM's unconditional VE teacher, schedule 40 -> 1 (one phase): the TRACT
release's EDM command (docs/SPEC_EDM.md: batch 512, 96M training samples).

  wget https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-ve.pkl
  python -m tract_jax.import_teacher --source=edm-cifar10-32x32-uncond-ve.pkl \
      --config=configs/cifar10_edm_tract.py --output=~/tract_teachers/edm_cifar10
  python -m tract_jax.main --config=configs/cifar10_edm_tract.py \
      --workdir=~/tract_runs/cifar10_edm_tract

(teacher_checkpoint below is the import's --output; the import reads the pickle's `ema` network
without executing its code.) The teacher is EDM's NCSN++ SongUNet (model.arch 'edm_song', the
model.edm defaults: 128 channels, channel_mult 2,2,2, Fourier noise embedding, residual encoder,
resample filter 1,3,3,1, no augmentation labels). 96 * 2**20 samples at batch 512: 196,608 steps in
the one phase, evaluation-EMA momentum 1e-3 ** (1 / 196,608) = 0.99996487. Each step runs the
teacher twice (Heun step sigma_{i0} -> sigma_{i0-1} on EDM's 40-level grid), the self-teacher once
and the student forward and backward; targets and loss in the network's output space (per-pixel
mean, weight 1); Adam 1e-3 without clipping, non-finite gradient entries replaced.

Hardware: sized like the release's command, batch 512 = 64 per device on 8 A100/H100-class GPUs
(or a TPU v4-8). Not yet run end to end on such hardware here.

Expected result: docs/SPEC_EDM.md quotes no figure for this run. The job's evaluation scores the 1-step
student (phase_0_ema) against the teacher's 40-step samples of the section-2 sampler from the same
noise (eval/rmse_vs_teacher); add 'fid' to eval.metrics with the FID files (README, "FID protocol")
to compare FIDs.

Precision: float32 by default; on GPU/TPU --config.model.dtype=bfloat16 computes the networks in
bf16 (parameters, EMAs, targets and loss stay float32).
"""
from tract_jax import default_config


def get_config():
  config = default_config.get_config()
  config.method = 'tract_edm'
  config.parametrisation = 'edm'
  config.teacher_checkpoint = '~/tract_teachers/edm_cifar10'
  config.teacher_steps = 40                 # EDM's grid: sigma 0.002 .. 80, rho 7
  config.time_schedule = '40,1'
  config.train_samples = 96 * 2**20
  config.batch_size = 512
  config.sema = 0.5
  config.ema_residual = 1e-3
  config.loss_reduction = 'mean'            # the release: mean over pixels
  config.clip_x = True                      # the section-2 step clips x0 (the Heun step never)
  config.student_dropout = 0.0

  config.optimizer.learning_rate = 1e-3
  config.optimizer.grad_clip = 0.0          # no clipping in the release
  config.optimizer.warmup_steps = 0
  config.optimizer.warmup_samples = 0       # the release's warm-up is optional, off by default
  config.teacher_training.train_steps = 0   # distil the imported teacher, never train one

  config.model.arch = 'edm_song'            # model.edm defaults: the CIFAR-10 VE network
  config.model.out_ch = 3
  config.model.num_classes = 0

  config.data.name = 'cifar10'
  config.data.random_flip = True
  config.checkpoint_every = 10_000
  config.log_every = 1000
  return config
