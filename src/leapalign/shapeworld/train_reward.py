"""Train ShapeScore, the embedded world's reward: a tiny transformers CLIPModel, contrastive with hard negatives.

    python -m leapalign.shapeworld.train_reward --out src/leapalign/shapeworld/assets/shapescore
"""
from __future__ import annotations

import argparse
import json
import math
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


def make_model(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=components.CLIP_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=4, hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3500)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok, _ = components.make_tokenizers()
    model = make_model(tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=args.steps, pct_start=0.05)
    t0 = time.time()
    for step in range(args.steps):
        caps, imgs, negs = [], [], []
        for _ in range(args.batch):
            cap, objs = world.random_scene(rng, TAG_WEIGHTS)
            caps.append(cap)
            imgs.append(world.render_scene(objs))
            negs.append(hard_negatives(cap, rng))
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
        # small colour jitter and noise so the reward also judges imperfect generations
        x = (x + 0.03 * torch.randn_like(x) + 0.05 * torch.randn(len(x), 3, 1, 1)).clamp(0, 1)
        texts = caps + [n for ns in negs for n in ns]
        ids = tok(texts, padding="max_length", max_length=components.CLIP_MAX_LENGTH, truncation=True, return_tensors="pt")
        t = F.normalize(model.get_text_features(**ids).pooler_output, dim=-1)
        v = F.normalize(model.get_image_features(pixel_values=preprocess(x, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)).pooler_output, dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * v @ t.T  # (B, B + all negatives)
        # each image competes against the batch captions and its own hard negatives only
        B = len(caps)
        mask = torch.full_like(logits, float("-inf"))
        mask[:, :B] = 0
        start = B
        for i, ns in enumerate(negs):
            mask[i, start : start + len(ns)] = 0
            start += len(ns)
        loss_i = F.cross_entropy(logits + mask, torch.arange(B))
        loss_t = F.cross_entropy(logits[:, :B].T, torch.arange(B))
        loss = loss_i + 0.5 * loss_t
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"reward step {step} loss {loss.item():.4f} scale {scale.item():.1f} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    (args.out / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
         "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "do_resize": True, "do_center_crop": True,
         "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3}, indent=2))
    acc = ranking_accuracy(ClipReward.from_pretrained(args.out), 2000, seed=12345)
    print("ranking accuracy vs hard negatives:", json.dumps(acc), flush=True)
    (args.out.parent / "shapescore_accuracy.json").write_text(json.dumps(acc, indent=2))


if __name__ == "__main__":
    main()
