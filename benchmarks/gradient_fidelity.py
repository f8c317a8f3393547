"""How close is each method's parameter gradient to the true gradient of the reward of the whole rollout?

On the same rollouts (train prompts, the trainer's LoRA at its start), every method's surrogate gradient
with respect to the LoRA parameters is compared with the exact one: backpropagation through all N Euler
steps from the fixed noise (`draft_k` with K = N).  Printed per method: the cosine with the exact gradient
(mean over batches), and its norm relative to the exact one.  Then the coherence of the exact gradient
itself: its cosine between two different batches, and between single samples (one prompt, other noises;
other prompts).  Gradients of different samples that are nearly orthogonal average out in a batch, and a
policy step then moves held-out samples along their own gradients only by that small shared part.

    python benchmarks/gradient_fidelity.py --batches 4        # -> results/gradient_fidelity.md
    python benchmarks/gradient_fidelity.py --set reward.path=DIR --set train.lora_rank=16

The LoRA starts with B = 0, so at the start only the B matrices have a gradient; `--warm STEPS` first takes
that many steps of the exact gradient, so that the A matrices are compared too.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from leapalign import config
from leapalign.backbones import load_backbone
from leapalign.evaluation import load_prompt_rows
from leapalign.methods import build_method
from leapalign.rewards import load_reward
from leapalign.rollout import rollout
from leapalign.objective import backward_surrogates, reward_gradient
from leapalign.train import draw_prompts, setup_trainable

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "leapalign (M=1)": {"name": "leapalign", "pairs_per_rollout": 1},
    "leapalign (M=2; demo)": {"name": "leapalign", "pairs_per_rollout": 2},
    "leapalign (M=8)": {"name": "leapalign", "pairs_per_rollout": 8},
    "leapalign alpha 1 (M=8)": {"name": "leapalign", "pairs_per_rollout": 8, "alpha": 1.0},
    "leapalign no weighting (M=8)": {"name": "leapalign", "pairs_per_rollout": 8, "weighting": False},
    "refl": {"name": "refl"},
    "draft_k (K=1)": {"name": "draft_k", "k": 1},
    "draft_k (K=4)": {"name": "draft_k", "k": 4},
    "drtune": {"name": "drtune"},
    "alignprop": {"name": "alignprop"},
}


def flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def method_gradient(backbone, method, reward, traj, grad, losses, params, cfg, seed: int) -> torch.Tensor:
    for p in params:
        p.grad = None
    backward_surrogates(backbone, method, reward, traj, grad, losses, torch.Generator().manual_seed(seed),
                        cfg.reward.lam, cfg.reward.scale)
    return flat_grad(params)


def per_sample_coherence(backbone, reward, rows, params, cfg, exact, num_prompts: int, num_noises: int) -> tuple[float, float]:
    """Mean cosine between exact gradients of single samples: same prompt with other noise, and other prompts."""
    tc, H, W = cfg.train, cfg.model.height, cfg.model.width
    picks = draw_prompts(rows, num_prompts, torch.Generator().manual_seed(tc.seed + 7), tc.balance_tags)
    noise_gen = torch.Generator().manual_seed(tc.seed + 8)
    grads = []
    for p in picks:
        prompts = [rows[p]["prompt"]] * num_noises
        traj = rollout(backbone, prompts, tc.num_steps, H, W, noise=backbone.initial_noise(num_noises, H, W, noise_gen))
        _, losses, grad, _ = reward_gradient(backbone, reward, traj.sample, prompts, H, W, cfg.reward.lam, cfg.reward.scale)
        for i in range(num_noises):
            only_i = torch.zeros_like(grad)
            only_i[i] = grad[i]
            grads.append(method_gradient(backbone, exact, reward, traj, only_i, losses, params, cfg, 0))
    g = torch.nn.functional.normalize(torch.stack(grads), dim=1)
    cos = g @ g.T
    block = torch.block_diag(*[torch.ones(num_noises, num_noises)] * num_prompts).bool()
    same = block & ~torch.eye(len(g), dtype=torch.bool)
    return cos[same].mean().item(), cos[~block].mean().item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "shapeworld_leapalign.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--warm", type=int, default=0, help="exact-gradient steps before measuring (lr train.lr)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts of the per-sample coherence measurement")
    ap.add_argument("--noises", type=int, default=4, help="noises per prompt of the per-sample coherence measurement")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from: " + ", ".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gradient_fidelity.md")
    args = ap.parse_args(argv)
    cfg = config.load(args.config, args.set)
    tc = cfg.train
    torch.manual_seed(tc.seed)
    backbone = load_backbone(cfg.model)
    reward = load_reward(cfg.reward.fn, cfg.reward.path)
    rows = load_prompt_rows(tc.prompts)
    params = setup_trainable(backbone, tc)
    N, H, W, B = tc.num_steps, cfg.model.height, cfg.model.width, tc.batch_size
    exact = build_method({"name": "draft_k", "k": N})
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    methods = {n: build_method(VARIANTS[n]) for n in names}
    gens = {"prompts": torch.Generator().manual_seed(tc.seed), "noise": torch.Generator().manual_seed(tc.seed + 1)}

    def batch():
        prompts = [rows[i]["prompt"] for i in draw_prompts(rows, B, gens["prompts"], tc.balance_tags)]
        traj = rollout(backbone, prompts, N, H, W, noise=backbone.initial_noise(B, H, W, gens["noise"]), keep_velocities=True)
        _, losses, grad, _ = reward_gradient(backbone, reward, traj.sample, prompts, H, W, cfg.reward.lam, cfg.reward.scale)
        return traj, losses, grad

    if args.warm:
        opt = torch.optim.AdamW(params, lr=tc.lr)
        for _ in range(args.warm):
            traj, losses, grad = batch()
            method_gradient(backbone, exact, reward, traj, grad, losses, params, cfg, 0)
            opt.step()
    cos = {n: [] for n in names}
    ratio = {n: [] for n in names}
    seconds = {n: 0.0 for n in names}
    exact_grads = []
    for b in range(args.batches):
        traj, losses, grad = batch()
        g_exact = method_gradient(backbone, exact, reward, traj, grad, losses, params, cfg, 0)
        exact_grads.append(g_exact)
        for n, m in methods.items():
            t0 = time.time()
            g = method_gradient(backbone, m, reward, traj, grad, losses, params, cfg, 1000 + b)
            seconds[n] += time.time() - t0
            cos[n].append(torch.nn.functional.cosine_similarity(g, g_exact, dim=0).item())
            ratio[n].append((g.norm() / g_exact.norm()).item())
        print(f"batch {b + 1}/{args.batches}: " + ", ".join(f"{n} {cos[n][-1]:.2f}" for n in names), flush=True)
    coherence = [torch.nn.functional.cosine_similarity(exact_grads[i], exact_grads[i + 1], dim=0).item()
                 for i in range(len(exact_grads) - 1)]
    same, other = per_sample_coherence(backbone, reward, rows, params, cfg, exact, args.prompts, args.noises)

    def mean(v):
        return sum(v) / len(v)

    lines = [f"Gradient fidelity: `python benchmarks/gradient_fidelity.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"{args.batches} batches of {B} train prompts, {N}-step rollouts, LoRA rank {tc.lora_rank}"
             + (f" after {args.warm} exact-gradient steps" if args.warm else " at its start (B = 0)")
             + f", reward {cfg.reward.fn}{' ' + cfg.reward.path if cfg.reward.path else ''}.", "",
             "| surrogate | cos with the exact gradient | norm / exact norm | s per batch |", "|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {mean(cos[n]):.3f} (min {min(cos[n]):.2f}) | {mean(ratio[n]):.2f} | {seconds[n] / args.batches:.2f} |")
    if coherence:
        lines.append(f"| *exact gradient, batch b vs b+1* | {mean(coherence):.3f} | | |")
    lines += ["", f"Exact gradients of single samples ({args.prompts} prompts x {args.noises} noises): mean cosine "
              f"{same:.4f} between two noises of one prompt, {other:.4f} between samples of different prompts."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
