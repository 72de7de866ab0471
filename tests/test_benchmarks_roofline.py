"""benchmarks/roofline.py --quick runs on the CPU, ends with its headline line, and saves positive rates."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "roofline.py"
HEADLINE = re.compile(r"resnet12 pre-train step: \d+\.\d% of the (fp32|bf16) matrix-multiply rate")


def test_quick_run_prints_headline_and_saves_rates(tmp_path: Path) -> None:
    out = tmp_path / "roofline.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=SCRIPT.parents[1],
    )
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert HEADLINE.fullmatch(last), last
    result = json.loads(out.read_text())
    assert last.endswith(f"of the {result['precision']} matrix-multiply rate")
    assert result["precision"] == ("bf16" if result["bf16_native"] else "fp32")
    assert result["threads"] == 1 and result["torch"] and result["cpu_model"]
    assert all(record["gflops"] > 0 for record in result["matmul"].values())
    assert ("bf16" in result["matmul"]) == result["bf16_native"]
    for name in ("resnet12", "conv4"):
        for kind in ("pre-train", "meta-train", "features"):
            record = result["steps"][name][kind]
            assert record["gflop"] > 0 and record["gflops"] > 0 and record["percent_of_matmul"] > 0, (name, kind)
