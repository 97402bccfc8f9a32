"""Packaging glue that pyproject.toml cannot express: `kernels/` and `benchmarks/` live at the top level of the
repository (DESIGN.md) but are installed as the subpackages `fastalign.kernels` and `fastalign.benchmarks`.

No compiler step: the optional C++/CUDA extension `fastalign._C` is built on first use (JIT, cached) or ahead of
time with `FASTALIGN_BUILD_EXT=1 python -m fastalign.ext build` — never by a plain install.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastalign", "fastalign.*"])
packages += ["fastalign.kernels", "fastalign.benchmarks"]

setup(
    packages=packages,
    package_dir={"fastalign.kernels": "kernels", "fastalign.benchmarks": "benchmarks"},
    package_data={"fastalign": ["data/*", "data/**/*"], "fastalign.benchmarks": ["*.sh"]},
    include_package_data=True,
)
