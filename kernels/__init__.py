"""Triton kernels, installed as ``fastalign.kernels``: ``@triton.jit`` functions only (launchers live in
``fastalign.ops``). Import this package only after deciding on ``TRITON_INTERPRET``: Triton reads it at import."""
