"""``python -m relay``: the push-relay command, with the process made unable to write first.

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``push-relay`` / ``python -m relay``: harden, then run the CLI."""
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
