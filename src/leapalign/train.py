"""The training loop shared by every method: rollout -> reward gradient once -> surrogates -> optimiser step."""
from __future__ import annotations

import copy
import json
import math
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import config as config_mod
from .backbones import check_model_path, load_backbone
from .errors import UserError
from .evaluation import evaluate_model, load_prompt_rows, save_grid, spread, write_json
from .judges import HackWatch, Judges, default_judges, headline
from .methods import build_method
from .objective import Objective, step as objective_step
from .rewards import load_reward
from .rollout import rollout


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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


class MasterWeights:
    """fp32 copies of trainable weights stored in bf16/fp16: the optimiser and EMA update the copies,
    the model runs on their rounding.  Without them an update below half a bf16 ulp of its weight
    (lr 1e-5 on a weight of 0.1 is one) is lost entirely.  With fp32 weights this is a no-op.
    """

    def __init__(self, params: list, enabled: bool = True):
        self.model = params
        self.enabled = enabled and any(p.dtype != torch.float32 for p in params)
        self.params = [p.detach().float().clone().requires_grad_(True) for p in params] if self.enabled else params

    def grads_to_master(self) -> None:
        if self.enabled:
            for m, p in zip(self.params, self.model):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def to_model(self) -> None:
        if self.enabled:
            for m, p in zip(self.params, self.model):
                p.copy_(m)


def save_lora(backbone, directory: Path, write: bool = True) -> None:
    """A diffusers LoRA file: `<Pipeline>.load_lora_weights(directory)` loads it.  Every rank calls it when sharded."""
    from peft.utils import get_peft_model_state_dict

    from .distributed import full_state

    layers = full_state(get_peft_model_state_dict(backbone.transformer))
    if write:
        type(backbone.pipe).save_lora_weights(directory, transformer_lora_layers=layers, safe_serialization=True)


def save_transformer(backbone, directory: Path, write: bool = True) -> None:
    """A diffusers transformer folder (`<Model>.from_pretrained(directory)`), gathered from shards if sharded."""
    from .distributed import full_state, is_sharded

    tr = backbone.transformer
    if not any(is_sharded(p) for p in tr.parameters()):
        if write:
            tr.save_pretrained(directory, safe_serialization=True)
        return
    state = full_state(tr.state_dict())
    if write:
        from huggingface_hub import save_torch_state_dict

        directory.mkdir(parents=True, exist_ok=True)
        save_torch_state_dict(state, directory, filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
        tr.save_config(directory)


def plot_curve(metrics: list[dict], path: Path, evals: list[dict]) -> None:
    """The training reward per step and its held-out value, and beside it every judge at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judge_names = list(evals[0].get("judges", {})) if evals else []
    fig, axes = plt.subplots(1, 2 if judge_names else 1, figsize=(11 if judge_names else 6, 3.5), squeeze=False)
    ax = axes[0, 0]
    steps = [m["step"] for m in metrics]
    r = np.array([m["reward"] for m in metrics])
    ax.plot(steps, r, alpha=0.35, label="train reward (batch mean)")
    if len(r) >= 5:
        k = max(2, len(r) // 10)
        ax.plot(steps[k - 1 :], np.convolve(r, np.ones(k) / k, mode="valid"), label=f"moving average ({k})")
    if evals:
        ax.plot([e["step"] for e in evals], [e.get("reward", float("nan")) for e in evals], "o-", label="held-out reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=8)
    if judge_names:
        jx = axes[0, 1]
        for name in judge_names:
            pts = [(e["step"], headline(e["judges"][name])) for e in evals if name in e.get("judges", {})]
            jx.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        jx.set_xlabel("step")
        jx.set_ylabel("judge (held-out, never trained on)")
        jx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def agree(ok: bool, device) -> bool:
    """True on every rank only if it is true on all of them (one tiny all-reduce)."""
    import torch.distributed as dist

    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def average_across_ranks(params, agg: dict, bad: str | None, grads: bool = True) -> str | None:
    """Mean of the gradients (unless FSDP already reduced them) and of the logged values over the processes,
    in one all-reduce; a step is bad if any rank's is.

    Parameters without a gradient on a rank count as zeros there, so every rank sends the same layout.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    keys = sorted(agg)
    device = params[0].device if params else torch.device("cpu")
    grad_list = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params] if grads else []
    flat = torch.cat([g.reshape(-1).float() for g in grad_list] +
                     [torch.tensor([agg[k] for k in keys] + [float(bad is not None)], device=device)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params if grads else [], grad_list):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
    for i, k in enumerate(keys):
        agg[k] = flat[offset + i].item()
    any_bad = flat[-1].item() > 0
    return (bad or "value on another rank") if any_bad else None


class Guard:
    """Counts skipped (non-finite) steps, stops a run that keeps failing, and warns once when the reward collapses
    or when the hinge passes no gradient at the first step (a margin on another scale than the reward's)."""

    def __init__(self, max_in_a_row: int, say, lam: float):
        self.max_in_a_row, self.lam = max_in_a_row, lam
        self.skipped, self.in_a_row, self.rewards, self.warned, self.warnings = 0, 0, [], False, []
        self._say = say

    def say(self, line: str) -> None:
        if line.startswith("warning"):
            self.warnings.append(line)
        self._say(line)

    def watch_hinge(self, rec: dict, first: bool) -> None:
        """relu(lam - r) is zero for every sample of the run's first step: say so, with the rewards' range."""
        if first and rec.get("active") == 0 and "skipped" not in rec:
            self.say(f"warning: every sample's reward is above reward.lam = {self.lam:g} (rewards {rec['reward_min']:.4g} to "
                     f"{rec['reward_max']:.4g}): the hinge passes no gradient and nothing trains; set reward.lam above "
                     "the rewards it should raise (docs/rewards.md gives each reward's range)")

    def record(self, step: int, bad: str | None, rec: dict) -> int:
        if bad is None:
            self.in_a_row = 0
            return self.skipped
        self.skipped += 1
        self.in_a_row += 1
        self.say(f"step {step} skipped: non-finite {bad} (k, j = {rec.get('k')}, {rec.get('j')}; prompts {rec.get('prompts')})")
        if self.in_a_row >= self.max_in_a_row:
            raise UserError(f"stopped at step {step}: {self.in_a_row} steps in a row had a non-finite {bad}; "
                            "lower train.lr, check the reward, or resume from the last checkpoint")
        return self.skipped

    def watch_reward(self, rec: dict) -> None:
        """Divergence: the last 10 steps' mean reward far below the first 10 steps' (3 standard deviations)."""
        if "skipped" in rec:
            return
        self.rewards.append(rec["reward"])
        if self.warned or len(self.rewards) < 20:
            return
        first, last = np.array(self.rewards[:10]), np.array(self.rewards[-10:])
        if last.mean() < first.mean() - max(3 * first.std(), 1e-3):
            self.warned = True
            self.say(f"warning: the reward is collapsing ({first.mean():.4f} over the first 10 steps, {last.mean():.4f} over the "
                     f"last 10); the run may be diverging: consider a lower train.lr")


def check_launcher() -> None:
    """Refuse accelerate configs whose engine would wrap the model: leapalign shards it itself (train.parallel).

    A DeepSpeed or FSDP accelerate config only takes effect through accelerator.prepare, which the
    trainer does not call (several surrogate backwards share one reward gradient per step), so it would
    silently train unsharded; the same memory savings come from train.parallel=fsdp.
    """
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
        raise UserError(f"the accelerate config selects DeepSpeed{' ZeRO-' + stage if stage else ''}, which leapalign does not drive; "
                        "launch with distributed_type: MULTI_GPU (configs/accelerate/) and set train.parallel=fsdp instead "
                        "(ZeRO-3 = the default, ZeRO-2 = train.fsdp_reshard=false, offload = train.fsdp_cpu_offload=true)")
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise UserError("the accelerate config selects FSDP, but leapalign shards the transformer itself: launch with "
                        "distributed_type: MULTI_GPU (configs/accelerate/) and set train.parallel=fsdp "
                        "(train.fsdp_reshard, train.fsdp_cpu_offload for the other FSDP options)")


def check_run(cfg: config_mod.Config, resume: str | None):
    """The checks that need no model: numbers in range, the output directory, the checkpoint to resume.

    Returns (output dir, resolved config text, checkpoint folder or None).
    """
    tc = cfg.train
    for name, value in (("train.steps", tc.steps), ("train.batch_size", tc.batch_size), ("train.num_steps", tc.num_steps), ("train.grad_accum", tc.grad_accum)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if tc.num_steps < 2:
        raise UserError("train.num_steps must be >= 2 so that a method has two steps to choose from")
    if tc.parallel not in ("ddp", "fsdp"):
        raise UserError(f"train.parallel must be 'ddp' or 'fsdp', got {tc.parallel!r}")
    check_launcher()
    if tc.text_cache not in ("device", "cpu"):
        raise UserError(f"train.text_cache must be 'device' or 'cpu', got {tc.text_cache!r}")
    if tc.anchor < 0:
        raise UserError(f"train.anchor must be >= 0 (0 = off), got {tc.anchor}")
    if tc.anchor > 0 and tc.finetune == "full" and tc.parallel == "fsdp":
        raise UserError("train.anchor with train.finetune=full keeps a whole frozen copy of the transformer on every rank, "
                        "which defeats train.parallel=fsdp; use train.finetune=lora (its base is the model with the LoRA off) or train.anchor=0")
    out = Path(cfg.output.dir)
    config_text = config_mod.dump(cfg)
    if resume is None and out.exists() and any(out.iterdir()) and not cfg.output.overwrite:
        raise UserError(f"output directory {out} already exists and is not empty; choose another output.dir, pass --resume, or set output.overwrite=true")
    resume_from = None
    if resume is not None:
        resume_from = ckpt.resolve(out, resume)
        ckpt.check_config(resume_from, config_text)
    check_model_path(cfg.model.path)
    return out, config_text, resume_from


def train(cfg: config_mod.Config, resume: str | None = None, progress: bool = True) -> dict:
    """Run a whole training job described by `cfg`; returns the summary written to summary.json."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tc, ec = cfg.train, cfg.eval
    out, config_text, resume_from = check_run(cfg, resume)

    # Everything that can fail on bad input happens before the output directory is touched.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process  # logs, evaluates and saves; every rank trains
    for note in config_mod.world_notes(cfg) if main else []:
        print(note)
    set_seed(tc.seed)
    method = build_method(cfg.method)
    method.check(tc.num_steps)
    backbone = load_backbone(cfg.model, device)
    if tc.text_cache == "cpu":
        backbone.offload_text()
    reward = load_reward(cfg.reward.fn, cfg.reward.path).to(device)
    reward_name = reward.name  # the built-in's name, 'module:callable', or 'a=1,b=0.5' for a weighted sum
    judges = Judges(ec.judges if ec.judges is not None else default_judges(ec.prompts), exclude=reward_name).to(device)
    train_rows = load_prompt_rows(tc.prompts)
    eval_rows = load_prompt_rows(ec.prompts)
    H, W = cfg.model.height, cfg.model.width
    with torch.no_grad():  # preflight: the reward accepts what the decoder makes
        probe = backbone.decode(backbone.initial_noise(2, H, W, torch.Generator(device).manual_seed(0)), H, W)
        reward(probe, [train_rows[0]["prompt"]] * 2)
    reward.check_finite = False  # from here on a non-finite reward skips the step (guards below) instead of stopping
    anchor_base = None  # full fine-tuning's anchor: the same adapter over a frozen copy of the transformer
    if tc.anchor > 0 and tc.finetune == "full":
        anchor_base = copy.copy(backbone)
        anchor_base.transformer = copy.deepcopy(backbone.transformer).requires_grad_(False)
    model_params = setup_trainable(backbone, tc)
    sharded = tc.parallel == "fsdp" and world > 1
    if sharded:
        from .distributed import shard_transformer

        shard_transformer(backbone.transformer, tc.fsdp_cpu_offload, tc.fsdp_reshard)
        model_params = [p for p in backbone.transformer.parameters() if p.requires_grad]
    names = [n for n, p in backbone.transformer.named_parameters() if p.requires_grad]  # checkpoints key tensors by them
    master = MasterWeights(model_params, tc.fp32_master)
    params = master.params  # what the optimiser, clipping, EMA and checkpoints see
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    ema = EMA(params, tc.ema) if tc.ema else None

    def swap_ema() -> None:
        ema.swap()
        master.to_model()

    objective = Objective(method, reward, cfg.reward.lam, cfg.reward.scale, tc.anchor, anchor_base, tc.decode_batch)
    everyone = (lambda ok: agree(ok, device)) if world > 1 else (lambda ok: ok)  # all ranks decide together
    gens = {"prompts": torch.Generator().manual_seed(tc.seed), "noise": torch.Generator(device).manual_seed(tc.seed + 1),
            "pairs": torch.Generator().manual_seed(tc.seed + 2), "anchor": torch.Generator().manual_seed(tc.seed + 3)}

    accelerator.wait_for_everyone()  # every rank has checked the output directory before the main one writes to it
    if main:
        if resume is None and out.exists() and cfg.output.overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_text)
    start = ckpt.load(resume_from, params, optimizer, ema, gens, names) if resume_from is not None else 0
    master.to_model()
    writer = None
    if cfg.output.tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))

    def run_eval(tag: str) -> dict:
        """Every rank samples (a sharded model needs all of them) and scores; the main one writes the grid."""
        if ema is not None:
            swap_ema()
        res, imgs = evaluate_model(backbone, reward, eval_rows, ec.num_steps, H, W, ec.batch_size, ec.num_images, judges=judges)
        if sharded:
            from .distributed import reshard

            reshard(backbone.transformer)
        if ema is not None:
            swap_ema()
        res = {k: v for k, v in res.items() if k not in ("rewards", "per_image")}
        if main:
            evaluated = spread(eval_rows, ec.num_images) if ec.num_images else eval_rows
            pick = spread(list(range(len(imgs))), ec.grid_size)
            title = ", ".join([f"{tag}: {reward_name} {res.get('reward', float('nan')):.3f}"] +
                              [f"{n} {headline(v):.3f}" for n, v in res.get("judges", {}).items()])
            save_grid(imgs[pick], [evaluated[i]["prompt"] for i in pick], out / "samples" / f"{tag}.png", title=title)
        return res

    def judged(step_done: int, res: dict, final: bool = False) -> bool:
        """Log an evaluation, keep the best weights (eval.stop_on_hack) and watch for hacking; True = stop the run."""
        if writer is not None:
            writer.add_scalar("eval/reward", res.get("reward", float("nan")), step_done)
            for name, value in res.get("judges", {}).items():
                for part, v in (value.items() if isinstance(value, dict) else [("", value)]):
                    writer.add_scalar(f"eval/{name}" + (f"_{part}" if part and part != "overall" else ""), v, step_done)
        first = next(iter(res.get("judges", {}).values()), None)
        if ec.stop_on_hack and first is not None and (best["value"] is None or headline(first) > best["value"]):
            best.update(value=headline(first), step=step_done, params=[p.detach().clone() for p in params],
                        ema=[t.clone() for t in ema.shadow] if ema is not None else None)
        lines = watch.update(step_done, res, final)
        for line in lines:
            say(line)
        hack_warnings.extend(lines)
        return bool(lines) and ec.stop_on_hack

    def save(step_done: int, rng: dict) -> None:
        """Every rank joins (sharded tensors are gathered); the main one writes."""
        accelerator.wait_for_everyone()
        ckpt.save(out / "checkpoints", step_done, params, optimizer, ema, rng, config_text, tc.keep_last_n, write=main, names=names)
        accelerator.wait_for_everyone()

    summary = {"method": method.name, "reward": reward_name, "steps": tc.steps, "processes": world, "parallel": "fsdp" if sharded else "ddp"}
    during = []  # the periodic held-out evaluations (eval.every) of this run
    watch, hack_warnings, best = HackWatch(ec.hack_margin), [], {"value": None}
    if start == 0:
        before = run_eval("before")
    else:
        before = json.loads((out / "summary_before.json").read_text())
    if main:
        write_json(out / "summary_before.json", before)
    accelerator.wait_for_everyone()

    metrics_path = out / "metrics.jsonl"
    metrics: list[dict] = [json.loads(l) for l in metrics_path.read_text().splitlines()] if resume and metrics_path.exists() else []
    metrics = [m for m in metrics if m["step"] <= start]
    metrics_file = metrics_path.open("w") if main else open(os.devnull, "w")
    for m in metrics:
        metrics_file.write(json.dumps(m) + "\n")
    B = tc.batch_size
    mine = slice(rank * B, (rank + 1) * B)  # this rank's share of the global batch of B x processes
    bar = range(start, tc.steps)
    progress = progress and main
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"{method.name}", initial=start, total=tc.steps)
    say = (bar.write if progress else print) if main else (lambda message: None)  # one voice, not one per rank
    guard = Guard(tc.max_bad_steps, say, cfg.reward.lam)
    if start == 0:
        judged(0, before)
    else:  # resumed: the watch starts from `before`, nothing to log again
        watch.update(0, before)
    stopped_at = None
    resume_point = (start, ckpt.capture_rng(gens))  # what Ctrl-C saves: the state after the last finished step
    backbone.transformer.train()
    try:
        for step in bar:
            t0 = time.time()
            rec: dict = {"step": step + 1}
            agg = {"reward": 0.0, "loss": 0.0, "active": 0.0, "reward_min": math.inf, "reward_max": -math.inf}
            infos, bad, prompts = [], None, []
            for _ in range(tc.grad_accum):
                # every rank draws the whole global batch from the shared generators and keeps its slice,
                # so N processes with batch b train exactly like one process with batch N b
                picks = draw_prompts(train_rows, B * world, gens["prompts"], tc.balance_tags)[mine]
                noise = backbone.initial_noise(B * world, H, W, gens["noise"])[mine]
                prompts = [train_rows[i]["prompt"] for i in picks]
                traj = rollout(backbone, prompts, tc.num_steps, H, W, noise=noise, keep_velocities=method.needs_velocities)
                res = objective_step(backbone, objective, traj, gens, 1.0 / tc.grad_accum, agree=everyone)
                if res.bad == "reward":
                    bad = bad or "reward"
                    continue
                agg["reward"] += res.rewards.mean().item() / tc.grad_accum
                agg["active"] += res.active / tc.grad_accum
                agg["reward_min"] = min(agg["reward_min"], res.rewards.min().item())
                agg["reward_max"] = max(agg["reward_max"], res.rewards.max().item())
                if len(res.components) > 1:  # a weighted sum: each reward logged by name
                    for name, values in res.components.items():
                        agg[f"reward/{name}"] = agg.get(f"reward/{name}", 0.0) + values.float().mean().item() / tc.grad_accum
                agg["loss"] += res.loss
                infos += res.infos
                if res.anchor is not None:
                    agg["anchor"] = agg.get("anchor", 0.0) + res.anchor / tc.grad_accum
                bad = bad or res.bad
            if not math.isfinite(agg["reward_min"]):  # every micro-batch skipped: no range to log (on every rank alike)
                del agg["reward_min"], agg["reward_max"]
            if world > 1:
                bad = average_across_ranks(model_params, agg, bad, grads=not sharded)  # FSDP reduce-scattered them
            master.grads_to_master()
            grad_norm = float("nan")
            if bad is None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf")))
                if not math.isfinite(grad_norm):
                    bad = "gradient"
            if bad is None:
                optimizer.step()
                master.to_model()
                if ema is not None:
                    ema.update()
            optimizer.zero_grad(set_to_none=True)
            for p in model_params:
                p.grad = None
            rec.update(agg)
            rec["grad_norm"] = grad_norm
            for key in ("d_j", "d_N", "weight", "k", "j"):
                vals = [i[key] for i in infos if key in i]
                if vals:
                    rec[key] = float(np.mean(vals)) if key not in ("k", "j") else (vals[0] if len(vals) == 1 else vals)
            if bad is not None:
                rec.update({"skipped": f"non-finite {bad}", "prompts": prompts})
            rec["skipped_steps"] = guard.record(step + 1, bad, rec)
            rec["seconds"] = time.time() - t0
            rec["peak_memory_mb"] = peak_memory_mb(device)
            guard.watch_reward(rec)
            guard.watch_hinge(rec, first=step == start)
            metrics.append(rec)
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
            resume_point = (step + 1, ckpt.capture_rng(gens))
            if writer is not None:
                for k2, v in rec.items():
                    if isinstance(v, (int, float)) and k2 != "step":
                        writer.add_scalar(f"train/{k2}", v, step + 1)
            if progress:
                bar.set_postfix(reward=f"{rec['reward']:.3f}", loss=f"{rec['loss']:.3f}")
            if ec.every and (step + 1) % ec.every == 0 and step + 1 < tc.steps:
                res = run_eval(f"step_{step + 1}")
                during.append({"step": step + 1, **res})
                if judged(step + 1, res):
                    stopped_at = step + 1
                    break
            if tc.save_every and (step + 1) % tc.save_every == 0:
                save(step + 1, resume_point[1])
    except KeyboardInterrupt:  # no barrier here: the other ranks may be anywhere
        metrics_file.close()
        if sharded:  # gathering shards needs every rank at the same point, which an interrupt does not give
            say("interrupted: a sharded run cannot save here; resume from the last periodic checkpoint (train.save_every)")
            raise
        if main:
            ckpt.save(out / "checkpoints", resume_point[0], params, optimizer, ema, resume_point[1], config_text, tc.keep_last_n, names=names)
        say(f"interrupted: saved checkpoints/step_{resume_point[0]}; continue with `leapalign train --config {out / 'config.yaml'} --resume`")
        raise
    metrics_file.close()
    backbone.transformer.eval()
    save(resume_point[0], resume_point[1])
    if stopped_at is not None:  # eval.stop_on_hack: back to the weights where the first judge was best
        with torch.no_grad():
            for p, b in zip(params, best["params"]):
                p.copy_(b)
            if ema is not None:
                for s_, b in zip(ema.shadow, best["ema"]):
                    s_.copy_(b)
        master.to_model()
        say(f"stopped at step {stopped_at} (eval.stop_on_hack); kept the weights of step {best['step']}, where the first judge was best")
        summary.update(stopped_at=stopped_at, kept_step=best["step"])

    after = run_eval("after")
    if stopped_at is None:
        judged(tc.steps, after, final=True)
    if ema is not None:
        swap_ema()
    if tc.finetune == "lora":
        save_lora(backbone, out / "lora", write=main)
        summary["lora"] = "lora"
    else:
        save_transformer(backbone, out / "transformer", write=main)
        summary["transformer"] = "transformer"
    accelerator.wait_for_everyone()
    if not main:
        return summary
    summary.update({"before": before, "after": after})
    if during:
        summary["during"] = during
    if hack_warnings:
        summary["hack_warnings"] = hack_warnings
    if guard.skipped:
        summary["skipped_steps"] = guard.skipped
    if guard.warnings:
        summary["warnings"] = guard.warnings
    write_json(out / "summary.json", summary)
    evals = ([{"step": 0, **before}] if start == 0 else []) + during + [{"step": stopped_at or tc.steps, **after}]
    plot_curve([m for m in metrics if "skipped" not in m], out / "reward_curve.png", evals)
    if writer is not None:
        writer.close()
    return summary
