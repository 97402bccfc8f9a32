"""Compile-only checks of the log-prob kernels for sm_90 (H100/H200), with the GPU configs the launchers use."""
import pytest

pytest.importorskip("triton")

from helpers.compile import compile_in_subprocess  # noqa: E402

from fastalign.kernels.logprobs import _GPU_BLOCKS  # noqa: E402

_FWD = "fastalign.kernels.logprobs:_linear_logprobs_fwd_kernel"
_BWD = "fastalign.kernels.logprobs:_linear_logprobs_bwd_kernel"


def _launch_opts(kind):
    cfg = dict(_GPU_BLOCKS[kind])
    return cfg.pop("num_warps"), cfg.pop("num_stages"), cfg


def _optional(flag, dtype):
    """An optional input or output as a launch passes it: a tensor of ``dtype`` when used, else None."""
    return dtype if flag else None


def _scalars(flag):
    """inv_temperature always; softcap a float when set, else None (a constexpr, HAS_SOFTCAP=False)."""
    return (["inv_temperature", "softcap"], {}) if flag else (["inv_temperature"], {"softcap": None})


def _fwd_job(dtype, flag):
    warps, stages, blocks = _launch_opts("fwd")
    floats, absent = _scalars(flag)
    return dict(
        kernel=_FWD, num_warps=warps, num_stages=stages, floats=floats,
        pointers=dict(h_ptr=dtype, w_ptr=dtype, b_ptr=_optional(flag, dtype), labels_ptr="i64", row_idx_ptr="i64",
                      count_ptr="i32", m_ptr="fp32", s_ptr="fp32", t_ptr=_optional(flag, "fp32"), zy_ptr="fp32"),
        constexprs=dict(UPCAST=False, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", **absent, **blocks),
    )


def _bwd_job(dtype, flag, write_dz):
    warps, stages, blocks = _launch_opts("bwd")
    floats, absent = _scalars(flag)
    return dict(
        kernel=_BWD, num_warps=warps, num_stages=stages, floats=floats,
        pointers=dict(h_ptr=dtype, w_ptr=dtype, b_ptr=_optional(flag, dtype), labels_ptr="i64", row_idx_ptr="i64",
                      count_ptr="i32", lse_ptr="fp32", mu_ptr=_optional(flag, "fp32"), g_ptr="fp32",
                      e_ptr=_optional(flag, "fp32"), dz_ptr=_optional(write_dz, dtype),
                      dh_ptr=_optional(not write_dz, "fp32"), dw_ptr=_optional(not write_dz, "fp32"),
                      db_ptr=_optional(flag, "fp32")),
        constexprs=dict(UPCAST=False, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", **absent, **blocks),
    )


JOBS = {
    "fwd": _fwd_job,
    "bwd-dz": lambda dtype, flag: _bwd_job(dtype, flag, write_dz=True),
    "bwd-atomic": lambda dtype, flag: _bwd_job(dtype, flag, write_dz=False),
}
CASES = [(kind, dtype, flag) for kind in JOBS for dtype, flag in (("bf16", True), ("bf16", False), ("fp32", True))]


@pytest.fixture(scope="module")
def results():
    jobs = [JOBS[kind](dtype, flag) for kind, dtype, flag in CASES]
    return dict(zip(CASES, compile_in_subprocess(jobs)))


@pytest.mark.parametrize("case", CASES, ids=[f"{k}-{d}-{'all' if f else 'plain'}" for k, d, f in CASES])
def test_kernel_compiles_for_sm90(results, case):
    res = results[case]
    assert res["ok"], res["error"]
    assert res["cubin_bytes"] > 0
    assert res["shared"] <= 227 * 1024  # fits one H100/H200 SM's shared memory
