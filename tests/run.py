"""Run the whole suite, a test class per process, several at a time.

Most tests wait on sockets and subprocesses rather than compute, so running
classes side by side takes the suite from about 110 s to under a minute on
two cores.  Each class runs as `python3 -X dev -W error -m unittest -v
tests.MODULE.CLASS` from the repository root, as the one-at-a-time command
`python3 -X dev -W error -m unittest discover -s tests -v` would run it, and
its output is printed whole when it ends, so lines never interleave.

    python3 tests/run.py            # every class, as many at once as cores + 1
    python3 tests/run.py -j 1       # one at a time
    python3 tests/run.py test_sender test_abuse.FullHouseTest
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import unittest
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
# A class that takes longer has hung: its process is killed and it fails.
CLASS_TIMEOUT = 300.0
# Lines that mean a resource was left open or an error was swallowed,
# which -W error turns into a warning only where no exception can rise.
LEAKS = re.compile(r"ResourceWarning|Exception ignored")


def find_classes(names: list[str]) -> list[str]:
    """Return MODULE.CLASS for every test class the names cover."""
    # The root too: a module that imports a script before support (as
    # test_sender does) could not be loaded by name.
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    loader = unittest.TestLoader()
    if names:
        suite = loader.loadTestsFromNames(names)
    else:
        suite = loader.discover(str(HERE), top_level_dir=str(HERE))
    found: dict[str, None] = {}
    stack = [suite]
    while stack:
        item = stack.pop(0)
        if isinstance(item, unittest.TestSuite):
            stack[:0] = list(item)
        elif isinstance(item, unittest.loader._FailedTest):
            raise SystemExit("tests/run.py: cannot load %s" % item.id())
        else:
            found[type(item).__module__ + "." + type(item).__qualname__] = None
    return list(found)


def run_class(name: str) -> tuple[str, int, str, float]:
    """Run one test class in its own interpreter and return its output."""
    began = time.monotonic()
    # From the root, as tests.MODULE: the root and, by tests/__init__.py,
    # this folder are on sys.path, as with discover -s tests.
    command = [sys.executable, "-X", "dev", "-W", "error", "-m", "unittest",
               "-v", "tests." + name]
    try:
        done = subprocess.run(command, cwd=HERE.parent,
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              timeout=CLASS_TIMEOUT)
        status, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as hung:
        status = 1
        output = (hung.stdout or b"") + (
            b"\n%s: killed after %d s\n" % (name.encode(), CLASS_TIMEOUT))
    return name, status, output.decode("utf-8", "replace"), (
        time.monotonic() - began)


def skipped_tests(output: str) -> list:
    """Return the "name ... skipped 'why'" lines of a unittest -v run."""
    return re.findall(r"^(\S+) \(.*\) \.\.\. skipped (.*)$", output, re.M)


def count_tests(output: str) -> int:
    """Return how many tests a unittest run says it ran."""
    found = re.search(r"^Ran (\d+) tests? in", output, re.M)
    return int(found.group(1)) if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the test suite, several test classes at a time.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="a module or MODULE.CLASS to run "
                        "(default: every test_*.py here)")
    parser.add_argument("-j", "--jobs", type=int,
                        default=(os.cpu_count() or 1) + 1,
                        help="classes to run at once (default: cores + 1)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be 1 or more")
    # Longest first, so the slow classes do not start last: the modules
    # whose classes took longest on a 2-core machine lead.
    slow = ("test_follow", "test_abuse", "test_reconnect", "test_sender_stops",
            "test_check", "test_faults")
    classes = sorted(find_classes(args.names), key=lambda name: (
        slow.index(name.split(".")[0]) if name.split(".")[0] in slow
        else len(slow)))
    began = time.monotonic()
    failed, leaked, skipped, tests = [], [], [], 0
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = [pool.submit(run_class, name) for name in classes]
        for run in as_completed(runs):
            name, status, output, took = run.result()
            sys.stdout.write(output)
            sys.stdout.write("[%s: %s, %.1f s]\n" % (
                name, "ok" if status == 0 else "FAILED", took))
            sys.stdout.flush()
            tests += count_tests(output)
            skipped += skipped_tests(output)
            if status != 0:
                failed.append(name)
            if LEAKS.search(output):
                leaked.append(name)
    print("=" * 70)
    print("Ran %d tests in %d classes in %.1f s, %d at a time" % (
        tests, len(classes), time.monotonic() - began, args.jobs))
    # A skip is said where it happened too, but a long run buries it.
    for name, why in sorted(skipped):
        print("skipped: %s: %s" % (name, why))
    for name in failed:
        print("FAILED: %s" % name)
    for name in leaked:
        print("LEAKED: %s left a resource open (ResourceWarning above)"
              % name)
    if failed or leaked:
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
