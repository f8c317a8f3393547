"""Train ShapeScore, the embedded world's reward: a tiny transformers CLIPModel, contrastive with hard negatives.

    python -m leapalign.shapeworld.train_reward --out src/leapalign/shapeworld/assets/shapescore
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import components, world
from ..rewards.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipReward, preprocess


OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Layout is what the base model lacks and what alignment must fix, so the reward sees it more often.
TAG_WEIGHTS = {"position": 3.0, "color_attr": 1.5}


def hard_negatives(prompt: str, rng: random.Random) -> list[str]:
    """Captions that differ from `prompt` in one checked attribute: colour, shape, size, count, relation, binding."""
    spec = world.parse(prompt)
    o = list(spec.objects)
    S = world.PromptSpec
    O = world.ObjectSpec
    negs = [world.mismatch(prompt, rng)]
    other = lambda seq, x: rng.choice([v for v in seq if v != x])  # noqa: E731
    if spec.tag in ("single_object", "colors"):
        a = o[0]
        negs.append(world.caption(S(spec.tag, (O(other(world.SHAPES, a.shape), a.color, a.size),))))
        if a.color:
            negs.append(world.caption(S("colors", (O(a.shape, other(list(world.COLORS), a.color), a.size),))))
        if a.size:
            negs.append(world.caption(S(spec.tag, (O(a.shape, a.color, other(list(world.SIZES), a.size)),))))
        negs.append(world.caption(S("counting", (O(a.shape, a.color), O(a.shape, a.color)))))
    elif spec.tag == "counting":
        a = o[0]
        negs.append(world.caption(S("colors" if a.color else "single_object", (a,))))
        if a.color:
            negs.append(world.caption(S("counting", (O(a.shape, other(list(world.COLORS), a.color)),) * 2)))
    elif spec.tag == "position":
        a, b = o
        negs.append(world.caption(S("position", (b, a), spec.relation)))  # swapped objects
        negs.append(world.caption(S("position", (a, b), OPPOSITE[spec.relation])))  # opposite relation
        if a.color != b.color:
            negs.append(world.caption(S("position", (O(a.shape, b.color), O(b.shape, a.color)), spec.relation)))
        negs.append(world.caption(S("position", (O(other(world.SHAPES, a.shape), a.color), b), spec.relation)))
    elif spec.tag in ("two_objects", "color_attr"):
        a, b = o
        negs.append(world.caption(S(spec.tag, (O(other(world.SHAPES, a.shape), a.color), b))))
        if spec.tag == "color_attr":
            negs.append(world.caption(S("color_attr", (O(a.shape, other([c for c in world.COLORS if c != b.color], a.color)), b))))
    return [n for n in dict.fromkeys(negs) if n != prompt]


def own_group_mask(logits: torch.Tensor, batch: int, group_sizes: list[int]) -> torch.Tensor:
    """0 where row i may compete (the batch's first `batch` columns, then row i's own group), -inf elsewhere."""
    mask = torch.full_like(logits, float("-inf"))
    mask[:, :batch] = 0
    start = batch
    for i, n in enumerate(group_sizes):
        mask[i, start : start + n] = 0
        start += n
    return mask


def init_positions(model, scale: float) -> None:
    """Start the vision tower's position embeddings at a 2D sin-cos grid times `scale` (MAE's table), class row 0.

    CLIP's default start (std 0.02, beside patch embeddings of std 0.1 at this width) makes where a patch is a
    small perturbation of what it shows.  Relations are learned either way in position-only runs; the shipped
    ShapeScore was trained with this start (docs/shapeworld.md has the measurements)."""
    emb = model.vision_model.embeddings.position_embedding.weight
    grid = int(round((emb.shape[0] - 1) ** 0.5))
    quarter = emb.shape[1] // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], 1)

    table = torch.cat([encode(ys), encode(xs)], 1)
    with torch.no_grad():
        emb.zero_()
        emb[1 : 1 + grid * grid, : table.shape[1]] = scale * table


def make_model(tokenizer, position_init: float = 0.3):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=components.CLIP_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=4, hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))
    if position_init > 0:
        init_positions(model, position_init)
    return model


def ranking_accuracy(reward: ClipReward, n: int, seed: int) -> dict:
    """How often the true caption outscores each hard negative, on fresh renders of eval prompts."""
    rng = random.Random(seed)
    rows = world.prompt_rows("eval")
    wins, total, per_tag = 0, 0, {}
    with torch.no_grad():
        for i in range(n):
            row = rows[i % len(rows)]
            img = torch.from_numpy(world.render(row["prompt"], seed * 100000 + i)).permute(2, 0, 1)[None]
            negs = hard_negatives(row["prompt"], rng)
            s = reward(img.expand(len(negs) + 1, -1, -1, -1), [row["prompt"]] + negs)
            ok = (s[0] > s[1:]).float()
            wins += ok.sum().item()
            total += len(negs)
            t = per_tag.setdefault(row["tag"], [0, 0])
            t[0] += ok.sum().item()
            t[1] += len(negs)
    return {"overall": wins / total, **{k: v[0] / v[1] for k, v in per_tag.items()}}


def robust_accuracy(reward: ClipReward, n: int, seed: int, eps: float = 0.03, steps: int = 4) -> float:
    """How often the true caption still outscores a hard negative after an L-inf `eps` PGD attack on the render
    that pushes the negative's score above the caption's: what a policy can gain from pixel noise alone."""
    rng = random.Random(seed)
    rows = world.prompt_rows("eval")
    picked = [rows[i % len(rows)] for i in range(n)]
    prompts = [r["prompt"] for r in picked]
    negs = [rng.choice(hard_negatives(p, rng)) for p in prompts]
    x = world.render_batch(prompts, [seed * 100000 + i for i in range(n)])
    im = pgd(x, lambda im: (reward(im, negs) - reward(im, prompts)).sum(), eps, steps, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (reward(im, prompts) > reward(im, negs)).float().mean().item()


def augment(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Imperfections of generated images, so the reward judges those too: a one-pixel shift, slight blur,
    colour gain/offset jitter and pixel noise, each drawn per image.  `x` (B, 3, H, W) in [0, 1]."""
    if strength <= 0:
        return x
    B = len(x)
    # shift by -1..1 pixels, the border repeated (renders leave a background margin)
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    H, W = x.shape[-2:]
    dx, dy = torch.randint(0, 3, (B,)), torch.randint(0, 3, (B,))
    x = torch.stack([pad[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])
    # slight blur on a third of the images
    k = torch.tensor([0.25, 0.5, 0.25])
    k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    a = (torch.rand(B, 1, 1, 1) < 0.33).float() * torch.rand(B, 1, 1, 1) * strength
    x = (1 - a) * x + a * blurred
    gain = 1 + 0.05 * strength * torch.randn(B, 1, 1, 1)
    offset = 0.04 * strength * torch.randn(B, 3, 1, 1)
    noise = 0.06 * strength * torch.rand(B, 1, 1, 1) * torch.randn_like(x)
    return (x * gain + offset + noise).clamp(0, 1)


def pgd(x: torch.Tensor, loss_fn, eps: float, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf PGD: from a uniform start within eps, `steps` signed-gradient steps of 0.5 eps that raise
    `loss_fn(images)`, every pixel kept within eps of `x` and the images within [0, 1]."""
    delta = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn((x + delta).clamp(0, 1)), delta)
        delta = (delta.detach() + 0.5 * eps * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


def adversarial_images(model, pre, x: torch.Tensor, loss_fn, eps: float, steps: int) -> torch.Tensor:
    """PGD in L-inf: perturb every image (within eps) to raise `loss_fn(image embeddings)`, the training loss.

    The caption's own image is pushed towards other captions and its hard-negative renders towards the caption.
    Training on these makes the reward robust, so that it cannot be raised by a small pixel change and its
    gradient has to change shapes, colours and places (robust models have perceptually aligned gradients)."""
    return pgd(x, lambda im: loss_fn(F.normalize(model.get_image_features(pixel_values=pre(im)).pooler_output, dim=-1)),
               eps, steps)


def negative_images(cap: str, objs: list, negs: list[str], count: int, rng: random.Random) -> list[np.ndarray]:
    """Renders that do NOT satisfy `cap`: scenes of `count` of its hard-negative captions, plus a count error
    (an extra object, or one of two objects missing) for every tag whose judge counts objects."""
    out = [world.render_scene(world.sample_scene(world.parse(n), rng)) for n in rng.sample(negs, min(count, len(negs)))]
    tag = world.parse(cap).tag
    if tag != "position":  # ShapeEval's position check allows extra objects
        if len(objs) == 2 and rng.random() < 0.5:
            out.append(world.render_scene([rng.choice(objs)]))
        else:
            more = world.add_object(objs, rng)
            if more is not None:
                out.append(world.render_scene(more))
    return out


def generated_pool(path: Path, per_tag: int, seeds_per_prompt: int, seed: int, lora: Path | None = None) -> dict:
    """Samples of the shipped base (plus `lora`, a policy trained against an earlier ShapeScore, if given) on
    TRAIN prompts (never eval ones), each labelled pass/fail by ShapeEval.

    ShapeEval plays the human rater of a real reward model's data; samples of a policy that was optimised
    against the reward are the on-policy round of that data (where the policy found the reward's holes).
    Half the samples use the demo's 16-step rollouts, half the pipeline's default 28 steps.  Cached at `path`."""
    if path.is_file():
        return torch.load(path)
    from .. import config, evaluation
    from ..backbones import load_backbone
    from .shapeeval import check

    backbone = load_backbone(config.load(None, []).model)
    if lora is not None:
        backbone.pipe.load_lora_weights(str(lora))
    rng = random.Random(seed + 7 + (1 if lora is not None else 0))
    by_tag: dict[str, list[str]] = {}
    for r in world.prompt_rows("train"):
        by_tag.setdefault(r["tag"], []).append(r["prompt"])
    prompts, seeds = [], []
    for tag in world.TAGS:
        for _ in range(per_tag // seeds_per_prompt):
            p = rng.choice(by_tag[tag])
            prompts += [p] * seeds_per_prompt
            seeds += [rng.randrange(2**31) for _ in range(seeds_per_prompt)]
    t0 = time.time()
    half = len(prompts) // 2
    order = list(range(len(prompts)))
    rng.shuffle(order)
    idx16, idx28 = sorted(order[:half]), sorted(order[half:])
    imgs = torch.empty(len(prompts), 3, 32, 32)
    for idx, steps in ((idx16, 16), (idx28, 28)):
        imgs[idx] = evaluation.generate(backbone, [prompts[i] for i in idx], [seeds[i] for i in idx], steps, 32, 32)
    arr = imgs.permute(0, 2, 3, 1).numpy()
    passed = torch.tensor([check(a, p) for a, p in zip(arr, prompts)])
    pool = {"images": (imgs * 255).round().to(torch.uint8), "prompts": prompts, "passed": passed,
            "tags": [world.parse(p).tag for p in prompts]}
    print(f"generated pool: {len(prompts)} samples in {time.time() - t0:.0f}s, ShapeEval pass rate {passed.float().mean():.3f}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pool, path)
    return pool


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3500)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--position-weight", type=float, default=TAG_WEIGHTS["position"],
                    help="how much more often position scenes are drawn than single-object ones")
    ap.add_argument("--position-init", type=float, default=0.3,
                    help="scale of the 2D sin-cos start of the vision position embeddings (0: CLIP's default std-0.02 start)")
    ap.add_argument("--init", type=Path, default=None, help="start from these ShapeScore weights")
    ap.add_argument("--image-negs", type=int, default=0,
                    help="renders of hard-negative captions per caption (plus a count error) the caption must rank below its own image")
    ap.add_argument("--augment", type=float, default=0.0, help="strength of shift/blur/jitter/noise augmentation (0: light legacy jitter)")
    ap.add_argument("--adversarial", type=float, default=0.0,
                    help="L-inf radius of PGD perturbations the reward is trained to resist (0: off); makes its pixel gradient follow shapes")
    ap.add_argument("--adv-steps", type=int, default=2, help="PGD steps per batch with --adversarial")
    ap.add_argument("--gen-per-tag", type=int, default=0, help="base samples per tag on train prompts, judged by ShapeEval (0: none)")
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--gen-pool", type=Path, default=Path("shapescore_generated.pt"), help="cache of the judged samples")
    ap.add_argument("--gen-lora", type=Path, default=None, help="also sample this LoRA policy (a demo run against an earlier ShapeScore)")
    ap.add_argument("--gen-lora-per-tag", type=int, default=800)
    ap.add_argument("--gen-lora-pool", type=Path, default=Path("shapescore_generated_lora.pt"))
    ap.add_argument("--check", type=int, default=2000, help="scenes of the final ranking-accuracy check")
    return ap.parse_args(argv)


def load_pool(args) -> dict | None:
    """The judged base (and LoRA) samples with their indices: passing / failing samples per prompt, prompts with a
    failing sample per tag."""
    if args.gen_per_tag <= 0:
        return None
    pool = generated_pool(args.gen_pool, args.gen_per_tag, 8, args.seed)
    if args.gen_lora is not None:
        extra = generated_pool(args.gen_lora_pool, args.gen_lora_per_tag, 8, args.seed, lora=args.gen_lora)
        pool = {"images": torch.cat([pool["images"], extra["images"]]), "passed": torch.cat([pool["passed"], extra["passed"]]),
                "prompts": pool["prompts"] + extra["prompts"], "tags": pool["tags"] + extra["tags"]}
    pool["pass"], pool["fail"], pool["by_tag"] = {}, {}, {}  # by_tag: samples whose prompt has at least one failing sample
    for i, (p, ok) in enumerate(zip(pool["prompts"], pool["passed"].tolist())):
        (pool["pass"] if ok else pool["fail"]).setdefault(p, []).append(i)
    for i, (p, t) in enumerate(zip(pool["prompts"], pool["tags"])):
        if p in pool["fail"]:
            pool["by_tag"].setdefault(t, []).append(i)
    pool["tags_with_fails"] = [t for t in world.TAGS if pool["by_tag"].get(t)]
    return pool


def generated_batch(pool: dict | None, size: int, rng: random.Random):
    """Prompts of generated samples, each with up to two failing samples and a positive (a passing sample or a
    render): (captions, positives, failing indices, which positives are passing samples)."""
    gen_caps, gen_pos, gen_fails, pass_items = [], [], [], []
    if pool is None:
        return gen_caps, gen_pos, gen_fails, pass_items
    for _ in range(size):
        i = rng.choice(pool["by_tag"][rng.choice(pool["tags_with_fails"])])
        p = pool["prompts"][i]
        fails, passes = pool["fail"].get(p, []), pool["pass"].get(p, [])
        if not fails:
            continue
        gen_caps.append(p)
        gen_fails.append(rng.sample(fails, min(2, len(fails))))
        if passes and rng.random() < 0.5:
            gen_pos.append(pool["images"][rng.choice(passes)].float() / 255)
            pass_items.append(len(gen_caps) - 1)
        else:
            gen_pos.append(torch.from_numpy(world.render(p, rng.randrange(2**31))).permute(2, 0, 1))
    return gen_caps, gen_pos, gen_fails, pass_items


def generated_losses(t, v, scale, offsets, gen_fails, pass_items, gen_negs) -> dict:
    """The prompt ranks its positive above its failing generated samples (ShapeEval's verdicts); a passing generated
    sample ranks its prompt above the prompt's hard-negative captions."""
    G, (off_t, off_v) = len(gen_fails), offsets
    tg, vpos, vfail = t[off_t : off_t + G], v[off_v : off_v + G], v[off_v + G :]
    gl, k = [], 0
    for i in range(G):
        nf = len(gen_fails[i])
        row = scale * torch.cat([(tg[i] * vpos[i]).sum()[None], vfail[k : k + nf] @ tg[i]])
        gl.append(F.cross_entropy(row[None], torch.zeros(1, dtype=torch.long)))
        k += nf
    out = {"gen": torch.stack(gl).mean()}
    if pass_items:
        tn, pl, k = t[off_t + G :], [], 0
        for i, ns in zip(pass_items, gen_negs):
            row = scale * torch.cat([(tg[i] * vpos[i]).sum()[None], tn[k : k + len(ns)] @ vpos[i]])
            pl.append(F.cross_entropy(row[None], torch.zeros(1, dtype=torch.long)))
            k += len(ns)
        out["pass"] = torch.stack(pl).mean()
    return out


def save_reward(model, tok, out: Path, check: int) -> None:
    """The CLIP folder (weights, tokenizer, preprocessor config) and its ranking accuracy beside it."""
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
         "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "do_resize": True, "do_center_crop": True,
         "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3}, indent=2))
    final = ClipReward.from_pretrained(out)
    acc = ranking_accuracy(final, check, seed=12345)
    acc["robust_eps0.03"] = robust_accuracy(final, max(1, check // 4), seed=12345)
    print("ranking accuracy vs hard negatives:", json.dumps(acc), flush=True)
    (out.parent / f"{out.name}_accuracy.json").write_text(json.dumps(acc, indent=2))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok, _ = components.make_tokenizers()
    if args.init:
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(args.init).train()
    else:
        model = make_model(tok, args.position_init).train()
    pool = load_pool(args)
    tag_weights = {**TAG_WEIGHTS, "position": args.position_weight}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    pre = lambda x: preprocess(x, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # noqa: E731
    t0 = time.time()
    for step in range(args.steps):
        caps, imgs, negs, neg_imgs = [], [], [], []
        for _ in range(args.batch):
            cap, objs = world.random_scene(rng, tag_weights)
            caps.append(cap)
            imgs.append(world.render_scene(objs))
            negs.append(hard_negatives(cap, rng))
            neg_imgs.append(negative_images(cap, objs, negs[-1], args.image_negs, rng) if args.image_negs > 0 else [])
        B = len(caps)
        gen_caps, gen_pos, gen_fails, pass_items = generated_batch(pool, args.gen_batch, rng)
        flat_negs = [im for ims in neg_imgs for im in ims]
        x = torch.from_numpy(np.stack(imgs + flat_negs)).permute(0, 3, 1, 2)
        if args.augment > 0:
            x = augment(x, args.augment)
        else:  # small colour jitter and noise so the reward also judges imperfect generations
            x = (x + 0.03 * torch.randn_like(x) + 0.05 * torch.randn(len(x), 3, 1, 1)).clamp(0, 1)
        if gen_caps:
            g = torch.cat([torch.stack(gen_pos), pool["images"][[j for fs in gen_fails for j in fs]].float() / 255])
            x = torch.cat([x, augment(g, 0.5 * args.augment) if args.augment > 0 else g])
        gen_negs = [hard_negatives(gen_caps[k], rng) for k in pass_items]
        texts = caps + [n for ns in negs for n in ns] + gen_caps + [n for ns in gen_negs for n in ns]
        ids = tok(texts, padding="max_length", max_length=components.CLIP_MAX_LENGTH, truncation=True, return_tensors="pt")
        t = F.normalize(model.get_text_features(**ids).pooler_output, dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        nb_neg_caps = sum(len(ns) for ns in negs)
        caption_groups, image_groups = [len(ns) for ns in negs], [len(ims) for ims in neg_imgs]

        def contrastive(v, t=t, scale=scale):
            """(image->text, text->image) losses of the batch's renders and their own hard negatives."""
            logits = scale * v[:B] @ t[: B + nb_neg_caps].T  # (B, B + all negatives)
            # each image competes against the batch captions and its own hard negatives only
            loss_i = F.cross_entropy(logits + own_group_mask(logits, B, caption_groups), torch.arange(B))
            if args.image_negs > 0:
                # each caption picks its own image among the batch images and the renders of its own negatives
                lt = scale * t[:B] @ v[: B + len(flat_negs)].T
                return loss_i, F.cross_entropy(lt + own_group_mask(lt, B, image_groups), torch.arange(B))
            return loss_i, F.cross_entropy(logits[:, :B].T, torch.arange(B))

        if args.adversarial > 0:
            n = B + len(flat_negs)  # renders only: generated samples keep their own imperfections
            adv = adversarial_images(model, pre, x[:n], lambda v: sum(contrastive(v, t.detach(), scale.detach())),
                                     args.adversarial, args.adv_steps)
            x = torch.cat([adv, x[n:]])
        v = F.normalize(model.get_image_features(pixel_values=pre(x)).pooler_output, dim=-1)
        loss_i, loss_t = contrastive(v)
        parts = {"i2t": loss_i.item(), "t2i": loss_t.item()}
        loss = loss_i + (loss_t if args.image_negs > 0 else 0.5 * loss_t)
        if gen_caps:
            extra = generated_losses(t, v, scale, (B + nb_neg_caps, B + len(flat_negs)), gen_fails, pass_items, gen_negs)
            loss = loss + extra["gen"] + 0.5 * extra.get("pass", 0.0)
            parts.update({k: val.item() for k, val in extra.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            detail = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
            print(f"reward step {step} loss {loss.item():.4f} ({detail}) scale {scale.item():.1f} {time.time() - t0:.0f}s", flush=True)
    save_reward(model, tok, args.out, args.check)


if __name__ == "__main__":
    main()
