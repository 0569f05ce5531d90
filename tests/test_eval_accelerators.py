"""tools/eval_accelerators.py: what its outputs show."""
import importlib.util
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))  # the tool imports its sibling eval_default_models
spec = importlib.util.spec_from_file_location("eval_accelerators", TOOLS / "eval_accelerators.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


@pytest.mark.parametrize("spec, label", [
    ("full", "full"),
    ("sliding:budget=0.1", "sliding:budget=0.1"),
    ("scalekv:budget=0.04,calibration=/work/runs/calib/default-0.04.json",
     "scalekv:budget=0.04,calibration=default-0.04.json"),
    ("scalekv:calibration=runs/c.json,budget=0.2", "scalekv:calibration=c.json,budget=0.2"),
    ("scalekv:budget=0.1,calibration=uniform", "scalekv:budget=0.1,calibration=uniform"),
])
def test_grid_rows_name_a_calibration_file_without_its_folders(spec, label):
    assert tool.grid_label(spec) == label
