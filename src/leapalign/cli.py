"""`leapalign train | demo | eval`: every bad input ends in one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError



def _train(args) -> None:
    from . import config
    from .train import check_run, train

    cfg = config.load(args.config, args.set)
    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        check_run(cfg, args.resume)  # bad input is one line here, not N copies from the workers
        _launch_workers(args.num_processes, args.raw_argv)
        return
    summary = train(cfg, resume=args.resume)
    if "after" in summary:  # the main process
        _print_summary(summary, cfg.output.dir)


def _launch_workers(n: int, raw_argv: list[str]) -> None:
    """`leapalign train --num-processes N ...`: the same command in N processes on this machine, with the
    environment torchrun would set (accelerate reads it).  If one fails, the others are stopped."""
    import socket
    import subprocess
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv, skip = [], False
    for a in raw_argv:  # the same command without --num-processes
        if skip or a.startswith("--num-processes="):
            skip = False
            continue
        skip = a == "--num-processes"
        if not skip:
            argv.append(a)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n)}
    procs = [subprocess.Popen([sys.executable, "-m", "leapalign", *argv], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(n)]
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:  # the workers got the same Ctrl-C: let the main one finish its checkpoint
        for p in procs:
            p.wait()
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    code = next((p.returncode for p in procs if p.returncode), 0)
    if code:
        raise SystemExit(code)


def _demo(args) -> None:
    from . import config
    from .train import train

    from .shapeworld import DEMO_CONFIG

    overrides = [f"output.dir={args.output_dir}"] + ([f"train.steps={args.steps}"] if args.steps else []) + list(args.set or [])
    cfg = config.load(DEMO_CONFIG, overrides)
    summary = train(cfg)
    _print_summary(summary, cfg.output.dir)


def _print_summary(summary: dict, out: str) -> None:
    """The before/after table: the training reward on the held-out prompts, then every judge (a checker's parts indented)."""
    from .judges import headline

    b, a = summary["before"], summary["after"]
    print(f"\n{summary['method']}, {summary['steps']} steps -> {out}")
    print(f"{'held-out':24s}{'before':>10s}{'after':>10s}")
    if "reward" in b:
        print(f"{'reward ' + summary.get('reward', ''):24s}{b['reward']:10.4f}{a['reward']:10.4f}")
    for name, value in b.get("judges", {}).items():
        after = a["judges"][name]
        print(f"{'judge ' + name:24s}{headline(value):10.4f}{headline(after):10.4f}")
        if isinstance(value, dict):
            for part, v in value.items():
                if part != "overall":
                    print(f"{'  ' + part:24s}{v:10.3f}{after[part]:10.3f}")
    for line in summary.get("hack_warnings", []):
        print(line)


def _eval(args) -> None:
    import torch

    from .backbones import load_backbone
    from .config import ModelConfig
    from .evaluation import Evaluator, load_prompt_rows, write_json
    from .judges import Judges, default_judges, headline
    from .rewards import load_reward

    mc = ModelConfig(path=args.model or "shapeworld", height=args.height, width=args.width, guidance_scale=args.guidance_scale,
                     dtype=args.dtype)
    rows = load_prompt_rows(args.prompts)
    if args.lora and not Path(args.lora).exists():
        raise UserError(f"LoRA path {args.lora} does not exist")
    names = [n.strip() for n in args.rewards.split(",") if n.strip()] if args.rewards else []
    rewards = {name: load_reward(name) for name in names}  # every name is checked before any sampling
    judge_names = [n.strip() for n in args.judges.split(",") if n.strip()] if args.judges is not None else default_judges(args.prompts)
    judges = Judges([n for n in judge_names if n not in rewards])
    out = Path(args.output)
    backbone = load_backbone(mc, "cuda" if torch.cuda.is_available() else "cpu")
    if args.lora:
        try:
            backbone.pipe.load_lora_weights(args.lora)
        except (OSError, ValueError) as e:
            raise UserError(f"could not load the LoRA at {args.lora}: {str(e).splitlines()[0]}") from None
    for fn in rewards.values():
        fn.to(backbone.device)
    evaluator = Evaluator(rows, args.num_steps, mc.height, mc.width, args.batch_size, args.num_images, rewards or None,
                          judges.to(backbone.device))
    res, images = evaluator(backbone, progress=True)
    per_image = res.pop("per_image", {})
    res["per_prompt"] = [{"prompt": r["prompt"], "seed": r["seed"], **{name: v[i] for name, v in per_image.items()}}
                         for i, r in enumerate(evaluator.rows)]
    res.pop("rewards", None)
    res.pop("reward", None)
    write_json(out, res)
    evaluator.save_grid(images, out.with_suffix(".png"), title=str(args.model or "shapeworld base") + (f" + {args.lora}" if args.lora else ""))
    means = " ".join(f"{k} {v:.4f}" for k, v in {**res.get("scores", {}), **{n: headline(v) for n, v in res.get("judges", {}).items()}}.items())
    print(f"wrote {out}: {means}")


def _plan(args) -> None:
    import json

    from . import config
    from .plan import ACCELERATORS, find_fit, format_report, report, trace_step

    if not args.gpu_memory > 0:
        raise UserError(f"--gpu-memory must be a positive number of GiB (e.g. 80), got {args.gpu_memory:g}")
    if args.gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {args.gpus}")
    if args.accelerator not in ACCELERATORS:
        raise UserError(f"unknown accelerator {args.accelerator!r}; known: {', '.join(ACCELERATORS)}")
    if not 0 < args.utilisation <= 1:
        raise UserError(f"--utilisation must be in (0, 1], got {args.utilisation:g}")
    cfg = config.load(args.config, args.set)
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    result = report(trace_step(cfg, args.gpus), cfg, args.gpu_memory, args.accelerator, args.utilisation)
    if not result["fits"] and not args.no_suggest:
        say(format_report(result) if not args.json else "does not fit; looking for changes that fit ...")
        changes, fit = find_fit(cfg, args.gpus, args.gpu_memory, progress=say)
        result["fits_with"] = {"changes": changes, "peak_bytes": fit.device_bytes()} if fit else None
        if fit is not None:
            say(f"fits in {args.gpu_memory:g} GiB with --set " + " --set ".join(" ".join(changes).split())
                + f" ({fit.device_bytes() / 2**30:.2f} GiB per GPU, planned)")
        else:
            say(f"does not fit in {args.gpu_memory:g} GiB even with {' '.join(changes) or 'every change leapalign knows'}; "
                "use more GPUs (--gpus N with train.parallel=fsdp) or a smaller resolution")
    elif not args.json:
        print(format_report(result))
    if args.json:
        print(json.dumps(result))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="leapalign", description="Reward-gradient post-training of flow-matching text-to-image models.")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML config")
    t.add_argument("--config", required=True, help="YAML file, e.g. configs/shapeworld_leapalign.yaml")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")
    t.add_argument("--resume", nargs="?", const="latest", default=None, help="continue from checkpoints/latest or a named checkpoint")
    t.add_argument("--num-processes", type=int, default=1,
                   help="data-parallel processes on this machine (GPUs, or CPU processes over gloo); train.batch_size is per process")
    t.set_defaults(func=_train)
    d = sub.add_parser("demo", help="LeapAlign LoRA on the embedded ShapeWorld base, with before/after evaluation")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="training iterations (default: the preset's train.steps)")
    d.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    d.set_defaults(func=_demo)
    e = sub.add_parser("eval", help="sample a prompt set and score it")
    e.add_argument("--model", default=None, help="diffusers pipeline folder (default: the shipped ShapeWorld base)")
    e.add_argument("--lora", default=None, help="LoRA folder saved by `leapalign train`")
    e.add_argument("--prompts", default="shapeworld:eval", help="shapeworld:eval, shapeworld:train or a text file")
    e.add_argument("--rewards", "--reward", default="shapematch,shapescore",
                   help="comma-separated rewards to score with, each a built-in name or module:callable (e.g. hpsv2.1,pickscore)")
    e.add_argument("--judges", default=None,
                   help="comma-separated judges (checkers such as shapeeval, or rewards); default: the prompt set's (ShapeWorld: shapeeval)")
    e.add_argument("--output", required=True, help="JSON file to write (an image grid goes next to it as .png)")
    e.add_argument("--num-steps", type=int, default=28)
    e.add_argument("--num-images", type=int, default=0, help="only the first N prompt rows (0 = all)")
    e.add_argument("--height", type=int, default=32)
    e.add_argument("--width", type=int, default=32)
    e.add_argument("--batch-size", type=int, default=96)
    e.add_argument("--guidance-scale", type=float, default=None, help="default: the model family's (FLUX.1-dev 3.5, SD3 7.0)")
    e.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    e.set_defaults(func=_eval)
    p = sub.add_parser("plan", help="trace one training iteration at full size on fake tensors: memory per GPU, FLOPs, fits or not")
    p.add_argument("--config", required=True, help="the YAML config `train` would take")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--gpus", type=int, default=1, help="processes (GPUs) the run will use; train.batch_size is per GPU")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--accelerator", default="h100", help="for the time estimate: h100, h200, a100, l40s, b200")
    p.add_argument("--utilisation", type=float, default=0.4, help="share of the accelerator's dense peak the estimate assumes")
    p.add_argument("--no-suggest", action="store_true", help="do not search for changes that fit when the plan does not")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress goes to stderr)")
    p.set_defaults(func=_plan)
    return ap


def _quiet_libraries() -> None:
    """Our own progress bar and messages only: no per-file loading bars from diffusers/transformers."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    try:
        args.func(args)
    except UserError as e:
        print(f"leapalign: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leapalign: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
