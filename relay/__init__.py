"""push-relay: a stateless gRPC relay from chat servers to push providers. Stores nothing."""

import sys

# The service never writes a file at run time, bytecode caches included: modules imported after
# this line are compiled in memory only (the image precompiles at build time).
sys.dont_write_bytecode = True

__version__ = "0.1.0"
