"""The benchmarks run end to end (smoke mode) and write what they promise."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_benchmark(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_compare_methods_quick_runs_every_variant_and_reuse_continues_from_kept_runs(tmp_path, capsys):
    compare_methods = _import_benchmark("compare_methods")
    compare_methods.main(["--quick", "--out", str(tmp_path), "--keep-runs", str(tmp_path / "runs")])
    text = (tmp_path / "methods_quick.md").read_text()
    for variant in compare_methods.VARIANTS:
        assert f"| {variant} |" in text, variant
    assert (tmp_path / "methods_quick.png").stat().st_size > 10_000
    assert "LeapAlign's mean held-out shapeeval reaches each method's final mean" in text and "refl (" in text
    # an interrupted benchmark continues: finished runs are read back, the missing one runs
    import shutil
    shutil.rmtree(tmp_path / "runs" / "refl_seed0")
    capsys.readouterr()
    compare_methods.main(["--quick", "--variants", "leapalign,refl", "--out", str(tmp_path / "again"),
                          "--keep-runs", str(tmp_path / "runs"), "--reuse"])
    printed = capsys.readouterr().out
    assert "leapalign seed 0: reusing" in printed and "refl seed 0: reusing" not in printed
    rows = lambda p: [l for l in p.read_text().splitlines() if l.startswith("| leapalign |")]  # noqa: E731
    assert rows(tmp_path / "again" / "methods_quick.md") == rows(tmp_path / "methods_quick.md")


def test_memory_benchmark_runs_through_the_trainer(tmp_path):
    out = tmp_path / "memory.md"
    # two methods (one process per method and length; the others' steps are tested in test_train): the suite's budget
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_vs_steps.py"), "--steps", "3,4", "--batch", "2",
                           "--methods", "leapalign,alignprop", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    for method in ("leapalign", "alignprop"):
        assert f"| {method} |" in text


@pytest.fixture(scope="module")
def moving_lora(tmp_path_factory) -> Path:
    """A LoRA on the shipped base whose B matrices are random (peft starts them at zero): it moves the samples."""
    from leapalign import config
    from leapalign.backbones import load_backbone
    from leapalign.train import save_lora, setup_trainable

    backbone = load_backbone(config.load(None, []).model)
    setup_trainable(backbone, config.load(None, []).train)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in backbone.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("lora") / "lora"
    save_lora(backbone, out)
    return out


def test_reward_alignment_probe_ascends_the_reward_and_measures_a_lora(tmp_path, moving_lora):
    """Latent ascent raises the reward it follows; a LoRA that moves the samples shows a non-zero drift."""
    out = tmp_path / "alignment.md"
    _import_benchmark("reward_alignment").main(["--quick", "--seeds", "1", "--loras", str(moving_lora), "--out", str(out)])
    rows = [l.split("|") for l in out.read_text().splitlines() if l.startswith("| shapematch |")]
    rewards = [float(r[5]) for r in rows]  # ascent steps 0, 1, 2
    assert len(rewards) == 3 and rewards[2] > rewards[0], rewards
    assert 0.0 < float(rows[0][3]) <= 1.0, rows[0]  # a share of the squared gradient norm
    drift = [l.split("|") for l in out.read_text().splitlines() if l.startswith(f"| {moving_lora} |")]
    assert len(drift) == 1 and float(drift[0][2]) > 1e-3, drift


def test_gradient_share_of_lowest_fifth():
    share = _import_benchmark("reward_alignment").gradient_share_of_lowest
    g = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # |g|^2 = 4, 1, 1, 1, 1
    assert share(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), g) == pytest.approx(0.5)  # the lowest: the steep one
    assert share(torch.tensor([4.0, 1.0, 2.0, 3.0, 0.0]), g) == pytest.approx(0.125)


def test_layout_shift_is_zero_for_the_base_and_measured_for_a_lora(tmp_path, moving_lora):
    out = tmp_path / "shift.md"
    _import_benchmark("layout_shift").main(["--quick", "--loras", f"moved={moving_lora}", f"twice={moving_lora}",
                                            f"twice={moving_lora}", "--out", str(out)])
    rows = {l.split("|")[1].strip(): l.split("|") for l in out.read_text().splitlines() if l.startswith("| ")}
    assert float(rows["base"][2]) == 0 and float(rows["moved"][2]) > 0.0, rows
    # a name given per seed is one row, mean ± std over its LoRAs (the same LoRA twice: no spread)
    assert rows["twice (2 seeds)"][2].strip() == f"{float(rows['moved'][2]):.2f} ± 0.00", rows
    # position = both objects drawn x relation right when both are (the two parts of ShapeEval's position pass)
    for name in ("base", "moved"):
        position, both, related = (float(rows[name][c].split("±")[0]) if rows[name][c].strip() != "nan" else 0.0 for c in (4, 5, 6))
        assert abs(position - both * related) < 1e-3, rows[name]
        follows = float(rows[name][8])
        assert np.isnan(follows) or 0.0 <= follows <= 1.0, rows[name]
    assert "layout follows the relation word" in out.read_text()


def test_reward_hacks_table_has_every_hack(tmp_path):
    out = tmp_path / "hacks.md"
    _import_benchmark("reward_hacks").main(["--quick", "--rewards", "shapematch", "--out", str(out)])
    text = out.read_text()
    from leapalign.shapeworld.hacks import HACKS

    assert all(name in text for name in HACKS) and "| shapematch |" in text
    assert "The gradient at each cheap image towards its truth render" in text


def test_gradient_share_is_one_for_a_linear_reward_and_two_for_a_quadratic_one():
    """The first-order change over the true change: exact for a linear reward, twice it for -|x - t|^2."""
    share = _import_benchmark("reward_hacks").gradient_share
    gen = torch.Generator().manual_seed(0)
    truth, hack, w = (torch.rand(4, 3, 8, 8, generator=gen) for _ in range(3))
    linear = lambda x, prompts: (x * w).flatten(1).sum(1)  # noqa: E731
    quadratic = lambda x, prompts: -((x - truth) ** 2).flatten(1).sum(1)  # noqa: E731
    prompts = [""] * 4
    assert ((linear(truth, prompts) - linear(hack, prompts)) > 0.05).any()
    assert share(linear, hack, truth, prompts) == pytest.approx(1.0, abs=1e-5)
    assert share(quadratic, hack, truth, prompts) == pytest.approx(2.0, abs=1e-5)


def test_cfg_sweep_scale_one_is_the_plain_sampling_and_guidance_changes_it():
    cfg_sweep = _import_benchmark("cfg_sweep")
    from leapalign import config, evaluation
    from leapalign.backbones import load_backbone

    backbone = load_backbone(config.load(None, []).model)
    prompts, seeds = ["a red circle", "a blue square to the left of a green triangle"], [3, 4]
    plain = evaluation.generate(backbone, prompts, seeds, 6, 32, 32)
    torch.testing.assert_close(cfg_sweep.cfg_images(backbone, prompts, seeds, 1.0, num_steps=6), plain, rtol=0, atol=1e-5)
    assert (cfg_sweep.cfg_images(backbone, prompts, seeds, 3.0, num_steps=6) - plain).abs().max() > 1e-2
    rows = cfg_sweep.main(["--scales", "1", "--seed-sets", "0", "--limit", "6"])
    assert len(rows) == 1 and 0.0 <= rows[0]["overall"] <= 1.0 and "position" in rows[0]


def test_gradient_fidelity_finds_the_exact_gradient_and_tells_a_one_step_surrogate_from_it(tmp_path):
    """With 4-step rollouts, DRaFT-K at K = 4 is the exact gradient (cosine 1, norm ratio 1); ReFL is not."""
    gradient_fidelity = _import_benchmark("gradient_fidelity")
    out = tmp_path / "fidelity.md"
    gradient_fidelity.main(["--batches", "1", "--variants", "draft_k (K=4),refl", "--prompts", "2", "--noises", "2",
                            "--set", "train.num_steps=4", "--set", "train.batch_size=3", "--out", str(out)])
    rows = {l.split("|")[1].strip(): l.split("|") for l in out.read_text().splitlines() if l.startswith("| ")}
    assert float(rows["draft_k (K=4)"][2].split()[0]) > 0.9999 and float(rows["draft_k (K=4)"][3]) == 1.0
    assert float(rows["refl"][2].split()[0]) < 0.99
    assert "between two noises of one prompt" in out.read_text()


def test_step_cost_quick_prints_the_ratios_line(capsys):
    """The last line scripts read; reusing the rollout's calls makes an iteration cheaper than recomputing them."""
    step_cost = _import_benchmark("step_cost")
    x, y = step_cost.main(["--quick"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"ratios: iteration/rollout={x:.3f} pair_gain={y:.3f}"
    assert 1.0 < x < 3.0 and 1.0 < y < 4.0


def test_gpu_run_book_runs_every_configuration_at_a_reduced_size():
    """The GPU run book's code path (full-size FLUX.1-dev configs there) on a reduced FLUX here, so it cannot rot."""
    gpu_flux = _import_benchmark("gpu_flux")
    rows = gpu_flux.main(["--tiny", "--iters", "1"])
    assert [r["case"] for r in rows] == [c[0] for c in gpu_flux.CASES]
    assert all("error" not in r and r["seconds"] > 0 for r in rows), rows
    lora, full = rows[0]["trainable_m"], rows[1]["trainable_m"]
    for r in rows[2:4]:  # the 8-bit optimiser and the CPU-offloaded one ran: their states are measured, not computed
        assert r["adamw_fp32_gb"] == 0 and r["trainable_m"] == full
    assert 0 < lora < full and rows[1]["adamw_fp32_gb"] == pytest.approx(full * 1e6 * 16 / 2**30)


def test_relation_loss_measures_how_much_the_flipped_relation_costs(tmp_path):
    """A model that predicts the true scene exactly and the flipped caption's scene 0.1 off gives a gap of 0.01 everywhere."""
    from leapalign.shapeworld import world

    relation_loss = _import_benchmark("relation_loss")
    captions, images = relation_loss.position_scenes(6, seed=0)
    assert all(world.parse(c).tag == "position" for c in captions) and images.shape == (6, 3, 32, 32), captions

    class ReadsTheRelation:
        def encode_images(self, images):
            self.x0 = torch.randn(len(images), 16, 32, generator=torch.Generator().manual_seed(1))
            return self.x0

        def encode_prompts(self, prompts):
            return list(prompts)

        def at_resolution(self, cond, height, width):
            return cond

        def velocity(self, xt, sigma, cond):
            exact = (xt - self.x0) / sigma[:, None, None]  # = noise - x0, the flow-matching target
            return exact + 0.1 * torch.tensor([c not in captions for c in cond], dtype=torch.float)[:, None, None]

    rows = relation_loss.loss_gap(ReadsTheRelation(), captions, images)
    assert [r[0] for r in rows] == list(relation_loss.SIGMAS)
    for sigma, true, gap, worse in rows:
        assert true < 1e-10 and abs(gap - 0.01) < 1e-6 and worse == 1.0, (sigma, true, gap, worse)


def test_relation_bayes_gap_is_the_distance_of_the_caption_means_without_sampling_bias(monkeypatch):
    """Scenes of a caption and of its flip whose means differ by 0.5 per element under unit noise: gap 0.25, loss 1.

    Without the correction for the means' own variance the estimate would read 0.25 + 2 / 20 = 0.35.
    """
    from leapalign.shapeworld import world

    relation_loss = _import_benchmark("relation_loss")
    caption = "a red square to the left of a cyan circle"
    flipped = world.flip_relation(caption)
    assert flipped != caption
    gen = torch.Generator().manual_seed(0)
    images = torch.cat([torch.randn(20, 3, 32, 32, generator=gen) + 0.5, torch.randn(20, 3, 32, 32, generator=gen)])
    monkeypatch.setattr(relation_loss, "position_scenes", lambda n, seed: ([caption] * 20 + [flipped] * 20, images))

    class Pixels:
        def encode_images(self, x):
            return x

    gap, err, loss, pairs = relation_loss.bayes_gap(Pixels(), 40, seed=0)
    assert pairs == 2 and abs(gap - 0.25) < 0.02 and abs(loss - 1.0) < 0.05, (gap, err, loss, pairs)


def test_relation_loss_runs_on_the_shipped_base(tmp_path, monkeypatch):
    out = tmp_path / "relation_loss.md"
    monkeypatch.setattr(sys, "argv", ["relation_loss.py", "--scenes", "4", "--bayes-scenes", "0", "--out", str(out)])
    _import_benchmark("relation_loss").main()
    rows = [l.split("|") for l in out.read_text().splitlines() if l.startswith("| shapeworld |")]
    assert len(rows) == 6 and all(0.0 <= float(r[5]) <= 1.0 for r in rows), rows
