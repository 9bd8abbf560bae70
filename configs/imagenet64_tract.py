"""Class-conditional ImageNet 64x64 TRACT, schedule 1024 -> 32 -> 1 (spec sections 5 and 7).

  python -m tract_jax.import_teacher \
      --source=gs://gresearch/diffusion-distillation/imagenet_original \
      --config=configs/imagenet64_tract.py --output=~/tract_teachers/imagenet64
  python -m tract_jax.main --config=configs/imagenet64_tract.py --workdir=~/tract_runs/imagenet64_tract

The published imagenet_original teacher: 192 / 768 channels, ch_mult 1,2,3,4, 3 residual blocks,
attention at 32, 16 and 8 px with 64-channel heads, 'both' output (an x head and an eps head,
6 channels), 1000 classes; 295,905,222 parameters. Labels go to teacher, self-teacher and student;
evaluation samples use uniformly random labels. Training budget: the spec fixes none for
ImageNet-64, so this takes the CIFAR-10 run's (96 * 2**20 samples in total at batch 256: 196,608 steps
per phase). Random horizontal flips as the official code's ImageNet pipeline (RandomHorizontalFlip
after a 64 px centre crop).

Hardware: sized for 8 A100/V100-class GPUs (as the official code's README) or a TPU v4-8,
data-parallel with batch 32 per device; student, Adam moments, both EMAs and the teacher take about
8.3 GB per replica in float32. With less memory per device, shard them: --config.mesh.fsdp=8.
Expected result (paper, spec section 9): FID 7.43 with 1 step; the 2-step figure, 4.97, belongs to a
run whose schedule ends at 2 steps.

Precision: float32 by default, as the paper ran it; on GPU/TPU we recommend
--config.model.dtype=bfloat16 (float32 parameters, EMAs, targets and loss), with
--config.model.remat=blocks if activations do not fit. On CPU keep float32.
"""
from tract_jax import default_config


def get_config():
  config = default_config.get_config()
  config.method = 'tract'
  config.teacher_checkpoint = '~/tract_teachers/imagenet64'
  config.teacher_steps = 1024
  config.time_schedule = '1024,32,1'
  config.train_samples = 96 * 2**20
  config.batch_size = 256
  config.sema = 0.5
  config.ema_residual = 1e-3
  config.loss_reduction = 'sum'
  config.clip_x = True
  config.optimizer.learning_rate = 2e-4
  config.teacher_training.train_steps = 0

  config.model.ch = 192
  config.model.emb_ch = 768
  config.model.ch_mult = (1, 2, 3, 4)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (32, 16, 8)
  config.model.num_heads = None             # heads = channels / head_dim
  config.model.head_dim = 64
  config.model.out_ch = 6                   # 'both': x head (3) and eps head (3)
  config.model.num_classes = 1000
  config.model.mean_type = 'both'

  config.data.name = 'imagenet64'
  config.data.random_flip = True            # official code: RandomHorizontalFlip
  config.eval.num_samples = 64
  config.checkpoint_every = 10_000
  config.log_every = 1000
  return config
