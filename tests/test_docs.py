"""The README and --help: what a new user reads first."""

from __future__ import annotations

import re
import subprocess
import sys
import unittest

from support import LISTENER, ROOT, SENDER, TIMEOUT, user_env

README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """Return a top-level README section's text, up to the next one."""
    found = re.search(r"^## %s\n(.*?)(?=^## |\Z)" % re.escape(title), README,
                      re.MULTILINE | re.DOTALL)
    if found is None:
        raise AssertionError("no top-level section %r in README.md" % title)
    return found.group(1)


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True,
                          text=True, timeout=TIMEOUT * 4, cwd=ROOT,
                          env=user_env())


class ReadmeTest(unittest.TestCase):
    def test_it_stays_short_and_its_links_lead_somewhere(self):
        # What a user needs, in order; reference detail lives in docs/.
        self.assertLessEqual(len(README.encode()), 25 * 1024)
        docs = [ROOT / "README.md", *ROOT.glob("docs/*.md"),
                ROOT / "TESTING.md", ROOT / "benchmarks" / "README.md"]
        for page in docs:
            text = page.read_text(encoding="utf-8")
            for target in re.findall(r"\]\(([^):#]+)[#)]", text):
                with self.subTest(page=page.name, link=target):
                    self.assertTrue((page.parent / target).exists())

    def test_troubleshooting_is_a_top_level_section(self):
        self.assertIn("Address already in use", section("Troubleshooting"))

    def test_quick_start_and_platforms_show_each_connection_string(self):
        # Each form CyberTrace takes, beside the setting it matches.
        platforms = (ROOT / "docs" / "platforms.md").read_text(
            encoding="utf-8")
        forms = platforms[platforms.index("## ConnectionStrings"):]
        for text in (section("Quick start (only Python 3 needed)"), forms):
            for words in ("OutputSettings > ConnectionString", "tenant",
                          "AlertConnectionString",
                          "InputSettings > ConnectionString",
                          "192.0.2.105:9998", "[2001:db8::5]:9998",
                          "\\\\.\\pipe\\", "unix:/", "alerts="):
                with self.subTest(words=words):
                    self.assertIn(words, text)

    def test_troubleshooting_has_the_errors_of_places(self):
        rows = section("Troubleshooting")
        for words in ("named pipes (\\\\.\\pipe\\NAME) exist only on Windows",
                      "cannot listen on unix:PATH: another program listens "
                      "on it", "With several `-l`, the line names the one",
                      "can never match", "unix:/PATH"):
            with self.subTest(words=words):
                self.assertIn(words, rows)

    def test_one_figure_for_the_suite_s_time(self):
        # README rounds what TESTING.md measured on an idle machine.
        said = re.search(r"about (\d+) s on an idle 2-core machine",
                         section("Development"))
        testing = (ROOT / "TESTING.md").read_text(encoding="utf-8")
        measured = re.findall(r"\(\d+ tests\) ([\d.]+) s idle", testing)
        self.assertIsNotNone(said)
        self.assertEqual(len(measured), 1, measured)
        self.assertEqual(int(said.group(1)), round(float(measured[0])))

    def test_the_stand_in_log_the_readme_writes_is_ignored(self):
        written = re.findall(r"2>(\S+)", section("Try it without CyberTrace"))
        self.assertTrue(written)
        ignored = (ROOT / ".gitignore").read_text().split()
        for name in written:
            self.assertIn(name, ignored)

    def test_speed_speaks_to_a_user(self):
        speed = section("Speed")
        for word in ("target", "MISSED", "issue"):
            self.assertNotIn(word, speed)
        self.assertIn("What that means for you", speed)

    def test_one_name_for_kaspersky_s_tutorial(self):
        helps = [run(str(script), "--help").stdout
                 for script in (LISTENER, SENDER)]
        # What the scripts and the benchmark print, and their sources.
        sources = [path.read_text(encoding="utf-8") for path in
                   [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]]
        for text in [README] + helps + sources:
            self.assertNotRegex(text, r"(?i)\bguide\b", "Kaspersky's "
                                "tutorial is called 'the tutorial' throughout")
        for text in helps:
            self.assertIn("tutorial", text)

    def test_the_single_test_command_works_from_the_root(self):
        commands = re.findall(r"^    (python3 -m unittest tests\.\S+)$",
                              README, re.MULTILINE)
        self.assertTrue(commands, "README shows no single-test command")
        self.assertIn("the tests", README[:README.index(commands[0])])
        for command in commands:
            with self.subTest(command):
                target = command.split()[-1]
                if target.count(".") < 3:
                    # A whole module or class runs long; load it only.
                    loaded = run("-c", "import sys, unittest\n"
                                 "loader = unittest.TestLoader()\n"
                                 "found = loader.loadTestsFromName(%r)\n"
                                 "sys.exit(loader.errors or not "
                                 "found.countTestCases())" % target)
                    self.assertEqual(loaded.returncode, 0, loaded.stderr)
                    continue
                proc = run("-m", "unittest", target)
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertIn("Ran 1 test", proc.stderr)


if __name__ == "__main__":
    unittest.main()
