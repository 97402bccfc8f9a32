"""Feedback tests: fakes.py importable (also for the subprocess tests); the tiny model comes from tests/conftest.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fakes.py, also for the subprocess tests

