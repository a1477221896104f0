import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=True).stdout


def test_bench_moe_quick():
    out = run("scripts/bench_moe.py", "--tokens", "256", "--dim", "32", "--hidden", "64", "--experts", "4", "--top-k", "1", "2", "--reps", "1", "--no-deepspeed")
    rows = [line for line in out.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 2 * 5  # dense, vlmoe, grouped_mm, loop, one-hot einsum for two top-k
    assert "DeepSpeed MoE: skipped" in out


def test_vlmoe_info_json():
    from vlmoe.cli import info_main
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        info_main(["limoe-tiny", "--json"])
    rows = json.loads(buf.getvalue())
    assert set(rows) == {"limoe-tiny", "clip-tiny"}
    assert rows["limoe-tiny"]["total_params"] > rows["clip-tiny"]["total_params"]
