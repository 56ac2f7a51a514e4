"""The README's real-model table is what experiments/real_model/frontier_table.py computes from the committed
results files (logitguard.verdict's statistics), so no number in it is typed by hand."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_table_is_the_scripts_output():
    spec = importlib.util.spec_from_file_location("frontier_table", ROOT / "experiments/real_model/frontier_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run | benign: refusal"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    assert "\n".join(lines[start:end]) == module.table(ROOT / "results")
