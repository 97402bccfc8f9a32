"""What every Triton launcher must do besides computing the right numbers (kernels/_launch.py): launch on the
tensors' device and its current stream, follow torch's fp32 matmul precision, read the tuned-config table; and
the launchers' memory and accumulation choices (backward chunks by the memory budget, fp32 dh partials).

No GPU here: the CUDA device, its streams and the launch itself are mocked (Triton launches on
``torch.cuda.current_device()`` and that device's current stream; the mock records both at each launch).
"""
import ast
import inspect
import json
import math

import pytest
import torch

import fastalign as fa
from fastalign.kernels import _launch
from fastalign.kernels import logprobs as lp_kernels
from fastalign.kernels import rl as rl_kernels
from helpers.accuracy import assert_close_3way
from helpers.inputs import randn, random_mask

FAMILIES = (lp_kernels, rl_kernels)


def _is_kernel(obj) -> bool:
    """A @triton.jit function, possibly under triton.heuristics, compiled or interpreted."""
    while hasattr(obj, "fn") and not hasattr(obj, "arg_names"):
        obj = obj.fn
    return type(obj).__name__ in ("JITFunction", "InterpretedFunction") or (
        hasattr(obj, "arg_names") and hasattr(obj, "run"))


def _launching_functions(module):
    """Names of the module-level functions whose body contains ``<kernel>[grid](...)``."""
    tree = ast.parse(inspect.getsource(module))
    names = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for call in ast.walk(node):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Subscript)
                    and isinstance(call.func.value, ast.Name)
                    and _is_kernel(getattr(module, call.func.value.id, None))):
                names.append(node.name)
                break
    return names


@pytest.mark.parametrize("module", FAMILIES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_triton_launch_is_in_a_device_guarded_launcher(module):
    names = _launching_functions(module)
    assert names, "found no launches: the scan is broken"
    unguarded = [name for name in names if not getattr(getattr(module, name), "guards_device", False)]
    assert not unguarded, f"launch Triton kernels without @on_input_device: {unguarded}"


class _FakeCuda:
    """torch.cuda's current device and per-device current streams, and a record of every kernel launch."""

    def __init__(self):
        self.current = 0
        self.streams = {0: "stream-0", 1: "user-stream-1"}  # the caller made a side stream current on cuda:1
        self.launches = []

    def install(self, monkeypatch):
        fake = self

        class device:  # torch.cuda.device(d): makes d current inside, restores on exit
            def __init__(self, d):
                self.index = torch.device(d).index

            def __enter__(self):
                self.prev, fake.current = fake.current, self.index

            def __exit__(self, *exc):
                fake.current = self.prev

        def current_stream(device=None):
            return fake.streams[fake.current if device is None else torch.device(device).index]

        def record(kernel, *args, grid, warmup, **kwargs):
            # what JITFunction.run reads: driver.active.get_current_device() / get_current_stream(device)
            fake.launches.append((getattr(kernel, "__name__", repr(kernel)), fake.current, current_stream()))

        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
        monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
        from triton.runtime.jit import JITFunction

        monkeypatch.setattr(JITFunction, "run", record)
        try:
            from triton.runtime.interpreter import InterpretedFunction

            monkeypatch.setattr(InterpretedFunction, "run", record)
        except ImportError:  # pragma: no cover
            pass
        # the inputs below live on the CPU; the guard is told they are on cuda:1
        real_first_device = _launch._first_device
        monkeypatch.setattr(_launch, "_first_device", lambda args, kwargs: (
            torch.device("cuda", 1) if real_first_device(args, kwargs) == torch.device("cpu") else
            real_first_device(args, kwargs)))


def _every_launcher():
    """One call of each launcher (the kernels never run: the launch is recorded)."""
    n, d, v = 37, 40, 300
    h, w = randn(n, d, seed=1), randn(v, d, seed=2)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    stat = torch.zeros(n)
    r, val, mask = randn(4, 50, seed=4), randn(4, 50, seed=5), random_mask(4, 50, seed=6)
    grad, scale = torch.zeros(4, 50), torch.ones(4)
    head = dict(temperature=1.0, softcap=None, ignore_index=-100)
    return {
        "linear_logprobs_forward": lambda: lp_kernels.linear_logprobs_forward(h, w, labels, None, need_entropy=True,
                                                                              **head),
        "linear_logprobs_backward": lambda: lp_kernels.linear_logprobs_backward(h, w, labels, None, stat, stat, stat,
                                                                                stat, **head),
        "gae": lambda: rl_kernels.gae(r, val, mask, gamma=0.99, lam=0.95, whiten=True),
        "rl_loss_forward": lambda: rl_kernels.rl_loss_forward(r, val, val, mask, is_value=False, clip_low=0.2,
                                                              clip_high=0.2, dual_clip=None, agg=0, norm_len=50.0,
                                                              need_grad=True),
        "rl_loss_backward": lambda: rl_kernels.rl_loss_backward(grad, scale, torch.ones(1), torch.float32),
        "kl_forward": lambda: rl_kernels.kl_forward(r, val, kind="k3"),
        "kl_backward": lambda: rl_kernels.kl_backward(r, val, grad, kind="k3", need_logp=True, need_ref=True),
    }


def test_launchers_launch_on_the_tensors_device_and_its_current_stream(monkeypatch):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    launchers = _every_launcher()
    assert set(launchers) == {name for m in FAMILIES for name in _launching_functions(m)}
    for name, call in launchers.items():
        fake.launches.clear()
        call()
        assert fake.launches, f"{name} launched nothing"
        wrong = [launch for launch in fake.launches if launch[1:] != (1, "user-stream-1")]
        assert not wrong, f"{name}: launches not on cuda:1 / its current stream: {wrong}"
        assert fake.current == 0, f"{name} left cuda:1 current"


def test_first_device_is_the_first_tensor_argument():
    a, b = torch.empty(1, device="meta"), torch.empty(1)
    assert _launch._first_device((1.0, a, b), {}) == torch.device("meta")
    assert _launch._first_device((1.0,), {"x": b}) == torch.device("cpu")
    assert _launch._first_device((None,), {}) is None


# ---------------------------------------------------------------------------------------------- fp32 precision

@pytest.mark.parametrize("precision,expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_dots_follow_torch_matmul_precision(precision, expected):
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        assert _launch.fp32_dot_precision() == expected
        assert lp_kernels.operand_class(torch.float32) == f"fp32-{expected}"
        assert lp_kernels.operand_class(torch.bfloat16) == "half"
    finally:
        torch.set_float32_matmul_precision(old)


# ------------------------------------------------------------------------------------------ tuned-config table

def test_tuned_config_reads_the_table_keeps_defaults_and_ignores_unknown_keys(tmp_path, monkeypatch):
    table = {"format": 1, "devices": {"cpu": {"logprobs_fwd/bf16": {"BLOCK_N": 64, "num_stages": 4, "STALE": 1}}}}
    path = tmp_path / "card.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(_launch.CONFIG_ENV, str(path))
    default = dict(BLOCK_N=128, BLOCK_V=128, num_stages=3)
    cpu = torch.device("cpu")
    assert _launch.tuned_config(cpu, "logprobs_fwd/bf16", default) == dict(BLOCK_N=64, BLOCK_V=128, num_stages=4)
    assert _launch.tuned_config(cpu, "logprobs_bwd/bf16", default) == default  # no entry: the defaults
    assert _launch.tuned_config(torch.device("meta"), "logprobs_fwd/bf16", default) == default  # another card
    with _launch.config_override({"logprobs_fwd/bf16": dict(BLOCK_N=32)}):
        assert _launch.tuned_config(cpu, "logprobs_fwd/bf16", default)["BLOCK_N"] == 32
    assert _launch.tuned_config(cpu, "logprobs_fwd/bf16", default)["BLOCK_N"] == 64
    monkeypatch.setenv(_launch.CONFIG_ENV, "0")
    assert _launch.tuned_config(cpu, "logprobs_fwd/bf16", default) == default


def test_shipped_config_tables_name_known_kernels():
    known = set(lp_kernels._GPU_BLOCKS) | set(rl_kernels._GPU_BLOCKS)
    prefixes = {key.split("/")[0] for key in known}
    table = _launch._config_table(_launch.CONFIG_DIR)
    for device, kernels in table.items():
        for key, cfg in kernels.items():
            assert key.split("/")[0] in prefixes, (device, key)
            assert all(isinstance(v, int) for k, v in cfg.items() if k != "ms"), (device, key, cfg)


# ------------------------------------------------------------------------- backward chunks and fp32 partials

@pytest.mark.parametrize("budget,expected_chunks", [(None, 1), (64 * 2 * 37, 5)])
def test_backward_chunks_follow_the_memory_budget(budget, expected_chunks, monkeypatch, device):
    """Several vocabulary chunks (a small budget) give the same gradients as one; the chunk count follows the
    budget (the interpreter's BLOCK_V is 64)."""
    monkeypatch.setattr(lp_kernels, "_MIN_CHUNK_COLS", 64)
    if budget is not None:
        monkeypatch.setattr(lp_kernels._common, "head_memory_budget", lambda device: budget, raising=False)
    n, d, v = 37, 40, 300
    g = torch.Generator().manual_seed(8)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 3 / math.sqrt(d)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    up = torch.randn(n, generator=g, dtype=torch.float64)
    h, w, labels, up = h.to(device), w.to(device), labels.to(device), up.to(device)
    if lp_kernels.interpreting():  # the GPU's BLOCK_V is 128: the counts below are the interpreter's
        assert math.ceil(v / lp_kernels._chunk_columns(n, v, 2, 64, h.device)) == expected_chunks
    truth = fa.linear_logprobs(h.requires_grad_(), w.requires_grad_(), labels, backend="torch").logprobs
    truth_dh, truth_dw = torch.autograd.grad((truth * up).sum(), (h, w))
    for mode in ("gemm", "atomic"):
        monkeypatch.setenv("FASTALIGN_LOGPROBS_BWD", mode)
        hh = h.detach().to(torch.float16).requires_grad_()
        ww = w.detach().to(torch.float16).requires_grad_()
        out = fa.linear_logprobs(hh, ww, labels, backend="triton").logprobs
        dh, dw = torch.autograd.grad((out * up.float()).sum(), (hh, ww))
        same = fa.linear_logprobs(hh, ww, labels, backend="torch").logprobs
        same_dh, same_dw = torch.autograd.grad((same * up.float()).sum(), (hh, ww))
        assert_close_3way(dh, same_dh, truth_dh, torch.float16, name=f"{mode}/dh")
        assert_close_3way(dw, same_dw, truth_dw, torch.float16, name=f"{mode}/dw")


def test_dh_partials_stay_fp32_when_addmm_out_dtype_is_refused(monkeypatch):
    """Without addmm(out_dtype=float32) the dh accumulation must not round each chunk's product to bf16."""
    monkeypatch.setattr(lp_kernels, "addmm_fp32_supported", lambda device, dtype: False)
    g = torch.Generator().manual_seed(9)
    a = torch.randn(300, 512, generator=g).to(torch.bfloat16)
    b = torch.randn(512, 96, generator=g).to(torch.bfloat16)
    acc = torch.randn(300, 96, generator=g) * 100
    truth = acc.double() + a.double() @ b.double()
    out = acc.clone()
    lp_kernels._addmm_fp32_(out, a, b, rows_per_step=128)
    err = (out.double() - truth).abs().max().item()
    rounded = (acc + (a.float() @ b.float()).to(torch.bfloat16).float()).double()  # a bf16 partial
    assert err < 1e-3 < (rounded - truth).abs().max().item()


def test_addmm_fp32_check_runs_once_per_device_and_dtype(monkeypatch):
    calls = []
    monkeypatch.setattr(lp_kernels, "_ADDMM_FP32", {})
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(k) or a[0])
    assert not lp_kernels.addmm_fp32_supported(torch.device("cpu"), torch.bfloat16)  # CPU: never asked
    assert not calls
    assert lp_kernels._ADDMM_FP32 == {("cpu", torch.bfloat16): False}


# ------------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
def test_gpu_launches_follow_the_current_stream_and_capture_in_a_cuda_graph():
    """On a card: work issued on a side stream lands there (same values as on the default stream), and a whole
    forward + backward of the head captures in a CUDA graph (no host sync anywhere on the path)."""
    n, d, v = 1000, 256, 5000
    g = torch.Generator().manual_seed(11)
    h = torch.randn(n, d, generator=g).cuda().to(torch.bfloat16)
    w = (torch.randn(v, d, generator=g) / 16).cuda().to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), generator=g).cuda()
    labels[::7] = -100
    up = torch.randn(n, generator=g).cuda()

    def step():
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        out = fa.linear_logprobs(hh, ww, labels, return_entropy=True, backend="triton")
        dh, dw = torch.autograd.grad((out.logprobs * up).sum() + out.entropy.sum(), (hh, ww))
        return out.logprobs, dh, dw

    expected = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = step()
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(on_side, expected):
        torch.testing.assert_close(a, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        step()  # warm: compile, autotune, allocate outside the capture
        with torch.cuda.graph(graph):
            captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, expected):
        torch.testing.assert_close(a, b)
