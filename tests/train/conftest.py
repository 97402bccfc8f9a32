"""Shared fixtures for the trainer tests: the tiny model and tokenizer, built once per session, offline."""

import pytest



@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama-style checkpoint + tokenizer (hidden 64, 2 layers, vocab 384), like a real one."""
    from fastalign.train.tiny import build_tiny_model_and_tokenizer

    return build_tiny_model_and_tokenizer(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from fastalign.train.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)
