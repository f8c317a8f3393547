"""Pretrain the ShapeWorld base pipeline (VAE, then text encoders + FLUX transformer) from scratch.

    python -m leapalign.shapeworld.pretrain --stage all --out src/leapalign/shapeworld/assets/base

Seeded and CPU-only; the documented settings finish in under an hour on two cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import components, world


def make_dataset(n: int, seed: int, tag_weights: dict[str, float] | None = None) -> tuple[list[str], torch.Tensor]:
    """n random (caption, image) pairs from the train prompts (tags uniform, or by `tag_weights`), images (n, 3, 32, 32) in [-1, 1]."""
    rng = random.Random(seed)
    caps, imgs = [], []
    for _ in range(n):
        cap, objs = world.random_scene(rng, tag_weights)
        caps.append(cap)
        imgs.append(world.render_scene(objs))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return caps, x * 2 - 1


def train_vae(out: Path, steps: int, batch: int, seed: int, log) -> None:
    torch.manual_seed(seed)
    _, data = make_dataset(20000, seed)
    vae = components.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = mse + F.l1_loss(rec, x) * 0.1 + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} mse {mse.item():.5f} kl {kl.item():.3f} {time.time() - t0:.0f}s")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(data[i : i + 256]).latent_dist.mode() for i in range(0, 4096, 256)])
        shift = z.mean().item()
        scale = 1.0 / (z - shift).std().item()
        rec = vae.decode(z[:256]).sample
        log(f"vae eval mse {F.mse_loss(rec, data[:256]).item():.6f} max-abs {(rec - data[:256]).abs().max().item():.3f}")
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.save_pretrained(out / "vae")
    log(f"vae saved, shift {shift:.4f} scale {scale:.4f}")


def assemble_pipeline(out: Path, transformer=None, text_encoders=None, vae=None):
    """A FluxPipeline of the ShapeWorld components (VAE given or from `out/vae`, the rest fresh or given)."""
    from diffusers import AutoencoderKL, FluxPipeline

    clip_tok, t5_tok = components.make_tokenizers()
    clip, t5 = text_encoders or components.make_text_encoders(clip_tok, t5_tok)
    return FluxPipeline(
        scheduler=components.make_scheduler(),
        vae=vae or AutoencoderKL.from_pretrained(out / "vae"),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer or components.make_transformer(),
    )


class CaptionedLatents:
    """n random training scenes as VAE latents, with each scene's caption as token ids of both tokenizers."""

    def __init__(self, pipe, backbone, n: int, seed: int, tag_weights: dict[str, float] | None = None, sigma_mean: float = 0.0,
                 sigma_tail: tuple[float, float] = (0.0, 0.9)):
        caps, imgs = make_dataset(n, seed, tag_weights)
        self.sigma_mean, self.sigma_tail = sigma_mean, sigma_tail
        with torch.no_grad():
            self.latents = torch.cat([backbone.encode_images(imgs[i : i + 500] / 2 + 0.5) for i in range(0, len(imgs), 500)])
        vocab = sorted(set(caps)) + [""]
        cap_index = {c: i for i, c in enumerate(vocab)}
        self.num_captions = len(vocab)
        self.empty = cap_index[""]
        self.cap_ids = torch.tensor([cap_index[c] for c in caps])
        self.t5_ids = pipe.tokenizer_2(vocab, padding="max_length", max_length=components.T5_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
        self.clip_ids = pipe.tokenizer(vocab, padding="max_length", max_length=components.CLIP_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids

    def noised_batch(self, batch: int, gen: torch.Generator):
        """(x0, caption ids with 10% empty, noise, sigma, x_sigma) for one flow-matching step.

        sigma is logit-normal(sigma_mean, 1), except a share `sigma_tail[0]` of the draws, uniform in
        [sigma_tail[1], 1]: the nearly pure-noise levels where a layout, and so a relation, is decided.
        """
        idx = torch.randint(len(self.latents), (batch,), generator=gen)
        x0 = self.latents[idx]
        pidx = torch.where(torch.rand(batch, generator=gen) < 0.1, torch.tensor(self.empty), self.cap_ids[idx])
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(batch, generator=gen) + self.sigma_mean)
        share, low = self.sigma_tail
        if share > 0:
            tail = torch.rand(batch, generator=gen) < share
            sigma = torch.where(tail, low + (1 - low) * torch.rand(batch, generator=gen), sigma)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        return x0, pidx, noise, sigma, xt

    def conditioning(self, pipe, backbone, pidx: torch.Tensor):
        """The backbone's conditioning for caption ids, through the pipeline's (trainable or frozen) text encoders."""
        embeds = components.encode_t5(pipe.text_encoder_2, self.t5_ids[pidx])
        pooled = pipe.text_encoder(self.clip_ids[pidx]).pooler_output
        return backbone.conditioning(embeds, pooled)


def adamw_cosine(params, lr: float, steps: int, warm: int):
    """AdamW with linear warm-up then cosine decay to zero (the FLUX and distillation stages)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


@torch.no_grad()
def optimiser_step(loss, opt, sched, params, ema, modules, step: int, ema_decay: float) -> None:
    """Backward, clip to norm 1, AdamW and schedule step, then the EMA of `modules`."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    ema_update(ema, modules, step, ema_decay)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """EMA with a short warm-up of the decay, (step + 1) / (step + 10)."""
    d = min(decay, (step + 1) / (step + 10))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)


def train_flux(out: Path, steps: int, batch: int, seed: int, log, lr: float = 1e-3, ema_decay: float = 0.999,
               init: Path | None = None, tag_weights: dict[str, float] | None = None, num_scenes: int = 60000,
               sigma_mean: float = 0.0, sigma_tail: tuple[float, float] = (0.0, 0.9)) -> None:
    """Flow matching on VAE latents; the two text encoders train jointly with the transformer.

    `init`: continue from a ShapeWorld pipeline folder (its transformer, text encoders and VAE); a distilled
    one continues from its velocity at guidance 1.
    `tag_weights`: how often each task tag's scenes are drawn (default: uniform), e.g. more relations.
    `sigma_mean`: the location of the logit-normal noise levels; > 0 trains the noisy steps, where layout is decided, more.
    `sigma_tail`: (share, low): that share of the noise levels uniform in [low, 1] instead (see `CaptionedLatents`).
    """
    from ..backbones.flux import FluxBackbone

    torch.manual_seed(seed)
    if init is not None:
        from diffusers import FluxPipeline

        start = FluxPipeline.from_pretrained(init)
        t5 = components.grow_t5(start.text_encoder_2)
        transformer = start.transformer
        if transformer.config.guidance_embeds:
            transformer = without_guidance_embedding(transformer)
            log(f"flux: {init} is guidance-distilled; its guidance embedding is folded in at 1 (no guidance)")
        pipe = assemble_pipeline(out, transformer, (start.text_encoder, t5), start.vae)
        log(f"flux: continuing from {init}" + (f", its T5 grown to {t5.config.num_layers} layers" if t5 is not start.text_encoder_2 else ""))
    else:
        pipe = assemble_pipeline(out)
    backbone = FluxBackbone(pipe)
    pipe.vae.requires_grad_(False).eval()
    data = CaptionedLatents(pipe, backbone, num_scenes, seed + 1, tag_weights, sigma_mean, sigma_tail)
    log(f"flux data: {len(data.latents)} latents {tuple(data.latents.shape[1:])}, std {data.latents.std().item():.3f}, {data.num_captions} captions")

    modules = torch.nn.ModuleList([pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]).train()
    params = [p for p in modules.parameters() if p.requires_grad]
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    opt, sched = adamw_cosine(params, lr, steps, warm=200)
    gen = torch.Generator().manual_seed(seed)
    t0, run_loss = time.time(), 0.0
    for step in range(steps):
        x0, pidx, noise, sigma, xt = data.noised_batch(batch, gen)
        v = backbone.velocity(xt, sigma, data.conditioning(pipe, backbone, pidx))
        loss = F.mse_loss(v, noise - x0)
        optimiser_step(loss, opt, sched, params, ema, modules, step, ema_decay)
        run_loss += loss.item()
        if (step + 1) % 100 == 0 or step == steps - 1:
            log(f"flux step {step + 1}/{steps} loss {run_loss / 100:.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s")
            run_loss = 0.0
        if (step + 1) % 2000 == 0 or step == steps - 1:
            final = assemble_pipeline(out, transformer=ema[0], text_encoders=(ema[1], ema[2]), vae=pipe.vae)
            final.save_pretrained(out, safe_serialization=True)
            log(f"saved pipeline to {out} at step {step + 1}")


PIPELINE_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


def cfg_scale(guidance: torch.Tensor, cfg_at_default: float) -> torch.Tensor:
    """The classifier-free guidance scale that a guidance-embedding value stands for.

    Linear, with 1 = no guidance and the pipeline's default 3.5 = `cfg_at_default`, so that
    `pipe(prompt)` samples at the CFG scale that measured best (docs/shapeworld.md).
    """
    return 1 + (guidance - 1) * (cfg_at_default - 1) / (PIPELINE_GUIDANCE - 1)


def with_guidance_embedding(transformer):
    """A copy of a FLUX transformer with FLUX.1-dev's guidance embedding, zero-initialised so it starts equal."""
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    student = FluxTransformer2DModel(**{**config, "guidance_embeds": True})
    missing, unexpected = student.load_state_dict(transformer.state_dict(), strict=False)
    if unexpected or any("guidance_embedder" not in k for k in missing):
        raise RuntimeError(f"unexpected weights when adding the guidance embedding: {unexpected or missing}")
    last = student.time_text_embed.guidance_embedder.linear_2
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return student


def without_guidance_embedding(transformer, guidance: float = 1.0):
    """A copy of a guidance-distilled FLUX transformer with its guidance embedding folded in at `guidance`.

    FLUX adds the guidance embedding to the timestep and pooled-text embeddings, so at a fixed value it is a
    constant: adding it to the pooled-text projection's last bias gives an undistilled transformer equal to the
    distilled one at that value. At 1 (no guidance) that is the conditional velocity, so flow matching can go on
    from a distilled base and be distilled again.
    """
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    plain = FluxTransformer2DModel(**{**config, "guidance_embeds": False})
    state = {k: v for k, v in transformer.state_dict().items() if "guidance_embedder" not in k}
    embed = transformer.time_text_embed
    with torch.no_grad():
        g = torch.tensor([guidance * 1000.0])  # the transformer scales guidance as it does timesteps
        constant = embed.guidance_embedder(embed.time_proj(g).to(embed.guidance_embedder.linear_1.weight.dtype))[0]
        key = "time_text_embed.text_embedder.linear_2.bias"
        state[key] = state[key] + constant.to(state[key].dtype)
    plain.load_state_dict(state, strict=True)
    return plain


def distill_guidance(out: Path, init: Path, steps: int, batch: int, seed: int, log, lr: float = 3e-4,
                     cfg_at_default: float = 2.0, max_guidance: float = 5.0, ema_decay: float = 0.999,
                     num_scenes: int = 60000, tag_weights: dict[str, float] | None = None, sigma_mean: float = 0.0,
                     sigma_tail: tuple[float, float] = (0.0, 0.9)) -> list[float]:
    """Guidance distillation, as FLUX.1-dev was made: the student's velocity at guidance g matches the
    teacher's classifier-free guided velocity v_u + w(g) (v_c - v_u), so one call does what CFG does in two.

    Teacher: the pipeline at `init` (frozen). Student: its transformer plus a guidance embedding;
    text encoders and VAE are shared and frozen. Points x_t are noised training latents, their
    scenes drawn by `tag_weights` as in `train_flux` (the student learns guidance where it is asked).
    """
    from diffusers import FluxPipeline

    from ..backbones.flux import FluxBackbone

    torch.manual_seed(seed)
    teacher = FluxPipeline.from_pretrained(init)
    if teacher.transformer.config.guidance_embeds:
        raise ValueError(f"{init} already has a guidance embedding; distil from an undistilled base")
    for m in (teacher.transformer, teacher.text_encoder, teacher.text_encoder_2, teacher.vae):
        m.requires_grad_(False).eval()
    teacher_bb = FluxBackbone(teacher)
    student = with_guidance_embedding(teacher.transformer).train().requires_grad_(True)
    student_bb = FluxBackbone(teacher)
    student_bb.transformer = student
    data = CaptionedLatents(teacher, teacher_bb, num_scenes, seed + 2, tag_weights, sigma_mean, sigma_tail)
    log(f"distill: teacher {init}, {len(data.latents)} latents, CFG {cfg_at_default} at guidance {PIPELINE_GUIDANCE}, guidance in [1, {max_guidance}]")

    ema = copy.deepcopy(student).eval().requires_grad_(False)
    params = list(student.parameters())
    opt, sched = adamw_cosine(params, lr, steps, warm=min(100, steps // 10 + 1))
    gen = torch.Generator().manual_seed(seed)
    t0, run_loss, losses = time.time(), 0.0, []
    for step in range(steps):
        x0, pidx, noise, sigma, xt = data.noised_batch(batch, gen)
        g = 1 + (max_guidance - 1) * torch.rand(batch, generator=gen)
        both = torch.cat([pidx, torch.full_like(pidx, data.empty)])
        with torch.no_grad():
            cond = teacher_bb.at_resolution(data.conditioning(teacher, teacher_bb, both), 32, 32)
            v_c, v_u = teacher_bb.velocity(torch.cat([xt, xt]), torch.cat([sigma, sigma]), cond).chunk(2)
            w = cfg_scale(g, cfg_at_default)[:, None, None]
            target = v_u + w * (v_c - v_u)
        student_bb.guidance_scale = g
        loss = F.mse_loss(student_bb.velocity(xt, sigma, cond.index(slice(0, batch))), target)
        optimiser_step(loss, opt, sched, params, ema, student, step, ema_decay)
        run_loss += loss.item()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step == steps - 1:
            log(f"distill step {step + 1}/{steps} loss {run_loss / 100:.5f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s")
            run_loss = 0.0
    final = assemble_pipeline(out, transformer=ema, text_encoders=(teacher.text_encoder, teacher.text_encoder_2), vae=teacher.vae)
    final.save_pretrained(out, safe_serialization=True)
    log(f"saved the guidance-distilled pipeline to {out} ({time.time() - t0:.0f}s)")
    return losses


def parse_tag_weights(text: str | None) -> dict[str, float] | None:
    """"position=3,color_attr=2" -> {"position": 3.0, "color_attr": 2.0}; unnamed tags keep weight 1."""
    if not text:
        return None
    weights = {}
    for item in text.split(","):
        tag, _, value = item.partition("=")
        if tag.strip() not in world.TAGS or not value:
            raise SystemExit(f"--tag-weights: {item!r} is not TAG=WEIGHT with a tag of {', '.join(world.TAGS)}")
        weights[tag.strip()] = float(value)
    return weights


def check_undistilled(teacher: Path) -> None:
    """Distillation needs the teacher's unconditional velocity, which a distilled pipeline no longer has."""
    config_file = teacher / "transformer" / "config.json"
    if not config_file.is_file():
        raise SystemExit(f"--stage distill: {teacher} is not a pipeline folder (no transformer/config.json); "
                         "pass the undistilled teacher with --init")
    if json.loads(config_file.read_text()).get("guidance_embeds"):
        raise SystemExit(f"--stage distill: {teacher} is already guidance-distilled; distil an undistilled pipeline "
                         f"(continue this one with --stage flux --init {teacher}, which folds its guidance in at 1)")


def parse_sigma_tail(text: str) -> tuple[float, float]:
    """"0.25:0.9" -> (0.25, 0.9), checked: a share in [0, 1] and a low end in [0, 1)."""
    try:
        share, low = (float(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"--sigma-tail: {text!r} is not SHARE:LOW, e.g. 0.25:0.9") from None
    if not (0 <= share <= 1 and 0 <= low < 1):
        raise SystemExit(f"--sigma-tail: {text!r} needs a share in [0, 1] and a low end in [0, 1), e.g. 0.25:0.9")
    return share, low


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["vae", "flux", "distill", "all"], default="all")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--flux-steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flux-lr", type=float, default=1e-3)
    ap.add_argument("--init", type=Path, default=None,
                    help="flux stage: continue from this pipeline folder; distill stage: the teacher (default: --out)")
    ap.add_argument("--tag-weights", default=None, metavar="TAG=W,...",
                    help="flux and distill stages: draw these task tags' scenes W times as often (e.g. position=3,color_attr=2)")
    ap.add_argument("--sigma-mean", type=float, default=0.0,
                    help="flux and distill stages: logit-normal location of the training noise levels (> 0: more weight on the noisy, layout-deciding steps)")
    ap.add_argument("--sigma-tail", default="0:0.9", metavar="SHARE:LOW",
                    help="flux and distill stages: draw this share of the noise levels uniformly in [LOW, 1], the nearly pure-noise levels "
                         "where the relation word decides the layout (e.g. 0.25:0.9)")
    ap.add_argument("--distill-steps", type=int, default=2000)
    ap.add_argument("--distill-lr", type=float, default=3e-4)
    ap.add_argument("--cfg-at-default", type=float, default=2.0,
                    help="the CFG scale that the pipeline's default guidance 3.5 is distilled from")
    args = ap.parse_args(argv)
    tag_weights, sigma_tail = parse_tag_weights(args.tag_weights), parse_sigma_tail(args.sigma_tail)  # bad input fails before any stage runs
    if args.stage == "distill":
        check_undistilled(args.init or args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    logf = open(args.out.parent / f"pretrain_{args.stage}.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    if args.stage in ("vae", "all"):
        train_vae(args.out, args.vae_steps, args.batch, args.seed, log)
    if args.stage in ("flux", "all"):
        train_flux(args.out, args.flux_steps, args.batch, args.seed, log, lr=args.flux_lr, init=args.init,
                   tag_weights=tag_weights, sigma_mean=args.sigma_mean, sigma_tail=sigma_tail)
    if args.stage in ("distill", "all"):
        teacher = args.out if args.stage == "all" or args.init is None else args.init
        distill_guidance(args.out, teacher, args.distill_steps, args.batch, args.seed, log, lr=args.distill_lr,
                         cfg_at_default=args.cfg_at_default, tag_weights=tag_weights, sigma_mean=args.sigma_mean, sigma_tail=sigma_tail)


if __name__ == "__main__":
    main()
