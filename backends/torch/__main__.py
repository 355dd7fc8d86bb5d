"""``python -m backends.torch``: build the C++ CPU loops ahead of time (e.g. in a Docker image) and say
what was built; exit status 1 where the Python loops will run instead."""

import sys

from .build import compiled_cpu_loops

if __name__ == "__main__":
    compiled, reason = compiled_cpu_loops()
    print(f"backends.torch CPU loops: {reason}")
    sys.exit(0 if compiled else 1)
