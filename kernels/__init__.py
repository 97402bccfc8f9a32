"""Triton kernels and their launchers, installed as ``fastalign.kernels``: one module per op family, plus the
launcher helpers they share (``_common``). No autograd here (that is ``fastalign.ops``); see docs/architecture.md,
*Layout* and *Dependency direction*. Import a family module only after deciding on ``TRITON_INTERPRET``: Triton
reads it when the kernels are defined."""
