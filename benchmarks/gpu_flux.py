"""GPU run book: peak memory and seconds per iteration of the FLUX.1-dev architecture at full size, random weights.

Nothing is downloaded: the transformer (12B), the VAE and a stand-in reward of HPSv2.1's size (a CLIP ViT-H/14
image tower scoring against a fixed text embedding) are built from their published configs with random
weights, in bf16.  The text encoders are not the point (their outputs are cached per prompt and they can live
in CPU memory, `train.text_cache=cpu`): a zero-layer T5 of width 4096 and a one-layer CLIP of width 768 with a
40-word vocabulary stand in for T5-XXL and CLIP-L; the transformer sees all 512 text tokens, as with T5-XXL.  Each configuration runs the trainer's own step (`objective.rollout_for` +
`objective.step`, then AdamW on the trainable weights) in a fresh process, so its peak is its own (`--tiny`: all in
this process).

    python benchmarks/gpu_flux.py                   # one GPU: 512 and 720 px, batch 1, 2, 4 -> results/gpu_flux.md
    python benchmarks/gpu_flux.py --tiny            # CPU: the same code on a reduced FLUX (the test suite runs this)
    python benchmarks/gpu_flux.py --vae 1024        # the FLUX VAE's decode + backward, with and without train.vae_checkpointing
    python benchmarks/gpu_flux.py --attention flash --out results/gpu_flux_flash.md   # every case on another attention kernel

Full fine-tuning, step only: the measured peak covers rollout, gradients and bf16 weights; AdamW's fp32 states and
masters (16 bytes a parameter, 192 GB for 12B) are given as computed figures, as they do not fit one GPU whatever the
step.  Two one-GPU configurations are measured: bitsandbytes' 8-bit AdamW updating the bf16 weights directly
(`train.optimizer=adamw8bit train.fp32_master=false`: states of 2 bytes a parameter on the GPU), and fp32 masters with
8-bit AdamW states in CPU memory (`train.offload_optimizer=true train.optimizer=adamw8bit`: the GPU keeps weights and
gradients; 72 GB of host memory for 12B, where fp32 states would need 192 GB).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14, image_size=224)
TINY = {"transformer": dict(FLUX_DEV, num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                            pooled_projection_dim=32, axes_dims_rope=(8, 12, 12)),
        "vae": dict(FLUX_VAE, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
        "vit": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32),
        "text": (64, 32)}
FULL = {"transformer": FLUX_DEV, "vae": FLUX_VAE, "vit": VIT_H, "text": (4096, 768)}
# (label, method options, finetune, optimiser: adamw | adamw8bit | offload (fp32 masters and 8-bit AdamW in CPU memory: 72 GB
# of host memory for 12B, where fp32 states would need 192 GB) | None = the step only, states computed)
CASES = [
    ("leapalign LoRA", {"name": "leapalign"}, "lora", "adamw"),
    ("leapalign full (step only)", {"name": "leapalign"}, "full", None),
    ("leapalign full, 8-bit AdamW on the bf16 weights", {"name": "leapalign"}, "full", "adamw8bit"),
    ("leapalign full, fp32 masters + 8-bit AdamW in CPU memory", {"name": "leapalign"}, "full", "offload"),
    ("drtune LoRA", {"name": "drtune"}, "lora", "adamw"),
    ("alignprop LoRA (whole rollout)", {"name": "alignprop", "truncation": "uniform", "min_k": 10**6}, "lora", "adamw"),
]


class StandInReward(torch.nn.Module):
    """HPSv2.1's compute and memory without its weights: a random CLIP vision tower, cosine to a fixed embedding."""

    name = "stand-in"

    def __init__(self, vit: dict):
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        super().__init__()
        self.model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vit, projection_dim=64))
        self.size = vit["image_size"]
        self.register_buffer("target", torch.nn.functional.normalize(torch.randn(64), dim=0))

    def forward(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", antialias=True)
        emb = self.model(pixel_values=((x - 0.5) / 0.27).to(self.target.dtype)).image_embeds.float()
        return torch.nn.functional.normalize(emb, dim=-1) @ self.target.float()


def build(spec: dict, device: str, dtype: torch.dtype):
    """A FluxPipeline from configs on the device in `dtype` (the stand-in text encoders are a few MB)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from leapalign.shapeworld import components

    clip_tok, t5_tok = components.make_tokenizers()
    t5_width, clip_width = spec["text"]
    clip, _ = components.make_text_encoders(clip_tok, t5_tok, width=clip_width, clip_layers=1, heads=max(1, clip_width // 64))
    _, t5 = components.make_text_encoders(clip_tok, t5_tok, width=t5_width, t5_layers=0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # random init straight on the device: a 12B model never passes through CPU memory
            transformer = FluxTransformer2DModel(**spec["transformer"])
            vae = AutoencoderKL(**spec["vae"])
    finally:
        torch.set_default_dtype(previous)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=clip.to(device, dtype),
                        tokenizer=clip_tok, text_encoder_2=t5.to(device, dtype), tokenizer_2=t5_tok, transformer=transformer)


def run_case(case: int, size: int, batch: int, steps: int, tiny: bool, iters: int, attention: str | None = None) -> dict:
    """One configuration in this process: peak memory above the loaded models and seconds per iteration."""
    from leapalign.backbones.flux import FluxBackbone
    from leapalign.config import TrainConfig
    from leapalign.methods import build_method
    from leapalign.objective import Objective, rollout_for, step
    from leapalign.train import MasterWeights, make_optimizer, setup_trainable

    label, opts, finetune, optimiser = CASES[case]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    spec = TINY if tiny else FULL
    torch.manual_seed(0)
    backbone = FluxBackbone(build(spec, device, dtype), merge_padding=False)  # all 512 T5 tokens, as with T5-XXL
    if attention:
        from leapalign.backbones import set_attention_backend

        set_attention_backend(backbone, attention)
    reward = StandInReward(spec["vit"]).to(device, dtype).requires_grad_(False)
    tc = TrainConfig(finetune=finetune, gradient_checkpointing=finetune == "full", optimizer="adamw" if optimiser == "adamw" else "adamw8bit",
                     lr=1e-6, offload_optimizer=optimiser == "offload")
    params = setup_trainable(backbone, tc)
    backbone.transformer.train()
    master = MasterWeights(params, optimiser == "offload", tc.offload_optimizer)  # the trainer's: fp32 copies in CPU memory
    optimizer = make_optimizer(master.params, tc) if optimiser else None
    method = build_method(opts)
    method.check(steps)
    prompts = ["a red circle to the left of a blue square"] * batch
    backbone.encode_prompts(prompts)  # cached, as in training
    n_trainable = sum(p.numel() for p in params)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        pairs = torch.Generator().manual_seed(i)
        noise = backbone.initial_noise(batch, size, size, torch.Generator(device).manual_seed(i))
        traj = rollout_for(backbone, method, prompts, steps, size, size, noise, pairs)
        step(backbone, Objective(method, reward, lam=1.0), traj, {"pairs": pairs})
        if optimizer is not None:
            master.grads_to_master()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            master.to_model()
        else:
            for p in params:
                p.grad = None
        del traj
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first iteration warms up kernels and allocator
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else float("nan")
    weights = sum(p.numel() * p.element_size() for p in backbone.transformer.parameters()) / 2**30
    return {"case": label, "size": size, "batch": batch, "steps": steps, "device": device, "seconds": sorted(times)[len(times) // 2],
            "peak_gb": peak, "weights_gb": weights, "trainable_m": n_trainable / 1e6,
            "adamw_fp32_gb": n_trainable * 16 / 2**30 if optimiser is None else 0.0}


def vae_case(size: int, checkpointing: bool, tiny: bool) -> dict:
    """The FLUX VAE's decode and backward of one image (the reward gradient's decoder part): peak memory above the
    loaded VAE (CUDA: allocated; CPU: resident set) and seconds, with and without train.vae_checkpointing."""
    import resource

    from diffusers import AutoencoderKL

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vae = AutoencoderKL(**(TINY if tiny else FULL)["vae"]).to(device, dtype).requires_grad_(False)
    if checkpointing:
        vae.enable_gradient_checkpointing()
    z = torch.randn(1, vae.config.latent_channels, size // 8, size // 8, device=device, dtype=dtype, requires_grad=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    vae.decode(z).sample.float().square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"size": size, "checkpointing": checkpointing, "peak_gb": peak / 2**30, "seconds": time.perf_counter() - t0}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a reduced FLUX on whatever device there is, 64 px, batch 1, 4 steps")
    ap.add_argument("--sizes", default="512,720")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_flux.md"))
    ap.add_argument("--_case", nargs=3, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--vae", type=int, default=0, metavar="PX", help="only the VAE decode + backward at PX, with and without checkpointing")
    ap.add_argument("--attention", default=None, help="model.attention_backend of every case, e.g. flash or _native_cudnn")
    ap.add_argument("--_vae", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._vae:
        print(json.dumps(vae_case(args._vae[0], bool(args._vae[1]), args.tiny)))
        return []
    if args.vae:  # each in a fresh process: the peak is its own
        rows = []
        for ckpt in (0, 1):
            proc = subprocess.run([sys.executable, __file__, "--_vae", str(args.vae), str(ckpt)] + (["--tiny"] if args.tiny else []),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-2000:])
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"VAE decode + backward at {args.vae} px, checkpointing {bool(ckpt)}: peak +{rows[-1]['peak_gb']:.2f} GB, "
                  f"{rows[-1]['seconds']:.1f} s", flush=True)
        return rows
    if args._case:
        print(json.dumps(run_case(*args._case, args.steps, args.tiny, args.iters, args.attention)))
        return []
    sizes, batches = [int(s) for s in args.sizes.split(",")], [int(b) for b in args.batches.split(",")]
    steps = 4 if args.tiny else args.steps
    rows = []
    if args.tiny:  # nothing to keep apart on CPU (no peak is read): every case in this process, in seconds
        return print_table([run_case(case, 64, 1, steps, True, args.iters, args.attention) for case in range(len(CASES))], args, steps)
    for case in range(len(CASES)):
        for size in sizes:
            for batch in batches:
                cmd = [sys.executable, __file__, "--_case", str(case), str(size), str(batch), "--steps", str(steps), "--iters", str(args.iters)]
                cmd += ["--attention", args.attention] if args.attention else []
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
                    rows.append({"case": CASES[case][0], "size": size, "batch": batch, "error": "out of memory" if "out of memory" in err.lower() else err[:120]})
                else:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    return print_table(rows, args, steps)


def print_table(rows: list[dict], args, steps: int) -> list[dict]:
    lines = ["# FLUX.1-dev architecture, random weights, bf16: one training iteration\n",
             f"`python benchmarks/gpu_flux.py{' --tiny' if args.tiny else ''}{' --attention ' + args.attention if args.attention else ''}` on {rows[0].get('device', '?')}"
             f"{' (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() else ''}; rollout {steps} steps; "
             "peak = GPU memory above the loaded models; full fine-tuning with gradient checkpointing.\n",
             "| configuration | px | batch | s / iteration | peak GB | weights GB | trainable (M) | AdamW fp32 states + masters GB (computed) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['size']} | {r['batch']} | {r['error']} | | | | |")
        else:
            lines.append(f"| {r['case']} | {r['size']} | {r['batch']} | {r['seconds']:.2f} | {r['peak_gb']:.1f} | {r['weights_gb']:.1f} | "
                         f"{r['trainable_m']:.1f} | {r['adamw_fp32_gb']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.tiny:
        Path(args.out).write_text(text)
    return rows


if __name__ == "__main__":
    main()
