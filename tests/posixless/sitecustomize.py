"""Take away what only POSIX has, as on Windows, before a script runs.

tests/test_portable.py puts this folder first on PYTHONPATH, so that a
POSIX-only call on a script's default path fails on Linux in seconds,
before the slower run under wine (tests/windows/) finds it.
"""

import signal
import sys

for _name in ("SIGHUP", "SIGUSR1", "SIGUSR2"):
    if hasattr(signal, _name):
        delattr(signal, _name)
# None in sys.modules makes "import fcntl" raise ImportError.
for _name in ("fcntl", "termios"):
    sys.modules[_name] = None
