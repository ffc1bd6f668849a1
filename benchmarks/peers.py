"""Find what the benchmark compares against: nc, socat and syslog-ng.

nc and socat are installed with apt-get when missing (as root).  syslog-ng
is fetched with apt-get download and unpacked into a cache folder, never
installed: Debian's package conflicts with rsyslog, which the tests use.
It runs in the foreground with its own config, module path, pid, persist
and control files, from the caller's folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or
                     os.path.expanduser("~/.cache"), "cybertrace-bench")


def user_env() -> dict:
    """Return the environment of a user's shell: no PYTHONUNBUFFERED."""
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    return env


def apt_install(packages: list) -> str:
    """Install Debian packages if we may; return what went wrong, or ""."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root or no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for update in (False, True):
        if update:
            subprocess.run(["apt-get", "update", "-qq"], env=env,
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        done = subprocess.run(["apt-get", "install", "-y", "-qq", *packages],
                              env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        if done.returncode == 0:
            return ""
    return "apt-get install %s failed" % " ".join(packages)


def find_tool(name: str, package: str, missing: dict):
    """Return the tool's path, installing its package if need be."""
    path = shutil.which(name)
    if path is None:
        print("Installing %s..." % package, file=sys.stderr)
        problem = apt_install([package])
        path = shutil.which(name)
        if path is None:
            missing[name] = "%s is not installed (%s: apt-get install %s)" % (
                name, problem or "not found after install", package)
    return path


class SyslogNg:
    """syslog-ng unpacked from Debian's packages into a cache folder."""

    PACKAGE = "syslog-ng-core"

    def __init__(self, root: str) -> None:
        self.root = root
        self.binary = os.path.join(root, "usr/sbin/syslog-ng")
        self.ctl = os.path.join(root, "usr/sbin/syslog-ng-ctl")
        libs = [os.path.join(root, "usr/lib/syslog-ng")]
        for base in ("usr/lib", "lib"):
            for triplet in os.listdir(os.path.join(root, base)) \
                    if os.path.isdir(os.path.join(root, base)) else []:
                if triplet.endswith("-linux-gnu"):
                    libs.append(os.path.join(root, base, triplet))
        self.env = dict(user_env(), LD_LIBRARY_PATH=":".join(libs))
        modules = os.path.join(root, "usr/lib/syslog-ng")
        self.modules = [os.path.join(modules, name)
                        for name in os.listdir(modules)
                        if os.path.isdir(os.path.join(modules, name))][0]

    @classmethod
    def fetch(cls, missing: dict):
        """Return syslog-ng from the cache, fetching it the first time."""
        root = os.path.join(CACHE, "syslog-ng")
        if not os.path.exists(os.path.join(root, "usr/sbin/syslog-ng")):
            problem = cls.unpack(root)
            if problem:
                missing["syslog-ng"] = "syslog-ng could not be had: " + problem
                return None
        try:
            found = cls(root)
            version = subprocess.run([found.binary, "--version"],
                                     env=found.env, capture_output=True,
                                     text=True, timeout=30)
        except (OSError, IndexError, subprocess.SubprocessError) as exc:
            missing["syslog-ng"] = "syslog-ng does not run: %s" % exc
            return None
        if version.returncode:
            missing["syslog-ng"] = "syslog-ng does not run: " + \
                version.stderr.strip()[:200]
            return None
        found.version = version.stdout.split("\n")[0]
        return found

    @classmethod
    def unpack(cls, root: str) -> str:
        """apt-get download the package and its missing libraries."""
        if not shutil.which("apt-get") or not shutil.which("dpkg"):
            return "needs apt-get and dpkg (Debian or Ubuntu)"
        print("Fetching %s into %s..." % (cls.PACKAGE, root), file=sys.stderr)
        debs = os.path.join(CACHE, "debs")
        os.makedirs(debs, exist_ok=True)
        packages = [cls.PACKAGE] + cls.missing_libraries()
        for update in (False, True):
            if update:
                if os.geteuid() != 0:
                    break
                subprocess.run(["apt-get", "update", "-qq"],
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                packages = [cls.PACKAGE] + cls.missing_libraries()
            got = subprocess.run(["apt-get", "download", "-qq", *packages],
                                 cwd=debs, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
            if got.returncode == 0:
                break
        else:
            got = None
        if got is None or got.returncode:
            return "apt-get download %s failed" % " ".join(packages)
        partial = root + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        for name in os.listdir(debs):
            if name.endswith(".deb"):
                subprocess.run(["dpkg", "-x", os.path.join(debs, name),
                                partial], check=True)
        shutil.rmtree(root, ignore_errors=True)
        os.rename(partial, root)
        return ""

    @classmethod
    def missing_libraries(cls) -> list:
        """Return the libraries syslog-ng depends on that are not installed."""
        found = subprocess.run(["apt-cache", "depends", cls.PACKAGE],
                               capture_output=True, text=True)
        wanted = []
        for line in found.stdout.splitlines():
            kind, _, name = line.strip().partition(": ")
            if kind == "Depends" and name.startswith("lib"):
                status = subprocess.run(
                    ["dpkg-query", "-W", "-f=${Status}", name],
                    capture_output=True, text=True)
                if "install ok installed" not in status.stdout:
                    wanted.append(name)
        return wanted

    def config(self, workdir: str, port: int, out_path: str,
               fmt: str) -> str:
        """Write a config for one run; return its path."""
        template = "$(format-json --scope nv-pairs)\\n" if fmt == "json" \
            else "${MESSAGE}\\n"
        parser = "parser { kv-parser(prefix(\"\")); };" if fmt == "json" \
            else ""
        # Flow control with a window no queue can overflow: the source stops
        # reading rather than drop (its drop counters are checked each run).
        text = """@version: 3.38
options { use-dns(no); dns-cache(no); keep-hostname(yes); stats-level(1);
          log-fifo-size(100000); };
source s_net { network(ip("127.0.0.1") port(%d) transport("tcp")
    flags(no-parse) max-connections(100) log-iw-size(50000)
    log-msg-size(1048576)); };
destination d_out { file("%s" template("%s")); };
log { source(s_net); %s destination(d_out); flags(flow-control); };
""" % (port, out_path, template, parser)
        path = os.path.join(workdir, "syslog-ng.conf")
        with open(path, "w") as f:
            f.write(text)
        return path

    def start(self, workdir: str, port: int, out_path: str,
              fmt: str) -> subprocess.Popen:
        conf = self.config(workdir, port, out_path, fmt)
        files = {name: os.path.join(workdir, "syslog-ng." + name)
                 for name in ("pid", "persist", "ctl")}
        return subprocess.Popen(
            [self.binary, "-F", "-f", conf, "--module-path", self.modules,
             "-p", files["pid"], "-R", files["persist"], "-c", files["ctl"],
             "--no-caps"], env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def counters(self, workdir: str) -> dict:
        """Return syslog-ng's statistics as {(name, instance, type): n}."""
        found = subprocess.run(
            [self.ctl, "stats", "-c", os.path.join(workdir, "syslog-ng.ctl")],
            env=self.env, capture_output=True, text=True, timeout=30)
        stats = {}
        for line in found.stdout.splitlines()[1:]:
            fields = line.split(";")
            if len(fields) == 6 and fields[5].isdigit():
                stats[(fields[0], fields[1], fields[4])] = int(fields[5])
        return stats

    def check(self, workdir: str, count: int) -> None:
        """Fail if syslog-ng dropped anything, or missed an event."""
        stats = self.counters(workdir)
        dropped = sum(n for key, n in stats.items() if key[2] == "dropped")
        written = stats.get(("destination", "d_out", "processed"))
        if dropped or written != count:
            raise SystemExit("bench: syslog-ng dropped %d and passed on %s "
                             "of %d events: its comparison is void"
                             % (dropped, written, count))
