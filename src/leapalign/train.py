"""The training loop shared by every method: rollout -> reward gradient once -> surrogates -> optimiser step."""
from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import config as config_mod
from .backbones import load_backbone
from .errors import UserError
from .evaluation import evaluate_model, load_prompt_rows, save_grid, spread, write_json
from .methods import build_method
from .rewards import load_reward
from .rollout import rollout


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reward_gradient(backbone, reward, sample: torch.Tensor, prompts: list[str], height: int, width: int, lam: float, scale: float,
                    need_grad: bool = True):
    """Decode the real sample once, score it, and return (rewards, per-sample hinge losses, dLoss_b/dx_N or None)."""
    x = sample.detach().requires_grad_(need_grad)
    if not need_grad:
        with torch.no_grad():
            r = reward(backbone.decode(x, height, width), prompts)
        return r, torch.relu(lam - r) * scale, None
    with torch.enable_grad():
        images = backbone.decode(x, height, width)
        r = reward(images, prompts)
        losses = torch.relu(lam - r) * scale
        (grad,) = torch.autograd.grad(losses.sum(), x)
    return r.detach(), losses.detach(), grad


def backward_surrogates(backbone, method, reward, traj, grad, losses, generator, lam: float, scale: float, factor: float = 1.0):
    """Accumulate into .grad the gradient of factor * (mean over the method's surrogates of the batch-mean weighted loss).

    A connected surrogate reuses the rollout's reward gradient `grad`; an unconnected one (a
    prediction, e.g. ReFL) is decoded and scored itself.  Returns (loss value, surrogate infos).
    """
    params = [p for p in backbone.transformer.parameters() if p.requires_grad]
    before = [None if p.grad is None else p.grad.clone() for p in params]
    B, H, W = traj.sample.shape[0], traj.height, traj.width
    loss, infos = 0.0, []
    for s in method.surrogates(backbone, traj, generator):
        infos.append(s.info)
        w = s.weight.to(traj.sample.dtype)
        if s.connected:
            if grad is None:
                raise RuntimeError(f"{method.name} yielded a connected surrogate but declares reward_on_sample = False")
            coeff = (w * factor / B).view(-1, *[1] * (grad.dim() - 1))
            torch.autograd.backward(s.endpoint, grad_tensors=grad * coeff)
            loss += (w * losses).mean().item() * factor
        else:
            images = backbone.decode(s.endpoint, H, W)
            pl = torch.relu(lam - reward(images, traj.prompts)) * scale
            ((w * pl).mean() * factor).backward()
            loss += (w * pl.detach()).mean().item() * factor
    m = len(infos)
    if m > 1:  # M surrogates of one rollout: their mean is the objective
        for p, b in zip(params, before):
            if p.grad is not None:
                p.grad.sub_(0 if b is None else b).div_(m).add_(0 if b is None else b)
        loss /= m
    return loss, infos


def draw_prompts(rows: list[dict], count: int, generator: torch.Generator, balance_tags: bool) -> list[int]:
    """Row indices: uniform over rows, or (balance_tags, rows with a "tag") a uniform tag, then a uniform row of it.

    ShapeWorld's train set is 81% `position` prompts; uniform rows would train mostly on the
    tag where the reward is weakest, while evaluation weighs every tag the same.
    """
    if not (balance_tags and all("tag" in r for r in rows)):
        return torch.randint(len(rows), (count,), generator=generator).tolist()
    by_tag: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_tag.setdefault(r["tag"], []).append(i)
    tags = sorted(by_tag)
    out = []
    for t in torch.randint(len(tags), (count,), generator=generator).tolist():
        members = by_tag[tags[t]]
        out.append(members[int(torch.randint(len(members), (1,), generator=generator))])
    return out


def setup_trainable(backbone, train_cfg):
    """LoRA adapters through peft (default) or the whole transformer; returns the trainable parameters."""
    tr = backbone.transformer
    tr.requires_grad_(False)
    if train_cfg.finetune == "lora":
        from peft import LoraConfig

        names = {n.rsplit(".", 1)[-1] for n, _ in tr.named_modules()} | {n for n, _ in tr.named_modules()}
        targets = [t for t in train_cfg.lora_targets if t in names or any(n.endswith("." + t) for n in names)]
        if not targets:
            raise UserError(f"train.lora_targets {train_cfg.lora_targets} match no module of the transformer")
        tr.add_adapter(LoraConfig(r=train_cfg.lora_rank, lora_alpha=train_cfg.lora_alpha, init_lora_weights="gaussian", target_modules=targets))
    elif train_cfg.finetune == "full":
        tr.requires_grad_(True)
    else:
        raise UserError(f"train.finetune must be 'lora' or 'full', got {train_cfg.finetune!r}")
    if train_cfg.gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    return [p for p in tr.parameters() if p.requires_grad]


class EMA:
    """Exponential moving average of the trainable parameters, swapped in for evaluation and saving."""

    def __init__(self, params, decay: float):
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def swap(self):
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def save_lora(backbone, directory: Path) -> None:
    """A diffusers LoRA file: `FluxPipeline.load_lora_weights(directory)` loads it."""
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(backbone.transformer)
    type(backbone.pipe).save_lora_weights(directory, transformer_lora_layers=layers, safe_serialization=True)


def save_checkpoint(directory: Path, step: int, params, optimizer, ema: EMA | None, generators: dict) -> None:
    from safetensors.torch import save_file

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({f"p{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}, tmp / "trainable.safetensors")
    if ema is not None:
        save_file({f"p{i}": s.cpu().contiguous() for i, s in enumerate(ema.shadow)}, tmp / "ema.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "generators": {k: g.get_state() for k, g in generators.items()}}, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    (directory.parent / "latest").write_text(directory.name)


def load_checkpoint(directory: Path, params, optimizer, ema: EMA | None, generators: dict) -> int:
    from safetensors.torch import load_file

    weights = load_file(directory / "trainable.safetensors")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(weights[f"p{i}"])
        if ema is not None and (directory / "ema.safetensors").is_file():
            for i, t in load_file(directory / "ema.safetensors").items():
                ema.shadow[int(i[1:])].copy_(t)
    state = torch.load(directory / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    return json.loads((directory / "trainer_state.json").read_text())["step"]


def plot_curve(metrics: list[dict], path: Path, evals: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    r = np.array([m["reward"] for m in metrics])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, r, alpha=0.35, label="train reward (batch mean)")
    if len(r) >= 5:
        k = max(2, len(r) // 10)
        ax.plot(steps[k - 1 :], np.convolve(r, np.ones(k) / k, mode="valid"), label=f"moving average ({k})")
    if evals:
        ax.plot([e["step"] for e in evals], [e["reward"] for e in evals], "o-", label="held-out reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(cfg: config_mod.Config, resume: str | None = None, progress: bool = True) -> dict:
    """Run a whole training job described by `cfg`; returns the summary written to summary.json."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tc, ec = cfg.train, cfg.eval
    for name, value in (("train.steps", tc.steps), ("train.batch_size", tc.batch_size), ("train.num_steps", tc.num_steps), ("train.grad_accum", tc.grad_accum)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if tc.num_steps < 2:
        raise UserError("train.num_steps must be >= 2 so that a method has two steps to choose from")
    out = Path(cfg.output.dir)
    if resume is None and out.exists() and any(out.iterdir()) and not cfg.output.overwrite:
        raise UserError(f"output directory {out} already exists and is not empty; choose another output.dir, pass --resume, or set output.overwrite=true")
    if resume is not None and not (out / "checkpoints").is_dir():
        raise UserError(f"nothing to resume in {out}: it has no checkpoints/ folder")

    # Everything that can fail on bad input happens before the output directory is touched.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    set_seed(tc.seed)
    method = build_method(cfg.method)
    method.check(tc.num_steps)
    backbone = load_backbone(cfg.model, device)
    reward = load_reward(cfg.reward.fn, cfg.reward.path).to(device)
    train_rows = load_prompt_rows(tc.prompts)
    eval_rows = load_prompt_rows(ec.prompts)
    H, W = cfg.model.height, cfg.model.width
    with torch.no_grad():  # preflight: the reward accepts what the decoder makes
        probe = backbone.decode(backbone.initial_noise(2, H, W, torch.Generator(device).manual_seed(0)), H, W)
        reward(probe, [train_rows[0]["prompt"]] * 2)
    params = setup_trainable(backbone, tc)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    ema = EMA(params, tc.ema) if tc.ema else None
    gens = {"prompts": torch.Generator().manual_seed(tc.seed), "noise": torch.Generator(device).manual_seed(tc.seed + 1),
            "pairs": torch.Generator().manual_seed(tc.seed + 2)}

    if resume is None and out.exists() and cfg.output.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_mod.dump(cfg))
    start = 0
    if resume is not None:
        ckpt = out / "checkpoints" / ((out / "checkpoints" / "latest").read_text().strip() if resume == "latest" else resume)
        if not ckpt.is_dir():
            raise UserError(f"checkpoint {ckpt} does not exist")
        start = load_checkpoint(ckpt, params, optimizer, ema, gens)
    writer = None
    if cfg.output.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))

    def run_eval(tag: str) -> tuple[dict, torch.Tensor]:
        if ema is not None:
            ema.swap()
        res, imgs = evaluate_model(backbone, reward, eval_rows, ec.num_steps, H, W, ec.batch_size, ec.num_images)
        if ema is not None:
            ema.swap()
        evaluated = spread(eval_rows, ec.num_images) if ec.num_images else eval_rows
        pick = spread(list(range(len(imgs))), ec.grid_size)
        save_grid(imgs[pick], [evaluated[i]["prompt"] for i in pick], out / "samples" / f"{tag}.png",
                  title=f"{tag}: reward {res.get('reward', float('nan')):.3f}" + (f", ShapeEval {res['shapeeval']['overall']:.2f}" if "shapeeval" in res else ""))
        return {k: v for k, v in res.items() if k != "rewards"}, imgs

    summary = {"method": method.name, "steps": tc.steps}
    before, _ = run_eval("before") if start == 0 else (json.loads((out / "summary_before.json").read_text()), None)
    write_json(out / "summary_before.json", before)
    evals = [{"step": start, "reward": before.get("reward", float("nan"))}] if start == 0 else []

    metrics_path = out / "metrics.jsonl"
    metrics: list[dict] = [json.loads(l) for l in metrics_path.read_text().splitlines()] if resume and metrics_path.exists() else []
    metrics = [m for m in metrics if m["step"] <= start]
    metrics_file = metrics_path.open("w")
    for m in metrics:
        metrics_file.write(json.dumps(m) + "\n")
    B = tc.batch_size
    bar = range(start, tc.steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"{method.name}", initial=start, total=tc.steps)
    backbone.transformer.train()
    for step in bar:
        t0 = time.time()
        rec: dict = {"step": step + 1}
        agg = {"reward": 0.0, "loss": 0.0}
        infos = []
        for _ in range(tc.grad_accum):
            prompts = [train_rows[i]["prompt"] for i in draw_prompts(train_rows, B, gens["prompts"], tc.balance_tags)]
            traj = rollout(backbone, prompts, tc.num_steps, H, W, generator=gens["noise"], keep_velocities=method.needs_velocities)
            r, losses, grad = reward_gradient(backbone, reward, traj.sample, prompts, H, W, cfg.reward.lam, cfg.reward.scale,
                                             need_grad=method.reward_on_sample)
            agg["reward"] += r.mean().item() / tc.grad_accum
            loss, step_infos = backward_surrogates(backbone, method, reward, traj, grad, losses, gens["pairs"], cfg.reward.lam,
                                                   cfg.reward.scale, 1.0 / tc.grad_accum)
            agg["loss"] += loss
            infos += step_infos
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        rec.update(agg)
        rec["grad_norm"] = float(grad_norm)
        for key in ("d_j", "d_N", "weight", "k", "j"):
            vals = [i[key] for i in infos if key in i]
            if vals:
                rec[key] = float(np.mean(vals)) if key not in ("k", "j") else (vals[0] if len(vals) == 1 else vals)
        rec["seconds"] = time.time() - t0
        rec["peak_memory_mb"] = peak_memory_mb(device)
        metrics.append(rec)
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()
        if writer is not None:
            for k2, v in rec.items():
                if isinstance(v, (int, float)) and k2 != "step":
                    writer.add_scalar(f"train/{k2}", v, step + 1)
        if progress:
            bar.set_postfix(reward=f"{rec['reward']:.3f}", loss=f"{rec['loss']:.3f}")
        if ec.every and (step + 1) % ec.every == 0 and step + 1 < tc.steps:
            res, _ = run_eval(f"step_{step + 1}")
            evals.append({"step": step + 1, "reward": res.get("reward", float("nan"))})
            if writer is not None:
                writer.add_scalar("eval/reward", res.get("reward", float("nan")), step + 1)
        if tc.save_every and (step + 1) % tc.save_every == 0:
            save_checkpoint(out / "checkpoints" / f"step_{step + 1}", step + 1, params, optimizer, ema, gens)
    metrics_file.close()
    backbone.transformer.eval()
    save_checkpoint(out / "checkpoints" / f"step_{tc.steps}", tc.steps, params, optimizer, ema, gens)

    after, _ = run_eval("after")
    evals.append({"step": tc.steps, "reward": after.get("reward", float("nan"))})
    if ema is not None:
        ema.swap()
    if tc.finetune == "lora":
        save_lora(backbone, out / "lora")
        summary["lora"] = "lora"
    else:
        backbone.transformer.save_pretrained(out / "transformer", safe_serialization=True)
        summary["transformer"] = "transformer"
    summary.update({"before": before, "after": after})
    write_json(out / "summary.json", summary)
    plot_curve(metrics, out / "reward_curve.png", evals)
    if writer is not None:
        writer.close()
    return summary
