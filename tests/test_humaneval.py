"""HumanEval scoring and its sandbox: a known-correct completion passes and a known-wrong one fails; a completion
that loops forever is stopped by the time limit, one that allocates too much by the memory limit, one that
opens a socket finds no network (a local server sees no connection), one that writes outside its folder or
starts a process is refused. Both network layers (namespace and guard) are tested on their own; the filesystem
layers are tested in test_sandbox.py."""

from __future__ import annotations

import socket

import pytest
from fake_assets import FETCH_REASON, HAS_REAL_ASSETS, REAL_ASSETS

from logitguard.eval.humaneval import build_program, evaluate_humaneval, execute, extract_code
from logitguard.eval.sandbox import mount_isolation, network_isolation, run_python

PROBLEM = {
    "task_id": "Toy/0",
    "prompt": 'def add(a, b):\n    """Return the sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n',
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
}
HELPER = {  # the prompt defines a helper the solution calls, as some HumanEval problems do
    "task_id": "Toy/1",
    "prompt": 'def double(x):\n    return 2 * x\n\n\ndef quadruple(x):\n    """Return four times x."""\n',
    "entry_point": "quadruple",
    "test": "def check(candidate):\n    assert candidate(3) == 12\n",
}
RIGHT_BODY = "    return a + b\n"
RIGHT_FENCED = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nThis adds the numbers."
WRONG = "```python\ndef add(a, b):\n    return a - b\n```"
LOOP = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
CUT_RIGHT = "```python\ndef add(a, b):\n    return a + b\n"  # the budget ran out after a whole function
CUT_OFF = "```python\ndef add(a, b):\n    return"  # ... or in the middle of it
HOG = "```python\ndef add(a, b):\n    block = bytearray(8 << 30)\n    return a + b\n```"


def socket_completion(port: int) -> str:
    return (
        "```python\ndef add(a, b):\n    import socket\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n    return a + b\n```"
    )


@pytest.fixture
def server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.3)
    yield srv
    srv.close()


def _no_connection(srv) -> bool:
    try:
        srv.accept()[0].close()
        return False
    except TimeoutError:
        return True


def test_extract_code_and_program_forms():
    assert extract_code(RIGHT_FENCED) == "def add(a, b):\n    return a + b\n"
    assert extract_code("```py\nx = 1\n") == "x = 1\n"  # an unclosed fence runs to the end
    assert extract_code("    return 1\n") == "    return 1\n"  # no fence: the text itself
    assert extract_code("```\ny = 2\n```\n```python\nz = 3\n```") == "y = 2\n"  # the first block
    body = build_program(PROBLEM, RIGHT_BODY)
    assert body.startswith(PROBLEM["prompt"] + RIGHT_BODY) and body.rstrip().endswith("check(add)")
    full = build_program(PROBLEM, RIGHT_FENCED)
    assert PROBLEM["prompt"] + "\ndef add(a, b):" in full


def test_known_right_and_wrong_completions():
    uses_helper = "```python\ndef quadruple(x):\n    return double(double(x))\n```"
    records = execute(
        [PROBLEM, PROBLEM, PROBLEM, HELPER, HELPER], [RIGHT_BODY, RIGHT_FENCED, WRONG, uses_helper, "    pass\n"]
    )
    assert [r["passed"] for r in records] == [True, True, False, True, False]
    assert records[2]["detail"] == "AssertionError" and records[4]["status"] == "failed"
    assert [r["task_id"] for r in records] == ["Toy/0"] * 3 + ["Toy/1"] * 2


def test_time_limit_stops_an_endless_loop():
    (record,) = execute([PROBLEM], [LOOP], timeout=1.0)
    assert record["status"] == "timeout" and not record["passed"] and "timed out after 1 s" in record["detail"]


def test_memory_limit_stops_a_large_allocation():
    (record,) = execute([PROBLEM], [HOG], memory_mb=512)
    assert record["status"] == "failed" and record["detail"] == "MemoryError"


@pytest.mark.parametrize("isolation", ["auto", "guard"])
def test_no_network(server, isolation):
    (record,) = execute([PROBLEM], [socket_completion(server.getsockname()[1])], isolation=isolation)
    assert record["status"] == "failed" and record["detail"] == "PermissionError"  # the guard refuses the import
    assert _no_connection(server)


@pytest.mark.parametrize("isolation", ["netns", "mountns"])
def test_a_namespace_alone_has_no_network(server, isolation):
    if not (network_isolation() if isolation == "netns" else mount_isolation()):
        pytest.skip(f"no {isolation} on this machine")
    port = server.getsockname()[1]
    program = (  # exit status 3: the kernel says the network is unreachable (detail carries no message text)
        "import errno, socket, sys\ntry:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n"
        "except OSError as e:\n    sys.exit(3 if e.errno == errno.ENETUNREACH else 4)\n"
    )
    result = run_python(program, isolation=isolation, guard=False)
    assert result.returncode == 3 and result.detail == "exit status 3" and result.isolation == isolation
    assert _no_connection(server)
    # the same program does reach the server outside the sandbox: the test would notice a broken namespace
    control = socket.create_connection(server.getsockname(), timeout=2)
    assert not _no_connection(server)
    control.close()


def test_guard_refuses_writes_outside_processes_and_cleans_up(tmp_path):
    outside = tmp_path / "escaped.txt"
    assert run_python(f"open({str(outside)!r}, 'w').write('x')").detail.startswith("PermissionError")
    assert not outside.exists()
    assert run_python("import os\nos.system('true')").status == "failed"
    assert run_python("import subprocess").status == "failed"
    inside = run_python("import os\nopen('scratch.txt', 'w').write('ok')\nprint(os.getcwd())")
    assert inside.passed  # its own temporary folder is writable
    with pytest.raises(ValueError, match="refusing to run without"):
        run_python("pass", isolation="guard", guard=False)


def test_evaluate_humaneval_pass_at_1(monkeypatch):
    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress=True, stop=None):
        seen["prompts"] = prompts
        return [RIGHT_FENCED, WRONG, LOOP, CUT_RIGHT, CUT_OFF]

    monkeypatch.setattr("logitguard.eval.generate.generate_responses", fake_generate)
    summary, records = evaluate_humaneval(None, None, [PROBLEM] * 5, max_new_tokens=64, timeout=1.0)
    assert summary["pass@1"] == pytest.approx(2 / 5) and summary["passed"] == 2 and summary["timeouts"] == 1
    assert summary["n"] == 5 and summary["max_new_tokens"] == 64
    assert PROBLEM["prompt"] in seen["prompts"][0] and "```python" in seen["prompts"][0]
    assert [r["status"] for r in records] == ["passed", "failed", "timeout", "passed", "failed"]
    # answers cut off before their code block closed: counted, and those that still pass
    assert [r["code_block"] for r in records] == ["closed", "closed", "closed", "cut", "cut"]
    assert summary["cut"] == 2 and summary["cut_passed"] == 1 and summary["no_code_block"] == 0


@pytest.mark.skipif(not HAS_REAL_ASSETS, reason=FETCH_REASON)
def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail():
    from logitguard.eval.datasets import load_set

    problems = load_set("humaneval", REAL_ASSETS)
    canonical = execute(problems, [p["canonical_solution"] for p in problems])
    assert sum(r["passed"] for r in canonical) == 164
    assert mount_isolation() is False or {r["isolation"] for r in canonical} == {"mountns"}
    fenced = execute(problems, [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in problems])
    assert sum(r["passed"] for r in fenced) == 164  # the full-function form of the same solutions
    assert not any(r["passed"] for r in execute(problems, ["    pass\n"] * len(problems)))


def test_cutoff_script_counts_answers_the_budget_cut(tmp_path):
    import importlib.util
    import json
    import subprocess
    import sys
    from pathlib import Path

    rows = [{"set": "humaneval", "completion": RIGHT_FENCED, "passed": True},
            {"set": "humaneval", "completion": CUT_RIGHT, "passed": True},
            {"set": "humaneval", "completion": CUT_OFF, "passed": False},
            {"set": "humaneval", "completion": "def add(a, b):\n    return a + b", "passed": True},  # no block
            {"set": "gsm8k", "completion": "4", "passed": True}]  # fmt: skip
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "utility_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = Path(__file__).parents[1] / "bench" / "utility_cutoff.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True)
    assert "HumanEval 4: 1 closed (1 pass), 2 cut off inside their code block (1 pass), 1 without one (1 pass)" in (
        out.stdout
    )
    spec = importlib.util.spec_from_file_location("utility_cutoff", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def tokenizer(text, add_special_tokens=False):  # a stand-in: one token per word
        return {"input_ids": text.split()}

    gsm = [{"response": "a " * 10, "correct": True}, {"response": "a " * 3, "correct": True},
           {"response": "a " * 9, "correct": False}]  # fmt: skip
    assert module.at_budget(gsm, "gsm8k", tokenizer, budget=10) == (3, 2, 1)  # 10 and 9 words: at the budget
