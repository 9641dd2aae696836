"""``python -m relay``: the push-relay command, with the process made unable to write first.

First of all, :func:`keep_memory_in` stops memory leaving the process: no core dump, and no
ptrace or ``/proc/<pid>/mem`` reads by other processes of the same user.

The service writes no file (DESIGN §1), yet some libraries write one whenever the environment
asks, whatever the program wants: ``ssl.create_default_context`` (every adapter's TLS) appends
the TLS session secrets to ``$SSLKEYLOGFILE``, and prometheus_client keeps every metric in mmap
files under ``$PROMETHEUS_MULTIPROC_DIR``. :func:`main` drops those variables from this process's
environment before any such library is imported, and logs that it did; the console script
``push-relay`` is meant to run this :func:`main` too.

Bytecode caches: ``relay/__init__`` turns ``.pyc`` writing off for every module imported after
it, but the interpreter has compiled its own start-up modules, and ``relay/__init__`` itself,
before any line of ours runs. So the process must start with caching off
(``PYTHONDONTWRITEBYTECODE=1`` or ``python -B``, as the image does) or find every cache
precompiled and fresh (the image precompiles too). ``tests/test_no_writes.py`` checks both
halves: with caching off and no cache to be found, serving writes nothing; with caching on,
the interpreter writes the caches of its start-up modules and of ``relay/__init__``, and of
nothing imported after it.
"""

import os
import sys
from collections.abc import Sequence

# Variables that make a library write files. Removed for this process only (children of the
# relay, of which there are none, would not see them either).
WRITING_ENVIRONMENT = ("SSLKEYLOGFILE", "PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")


PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def keep_memory_in() -> None:
    """No core dump, and no other process of this user reading our memory.

    A crash would otherwise let the kernel write the previews, names and keys in memory to a
    core file, and any process of the same user could read them through ptrace or
    ``/proc/<pid>/mem``. The core-file limit goes to zero and the process marks itself
    non-dumpable (which also makes its ``/proc`` files root's, so ptrace and ``mem`` refuse
    other processes of the user). Linux only; elsewhere only the limit is set.
    """
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``push-relay`` / ``python -m relay``: harden, then run the CLI."""
    keep_memory_in()
    dropped = [name for name in WRITING_ENVIRONMENT if os.environ.pop(name, None) is not None]
    # Imported only now: prometheus_client picks its storage when it is first imported.
    from relay.cli import main as cli_main
    from relay.logs import setup_logging

    if dropped:
        import logging

        setup_logging("warning")  # `serve` sets the configured level later
        for name in dropped:
            logging.getLogger("relay").warning(
                "environment variable ignored: the relay writes no files", extra={"variable": name}
            )
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
