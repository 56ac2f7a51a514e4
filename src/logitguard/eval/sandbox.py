"""Run untrusted Python (model-written code) in a separate, confined process; never in the logitguard process.

Each program runs in its own subprocess (`python -I -S` of the base installation: the standard library only),
in a fresh working folder that is deleted afterwards, with:
- a wall-clock time limit (the whole process group is killed) and a CPU-time limit (RLIMIT_CPU) behind it;
- a memory limit (RLIMIT_AS), a file-size limit (RLIMIT_FSIZE), no core dumps, stdin closed, no environment
  but PATH, HOME (the folder), LANG and PYTHONHASHSEED;
- isolation, the strongest this machine allows (`isolation` in the result says which one ran):
  - "mountns": a filesystem of its own on an empty tmpfs, holding only read-only binds of /usr, /bin, /lib*,
    the dynamic loader's files in /etc and the Python installation, four /dev nodes (null, zero, random,
    urandom) and the working folder: no /proc, no home directories, no caches, no repository, nothing else of
    /tmp. With it a network namespace. The program runs chrooted there, with no_new_privs and no capabilities,
    as this user (nobody when logitguard runs as root; root with every capability dropped inside a user
    namespace that maps no nobody). A small launcher (ctypes: unshare, mount) builds the view, then execs the
    program's interpreter;
    The working folder is a tmpfs of its own there (64 MB, 1,024 files: it cannot fill the host's /tmp), and
    whatever the program leaves running is killed with its process group when it ends;
  - "netns": a network namespace only (`unshare -rn`, or `unshare -n` as root): the program can then read whatever
    this user can, except what the guard refuses;
  - "guard": the guard alone.
  "auto" is "mountns"; where the machine has no mount namespace it refuses (SandboxUnavailable, before any
  generation) unless LOGITGUARD_SANDBOX names "netns" or "guard", and then warns.
- a guard (a `sys.addaudithook` hook, which Python code cannot remove) installed before the program runs: it
  refuses sockets, starting processes, ctypes (each by the module's own name, however it is loaded), deleting or
  renaming files, writing outside the working folder, opening a directory (a descriptor for dir_fd paths, which
  the audit event does not show), and opening or listing anything outside the working folder, the Python
  prefix's lib folders and a few /dev nodes; also subinterpreters (they have no hooks), trace and profile
  functions (they could rewrite the hook's locals), native code from outside the lib folders and sqlite3. It keeps
  what it uses in its own defaults, so a program rebinding os, posixpath or builtins names changes nothing.
  An audit hook is a second line, not a boundary (os.stat, os.mknod and pidfd signals, for three, are not
  audited, and an interpreter with _posixsubprocess built in starts processes unseen); the namespaces are.
- `detail`, which goes into the records, never echoes the program's output: it is the name of a built-in
  exception class (from the last line of stderr), else the exit status, the signal or the timeout.
The limits are set by the child itself before the guard and the program run (not in `preexec_fn`, which is
unsafe in a process with threads, as torch's is).
"""

from __future__ import annotations

import builtins
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from logitguard.errors import LogitguardError  # absolute: tests load this file on its own

DEFAULT_TIMEOUT = 10.0  # seconds per program (HumanEval's tests take well under one)
DEFAULT_MEMORY_MB = 1024
ISOLATIONS = ("auto", "mountns", "netns", "guard")
NOBODY = 65534  # the user a root parent's programs run as
# Visible read-only inside the mount namespace, where they exist (symlinks, as in merged /usr, are copied).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_PATHS += ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")  # not all of /etc
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
_EXCEPTIONS = frozenset(n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException))

# The child's first code: limits, then the guard, then the program (run as __main__ from its file).
_HARNESS = r"""
import resource, sys
memory, cpu, fsize, guard, program = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if len(sys.argv) > 6:  # after the dropper (netns, guard): "ok" to the parent only holding no capability
    import os
    with open("/proc/self/status") as f:
        held = [int(line.split()[1], 16) for line in f if line.startswith(("CapPrm:", "CapEff:", "CapAmb:"))]
    if len(held) != 3 or any(held):
        sys.stderr.write("sandbox setup: the program would hold capabilities\n")
        os._exit(125)
    os.write(int(sys.argv[6]), b"ok")
    os.close(int(sys.argv[6]))
if guard == "1":
    import os, stat
    home = os.path.realpath(os.getcwd()) + os.sep
    prefixes = (sys.base_prefix, sys.base_exec_prefix)  # their lib folders only (python_paths says why)
    libs = {os.path.realpath(os.path.join(p, lib)) + os.sep for p in prefixes for lib in ("lib", "lib64")}

    # The program can rebind any module's names (os.fsdecode, posixpath's realpath helpers, os.path.isdir, even
    # builtins.type), so the hook uses only what it holds in its defaults: C functions and immutable values. Its own
    # and _resolve's defaults and code cannot be replaced unaudited (object.__setattr__, refused for these two).
    # No except clause here lets anything through: a signal handler can raise inside the hook at any line, and an
    # exception taken for "absent" would make a symbolic link look like a plain name that the kernel then follows.
    def _resolve(path, _lstat=os.lstat, _exists=os.access, _readlink=os.readlink, _getcwd=os.getcwd,
                 _islink=stat.S_ISLNK, _reversed=reversed, _denied=PermissionError):
        # realpath: symlinks followed from the root, ".." applied to what they resolved to
        parts = ([] if path.startswith("/") else _getcwd().split("/")) + path.split("/")
        parts.reverse()
        resolved, hops = [], 0
        while parts:
            part = parts.pop()
            if part in ("", "."):
                continue
            if part == "..":
                resolved = resolved[:-1]
                continue
            here = "/" + "/".join([*resolved, part])
            # os.access answers without raising: a name missing (the kernel stops there, or creates it) or past what
            # can be checked (too long, no search right) is taken as it is written
            if not _exists(here, 0, follow_symlinks=False) or not _islink(_lstat(here).st_mode):
                resolved = [*resolved, part]
                continue
            hops += 1
            if hops > 40:
                raise _denied(f"sandbox: too many symbolic links in {path}")
            target = _readlink(here)
            resolved = [] if target.startswith("/") else resolved
            parts.extend(_reversed(target.split("/")))
        return "/" + "/".join(resolved)

    def _hook(event, args, _resolve=_resolve, _isdir=stat.S_ISDIR, _stat=os.stat, _sep=os.sep,
              _home=home, _readable=tuple({home, *libs}),
              _w=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC,
              _devices=("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"),
              _blocked_imports=frozenset({"socket", "_socket", "ssl", "_ssl", "subprocess", "_posixsubprocess",
                                          "multiprocessing", "_multiprocessing", "ctypes", "_ctypes", "pty"}),
              _blocked=("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                        "os.forkpty", "os.kill", "os.killpg", "ctypes.", "os.remove", "os.rmdir", "os.rename",
                        "shutil.rmtree", "os.chmod", "os.chown", "os.truncate", "os.link", "os.symlink",
                        "os.putenv"),
              _writes_to=("os.mkdir", "os.utime", "os.setxattr", "os.removexattr"),  # first argument a path
              _own=("__code__", "__defaults__", "__kwdefaults__"), _type=type, _int=int, _str=str, _bytes=bytes,
              _libs=tuple(libs), _creat=os.O_CREAT, _absent=FileNotFoundError, _notdir=NotADirectoryError,
              _oserror=OSError, _denied=PermissionError, _guarded=(),
              _refused=("cpython.PyInterpreterState_New", "sys.settrace", "sys.setprofile", "sqlite3.connect",
                        "sqlite3.enable_load_extension", "os.chdir", "sys.monitoring.register_callback")):
        # by the module's own name: an extension loaded from its file under another dotted name is the same module
        if event == "import":
            # by the module's own name (an exact str: a subclass could answer rpartition its own way); an extension
            # loaded from its file under another dotted name is the same module
            if _type(args[0]) is not _str or _str.rpartition(args[0], ".")[2] in _blocked_imports:
                raise _denied("sandbox: this import is not allowed")
            # native code only from the Python installation (one the program wrote would run unaudited)
            native = args[1]
            if native is not None and (_type(native) is not _str or not (_resolve(native) + _sep).startswith(_libs)):
                raise _denied("sandbox: an extension module from outside the Python installation")
        # subinterpreters have no audit hooks; a trace function or a sys.monitoring callback (3.12+) can run inside the
        # hook (to rewrite its locals, or raise where an exception would read as "absent"); sqlite writes anywhere;
        # a relative path is checked against the working folder of the moment, which another thread could change
        # (os.chdir, os.fchdir) before the kernel resolves it
        if event.startswith(_blocked) or event in _refused:
            raise _denied(f"sandbox: {event} is not allowed")
        if event in ("object.__setattr__", "object.__delattr__") and (
            args[0] is _guarded[0] or args[0] is _guarded[1]
        ) and args[1] in _own:  # would rewrite this hook (other functions' defaults are set by the standard library:
            # namedtuple); identity first: a type's attribute name can be a str subclass whose __eq__ is the program's
            raise _denied(f"sandbox: changing the guard's {args[1]} is not allowed")
        if event in ("open", "os.listdir", "os.scandir", *_writes_to) and _type(args[0]) is not _int:
            path = args[0] if args[0] is not None else "."
            if _type(path) is _bytes:
                path = path.decode("utf-8", "surrogateescape")
            if _type(path) is not _str:
                # os.open converted it already; a second __fspath__ call could answer differently (open() passes str)
                raise _denied(f"sandbox: {event} takes a str or bytes path here, got {_type(path).__name__}")
            path = _resolve(path)
            if event == "open":
                try:
                    directory = _isdir(_stat(path).st_mode)
                except _absent:
                    if not args[2] & _creat:  # the kernel would say the same; a racing mkdir could make it a folder
                        raise _absent(2, "No such file or directory", path) from None
                    directory = False
                except _notdir:  # under a file, as the kernel would say
                    raise _notdir(20, "Not a directory", path) from None
                except _oserror:  # too long to check, say: the kernel resolves it from the working folder
                    raise _denied(f"sandbox: cannot check {path}") from None
                if directory:
                    # a directory descriptor would make paths relative to it (dir_fd), which the event does not show
                    raise _denied(f"sandbox: opening the directory {path} is not allowed")
                mode, flags = args[1], args[2]
                writes = (_type(mode) is _str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) or (
                    mode is None and flags & _w
                )
            else:
                writes = event in _writes_to
            if writes and not (path + _sep).startswith(_home):
                raise _denied(f"sandbox: writing {path} is not allowed")
            if not (path + _sep).startswith(_readable) and path not in _devices:
                raise _denied(f"sandbox: reading {path} is not allowed")

    # the hook's own identity and _resolve's, for the check above: set before the hook is added (it would refuse it)
    _defaults, _code = list(_hook.__defaults__), _hook.__code__
    _names = _code.co_varnames[_code.co_argcount - len(_defaults) : _code.co_argcount]
    _defaults[_names.index("_guarded")] = (_hook, _resolve)
    _hook.__defaults__ = tuple(_defaults)
    sys.addaudithook(_hook)
    del os, stat, home, prefixes, libs, _resolve, _hook, _defaults, _code, _names
del resource
import runpy
runpy.run_path(program, run_name="__main__")
"""

# What the launcher and the dropper share: libc's prctl, a setup failure (exit 125, a line on stderr; the parent
# knows it from the missing "ok" on the status descriptor, not from anything the program could print) and dropping
# every capability for good (uid 0 keeps none, after the exec too).
_PRIVILEGES = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)

def check(result, what):
    if result != 0:
        fail(f"{what}: {os.strerror(ctypes.get_errno())}")

def fail(why):
    sys.stderr.write(f"sandbox setup: {why}\n")
    os._exit(125)

with open("/proc/sys/kernel/cap_last_cap") as f:  # read now: the launcher drops after its chroot (no /proc)
    last_cap = int(f.read())

def clear_ambient():
    check(libc.prctl(47, 4, 0, 0, 0), "clear ambient capabilities")  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL

def no_new_privs():  # no setuid or file capabilities at the next exec
    check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS

def drop_capabilities():
    for cap in range(last_cap + 1):
        check(libc.prctl(24, cap, 0, 0, 0), "drop capability")  # PR_CAPBSET_DROP
    clear_ambient()
    check(libc.prctl(28, 0xC3, 0, 0, 0), "securebits")  # NOROOT and NO_CAP_AMBIENT_RAISE, both locked

def ready(status, command):  # "ok" to the parent, then the next program
    no_new_privs()
    os.write(status, b"ok")
    os.close(status)
    os.execv(command[0], command)
"""

# Runs first under "netns" and "guard": the program would otherwise hold what this process can hand on (unshare -r
# makes it root of its user namespace; root, ambient capabilities), and os.chroot, which no audit event shows, could
# then move the root under the hook's checks (a thread swapping it between the hook's lstat and the kernel's open).
# The harness reports "ok" itself, once it has read that it holds no capability.
_DROPPER = (
    _PRIVILEGES
    + r"""
status, command = int(sys.argv[1]), sys.argv[2:]
with open("/proc/self/status") as f:
    effective = [int(line.split()[1], 16) for line in f if line.startswith("CapEff:")][0]
if os.geteuid() == 0 or effective & (1 << 8):  # CAP_SETPCAP: the bounding set and securebits can be locked
    drop_capabilities()
else:
    clear_ambient()
no_new_privs()
os.set_inheritable(status, True)
os.execv(command[0], [*command, str(status)])
"""
)

# Runs first under "mountns": new namespaces, the filesystem view, then exec of the harness (a fresh interpreter:
# no ctypes and no capabilities survive). It writes "ok" to its status descriptor (closed before the exec: the
# program never sees it) only once everything is in place.
_LAUNCHER = (
    _PRIVILEGES
    + r"""
spec, command = json.loads(sys.argv[1]), sys.argv[2:]
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
NEWNS, NEWUSER, NEWNET = 0x20000, 0x10000000, 0x40000000
RDONLY, BIND, REMOUNT, REC, PRIVATE = 1, 4096, 32, 16384, 1 << 18
KEEP = os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC | os.ST_NOATIME | os.ST_NODIRATIME | os.ST_RELATIME

def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

def write(path, text):
    with open(path, "w") as f:
        f.write(text)

def mapped_by_helper(maps):  # root without CAP_SYS_ADMIN: a map of two users must come from outside the namespace
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    if os.fork() == 0:
        try:
            os.close(ready_w)
            if os.read(ready_r, 1) == b"1":  # else the launcher died first
                for name in ("uid_map", "gid_map"):
                    write(f"/proc/{os.getppid()}/{name}", maps)
                os.write(done_w, b"1")
        finally:
            os._exit(0)
    os.close(ready_r)
    check(libc.unshare(NEWUSER | NEWNS | NEWNET), "unshare")
    os.write(ready_w, b"1")
    os.close(done_w)
    if os.read(done_r, 1) != b"1":
        fail("the helper could not write uid_map")
    os.wait()

uid, gid, root, nobody = os.getuid(), os.getgid(), spec["root"], spec["nobody"]
if uid == 0 and libc.unshare(NEWNS | NEWNET) == 0:
    pass  # root with CAP_SYS_ADMIN needs no user namespace
elif uid == 0 and nobody is not None:
    mapped_by_helper(f"0 0 1\n{nobody} {nobody} 1\n")  # root inside (to set up) and nobody (to run as)
else:  # the same user inside; a user's capabilities there end at the exec below
    check(libc.unshare(NEWUSER | NEWNS | NEWNET), "unshare")
    write("/proc/self/setgroups", "deny")
    write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    write("/proc/self/gid_map", f"{gid} {gid} 1\n")
mount(None, "/", None, REC | PRIVATE)  # nothing below propagates back to the host
mount("tmpfs", root, "tmpfs", 2 | 4, "mode=0755,size=1m")  # nosuid, nodev
os.umask(0o022)

def place(path, readonly):
    target = root + path
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "w").close()
    mount(path, target, None, BIND | REC)
    if readonly:  # a remount must keep the flags the user namespace locked
        mount(None, target, None, BIND | REMOUNT | RDONLY | (os.statvfs(target).f_flag & KEEP))

for path in spec["system"] + spec["python"]:
    if os.path.islink(path):
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        os.symlink(os.readlink(path), root + path)
    elif os.path.exists(path) or path in spec["python"]:  # the interpreter's own paths must be there
        place(path, True)
for path in spec["devices"]:
    if os.path.exists(path):
        place(path, True)  # reads and writes go to the device; the node itself stays as it is
# the program's folder: a tmpfs of its own, capped in size and files (a bind of the host's /tmp would let it fill
# that, in memory where /tmp is a tmpfs, past RLIMIT_AS), holding a copy of the program
with open(spec["box"] + "/program.py", "rb") as f:
    source = f.read()
os.makedirs(root + spec["box"])
owner = f",uid={nobody},gid={nobody}" if uid == 0 and nobody is not None else ""
mount("tmpfs", root + spec["box"], "tmpfs", 2 | 4, f"mode=0700,size={spec['box_mb']}m,nr_inodes=1024{owner}")
with open(root + spec["box"] + "/program.py", "wb") as f:
    f.write(source)
if owner:
    os.chown(root + spec["box"] + "/program.py", nobody, nobody)
mount(None, root, None, REMOUNT | RDONLY | 2 | 4)
os.chroot(root)
os.chdir(spec["box"])
if uid == 0 and nobody is not None:
    os.setgroups([])
    os.setgid(nobody)
    os.setuid(nobody)
elif uid == 0:  # root with no other user to run as
    drop_capabilities()
ready(spec["status"], command)
"""
)


@dataclass(frozen=True)
class ExecResult:
    status: str  # "passed" (exit 0), "failed" (any other exit) or "timeout"
    returncode: int | None
    detail: str  # a built-in exception's class name, else the exit status, the signal or the timeout; never output
    seconds: float
    isolation: str  # "mountns" (own filesystem and network, guard), "netns" (network, guard) or "guard" (guard only)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def python_executable() -> str:
    """The base installation's interpreter: the programs use the standard library only, and a virtual environment
    may sit inside the repository, which the mount namespace hides."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(base if os.path.exists(base) else sys.executable)


def python_paths() -> list[str]:
    """What the interpreter needs outside the system directories: its prefixes' lib folders (the standard library,
    its extension modules and the libraries they link) and the interpreter file itself. Not the whole prefix: a
    conda environment keeps its activation variables there (conda-meta/state, etc/conda/activate.d), tokens
    among them, and a base installation holds the other environments."""
    import sysconfig

    exe = python_executable()
    paths = {exe}
    for prefix in (sys.base_prefix, sys.base_exec_prefix):
        for lib in (os.path.join(prefix, "lib"), os.path.join(prefix, "lib64")):
            paths.add(os.path.realpath(lib))
            if os.path.islink(lib):  # lib64 -> lib: sys.path may name the link, which the launcher recreates
                paths.add(lib)
    if sysconfig.get_config_var("LIBDIR"):  # where libpython lives, if elsewhere
        paths.add(os.path.realpath(sysconfig.get_config_var("LIBDIR")))
    paths = {p for p in paths if os.path.exists(p)}
    covered = tuple(p + os.sep for p in (*SYSTEM_PATHS, *paths))  # a path inside another needs no bind of its own
    return sorted(p for p in paths if not (p + os.sep).startswith(tuple(c for c in covered if c != p + os.sep)))


@functools.cache
def network_isolation() -> tuple[str, ...]:
    """The command prefix that gives the child a network namespace of its own, or () when this machine cannot."""
    if shutil.which("unshare") is None:
        return ()
    for prefix in (("unshare", "-rn"), ("unshare", "-n")):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


_PROBE = "import collections, decimal, fractions, hashlib, heapq, itertools, json, math, re, string, typing\n"


@functools.cache
def mount_isolation_problem() -> str:
    """Why this machine cannot run programs in a mount namespace ("" when it can): one probe run per process."""
    try:
        result = _run(_PROBE, 10.0, DEFAULT_MEMORY_MB, "mountns", True, 1)
    except _SetupError as e:
        return str(e)
    return "" if result.passed else f"the probe program failed ({result.detail})"


def mount_isolation() -> bool:
    return not mount_isolation_problem()


class _SetupError(RuntimeError):
    pass


def run_python(
    source: str,
    timeout: float = DEFAULT_TIMEOUT,
    memory_mb: int = DEFAULT_MEMORY_MB,
    isolation: str = "auto",
    guard: bool = True,
    max_file_mb: int = 16,
) -> ExecResult:
    """Run `source` as a Python program under the limits above; exit status 0 is "passed".

    isolation: "auto" ("mountns"; where the machine has none, the weaker isolation LOGITGUARD_SANDBOX names, else
    SandboxUnavailable), "mountns" or "netns" (required: SandboxUnavailable where unavailable) or "guard" (no
    namespace). guard=False leaves out the audit hook (only for testing a namespace on its own)."""
    isolation = resolve_isolation(isolation)
    if isolation == "guard" and not guard:
        raise ValueError("refusing to run without a namespace and without the guard")
    try:
        return _run(source, timeout, memory_mb, isolation, guard, max_file_mb)
    except _SetupError as e:  # the probe passed, so this is new: never run the program with less, silently
        raise RuntimeError(f"sandbox setup failed: {e}") from None


class SandboxUnavailable(LogitguardError, RuntimeError):
    """The isolation asked for (or the only one that keeps the user's files out of sight) is not on this machine."""


OPT_IN = "LOGITGUARD_SANDBOX"  # netns or guard: run model-written code with that weaker isolation where no mountns


def resolve_isolation(isolation: str = "auto") -> str:
    """The isolation `run_python` will use: call it before generating (an evaluation then fails before its hour of
    generation, not after). Only "mountns" keeps the user's files out of the programs' sight: the audit hook alone
    is a second line, not a boundary, so "auto" takes a weaker one only where the user names it in
    LOGITGUARD_SANDBOX."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
    fallback = isolation == "auto" and not mount_isolation()
    if isolation == "auto":
        if mount_isolation():
            return "mountns"
        chosen = os.environ.get(OPT_IN, "")
        if chosen not in ("netns", "guard"):
            raise SandboxUnavailable(
                f"no mount namespace on this machine ({mount_isolation_problem()}), so model-written programs "
                f"(HumanEval) would see this user's files; allow user namespaces (Ubuntu: sysctl "
                f"kernel.apparmor_restrict_unprivileged_userns=0), or accept a weaker isolation with {OPT_IN}=netns "
                f"(no network) or {OPT_IN}=guard"
            )
        isolation = chosen
    if isolation == "mountns" and not mount_isolation():
        raise SandboxUnavailable(f"no mount namespace on this machine: {mount_isolation_problem()}")
    if isolation == "netns" and not network_isolation():
        raise SandboxUnavailable("no network namespace on this machine (`unshare -rn true` fails)")
    problem = guard_problem() if isolation in ("netns", "guard") else ""  # both leave the user's files to the hook
    if problem:
        raise SandboxUnavailable(
            f"isolation {isolation!r} leaves the user's files to the audit hook, which cannot protect itself on "
            f"this machine: {problem}; allow user namespaces here (mountns, which does not rest on the hook)"
        )
    if fallback:  # warned only once the weaker isolation is known to be usable here
        _warn_once(isolation, mount_isolation_problem())
    return isolation


def guard_problem(version: tuple = sys.version_info) -> str:
    """Why the audit hook cannot keep its own checks here ("" where it can). From 3.12 os.unshare raises no audit
    event: a program takes a user namespace of its own, and with it the capabilities to chroot into a tree it wrote
    (its own "Python installation", native code included). From 3.13 a frame's f_locals writes through to the
    running function (PEP 667), and a signal handler is handed the frame it interrupts, the hook's at times. And the
    hook tells a symbolic link from a name with os.access, which some container profiles make fail on every call
    (faccessat2 refused): every link would then read as a plain name."""
    problems = []
    if version >= (3, 12):
        problems.append(
            "os.unshare raises no audit event (Python 3.12+), so a program can take a user namespace and chroot"
        )
    if version >= (3, 13):
        problems.append(
            "a signal handler can rewrite the hook's locals through frame.f_locals (PEP 667, Python 3.13+)"
        )
    if not os.access(sys.executable or "/", os.F_OK, follow_symlinks=False):
        problems.append("os.access(..., follow_symlinks=False) fails here (a seccomp profile refusing faccessat2?)")
    return "; ".join(problems)


@functools.cache
def _warn_once(kind: str, why: str) -> None:
    warnings.warn(
        f"sandbox: no mount namespace ({why}); untrusted programs run with isolation {kind!r} ({OPT_IN}) and "
        "can see this user's files: the audit hook refuses plain reads of them, but it is not a boundary",
        stacklevel=3,
    )


def _run(source: str, timeout: float, memory_mb: int, kind: str, guard: bool, max_file_mb: int) -> ExecResult:
    folder = Path(tempfile.mkdtemp(prefix="logitguard-exec-"))  # 0700: the box inside is the program's folder
    try:
        box = folder / "box"
        box.mkdir()
        program = box / "program.py"
        program.write_text(source, encoding="utf-8")
        exe = python_executable()
        limits = [str(memory_mb << 20), str(int(timeout) + 1), str(max_file_mb << 20), "1" if guard else "0"]
        cmd = [exe, "-I", "-S", "-c", _HARNESS, *limits, str(program)]
        status_fd = os.open(folder / "status", os.O_WRONLY | os.O_CREAT, 0o600)  # "ok" once set up
        if kind == "mountns":
            (folder / "root").mkdir()
            nobody = NOBODY if os.geteuid() == 0 and _mapped(NOBODY) else None
            if nobody is not None:  # the program runs as nobody
                for p in (box, program):
                    os.chown(p, nobody, nobody)
            spec = {"root": str(folder / "root"), "box": str(box), "system": SYSTEM_PATHS, "devices": DEVICES}
            spec |= {"python": python_paths(), "nobody": nobody, "status": status_fd, "box_mb": 4 * max_file_mb}
            cmd = [exe, "-I", "-S", "-c", _LAUNCHER, json.dumps(spec), *cmd]
        else:
            cmd = [exe, "-I", "-S", "-c", _DROPPER, str(status_fd), *cmd]
        if kind == "netns":
            cmd = [*network_isolation(), *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(box), "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        start = time.monotonic()
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            try:
                proc = subprocess.Popen(
                    cmd,
                    cwd=box,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    pass_fds=(status_fd,),
                )
            finally:
                os.close(status_fd)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(proc)  # after an exit too: what the program left running in the background dies with it
        seconds = time.monotonic() - start
        stderr = (folder / "stderr").read_bytes()[-4000:].decode("utf-8", "replace")
        if code is not None and (folder / "status").read_bytes() != b"ok":
            raise _SetupError(stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {code}")
        if code is None:
            return ExecResult("timeout", None, f"timed out after {timeout:g} s", seconds, kind)
        detail = "" if code == 0 else _detail(stderr, code)
        return ExecResult("passed" if code == 0 else "failed", code, detail, seconds, kind)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _mapped(user: int) -> bool:
    """Whether `user` exists as a user and a group here (not so inside a user namespace that maps root alone)."""
    for name in ("uid_map", "gid_map"):
        try:
            ranges = [line.split() for line in Path(f"/proc/self/{name}").read_text().splitlines()]
        except OSError:
            return True
        if not any(int(inside) <= user < int(inside) + int(count) for inside, _, count in ranges):
            return False
    return True


def _detail(stderr: str, code: int) -> str:
    """A built-in exception's class name from the last line of stderr, else the exit status or signal. Nothing
    the program wrote is echoed beyond such a name: a model under evaluation is the untrusted party, and records
    are kept."""
    lines = stderr.strip().splitlines()
    match = re.match(r"([A-Za-z]\w*)(?::|$)", lines[-1]) if lines else None
    if match and match.group(1) in _EXCEPTIONS:
        return match.group(1)
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
