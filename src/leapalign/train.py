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
from .evaluation import Evaluator, load_prompt_rows, write_json
from .judges import HackWatch, Judges, default_judges, headline
from .methods import build_method
from .objective import Objective, rollout_for, step as objective_step
from .rewards import load_reward
from .runlog import Guard, RunLog


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


def make_optimizer(params, train_cfg) -> torch.optim.Optimizer:
    """AdamW (torch) or, with train.optimizer=adamw8bit, bitsandbytes' AdamW8bit: the two moments in 8 bits with
    block-wise scales, 2 bytes a parameter instead of 8 (tensors under 4096 values keep 32-bit moments)."""
    kwargs = dict(lr=train_cfg.lr, betas=tuple(train_cfg.betas), weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'leapalign[8bit]'") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


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
    if train_cfg.vae_checkpointing:
        backbone.vae.enable_gradient_checkpointing()
    if train_cfg.compile:
        tr.compile()  # torch.compile in place: the parameters keep their names (checkpoints, the LoRA export)
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

    `offload`: the copies (and so the optimiser's states and the EMA, which follow them) live in CPU memory,
    whatever the weights' dtype; each step moves the gradients there and the updated weights back.  The GPU then
    holds only the weights, their gradients and the activations: full fine-tuning of a 12B transformer needs
    16 bytes a parameter less on it.
    """

    def __init__(self, params: list, enabled: bool = True, offload: bool = False):
        self.model = params
        self.device = torch.device("cpu") if offload else None
        self.enabled = offload or (enabled and any(p.dtype != torch.float32 for p in params))
        dtype = torch.float32 if enabled else None  # None: the weights' own (offloaded copies without fp32 masters)
        self.params = [self._copy(p.detach(), dtype).clone().requires_grad_(True) for p in params] if self.enabled else params

    def _copy(self, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        return t.to(device=self.device or t.device, dtype=dtype or t.dtype)

    def grads_to_master(self) -> None:
        if self.enabled:
            for m, p in zip(self.params, self.model):
                m.grad = None if p.grad is None else self._copy(p.grad, m.dtype)
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


def agree(ok: bool, device) -> bool:
    """True on every rank only if it is true on all of them (one tiny all-reduce)."""
    import torch.distributed as dist

    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


GRAD_BUCKET = 2**25  # gradient elements averaged per all-reduce: at most 128 MB of fp32 beside the gradients


def _average_bucket(params: list, world: int) -> None:
    """Mean over the processes of these parameters' gradients, in fp32, written back into the gradients."""
    import torch.distributed as dist

    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def average_across_ranks(params, agg: dict, bad: str | None, grads: bool = True) -> str | None:
    """Mean of the gradients (unless FSDP already reduced them) and of the logged values over the processes;
    a step is bad if any rank's is.

    Gradients are averaged bucket by bucket (GRAD_BUCKET elements, summed in fp32) and written back in place, so
    the extra memory is one bucket, not a second copy of every gradient.  Parameters without a gradient on a rank
    count as zeros there, so every rank sends the same layout.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    keys = sorted(agg)
    device = params[0].device if params else torch.device("cpu")
    if grads:
        bucket, size = [], 0
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            bucket.append(p)
            size += p.numel()
            if size >= GRAD_BUCKET:
                _average_bucket(bucket, world)
                bucket, size = [], 0
        if bucket:
            _average_bucket(bucket, world)
    flat = torch.tensor([agg[k] for k in keys] + [float(bad is not None)], device=device)
    dist.all_reduce(flat)
    flat /= world
    for i, k in enumerate(keys):
        agg[k] = flat[i].item()
    any_bad = flat[-1].item() > 0
    return (bad or "value on another rank") if any_bad else None


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


def launch_notes(world: int) -> list[str]:
    """accelerate's simple launcher asked for several processes (it set MASTER_ADDR) but started one (no WORLD_SIZE):
    on a CPU machine without MPI, `accelerate launch --num_processes N --cpu` runs a single process."""
    env = os.environ
    if world == 1 and "MASTER_ADDR" in env and "WORLD_SIZE" not in env and "ACCELERATE_USE_CPU" in env:
        return ["note: the launcher asked for several processes but started one (accelerate launch on a CPU machine without "
                "MPI runs one); use `leapalign train --num-processes N` there, `accelerate launch` on GPU machines"]
    return []


def check_run(cfg: config_mod.Config, resume: str | None):
    """The checks that need no model: the config, the launcher, the output directory, the checkpoint to resume.

    Returns (output dir, resolved config text, checkpoint folder or None).
    """
    config_mod.resolve(cfg)  # a Config built in Python, not through config.load, is checked and completed here too
    check_launcher()
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


def read_numbers(dicts: list[dict]) -> None:
    """Replace, in place, every tensor value of these dicts by its float, read from the device in one transfer
    (a step keeps its numbers on the device so that nothing waits for the GPU between its backwards)."""
    slots = [(d, k) for d in dicts for k, v in d.items() if isinstance(v, torch.Tensor)]
    if slots:
        first = slots[0][0][slots[0][1]]
        values = torch.stack([d[k].detach().float().reshape(()).to(first.device) for d, k in slots]).tolist()
        for (d, k), v in zip(slots, values):
            d[k] = v


def summarise_infos(infos: list[dict]) -> dict:
    """One step's log fields from its surrogates' infos, whatever the method reports: floats averaged (d_j, d_N,
    weight), step choices kept (k, j, K: the value with one surrogate, the list with several)."""
    out = {}
    for key in dict.fromkeys(k for info in infos for k in info):
        vals = [info[key] for info in infos if key in info]
        out[key] = float(np.mean(vals)) if all(isinstance(v, float) for v in vals) else (vals[0] if len(vals) == 1 else vals)
    return out


class _NoLog:
    def step(self, rec: dict) -> None:
        pass


class Run:
    """One training job, set up once; its state lives on attributes (no closures).  Everything that can fail on
    bad input happens in __init__ before the output directory is touched."""

    def __init__(self, cfg: config_mod.Config, resume: str | None = None, progress: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, tc, ec = cfg, cfg.train, cfg.eval
        self.out, self.config_text, resume_from = check_run(cfg, resume)
        self.accelerator = acc = Accelerator(cpu=not torch.cuda.is_available())
        self.device, self.rank, self.world, self.main = acc.device, acc.process_index, acc.num_processes, acc.is_main_process
        for note in (config_mod.world_notes(cfg) + launch_notes(self.world)) if self.main else []:
            print(note)
        set_seed(tc.seed)
        self.method = build_method(cfg.method)
        self.method.check(tc.num_steps)
        backbone = load_backbone(cfg.model, self.device)
        reward = load_reward(cfg.reward.fn, cfg.reward.path).to(self.device)
        judges = Judges(ec.judges if ec.judges is not None else default_judges(ec.prompts), exclude=reward.name).to(self.device)
        self.H, self.W = cfg.model.height, cfg.model.width
        self.train_rows = load_prompt_rows(tc.prompts)
        self.evaluator = Evaluator(load_prompt_rows(ec.prompts), ec.num_steps, self.H, self.W, ec.batch_size, ec.num_images,
                                   reward, judges, ec.grid_size)
        with torch.no_grad():  # preflight: the reward accepts what the decoder makes
            probe = backbone.decode(backbone.initial_noise(2, self.H, self.W, torch.Generator(self.device).manual_seed(0)), self.H, self.W)
            reward(probe, [self.train_rows[0]["prompt"]] * 2)
        self.mesh = None  # FSDP over every process of the default group
        self._setup_training(backbone, reward)
        acc.wait_for_everyone()  # every rank has checked the output directory before the main one writes to it
        if self.main:
            if resume is None and self.out.exists() and cfg.output.overwrite:
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(self.config_text)
        self.start = ckpt.load(resume_from, self.params, self.optimizer, self.ema, self.gens, self.names) if resume_from else 0
        self.master.to_model()
        self.log = RunLog(self.out, self.start, self.main, cfg.output.tensorboard)
        self.bar = range(self.start, tc.steps)
        if progress and self.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(self.bar, desc=self.method.name, initial=self.start, total=tc.steps)
        writer = getattr(self.bar, "write", print)
        self.say = writer if self.main else (lambda message: None)  # one voice, not one per rank
        self.guard = Guard(tc.max_bad_steps, self.say, cfg.reward.lam, skipped=sum("skipped" in m for m in self.log.metrics))
        self.watch, self.hack_warnings, self.best = HackWatch(ec.hack_margin), [], {"value": None}
        self.resume_point = (self.start, ckpt.capture_rng(self.gens))  # what Ctrl-C saves: the state after the last finished step

    @classmethod
    def headless(cls, cfg: config_mod.Config, backbone, reward, rank: int = 0, world: int = 1, rows: list[dict] | None = None,
                 mesh=None) -> "Run":
        """A Run that can take training steps and nothing else: no output directory, evaluation, log or checkpoint
        (`leapalign plan` traces its `train_step` on a pipeline of fake tensors)."""
        run = cls.__new__(cls)
        run.cfg, run.device, run.rank, run.world, run.main = cfg, backbone.device, rank, world, rank == 0
        run.H, run.W, run.start, run.bar = cfg.model.height, cfg.model.width, 0, range(0)
        run.train_rows = rows if rows is not None else load_prompt_rows(cfg.train.prompts)
        run.mesh = mesh
        run.method = build_method(cfg.method)
        run.method.check(cfg.train.num_steps)
        run._setup_training(backbone, reward)
        run.log, run.say = _NoLog(), lambda line: None
        run.guard = Guard(cfg.train.max_bad_steps, run.say, cfg.reward.lam)
        return run

    def _setup_training(self, backbone, reward) -> None:
        """What a training step needs, on a loaded backbone and reward: the method, the trainable weights with their
        optimiser, the objective and the generators.  `leapalign plan` calls it too, on a pipeline of fake tensors."""
        cfg, tc = self.cfg, self.cfg.train
        self.backbone, self.reward = backbone, reward
        if tc.text_cache == "cpu":
            self.backbone.offload_text()
        self._setup_trainable()
        self.objective = Objective(self.method, self.reward, cfg.reward.lam, cfg.reward.scale, tc.anchor, self.anchor_base, tc.decode_batch,
                                   cfg.reward.balance)
        self.gens = {"prompts": torch.Generator().manual_seed(tc.seed), "noise": torch.Generator(self.device).manual_seed(tc.seed + 1),
                     "pairs": torch.Generator().manual_seed(tc.seed + 2), "anchor": torch.Generator().manual_seed(tc.seed + 3)}

    def _setup_trainable(self) -> None:
        """LoRA or full weights, sharded if asked, with fp32 masters, AdamW and the EMA; the anchor's frozen base."""
        tc = self.cfg.train
        self.anchor_base = None  # full fine-tuning's anchor: the same adapter over a frozen copy of the transformer
        if tc.anchor > 0 and tc.finetune == "full":
            self.anchor_base = copy.copy(self.backbone)
            self.anchor_base.transformer = copy.deepcopy(self.backbone.transformer).requires_grad_(False)
        self.model_params = setup_trainable(self.backbone, tc)
        self.sharded = tc.parallel == "fsdp" and self.world > 1
        if self.sharded:
            from .distributed import shard_transformer

            shard_transformer(self.backbone.transformer, tc.fsdp_cpu_offload, tc.fsdp_reshard, self.mesh)
            self.model_params = [p for p in self.backbone.transformer.parameters() if p.requires_grad]
        self.names = [n for n, p in self.backbone.transformer.named_parameters() if p.requires_grad]  # checkpoint keys
        self.master = MasterWeights(self.model_params, tc.fp32_master, tc.offload_optimizer)
        self.params = self.master.params  # what the optimiser, clipping, EMA and checkpoints see
        self.optimizer = make_optimizer(self.params, tc)
        self.ema = EMA(self.params, tc.ema) if tc.ema else None

    def swap_ema(self) -> None:
        if self.ema is not None:
            self.ema.swap()
            self.master.to_model()

    def evaluate(self, tag: str) -> dict:
        """Every rank samples (a sharded model needs all of them) and scores, with the EMA weights; the main one writes the grid."""
        self.swap_ema()
        res, imgs = self.evaluator(self.backbone)
        if self.sharded:
            from .distributed import reshard

            reshard(self.backbone.transformer)
        self.swap_ema()
        res = {k: v for k, v in res.items() if k not in ("rewards", "per_image")}
        if self.main:
            title = ", ".join([f"{tag}: {self.reward.name} {res.get('reward', float('nan')):.3f}"] +
                              [f"{n} {headline(v):.3f}" for n, v in res.get("judges", {}).items()])
            self.evaluator.save_grid(imgs, self.out / "samples" / f"{tag}.png", title=title)
        return res

    def judge(self, step_done: int, res: dict, final: bool = False) -> bool:
        """Log an evaluation, keep the best weights (eval.stop_on_hack) and watch for hacking; True = stop the run."""
        self.log.evaluation(step_done, res, final)
        first = next(iter(res.get("judges", {}).values()), None)
        if self.cfg.eval.stop_on_hack and first is not None and (self.best["value"] is None or headline(first) > self.best["value"]):
            self.best.update(value=headline(first), step=step_done, params=[p.detach().clone() for p in self.params],
                             ema=[t.clone() for t in self.ema.shadow] if self.ema is not None else None)
        lines = self.watch.update(step_done, res, final)
        for line in lines:
            self.say(line)
        self.hack_warnings.extend(lines)
        return bool(lines) and self.cfg.eval.stop_on_hack

    def save(self, step_done: int, rng: dict) -> None:
        """Every rank joins (sharded tensors are gathered); the main one writes."""
        self.accelerator.wait_for_everyone()
        ckpt.save(self.out / "checkpoints", step_done, self.params, self.optimizer, self.ema, rng, self.config_text,
                  self.cfg.train.keep_last_n, write=self.main, names=self.names)
        self.accelerator.wait_for_everyone()

    def begin(self) -> dict:
        """The held-out evaluation before training (read back on resume, with the evaluations since)."""
        if self.start == 0:
            before = self.evaluate("before")
            self.judge(0, before)
        else:
            before = json.loads((self.out / "summary_before.json").read_text())
            for e in self.log.evals or [{"step": 0, **before}]:  # the watch continues from the run's evaluations so far
                self.watch.update(e["step"], {k: v for k, v in e.items() if k != "step"})
        if self.main:
            write_json(self.out / "summary_before.json", before)
        self.accelerator.wait_for_everyone()
        self.backbone.transformer.train()
        return before

    def train_step(self, step: int) -> dict:
        """One optimiser step over train.grad_accum rollouts; returns its metrics record (also logged)."""
        tc, world, B = self.cfg.train, self.world, self.cfg.train.batch_size
        t0 = time.time()
        agg = {"reward": 0.0, "loss": 0.0, "active": 0.0, "reward_min": math.inf, "reward_max": -math.inf}
        infos, bad, prompts = [], None, []
        everyone = (lambda ok: agree(ok, self.device)) if world > 1 else (lambda ok: ok)  # all ranks decide together
        mine = slice(self.rank * B, (self.rank + 1) * B)  # this rank's share of the global batch of B x processes
        for _ in range(tc.grad_accum):
            # every rank draws the whole global batch from the shared generators and keeps its slice,
            # so N processes with batch b train exactly like one process with batch N b
            picks = draw_prompts(self.train_rows, B * world, self.gens["prompts"], tc.balance_tags)[mine]
            noise = self.backbone.initial_noise(B * world, self.H, self.W, self.gens["noise"])[mine]
            prompts = [self.train_rows[i]["prompt"] for i in picks]
            traj = rollout_for(self.backbone, self.method, prompts, tc.num_steps, self.H, self.W, noise, self.gens["pairs"],
                               tc.reuse_rollout_calls and not self.sharded)  # FSDP: every call is made anew
            res = objective_step(self.backbone, self.objective, traj, self.gens, 1.0 / tc.grad_accum, agree=everyone)
            if res.bad == "reward":
                bad = bad or "reward"
                continue
            # tensors until the step is done: one read from the device instead of one per number
            r = res.rewards.float()
            agg["reward"] = agg["reward"] + r.mean() / tc.grad_accum
            agg["active"] = agg["active"] + res.active / tc.grad_accum
            agg["reward_min"] = torch.minimum(torch.as_tensor(agg["reward_min"], device=r.device), r.min())
            agg["reward_max"] = torch.maximum(torch.as_tensor(agg["reward_max"], device=r.device), r.max())
            if len(res.components) > 1:  # a weighted sum: each reward logged by name
                for name, values in res.components.items():
                    agg[f"reward/{name}"] = agg.get(f"reward/{name}", 0.0) + values.float().mean() / tc.grad_accum
            agg["loss"] = agg["loss"] + res.loss
            infos += res.infos
            if res.anchor is not None:
                agg["anchor"] = agg.get("anchor", 0.0) + res.anchor / tc.grad_accum
            bad = bad or res.bad
        read_numbers([agg, *infos])
        if not math.isfinite(agg["reward_min"]):  # every micro-batch skipped: no range to log (on every rank alike)
            del agg["reward_min"], agg["reward_max"]
        if world > 1:
            bad = average_across_ranks(self.model_params, agg, bad, grads=not self.sharded)  # FSDP reduce-scattered them
        grad_norm, bad = self._optimiser_step(bad)
        rec = {"step": step + 1, **agg, "grad_norm": grad_norm, **summarise_infos(infos)}
        if bad is not None:
            rec.update({"skipped": f"non-finite {bad}", "prompts": prompts})
        rec["skipped_steps"] = self.guard.record(step + 1, bad, rec)
        rec["seconds"] = time.time() - t0
        rec["peak_memory_mb"] = peak_memory_mb(self.device)
        self.guard.watch_reward(rec)
        self.guard.watch_hinge(rec, first=step == self.start)
        self.log.step(rec)
        self.resume_point = (step + 1, ckpt.capture_rng(self.gens))
        if hasattr(self.bar, "set_postfix"):
            self.bar.set_postfix(reward=f"{rec['reward']:.3f}", loss=f"{rec['loss']:.3f}")
        return rec

    def _optimiser_step(self, bad: str | None) -> tuple[float, str | None]:
        """Clip, step AdamW (on the fp32 masters) and the EMA, unless the step is bad; returns (grad norm, bad)."""
        tc = self.cfg.train
        self.master.grads_to_master()
        grad_norm = float("nan")
        if bad is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip if tc.grad_clip > 0 else float("inf")))
            if not math.isfinite(grad_norm):
                bad = "gradient"
        if bad is None:
            self.optimizer.step()
            self.master.to_model()
            if self.ema is not None:
                self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.model_params:
            p.grad = None
        return grad_norm, bad

    def interrupted(self) -> None:
        """Ctrl-C: save the state after the last finished step (not possible when sharded: no common point)."""
        self.log.close()
        if self.sharded:
            self.say("interrupted: a sharded run cannot save here; resume from the last periodic checkpoint (train.save_every)")
            return
        if self.main:
            ckpt.save(self.out / "checkpoints", self.resume_point[0], self.params, self.optimizer, self.ema, self.resume_point[1],
                      self.config_text, self.cfg.train.keep_last_n, names=self.names)
        self.say(f"interrupted: saved checkpoints/step_{self.resume_point[0]}; continue with "
                 f"`leapalign train --config {self.out / 'config.yaml'} --resume`")

    def keep_best(self, stopped_at: int) -> None:
        """eval.stop_on_hack: back to the weights (and EMA) of the evaluation where the first judge was best."""
        with torch.no_grad():
            for p, b in zip(self.params, self.best["params"]):
                p.copy_(b)
            if self.ema is not None:
                for s_, b in zip(self.ema.shadow, self.best["ema"]):
                    s_.copy_(b)
        self.master.to_model()
        self.say(f"stopped at step {stopped_at} (eval.stop_on_hack); kept the weights of step {self.best['step']}, where the first judge was best")

    def finish(self, before: dict, stopped_at: int | None) -> dict:
        """The last checkpoint, the held-out evaluation after, the exported weights (EMA), summary.json and the curve."""
        tc = self.cfg.train
        self.backbone.transformer.eval()
        self.save(*self.resume_point)
        summary = {"method": self.method.name, "reward": self.reward.name, "steps": tc.steps, "processes": self.world,
                   "parallel": "fsdp" if self.sharded else "ddp"}
        if stopped_at is not None:
            self.keep_best(stopped_at)
            summary.update(stopped_at=stopped_at, kept_step=self.best["step"])
        after = self.evaluate("after")
        if stopped_at is None:
            self.judge(tc.steps, after, final=True)
        else:
            self.log.evaluation(stopped_at, after, final=True)
        self.swap_ema()
        if tc.finetune == "lora":
            save_lora(self.backbone, self.out / "lora", write=self.main)
            summary["lora"] = "lora"
        else:
            save_transformer(self.backbone, self.out / "transformer", write=self.main)
            summary["transformer"] = "transformer"
        self.accelerator.wait_for_everyone()
        during = self.log.during()
        self.log.close(self.out / "reward_curve.png")
        if not self.main:
            return summary
        summary.update({"before": before, "after": after})
        for key, value in (("during", during), ("hack_warnings", self.hack_warnings), ("skipped_steps", self.guard.skipped),
                           ("warnings", self.guard.warnings)):
            if value:
                summary[key] = value
        write_json(self.out / "summary.json", summary)
        return summary


def train(cfg: config_mod.Config, resume: str | None = None, progress: bool = True) -> dict:
    """Run a whole training job described by `cfg`; returns the summary written to summary.json."""
    run = Run(cfg, resume, progress)
    tc, every = cfg.train, cfg.eval.every
    before = run.begin()
    stopped_at = None
    try:
        for step in run.bar:
            run.train_step(step)
            done = step + 1
            if every and done % every == 0 and done < tc.steps and run.judge(done, run.evaluate(f"step_{done}")):
                stopped_at = done
                break
            if tc.save_every and done % tc.save_every == 0:
                run.save(*run.resume_point)
    except KeyboardInterrupt:  # no barrier here: the other ranks may be anywhere
        run.interrupted()
        raise
    return run.finish(before, stopped_at)
