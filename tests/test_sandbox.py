"""The sandbox's filesystem layers (issue 20): a program under evaluation cannot read or list the user's files
(a token and an SSH key under $HOME, the real home directory, the repository, the parent's working folder and
environment, the rest of /tmp), neither through the mount namespace alone nor through the guard alone; it runs
without privileges; `detail` never carries what the program wrote; a missing namespace is recorded and warned
about, never silent. The network layers and the HumanEval scoring are tested in test_humaneval.py."""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from logitguard.eval import sandbox
from logitguard.eval.sandbox import guard_problem, mount_isolation, python_paths, run_python

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_" + "Q7x" * 12  # the shape of a Hugging Face token
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
needs_mountns = pytest.mark.skipif(not mount_isolation(), reason="no mount namespace on this machine")

# Each check returns what it could read (truthy) or raises OSError. The program prints the names of the checks
# that read something and exits with status 1 when any did; else it goes on to what follows it.
_PROBE = """
import json, os, sys
paths = json.loads({paths!r})

def listing(path):
    return [n for n in os.listdir(path) if n not in paths["interpreter"]]

checks = {{
    "open token": lambda: open(paths["token"]).read(),
    "os.open token": lambda: os.read(os.open(paths["token"], os.O_RDONLY), 100),
    "open ssh key": lambda: open(paths["key"], "rb").read(),
    "list home": lambda: os.listdir(paths["home"]),
    "scan .ssh": lambda: [e.name for e in os.scandir(paths["ssh"])],
    "list real home": lambda: listing(paths["real_home"]),
    "read repo file": lambda: open(paths["repo_file"]).read(),
    "list repo": lambda: os.listdir(paths["repo"]),
    "list parent cwd": lambda: os.listdir(paths["cwd"]),
    "parent environ": lambda: open(f"/proc/{{os.getppid()}}/environ", "rb").read(),
    "list /tmp": lambda: [n for n in os.listdir("/tmp") if not n.startswith("logitguard-exec-")],
    # a path relative to a directory descriptor, which the audit event shows as relative to the working folder
    "dir_fd token": lambda: os.read(os.open(os.path.relpath(paths["token"], "/usr"), os.O_RDONLY,
                                            dir_fd=os.open("/usr", os.O_RDONLY)), 100),
}}
if paths["guarded"] and paths["posixsubprocess"]:  # a blocked extension under another name starts processes unaudited
    def renamed():
        import importlib.util
        spec = importlib.util.spec_from_file_location("x._posixsubprocess", paths["posixsubprocess"])
        return importlib.util.module_from_spec(spec)
    checks["renamed _posixsubprocess"] = renamed
if paths["exists"]:  # not audited, so only the mount namespace hides it
    checks["token exists"] = lambda: os.path.exists(paths["token"]) or os.path.exists(paths["repo_file"])
leaked = []
for name, check in checks.items():
    try:
        if check():
            leaked.append(name)
    except OSError:
        pass
print(json.dumps(leaked))
if leaked:
    sys.exit(1)
"""


def _interpreter_entries(home: str) -> list[str]:
    """The first folder of the Python installation below `home` (pyenv, uv), which the namespace must show."""
    return [Path(p).relative_to(home).parts[0] for p in python_paths() if Path(p).is_relative_to(home)]


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """A home with a token and an SSH key, set as $HOME (and the caches) of the parent, as a user's would be."""
    home = tmp_path / "home"
    token = home / ".cache" / "huggingface" / "token"
    key = home / ".ssh" / "id_ed25519"
    for path, text in ((token, SECRET), (key, KEY)):
        path.parent.mkdir(parents=True)
        path.write_text(text)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(token.parent))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    real_home = pwd.getpwuid(os.getuid()).pw_dir
    return {
        "home": str(home),
        "token": str(token),
        "key": str(key),
        "ssh": str(key.parent),
        "real_home": real_home,
        "interpreter": _interpreter_entries(real_home),
        "repo": str(REPO),
        "repo_file": str(REPO / "pyproject.toml"),
        "cwd": os.getcwd(),
        "posixsubprocess": _extension_file("_posixsubprocess"),
    }


def _extension_file(name: str) -> str | None:
    """Where the interpreter loads an extension module from (lib-dynload, lib64), or None when it is built in."""
    origin = importlib.util.find_spec(name).origin
    return origin if origin and os.path.isfile(origin) else None


def test_the_probe_finds_every_file_outside_the_sandbox(user_files):
    # the control: run plainly, each check reads something, so an empty list in the sandbox means it held
    program = _PROBE.format(paths=json.dumps(user_files | {"exists": True, "guarded": True}))
    plain = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    leaked = set(json.loads(plain.stdout))
    expected = {"open token", "os.open token", "open ssh key", "list home", "scan .ssh", "read repo file"}
    expected |= {"list repo", "list parent cwd", "parent environ", "list /tmp", "token exists", "dir_fd token"}
    expected |= {"renamed _posixsubprocess"} if user_files["posixsubprocess"] else set()
    assert expected <= leaked and plain.returncode == 1


@pytest.mark.parametrize(
    ("isolation", "guard"),
    [pytest.param("mountns", False, marks=needs_mountns, id="mount-namespace-alone"), ("guard", True), ("auto", True)],
)
def test_user_files_cannot_be_read_or_listed(user_files, isolation, guard):
    exists = isolation == "mountns" or (isolation == "auto" and mount_isolation())
    program = _PROBE.format(paths=json.dumps(user_files | {"exists": exists, "guarded": guard}))
    result = run_python(
        program + f"\nraise SystemExit(open({user_files['token']!r}).read())", isolation=isolation, guard=guard
    )
    # "exit status 1" would mean a check leaked; else the last line's read fails as well (it would have put the
    # token in detail before the fix)
    assert result.detail in ("FileNotFoundError", "PermissionError"), result
    assert SECRET not in repr(result)


@needs_mountns
def test_the_real_home_shows_only_the_interpreter():
    home = pwd.getpwuid(os.getuid()).pw_dir
    allowed = _interpreter_entries(home)
    theirs = sorted(set(os.listdir(home)) - set(allowed)) if os.path.isdir(home) else []
    program = f"import os, sys\nnames = os.listdir({home!r}) if os.path.isdir({home!r}) else []\n"
    program += f"sys.exit(0 if set(names) <= set({allowed!r}) else 1)\n"
    assert run_python(program, isolation="mountns", guard=False).passed, f"{home} lists more than {allowed}"
    assert theirs or not os.path.isdir(home)  # the parent does see the user's entries (this machine has some)


# Run with guard=False, so that it may use ctypes: no capability in any set, and each call below needs one.
_NO_PRIVILEGES = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
header, sets = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()  # _LINUX_CAPABILITY_VERSION_3
held = []
held.append(libc.capget(header, sets) != 0 or any(sets))
held.append(libc.umount2(b"/", 2) == 0)  # MNT_DETACH
held.append(libc.mount(b"tmpfs", b"/usr", b"tmpfs", 0, None) == 0)
held.append(libc.unshare(0x10000000) == 0)  # a nested user namespace (refused inside a chroot)
held.append(libc.unshare(0x20000) == 0)  # a new mount namespace
for attempt in (lambda: os.chroot("/"), lambda: open("/usr/escaped", "w"), lambda: os.chmod("/dev/null", 0o600)):
    try:
        attempt()
        held.append(True)
    except OSError:
        held.append(False)
sys.exit(10 + held.index(True) if any(held) else 0)
"""
_IN_NAMESPACE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sandbox
spec.loader.exec_module(sandbox)
result = sandbox.run_python(sys.argv[2], isolation="mountns", guard=False)
print(json.dumps([result.status, result.returncode]))
"""


@needs_mountns
def test_the_program_has_no_privileges():
    result = run_python(_NO_PRIVILEGES, isolation="mountns", guard=False)
    assert result.passed, result


@needs_mountns
def test_no_privileges_as_root_of_a_user_namespace_that_maps_root_alone():
    # as under `unshare -r` (rootless tools, some CI sandboxes): there is no nobody to run as, so the program
    # runs as root with every capability dropped
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-r", "true"]).returncode != 0:
        pytest.skip("no `unshare -r` on this machine")
    cmd = ["unshare", "-r", sys.executable, "-c", _IN_NAMESPACE, sandbox.__file__, _NO_PRIVILEGES]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout) == ["passed", 0], out.stderr[-2000:]


@pytest.mark.parametrize(
    "program",
    [
        f"raise SystemExit({SECRET!r})",
        f"raise ValueError({SECRET!r})",
        f"raise type({SECRET!r}, (Exception,), {{}})()",
        f"import sys\nsys.stderr.write({SECRET!r})\nsys.exit(2)",
        f"import sys\nprint('Traceback (most recent call last):', file=sys.stderr)\nprint({SECRET + ': x'!r}, "
        "file=sys.stderr)\nsys.exit(1)",
        f"import sys\nprint({SECRET!r}, file=sys.stderr)\nraise KeyError({SECRET!r})",
    ],
    ids=["SystemExit", "ValueError", "own-class", "stderr", "forged-traceback", "stderr-then-KeyError"],
)
def test_detail_never_carries_the_programs_output(program):
    result = run_python(program)
    assert result.status == "failed" and SECRET not in result.detail and "Q7x" not in result.detail
    assert result.detail in ("exit status 1", "exit status 2", "ValueError", "KeyError")


_TRICKS = {  # each changes what the guard would see, then the program reads the token
    "os.fsdecode": "import os\nos.fsdecode = lambda path: '/dev/null'\n",
    "os.fspath": "import os\nos.fspath = lambda path: '/dev/null'\n",
    "posixpath.abspath": "import posixpath\nposixpath.abspath = lambda path: '/dev/null'\n",
    "builtins.isinstance": "import builtins\nbuiltins.isinstance = lambda *args: True\n",
    "the hook's defaults": (
        "import gc\nfor f in gc.get_objects():\n    if type(f).__name__ == 'function' and f.__name__ == '_hook':\n"
        "        f.__defaults__ = tuple(('/',) if type(d) is tuple else d for d in f.__defaults__)\n"
    ),
}


@pytest.mark.parametrize("trick", _TRICKS)
def test_the_guard_trusts_nothing_the_program_can_rebind(user_files, trick):
    program = _TRICKS[trick] + f"print(open({user_files['token']!r}).read())\n"
    result = run_python(program, isolation="guard")
    assert result.detail == "PermissionError" and SECRET not in repr(result), result


_ESCAPES = {  # each reads the token past a hook that only looked at names and paths
    "subinterpreter": "import _xxsubinterpreters as i\ni.run_string(i.create(), 'print(open(TOKEN).read())')\n",
    "trace function": (
        "import gc, sys\nhook = [f for f in gc.get_objects() if type(f).__name__ == 'function' and "
        "f.__name__ == '_hook'][0]\nhook.__cantrace__ = True\n"
        "def local(frame, event, arg):\n    if frame.f_locals.get('path') is not None:\n"
        "        frame.f_locals['path'] = '/dev/null'\n    return local\n"
        "sys.settrace(lambda frame, event, arg: local if frame.f_code.co_name == '_hook' else None)\n"
        "print(open(TOKEN).read())\n"
    ),
    "long path": (  # the hook's stat of a path past PATH_MAX failed, so it took a folder for a file: a folder
        # descriptor; from a short deep folder the hook then resolves a relative path inside the box, the kernel from
        # the descriptor, to the token (refused now at its first os.chdir, which no program may call)
        "import os\nhome = os.getcwd()\nos.makedirs('a/' * 24)\n"
        "while len(os.getcwd()) + 252 < 4096:\n    os.mkdir('L' * 250)\n    os.chdir('L' * 250)\n"
        "os.mkdir('D' * 250)\nfolder = os.open('D' * 250, os.O_RDONLY)\ndepth = os.getcwd().count('/') + 1\n"
        "os.chdir(home + '/a' * 24)\n"
        "print(os.read(os.open('../' * depth + TOKEN.lstrip('/'), os.O_RDONLY, dir_fd=folder), 100))\n"
    ),
    # a relative path the hook checked against the box, opened by the kernel after another thread moved the working
    # folder to the root: the decoy exists in the box, so the hook lets the open through
    "working folder race": (
        "import os, threading\nhome, relative = os.getcwd(), TOKEN.lstrip('/')\n"
        "os.makedirs(os.path.dirname(relative), exist_ok=True)\nopen(relative, 'w').write('decoy')\n"
        "refused, done = [], threading.Event()\n"
        "def flip():\n    try:\n        while not done.is_set():\n"
        "            os.chdir('/')\n            os.chdir(home)\n"
        "    except PermissionError as e:\n        refused.append(e)\n"
        "threading.Thread(target=flip).start()\n"
        "for _ in range(20000):\n    try:\n        if open(relative).read() != 'decoy':\n            done.set()\n"
        "            raise SystemExit(0)\n    except (OSError, ValueError):\n        pass\n"
        "done.set()\nif refused:\n    raise refused[0]\nraise SystemExit(3)\n"
    ),
    # a signal handler is handed the frame it interrupts, the hook's at times; its f_locals writes reach the running
    # function only from Python 3.13 (PEP 667), where the guard is refused for that reason (guard_problem)
    "signal handler": (
        "import signal\n"
        "def widen(signum, frame):\n    while frame is not None:\n        if frame.f_code.co_name == '_hook':\n"
        "            frame.f_locals['_readable'] = ('/',)\n        frame = frame.f_back\n"
        "signal.signal(signal.SIGALRM, widen)\nsignal.setitimer(signal.ITIMER_REAL, 1e-4, 1e-4)\n"
        "for _ in range(20000):\n    try:\n        print(open(TOKEN).read())\n        raise SystemExit(0)\n"
        "    except PermissionError as e:\n        refused = e\n    except RecursionError:\n        pass\n"
        # the timer stopped first: an alarm during the interpreter's exit (default action) would kill it
        "signal.setitimer(signal.ITIMER_REAL, 0, 0)\nraise refused\n"
    ),
    "native code": (
        "import importlib.machinery, importlib.util\nname = 'mine' + importlib.machinery.EXTENSION_SUFFIXES[0]\n"
        "open(name, 'wb').write(b'not an ELF')\n"
        "importlib.util.module_from_spec(importlib.util.spec_from_file_location('mine', name))\n"
    ),
}


@pytest.mark.parametrize("escape", _ESCAPES)
def test_the_guard_refuses_what_the_hook_cannot_see_past(user_files, escape):
    if escape == "subinterpreter" and sys.version_info >= (3, 13):
        pytest.skip("the module is _interpreters from 3.13")
    if escape == "signal handler" and guard_problem():
        pytest.skip("the hook cannot keep its locals here, so the guard is refused (test_the_guard_is_refused_...)")
    program = f"TOKEN = {user_files['token']!r}\n" + _ESCAPES[escape]
    result = run_python(program, isolation="guard")
    # the subinterpreter's creation fails as a RuntimeError when the hook refuses it
    assert result.detail in ("PermissionError", "RuntimeError") and SECRET not in repr(result), result


def test_a_blocked_extension_cannot_hide_behind_a_str_subclass(user_files):
    if not user_files["posixsubprocess"]:
        pytest.skip("_posixsubprocess is built into this interpreter: no hook sees it (docs/evaluation.md)")
    program = (
        "import importlib.util\nclass Name(str):\n    def rpartition(self, sep):\n        return ('', '', 'fine')\n"
        f"spec = importlib.util.spec_from_file_location(Name('_posixsubprocess'), {user_files['posixsubprocess']!r})\n"
        "importlib.util.module_from_spec(spec)\n"
    )
    assert run_python(program, isolation="guard").detail == "PermissionError"


def test_the_guard_leaves_the_standard_library_working(tmp_path):
    """namedtuple sets its __new__'s defaults, which dataclasses, inspect, logging and unittest all do on import."""
    program = (
        "import dataclasses, inspect, logging, traceback, unittest, pathlib, tempfile, json\n"
        "from collections import namedtuple\nPoint = namedtuple('Point', 'x y', defaults=(0,))\n"
        "assert Point(1).y == 0\npathlib.Path('out.json').write_text(json.dumps([1]))\n"
        "assert json.loads(open('out.json').read()) == [1]\n"
        "try:\n    open('absent')\nexcept FileNotFoundError:\n    pass\n"
    )
    result = run_python(program, isolation="guard")
    assert result.passed, result


def test_the_guard_takes_plain_paths_only(user_files):
    """A path object whose __fspath__ answers differently per call reads nothing (the event carries the path the
    call used), and pathlib keeps working through open()."""
    program = (
        "import os, pathlib\npathlib.Path('mine').write_text('x')\nassert open(pathlib.Path('mine')).read() == 'x'\n"
        f"class Flip:\n    calls = 0\n    def __fspath__(self):\n        Flip.calls += 1\n"
        f"        return {user_files['token']!r} if Flip.calls == 1 else '/dev/null'\n"
        "print(os.read(os.open(Flip(), os.O_RDONLY), 100))\n"
    )
    result = run_python(program, isolation="guard")
    assert result.detail == "PermissionError" and SECRET not in repr(result), result


def test_a_missing_namespace_is_refused_unless_a_weaker_isolation_is_named(monkeypatch, user_files):
    monkeypatch.setattr(sandbox, "mount_isolation_problem", lambda: "unshare: Operation not permitted (test)")
    monkeypatch.delenv(sandbox.OPT_IN, raising=False)
    with pytest.raises(sandbox.SandboxUnavailable, match="test.*would see this user's files.*LOGITGUARD_SANDBOX"):
        run_python("pass")
    monkeypatch.setenv(sandbox.OPT_IN, "guard")
    sandbox._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="no mount namespace .*test.*'guard'.*can see this user's files"):
        result = run_python(f"print(open({user_files['token']!r}).read())")
    assert result.isolation == "guard" and result.detail == "PermissionError"  # the guard still refuses
    with pytest.raises(sandbox.SandboxUnavailable, match="no mount namespace"):
        run_python("pass", isolation="mountns")


def test_the_guard_is_refused_where_it_cannot_protect_itself(monkeypatch):
    """From Python 3.12 os.unshare is not audited (a program takes a user namespace, then chroots), from 3.13 a signal
    handler can rewrite the hook's locals (PEP 667): the isolations that leave the user's files to the hook alone are
    refused there, and the mount namespace still runs (with the hook inside it)."""
    assert guard_problem((3, 11, 7)) == ""
    assert "os.unshare" in guard_problem((3, 12, 0)) and "PEP 667" not in guard_problem((3, 12, 0))
    assert all("os.unshare" in guard_problem(v) and "PEP 667" in guard_problem(v) for v in ((3, 13, 0), (3, 14, 1)))
    # a container profile that refuses faccessat2: the hook could not tell a symbolic link from a name
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda *args, **kwargs: False)
        assert "faccessat2" in guard_problem((3, 11, 7))
    monkeypatch.setattr(sandbox, "guard_problem", lambda version=None: "simulated")
    monkeypatch.setattr(sandbox, "network_isolation", lambda: ("simulated",))
    for isolation in ("guard", "netns"):
        with pytest.raises(sandbox.SandboxUnavailable, match=f"{isolation}.*audit hook.*simulated.*mountns"):
            sandbox.resolve_isolation(isolation)
    monkeypatch.setattr(sandbox, "mount_isolation_problem", lambda: "simulated")
    monkeypatch.setenv(sandbox.OPT_IN, "guard")
    with pytest.raises(sandbox.SandboxUnavailable, match="'guard'.*audit hook"):
        sandbox.resolve_isolation("auto")


def test_the_guard_answers_as_the_kernel_would_under_a_file():
    program = (
        "open('file.txt', 'w').write('x')\nfor mode in ('r', 'w'):\n    try:\n        open('file.txt/x', mode)\n"
        "    except NotADirectoryError:\n        continue\n    raise SystemExit(1)\n"
    )
    assert run_python(program, isolation="guard").passed


# A system Python (prefix /usr) is bound whole with the system folders: nothing of a user's is kept there
in_system = (sys.base_prefix + os.sep).startswith(tuple(p + os.sep for p in sandbox.SYSTEM_PATHS))


@pytest.mark.parametrize(
    "isolation",
    [pytest.param("mountns", marks=[needs_mountns, pytest.mark.skipif(in_system, reason="a system Python")]), "guard"],
)
def test_the_python_prefix_shows_only_its_lib_folders(isolation):
    """A conda prefix keeps activation variables (tokens) in conda-meta/ and etc/: only lib*/ and the interpreter
    are visible (mountns), or readable at all (the guard)."""
    program = (
        "import os, sys\ntry:\n    seen = set(os.listdir(sys.base_prefix))\nexcept PermissionError:\n"
        "    seen = set()\nsys.exit(0 if seen <= {'bin', 'lib', 'lib64'} else 1)\n"
    )
    assert run_python(program, isolation=isolation, guard=isolation == "guard").passed


@needs_mountns
def test_what_a_program_leaves_running_dies_with_it():
    program = "import os\nos.system('sleep 31.4159 &')\n"  # no guard: the namespace alone
    assert run_python(program, isolation="mountns", guard=False).passed
    left = subprocess.run(["pgrep", "-f", "sleep 31.4159"], capture_output=True, text=True)
    assert left.stdout.strip() == ""


@needs_mountns
def test_the_programs_folder_is_capped_in_size():
    program = "for i in range(8):\n    open(f'f{i}', 'wb').write(bytes(15 << 20))\n"  # 120 MB, each under 16
    result = run_python(program, isolation="mountns", guard=False)
    assert result.status == "failed" and result.detail == "OSError", result  # no space left on the 64 MB tmpfs


@needs_mountns
def test_a_failed_setup_raises_instead_of_running_with_less(monkeypatch):
    monkeypatch.setattr(sandbox, "python_paths", lambda: ["/nonexistent/logitguard-python"])
    with pytest.raises(RuntimeError, match="sandbox setup failed: .*mount"):
        run_python("pass")


def test_a_lib64_link_in_the_prefix_is_kept_as_a_link(tmp_path, monkeypatch):
    """A prefix whose lib64 links to lib: sys.path may name either, so the namespace gets the folder and the link."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib64").symlink_to("lib")
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path))
    monkeypatch.setattr(sys, "base_exec_prefix", str(tmp_path))
    paths = python_paths()
    assert str(tmp_path / "lib") in paths and str(tmp_path / "lib64") in paths


def _guard_functions(home: Path, lib: Path) -> tuple:
    """The harness's _resolve and _hook, defined here with `home` as the program's folder and `lib` as the only lib
    folder (not installed as an audit hook), so that exceptions can be raised inside them at chosen lines."""
    import ast
    import stat

    tree = ast.parse(sandbox._HARNESS)
    defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in ("_resolve", "_hook")]
    scope = {"os": os, "stat": stat, "home": str(home) + os.sep, "libs": {str(lib) + os.sep}}
    exec(compile(ast.Module(body=defs, type_ignores=[]), "harness", "exec"), scope)
    return scope["_resolve"], scope["_hook"]


def _traced(codes, on_line):
    """Run with on_line(frame) called at each line of the given code objects (what it raises, the line raises)."""

    def local(frame, what, arg):
        if what == "line":
            on_line(frame)
        return local

    sys.settrace(lambda frame, what, arg: local if frame.f_code in codes else None)


@pytest.mark.parametrize("raised", [FileNotFoundError, NotADirectoryError, OSError])
def test_an_exception_raised_inside_the_guard_never_lets_a_path_through(tmp_path, raised):
    """A signal handler can raise at any line of the hook (3.11+). Raised at each run of each line of _resolve and
    the hook in turn, while a lib folder's symbolic link leads out to a secret: every call refuses, none passes."""
    (tmp_path / "box").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "token").write_text(SECRET)
    (tmp_path / "lib" / "out").symlink_to(tmp_path / "secret")
    resolve, hook = _guard_functions(tmp_path / "box", tmp_path / "lib")
    codes = (resolve.__code__, hook.__code__)
    target = str(tmp_path / "lib" / "out" / "token")
    for event, args in {"open": (target, "r", os.O_RDONLY), "os.listdir": (str(tmp_path / "lib" / "out"),)}.items():
        runs = []  # (code, line) of every line run by a call that is refused
        _traced(codes, lambda frame, runs=runs: runs.append((frame.f_code, frame.f_lineno)))
        try:
            with pytest.raises(PermissionError):
                hook(event, args)
        finally:
            sys.settrace(None)
        for at in range(len(runs)):
            seen = []

            def inject(frame, at=at, seen=seen):
                seen.append(1)
                if len(seen) == at + 1:
                    raise raised(2, "injected")

            _traced(codes, inject)
            try:
                hook(event, args)
            except BaseException:
                continue
            finally:
                sys.settrace(None)
            code, line = runs[at]
            pytest.fail(f"{event} let through after {raised.__name__} at {code.co_name} line {line}")


_NETNS = [pytest.param("netns", marks=pytest.mark.skipif(not sandbox.network_isolation(), reason="no netns"))]


@pytest.mark.parametrize("isolation", ["guard", *_NETNS])
def test_programs_outside_the_mount_namespace_hold_no_capability(isolation):
    """os.chroot shows no audit event: with CAP_SYS_CHROOT (root, or root of the user namespace netns makes) a thread
    could swap the root under the hook's checks. The program holds no capability, so the kernel refuses it."""
    assert run_python("import os\nos.chroot('.')\n", isolation=isolation).detail == "PermissionError"
    if isolation == "netns":  # without the guard, the program can read its own capability sets
        program = (
            "status = open('/proc/self/status').read().splitlines()\n"
            "sets = ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb')\n"
            "caps = [int(line.split()[1], 16) for line in status if line[:6] in sets]\n"
            "raise SystemExit(0 if len(caps) == 5 and not any(caps) else 1)\n"
        )
        assert run_python(program, isolation=isolation, guard=False).passed
