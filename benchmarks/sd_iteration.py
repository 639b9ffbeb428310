"""One SFD iteration on a Stable Diffusion v1.5-sized UNet: time and peak memory, plus the memory computed.

SFD Table 6's SD recipe: the teacher DPM-Solver++(2M) over the student grid refined K = 3 times
(no gradients), then one student Euler step, backward and Adam update per student step (distill.py's
teacher_targets and sfd_iteration), guidance 1 (the conditional branch only), bf16 autocast on CUDA.
The UNet is built from SD v1.5's config with random weights (no download, no network): the cost
is the architecture's. Prompt embeddings are random [B, 77, 768] (the frozen CLIP text encoder
runs once per iteration outside the timed loop in a real run; its cost is small).

    python benchmarks/sd_iteration.py                   # a GPU: SD-sized, batch 16; a CPU: a tiny UNet
    python benchmarks/sd_iteration.py --nfe 4 --sfd-v --grad-checkpointing
    python benchmarks/sd_iteration.py --lora-rank 64     # a LoRA student (hub.add_lora; needs peft)

On a CPU it times a tiny UNet (labelled as such: those times say nothing about SD). Either way it
prints the SD v1.5 memory at the chosen micro-batch computed without running SD: parameter counts
from the configs and the bytes autograd saves in one student forward, counted under fake tensors
(shapes only) with the bf16 autocast policy of the CPU, and the attention kernel that keeps no
attention matrix (as CUDA's flash / memory-efficient ones). With --lora-rank R the student is a LoRA
student (the frozen base, adapters on the attention and feed-forward projections): weights,
gradients and Adam's m and v of the adapters only, the frozen UNet's fp32 weights, and the bytes
autograd saves with the adapters in place.
"""
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import distill  # noqa: E402
import hub  # noqa: E402
import latent  # noqa: E402
import presets  # noqa: E402

SD_UNET = dict(sample_size=64, cross_attention_dim=768)  # SD v1.5's values; the rest are the class defaults
TINY_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), attention_head_dim=8,
                 up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), norm_num_groups=8)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=('DownEncoderBlock2D',) * 4,
              up_block_types=('UpDecoderBlock2D',) * 4, latent_channels=4, layers_per_block=2,
              sample_size=512)
SD_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, projection_dim=768)  # CLIP ViT-L/14's text
GB = 1e9


def denoiser(unet_kwargs):
    """A random-weight UNet2DConditionModel with SD's noise schedule as a latent.Denoiser."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
    unet = UNet2DConditionModel(**unet_kwargs)
    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')
    return latent.wrap(unet, sched, use_fp16=True)


def recipe(args, net):
    """SFD Table 6 for Stable Diffusion (presets.SFD['diffusers']), with this benchmark's batch."""
    method = 'sfd-v' if args.sfd_v else 'sfd'
    preset = {k: v for k, v in presets.SFD['diffusers'][method].items() if not callable(v)}
    cfg = distill.SFDConfig(**{**preset, 'accumulate': args.accumulate, 'batch': args.batch, 'nfe': args.nfe,
                               'method': method})
    return presets.with_levels(cfg, net)  # t_max 0: the model's sigma_max


def time_iteration(args, dev, unet_kwargs):
    """(seconds per iteration, peak GB or None, calls) of distill.py's SFD iteration on `dev`."""
    teacher = denoiser(unet_kwargs).to(dev).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    if args.sfd_v:
        student.enable_step_condition()
    if args.lora_rank:
        hub.add_lora(student, args.lora_rank)
    if args.grad_checkpointing:
        student.unet.enable_gradient_checkpointing()
    cfg = recipe(args, teacher)
    opt = torch.optim.Adam(hub.trainable(student), lr=cfg.lr)
    t_steps = distill.student_schedule(cfg, cfg.nfe, student)
    N = len(t_steps) - 1
    t_teacher = distill.grid(cfg, cfg.K * N, student)
    D = unet_kwargs['cross_attention_dim']
    cond = dict(encoder_hidden_states=torch.randn(args.batch, 77, D, device=dev))
    step = dict(step=distill.step_value(cfg.nfe, cfg.afs)) if args.sfd_v else {}
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)

    def one():
        x_N = cfg.t_max * torch.randn(args.batch, *teacher.shape, device=dev)
        targets = distill.teacher_targets(teacher, x_N, t_teacher, cfg.K, cfg.teacher_solver,
                                          accumulate=cfg.accumulate, **cond)
        distill.sfd_iteration(student, opt, x_N, t_steps, targets, cfg, **cond, **step)
    one()  # warm-up: kernels chosen, Adam's state allocated
    sync()
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        one()
    sync()
    seconds = (time.perf_counter() - t0) / args.repeat
    peak = torch.cuda.max_memory_allocated(dev) / GB if dev.type == 'cuda' else None
    return seconds, peak, (cfg.K * N, N)


def saved_bytes(batch, checkpointing, lora_rank=0):
    """Bytes autograd keeps for backward in one SD student forward at `batch` (fake tensors: no compute);
    lora_rank: with a LoRA student's adapters on its frozen UNet."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    unet = _meta_unet(lora_rank)
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet.to_empty(device='cpu')  # shapes only: fake storage for the meta-built UNet
        if checkpointing:
            unet.enable_gradient_checkpointing()
        storages = {}

        def pack(t):
            storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()  # each storage once
            return t
        x, h = torch.randn(batch, 4, 64, 64), torch.randn(batch, 77, 768)
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with hooks, torch.autocast('cpu', torch.bfloat16):
            unet(x, torch.full((batch,), 500.0), encoder_hidden_states=h)
    return sum(storages.values())


def _meta_unet(lora_rank=0):
    """SD v1.5's UNet on the meta device (no memory), in train mode; a LoRA student's if lora_rank."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
    with torch.device('meta'):
        unet = UNet2DConditionModel(**SD_UNET).train()
    if lora_rank:  # the base frozen, adapters on hub.LORA_TARGETS, built on the meta device too
        sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')
        net = latent.wrap(unet, sched)
        with torch.device('meta'):
            hub.add_lora(net, lora_rank)
    return unet


def lora_parameters(rank):
    """The adapters' parameter count of a rank-`rank` LoRA student of SD v1.5 (hub.LORA_TARGETS)."""
    return sum(p.numel() for p in _meta_unet(rank).parameters() if p.requires_grad)


def count(cls, **kwargs):
    """Parameters of a module built from config on the meta device (no memory)."""
    with torch.device('meta'):
        return sum(p.numel() for p in cls(**kwargs).parameters())


def memory_table(batch, sfd_v, lora_rank=0):
    """SD v1.5's memory for one SFD micro-batch, computed (weights, Adam, teacher, activations); with
    lora_rank, a LoRA student's: Adam and gradients of the adapters (and the projection) only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    proj = latent.COND_DIM * 320 if sfd_v else 0
    P = count(UNet2DConditionModel, **SD_UNET) + proj
    vae, text = count(AutoencoderKL, **SD_VAE), count(CLIPTextModel, config=CLIPTextConfig(**SD_TEXT))
    if lora_rank:
        L = lora_parameters(lora_rank) + proj  # what trains
        student = [('student UNet: the frozen fp32 weights (4 B/param)', 4 * P),
                   (f'rank-{lora_rank} adapters ({L:,}): fp32 weights, gradients, Adam m and v', 16 * L)]
    else:
        student = [('student UNet: fp32 weights, gradients, Adam m and v (16 B/param)', 16 * P)]
    rows = student + [('teacher UNet, fp32 (a deep copy; bf16 autocast casts per call)', 4 * P),
                      ('VAE and CLIP text encoder, fp32 (frozen; hub.load reads both)', 4 * (vae + text))]
    static = sum(b for _, b in rows)
    lines = [f'SD v1.5 memory at micro-batch {batch} (computed, not measured: UNet {P:,} params, '
             f'VAE {vae:,}, text {text:,})']
    lines += [f'  {what:<68} {b / GB:6.2f} GB' for what, b in rows]
    for ckpt in (False, True):
        act = saved_bytes(batch, ckpt, lora_rank)
        what = 'activations saved for backward, bf16 autocast' + (', checkpointing' if ckpt else '')
        lines.append(f'  {what:<68} '
                     f'{act / GB:6.2f} GB  -> total {(static + act) / GB:5.1f} GB + workspace')
    return lines


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument('--device', default='auto')
    p.add_argument('--batch', type=int, default=16, help='trajectories per iteration (SD: 16 per round)')
    p.add_argument('--accumulate', type=int, default=1, help='micro-batches it is split into (as distill.py)')
    p.add_argument('--nfe', type=int, default=2, help='student steps (the teacher takes K = 3 per step)')
    p.add_argument('--sfd-v', action='store_true', help="SFD-v's step condition on the student")
    p.add_argument('--grad-checkpointing', action='store_true')
    p.add_argument('--lora-rank', type=int, default=0, help='a LoRA student of this rank (0: no LoRA)')
    p.add_argument('--repeat', type=int, default=3)
    p.add_argument('--no-estimate', action='store_true', help='skip the computed SD memory table')
    args = p.parse_args(argv)
    latent._require()
    if args.lora_rank < 0:
        raise ValueError(f'--lora-rank {args.lora_rank}: a rank >= 1 for a LoRA student (0: no LoRA)')
    if args.lora_rank:
        hub.require_peft()
    dev = cli.device(args.device)
    sd = dev.type == 'cuda'
    what = ('SD v1.5-sized UNet (random weights), bf16 autocast' if sd else
            'CPU: a TINY UNet (8x8 latents, 2 levels), float32 -- not SD-sized: these times say nothing '
            'about SD')
    seconds, peak, (teacher_calls, student_calls) = time_iteration(args, dev, SD_UNET if sd else TINY_UNET)
    lines = [f'{what}; {torch.cuda.get_device_name(dev) if sd else "cpu"}',
             f'one SFD iteration, batch {args.batch} ({args.accumulate} round(s)), NFE {args.nfe}'
             f'{" SFD-v" if args.sfd_v else ""}'
             f'{", gradient checkpointing" if args.grad_checkpointing else ""}'
             f'{f", LoRA rank {args.lora_rank}" if args.lora_rank else ""}: '
             f'{teacher_calls} teacher calls + {student_calls} student steps: {seconds:.3f} s'
             + (f', peak {peak:.2f} GB allocated' if peak is not None else '')]
    if sd and args.batch == 16 and args.accumulate == 1:
        lines.append(f'  the recipe\'s 128 trajectories = 8 such micro-batches: ~{8 * seconds:.1f} s per '
                     'iteration, '
                     f'~{781 * 8 * seconds / 3600:.1f} h for 100 kimg (781 iterations) on this one GPU')
    if not args.no_estimate:
        lines += memory_table(args.batch // args.accumulate, args.sfd_v, args.lora_rank)
    print('\n'.join(lines))
    return lines


if __name__ == '__main__':
    cli.run(main)
