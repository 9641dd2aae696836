"""Record every file-system write a program makes: the relay's proof that it writes nothing.

Two independent layers, used together by ``tests/test_no_writes.py``:

1. An audit hook (``sys.addaudithook``), installed before anything of the program is imported.
   Run this file **by path**, not with ``-m`` (which would import ``relay`` first)::

       python relay/testing/audit.py --report-fd 3 -- serve --config relay.yaml

   It installs the recorder, then runs ``relay`` as ``python -m relay`` does, with the arguments
   after ``--`` (``-c CODE`` instead runs ``CODE``: the detector's negative control). Each write
   is reported at once, as one line ``write<TAB>event<TAB>detail`` on the inherited descriptor
   ``--report-fd``: a pipe the caller reads, since a report file would itself be a write.
   Recorded: ``open`` for writing (``open``, ``os.open``, C code opening through Python),
   ``os.mkdir``, rename and replace, remove and unlink, ``rmdir``, links, truncate, chmod,
   chown, utime, xattrs, every ``shutil`` copy/move/remove, ``sqlite3.connect`` to anything but
   memory, ``tempfile.mkstemp``/``mkdtemp``, binding a Unix socket to a path; and, as
   ``spawn``, every new process (the hook cannot follow it; the trace can).

2. A system-call trace (:func:`strace_command`, :func:`strace_writes`): ``strace -f`` over the
   whole process tree, for what the hook cannot see: the interpreter's start-up before the hook,
   and C code writing directly (grpc's core, OpenSSL).

Nothing here writes a file except where the caller points strace's log, which is outside the
traced program (strace does not trace itself).
"""

# Only builtin and frozen modules load before the hook (hence no `from __future__` and no
# `typing`): anything imported here would be imported, and perhaps cached, unseen by it.
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

REPORT_PREFIX = "write"
SPAWN_PREFIX = "spawn"

_OPEN_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_OPEN_WRITE_MODES = frozenset("wax+")
_WRITE_EVENTS = frozenset(
    {
        "os.mkdir",
        "os.rename",  # also os.replace
        "os.remove",  # also os.unlink
        "os.rmdir",
        "os.link",
        "os.symlink",
        "os.truncate",  # also os.ftruncate
        "os.chmod",
        "os.chown",
        "os.chflags",
        "os.utime",
        "os.setxattr",
        "os.removexattr",
        "shutil.copyfile",
        "shutil.copymode",
        "shutil.copystat",
        "shutil.copytree",
        "shutil.rmtree",
        "shutil.move",
        "shutil.chown",
        "shutil.make_archive",
        "shutil.unpack_archive",
        "tempfile.mkstemp",
        "tempfile.mkdtemp",
    }
)
_SPAWN_EVENTS = frozenset(
    {
        "os.exec",
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.spawn",
        "os.system",
        "subprocess.Popen",
        "pty.spawn",
    }
)
_MEMORY_DATABASES = (":memory:", "file::memory:")
# Where writing is not writing to a file system: the bit bucket and terminals.
_HARMLESS_TARGETS = ("/dev/null", "/dev/tty")
_HARMLESS_PREFIXES = ("/dev/pts/", "pipe:[", "socket:[", "anon_inode:")


class Recorder:
    """The audit hook: classifies each event and reports writes through ``emit``."""

    def __init__(self, emit: "Callable[[str], None]") -> None:
        self._emit = emit
        self._busy = False  # the hook's own calls must not be audited into it again

    def __call__(self, event: str, args: tuple[object, ...]) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            finding = self.classify(event, args)
            if finding is not None:
                self._emit(f"{finding}\t{event}\t{_detail(event, args)!r}\n")
        finally:
            self._busy = False

    @staticmethod
    def classify(event: str, args: tuple[object, ...]) -> str | None:
        """``write``, ``spawn``, or None for an event that changes no file."""
        if event == "open":
            return REPORT_PREFIX if _opens_for_writing(args) else None
        if event in _WRITE_EVENTS:
            return REPORT_PREFIX
        if event == "sqlite3.connect":
            database = os.fsdecode(args[0]) if isinstance(args[0], str | bytes) else ""
            return None if database.startswith(_MEMORY_DATABASES) else REPORT_PREFIX
        if event == "socket.bind":
            return REPORT_PREFIX if _binds_a_path(args) else None
        if event in _SPAWN_EVENTS:
            return SPAWN_PREFIX
        return None


def _opens_for_writing(args: tuple[object, ...]) -> bool:
    path, mode, flags = (*args, None, None, None)[:3]
    writing = isinstance(mode, str) and not _OPEN_WRITE_MODES.isdisjoint(mode)
    writing = writing or (isinstance(flags, int) and bool(flags & _OPEN_WRITE_FLAGS))
    return writing and not harmless(_target(path))


def _binds_a_path(args: tuple[object, ...]) -> bool:
    sock, address = (*args, None, None)[:2]
    family = getattr(sock, "family", None)
    if getattr(family, "name", "") != "AF_UNIX":
        return False
    # An abstract-namespace address (leading NUL) or an autobind ("") creates no file.
    return isinstance(address, str | bytes) and bool(address) and address[:1] not in ("\0", b"\0")


def _target(path: object) -> str:
    """The file a path or descriptor names; a descriptor is looked up in /proc."""
    if isinstance(path, int):
        try:
            return os.readlink(f"/proc/self/fd/{path}")
        except OSError:
            return f"fd {path}"
    try:
        return os.fsdecode(path)  # type: ignore[arg-type]
    except TypeError:
        return repr(path)


def harmless(target: str) -> bool:
    """Whether writing to ``target`` leaves the file system as it was (/dev/null, a pipe ...)."""
    return target in _HARMLESS_TARGETS or target.startswith(_HARMLESS_PREFIXES)


def _detail(event: str, args: tuple[object, ...]) -> tuple[object, ...]:
    """The event's arguments with paths decoded (and, for ``open``, a descriptor resolved)."""
    paths = (str, bytes, os.PathLike, int) if event == "open" else (str, bytes, os.PathLike)
    shown = [_target(arg) if isinstance(arg, paths) else arg for arg in args[:3]]
    if event == "open" and len(shown) > 1:
        shown[1:] = args[1:3]  # mode and flags as given
    return tuple(shown)


def install(report_fd: int) -> Recorder:
    """Install the recorder, reporting each finding as one line on ``report_fd``."""

    def emit(line: str) -> None:
        os.write(report_fd, line.encode("utf-8", "backslashreplace"))

    recorder = Recorder(emit)
    sys.addaudithook(recorder)
    return recorder


def parse_report(text: str) -> list[tuple[str, str, str]]:
    """The ``(kind, event, detail)`` findings of a report the recorder wrote."""
    return [
        (kind, event, detail)
        for kind, event, detail in (line.split("\t", 2) for line in text.splitlines() if line)
    ]


# -- the system-call layer ----------------------------------------------------------------------

# %file: every call taking a path; then the descriptor-based calls that change a file's content
# or metadata, and bind (a Unix socket is a file). Reads are traced too and ignored.
STRACE_CALLS = "%file,ftruncate,fallocate,fchmod,fchown,fsetxattr,fremovexattr,bind"
_OPEN_CALLS = frozenset({"open", "openat", "openat2"})
_WRITE_FLAG_NAMES = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND", "O_TMPFILE")
_WRITE_CALLS = frozenset(
    {
        "creat",
        "mkdir",
        "mkdirat",
        "rename",
        "renameat",
        "renameat2",
        "unlink",
        "unlinkat",
        "rmdir",
        "link",
        "linkat",
        "symlink",
        "symlinkat",
        "truncate",
        "ftruncate",
        "fallocate",
        "chmod",
        "fchmod",
        "fchmodat",
        "chown",
        "fchown",
        "lchown",
        "fchownat",
        "utime",
        "utimes",
        "utimensat",
        "futimesat",
        "mknod",
        "mknodat",
        "setxattr",
        "lsetxattr",
        "fsetxattr",
        "removexattr",
        "lremovexattr",
        "fremovexattr",
    }
)


def strace_command(log_prefix: str) -> list[str]:
    """The strace prefix for a command: every process and thread, one log per thread.

    ``-ff`` gives each thread its own file (``<log_prefix>.<tid>``), so no call is split into
    "unfinished"/"resumed" halves; ``-y`` prints the path behind each descriptor.
    """
    return [
        "strace",
        "-f",
        "-ff",
        "-qq",
        "-y",
        "--seccomp-bpf",  # stop only at the traced calls: keeps the service at speed
        "-e",
        "signal=none",
        "-e",
        f"trace={STRACE_CALLS}",
        "-o",
        log_prefix,
    ]


def strace_writes(lines: "Iterable[str]") -> "Iterator[str]":
    """The lines of a strace log that change the file system (attempts that failed included)."""
    for line in lines:
        name, _, args = line.partition("(")
        name = name.strip()
        if name in _OPEN_CALLS:
            path, _, flags = args.partition('"')[2].partition('"')
            if any(flag in flags for flag in _WRITE_FLAG_NAMES) and not harmless(path):
                yield line
        elif name in _WRITE_CALLS or (name == "bind" and _binds_unix_path(args)):
            yield line


def _binds_unix_path(args: str) -> bool:
    # bind(5<socket:[…]>, {sa_family=AF_UNIX, sun_path="/run/x.sock"}, 110); abstract: @"…"
    return "AF_UNIX" in args and 'sun_path="' in args


# -- running a program under the recorder -------------------------------------------------------


def _take_options(argv: list[str]) -> tuple[int, list[str], str | None]:
    report_fd, code = 2, None
    while argv:
        option = argv.pop(0)
        if option == "--":
            break
        if option == "--report-fd":
            report_fd = int(argv.pop(0))
        elif option == "-c":
            code = argv.pop(0)
        else:
            raise SystemExit(f"audit: unknown option {option!r}")
    return report_fd, argv, code


def main(argv: list[str]) -> None:
    """Install the recorder, then run ``relay`` (or ``-c CODE``) with the remaining arguments."""
    report_fd, args, code = _take_options(list(argv))
    # Run by path, the script's own directory heads sys.path; `python -m` puts the working
    # directory there instead.
    sys.path[0] = os.getcwd()
    install(report_fd)
    sys.argv = ["push-relay", *args]
    import runpy  # after the hook: from here on every import is the program's

    if code is not None:
        exec(compile(code, "<audit -c>", "exec"), {"__name__": "__main__"})
        return
    runpy.run_module("relay", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    if __package__:  # python -m relay.testing.audit: relay was imported before the hook
        raise SystemExit("audit: run relay/testing/audit.py by path, not with -m")
    main(sys.argv[1:])
