"""tools/gpu_checks.sh, the prepared GPU run, smoke-run on the CPU with tiny models so it cannot rot: every step
runs its real command and leaves the rows the docs are filled from."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_step_runs_with_tiny_models_on_the_cpu(tmp_path):
    env = {**os.environ, "GPU_CHECKS_SMOKE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    steps = ["cuda-tests", "bench", "speculative", "scalekv", "fid-10k"]
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_checks.sh"), str(tmp_path), *steps], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    status = (tmp_path / "steps.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in status] == steps
    assert all(": exit 0," in line for line in status), status
    assert "| VAR-tiny | nextscale | full | 1 |" in (tmp_path / "bench.log").read_text()
    speculative = json.loads((tmp_path / "speculative.json").read_text())
    assert {row["sampler"] for row in speculative} == {"nexttoken", "sjd", "sjd:coupled=true",
                                                      "gsd:embedding=transformer"}
    scalekv = json.loads((tmp_path / "scalekv.json").read_text())
    assert [(row["kv_cache"], row["batch"]) for row in scalekv] == [
        ("full", 4), ("scalekv:budget=0.1,calibration=uniform", 4)]
    assert scalekv[1]["kv_gib"] < scalekv[0]["kv_gib"]
    assert json.loads((tmp_path / "fid-10k-results.json").read_text())["settings"]["num_images"] == 8
