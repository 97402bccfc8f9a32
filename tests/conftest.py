"""Test setup: run Triton kernels in the interpreter when there is no GPU, before anything imports Triton; skip the
GPU tests without a GPU and the vLLM tests without vLLM."""
import importlib.util
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FASTALIGN_POISON", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if _HAS_CUDA else "cpu"


_HAS_VLLM = importlib.util.find_spec("vllm") is not None  # found, not imported: a broken install fails loudly


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (runs in benchmarks/gpu_check.sh)")
    skip_vllm = pytest.mark.skip(reason="needs vLLM: pip install 'fastalign[vllm]' (runs in .ci/run's vLLM stage)")
    for item in items:
        if item.get_closest_marker("gpu") and not _HAS_CUDA:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("vllm") and not _HAS_VLLM:
            item.add_marker(skip_vllm)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama-style checkpoint + tokenizer (hidden 64, 2 layers, vocab 384), like a real one."""
    from fastalign.train.tiny import build_tiny_model_and_tokenizer

    return build_tiny_model_and_tokenizer(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from fastalign.train.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)
