"""The benchmarks run end to end (smoke mode) and write what they promise."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compare_methods_quick_runs_every_variant(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import compare_methods
    finally:
        sys.path.pop(0)
    compare_methods.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "methods_quick.md").read_text()
    for variant in compare_methods.VARIANTS:
        assert f"| {variant} |" in text, variant
    assert (tmp_path / "methods_quick.png").stat().st_size > 10_000


def test_memory_benchmark_runs_through_the_trainer(tmp_path):
    out = tmp_path / "memory.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_vs_steps.py"), "--steps", "3,4", "--batch", "2",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    for method in ("leapalign", "alignprop", "draft_k", "drtune"):
        assert f"| {method} |" in text
