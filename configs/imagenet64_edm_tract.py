"""Class-conditional ImageNet 64x64 TRACT with EDM's ADM teacher, schedule 40 -> 1 (one phase), as
the TRACT release distils EDM teachers (docs/SPEC_EDM.md).

  wget https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl
  python -m tract_jax.import_teacher --source=edm-imagenet-64x64-cond-adm.pkl \
      --config=configs/imagenet64_edm_tract.py --output=~/tract_teachers/edm_imagenet64
  python -m tract_jax.main --config=configs/imagenet64_edm_tract.py \
      --workdir=~/tract_runs/imagenet64_edm_tract

The teacher is EDM's DhariwalUNet (model.arch 'edm_dhariwal': 192 channels, channel_mult 1,2,3,4,
3 blocks per level, attention at 32, 16 and 8 px, 1000 classes given as one-hot vectors). Labels go
to teacher, self-teacher and student; evaluation samples use uniformly random labels. Training
budget: docs/SPEC_EDM.md gives the release's command for CIFAR-10 only, so this takes it (96 * 2**20
samples at batch 512: 196,608 steps, evaluation-EMA momentum 0.99996487).

Hardware: batch 512 = 64 per device on 8 A100/H100-class GPUs or a TPU v4-8; with less memory per
device shard parameters and optimiser state with --config.mesh.fsdp=8, and recompute activations
with --config.model.remat=blocks. Not yet run end to end on such hardware here.

Expected result: docs/SPEC_EDM.md quotes no figure for this run; the job's evaluation scores the 1-step
student against the teacher's 40-step samples from the same noise and labels (add 'fid' to
eval.metrics with the ImageNet-64 FID files to compare FIDs).

Precision: float32 by default; on GPU/TPU --config.model.dtype=bfloat16 (float32 parameters, EMAs,
targets and loss).
"""
from tract_jax import default_config


def get_config():
  config = default_config.get_config()
  config.method = 'tract_edm'
  config.parametrisation = 'edm'
  config.teacher_checkpoint = '~/tract_teachers/edm_imagenet64'
  config.teacher_steps = 40
  config.time_schedule = '40,1'
  config.train_samples = 96 * 2**20
  config.batch_size = 512
  config.sema = 0.5
  config.ema_residual = 1e-3
  config.loss_reduction = 'mean'
  config.clip_x = True
  config.student_dropout = 0.0

  config.optimizer.learning_rate = 1e-3
  config.optimizer.grad_clip = 0.0
  config.optimizer.warmup_steps = 0
  config.optimizer.warmup_samples = 0
  config.teacher_training.train_steps = 0

  config.model.arch = 'edm_dhariwal'
  config.model.out_ch = 3
  config.model.num_classes = 1000
  config.model.edm.model_channels = 192
  config.model.edm.channel_mult = (1, 2, 3, 4)
  config.model.edm.channel_mult_emb = 4
  config.model.edm.num_blocks = 3
  config.model.edm.attn_resolutions = (32, 16, 8)
  config.model.edm.augment_dim = 0

  config.data.name = 'imagenet64'
  config.data.random_flip = True
  config.eval.num_samples = 64
  config.checkpoint_every = 10_000
  config.log_every = 1000
  return config
