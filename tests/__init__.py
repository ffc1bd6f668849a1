"""Tests of both scripts, run from the repository root.

The test modules import their helpers as ``support``; putting this folder on
sys.path lets ``python3 -m unittest tests.test_listener`` find it, as
``discover -s tests`` does by itself.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
