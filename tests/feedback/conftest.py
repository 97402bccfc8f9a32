"""Fixtures for the feedback tests: the tiny model (built once, offline), its tokenizer, fake backends."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fakes.py, also for the subprocess tests


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from fastalign.train.tiny import build_tiny_model_and_tokenizer

    return build_tiny_model_and_tokenizer(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from fastalign.train.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)
