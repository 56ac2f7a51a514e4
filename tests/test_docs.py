"""The README stays short and every relative link in it and in docs/ leads somewhere (no torch, no model)."""

import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text without fenced blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces -> '-'."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"[a-z]+:", t)]


def test_readme_is_at_most_250_lines():
    assert len(README.read_text().splitlines()) <= 250


def test_the_docs_pages_exist_and_are_linked_from_the_readme():
    linked = {t.split("#")[0] for t in relative_links(README)}
    pages = {f"docs/{p.name}" for p in PAGES[1:]}
    assert {"docs/methods.md", "docs/gpu.md", "docs/real-model.md", "docs/evaluation.md"} <= pages
    assert pages <= linked, pages - linked


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no heading)")
    assert not broken, broken


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [gone](missing.md) `[not a link](x.md)`\n```\n[code](y.md)\n```\n")
    assert relative_links(page) == ["#top", "missing.md"]
    assert anchors(page) == {"top"}
    assert slug("The GPU check: `python -m logitguard.gpu_check`") == "the-gpu-check-python--m-logitguardgpu_check"


def test_python_snippets_parse():
    for page in PAGES:
        for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M):
            ast.parse(block, filename=page.name)


def test_readme_test_command_is_the_one_ci_runs():
    # .ci/run runs the README's test command on a fresh machine; the two must not drift apart
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M)
    assert blocks[1].strip() == ". .venv/bin/activate && python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\npython -m pytest -q\n" in ci and "pip install --quiet torch==2.13.0" in ci
    assert 'pip install torch==2.13.0 && pip install -e ".[dev]"' in blocks[0]


def test_the_readme_speed_claim_is_the_committed_benchmarks():
    # the README's whole-evaluation speedup is the full-size bench's, as committed (bench/eval_speed.py wrote it)
    bench = json.loads((ROOT / "bench" / "results" / "eval_speed_real_qwen.json").read_text())
    assert bench["what"]["scale"] == 1.0 and bench["set_sizes"]["humaneval"] == 164  # a whole row's sets
    claimed = re.search(r"40 rows a batch, (\d+\.\d+)x the old path", README.read_text())
    assert claimed and float(claimed.group(1)) == bench["speedup"]["fast_bfloat16"]
