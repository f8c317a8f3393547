"""Checkpoints that survive crashes and resume a run bit for bit.

A checkpoint folder `checkpoints/step_N/` holds the trainable weights and EMA (safetensors, keyed
by parameter name), the optimiser state (with the parameter names in its order) and every random state (torch.load with weights_only=True: a pickle that
would run code is refused), the step, and the resolved config.  It is written under a
temporary name and renamed into place; `checkpoints/latest` is replaced atomically afterwards,
so it only ever names a complete checkpoint, whatever moment the process dies at.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

# Keys whose change does not alter the trajectory of a resumed run: its length, logging, evaluation,
# or memory switches that are tested to leave gradients unchanged (checkpoints hold whole tensors, so
# a run may also resume with another number of processes or parallel mode).
HARMLESS = ("train.steps", "train.save_every", "train.keep_last_n", "train.max_bad_steps", "train.gradient_checkpointing",
            "train.reuse_rollout_calls", "train.vae_checkpointing", "train.compile", "train.offload_optimizer", "train.decode_batch",
            "train.text_cache", "train.parallel", "train.fsdp_cpu_offload", "train.fsdp_reshard", "model.attention_backend",
            "eval.", "output.")


# Keys added after checkpoints were first written, with the value that reproduces a run from before:
# an older checkpoint resumes under it, and is refused (naming the key) under anything else.
BEFORE_IT_EXISTED = {"train.anchor": 0.0, "train.fsdp_reshard": True, "train.text_cache": "device", "train.optimizer": "adamw",
                     "train.reuse_rollout_calls": False, "train.vae_checkpointing": False,
                     "train.compile": False, "train.offload_optimizer": False, "model.attention_backend": None}


def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    """Every random state a step consumes: python, numpy, torch (CPU and CUDA), and the run's own generators."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state(),
             "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    random.setstate(_python_state(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        if k in state["generators"]:  # a generator added since the checkpoint was written keeps its seed
            g.set_state(state["generators"][k])


def _python_state(s):
    """random.getstate() round-trips through torch.save as nested lists; setstate wants tuples."""
    return (s[0], tuple(s[1]), s[2])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(root: Path, step: int, params, optimizer, ema, rng: dict, config_text: str, keep_last_n: int = 0,
         write: bool = True, names: list[str] | None = None) -> Path:
    """Write checkpoints/step_<step>, then point `latest` at it, then drop all but the newest keep_last_n.

    `names` are the parameters' names (the trainer's: the transformer's); without them tensors are keyed
    by position, as checkpoints were before names.  Every rank calls it (sharded tensors are gathered, a
    collective); only the one with `write` writes.
    """
    from safetensors.torch import save_file

    from .distributed import full_optimizer_state, full_state

    keys = list(names) if names is not None else [f"p{i}" for i in range(len(params))]
    weights = full_state(dict(zip(keys, params)))
    shadow = full_state(dict(zip(keys, ema.shadow))) if ema is not None else None
    optim = full_optimizer_state(optimizer)
    optim["names"] = keys  # the optimiser keys its state by position: this maps position -> parameter
    final = root / f"step_{step}"
    if not write:
        return final
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.partial"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"step_{step}.partial"
    tmp.mkdir()
    save_file(weights, tmp / "trainable.safetensors")
    if shadow is not None:
        save_file(shadow, tmp / "ema.safetensors")
    torch.save({"optimizer": optim, "rng": rng}, tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_text)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    if final.exists():  # the same step saved again (e.g. after resuming): swap, never leave neither
        old = root / f"step_{step}.old.partial"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _write_atomic(root / "latest", final.name)
    if keep_last_n > 0:
        done = sorted((d for d in root.glob("step_*") if d.is_dir() and not d.name.endswith(".partial")),
                      key=lambda d: int(d.name.split("_")[1]))
        for d in done[:-keep_last_n]:
            if d != final:
                shutil.rmtree(d, ignore_errors=True)
    return final


def resolve(out: Path, which: str) -> Path:
    """The checkpoint folder that `--resume latest|step_N|PATH` names, or a clear error."""
    root = out / "checkpoints"
    if which == "latest":
        if not (root / "latest").is_file():
            raise UserError(f"nothing to resume in {out}: it has no checkpoints/latest")
        path = root / (root / "latest").read_text().strip()
    else:
        path = Path(which) if Path(which).is_dir() else root / which
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"checkpoint {path} does not exist or is incomplete")
    return path


def check_config(path: Path, config_text: str) -> None:
    """Refuse to resume under a config that changes the run (method, model, seed, ...); warn for harmless keys."""
    import yaml

    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        return
    saved, now = _flatten(yaml.safe_load(saved_file.read_text())), _flatten(yaml.safe_load(config_text))
    for key, value in BEFORE_IT_EXISTED.items():  # a checkpoint older than the key ran as the key's legacy value
        saved.setdefault(key, value)
    diffs = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    harmful = [k for k in diffs if not k.startswith(HARMLESS)]
    if harmful:
        listing = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in harmful)
        raise UserError(f"cannot resume {path.name} with a different config ({listing}); "
                        "start a new output.dir, or resume with the checkpoint's config")
    if diffs:
        warnings.warn("resuming with changed settings: " + "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diffs))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not key.startswith("reward.fn"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _positional(keys) -> bool:
    return all(k.startswith("p") and k[1:].isdigit() for k in keys)


def match_names(path: Path, saved: dict, names: list[str], params) -> list[str]:
    """The saved key of each of this run's parameters: by name, or by position for a checkpoint from before names.

    A name missing from the checkpoint, one the run lacks, or a shape that differs is one clear error.
    """
    if _positional(saved):
        if len(saved) != len(params):
            raise UserError(f"checkpoint {path} holds {len(saved)} trainable tensors, this run has {len(params)}; "
                            "was it made with another finetune/LoRA setting?")
        keys = [f"p{i}" for i in range(len(params))]
    else:
        missing, extra = [n for n in names if n not in saved], [k for k in saved if k not in set(names)]
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which this run does not train"
            raise UserError(f"checkpoint {path} {what} ({len(missing)} missing, {len(extra)} extra); "
                            "was it made with another finetune/LoRA setting (train.finetune, train.lora_rank, train.lora_targets)?")
        keys = list(names)
    for key, p in zip(keys, params):  # a sharded parameter (DTensor) reports its whole shape: nothing to gather
        if tuple(saved[key].shape) != tuple(p.shape):
            raise UserError(f"checkpoint {path}: {key} has shape {tuple(saved[key].shape)}, this run's has {tuple(p.shape)}; "
                            "was it made with another train.lora_rank or model?")
    return keys


def load(path: Path, params, optimizer, ema, generators: dict, names: list[str] | None = None) -> int:
    """Restore a checkpoint written by save(), by parameter name (positional for older ones); returns its step."""
    from safetensors.torch import load_file

    from .distributed import load_full_optimizer_state, shard_like

    weights = load_file(path / "trainable.safetensors")
    keys = match_names(path, weights, list(names) if names is not None else [f"p{i}" for i in range(len(params))], params)
    with torch.no_grad():
        for key, p in zip(keys, params):
            p.copy_(shard_like(weights[key], p))
        if ema is not None and (path / "ema.safetensors").is_file():
            shadow = load_file(path / "ema.safetensors")
            for key, ref in zip(keys, ema.shadow):
                ref.copy_(shard_like(shadow[key], ref))
    state = load_state(path / "state.pt")
    optim = dict(state["optimizer"])
    saved_order = optim.pop("names", [f"p{i}" for i in range(len(params))])
    where = {k: i for i, k in enumerate(saved_order)}  # saved position of each key
    optim["state"] = {j: optim["state"][where[k]] for j, k in enumerate(keys) if where[k] in optim["state"]}
    load_full_optimizer_state(optimizer, optim)
    restore_rng(state["rng"], generators)
    return json.loads((path / "trainer_state.json").read_text())["step"]


def load_state(file: Path) -> dict:
    """torch.load restricted to tensors and plain containers: a pickle that would execute code is an error."""
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - UnpicklingError and friends: say what it means
        raise UserError(f"{file} is not a checkpoint this program wrote (refused to unpickle it: {str(e).splitlines()[0]})") from None
