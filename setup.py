"""Packaging glue that pyproject.toml cannot express: `kernels/` and `benchmarks/` live at the top level of the
repository (docs/architecture.md, *Layout*) but are installed as the subpackages `fastalign.kernels` and `fastalign.benchmarks`.

No compiler step: the optional C++/CUDA extension `fastalign._C` is built on first use (JIT, cached) or ahead of
time with `FASTALIGN_BUILD_EXT=1 python -m fastalign.ext build` — never by a plain install.
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
MAPPED = {"fastalign.kernels": "kernels", "fastalign.benchmarks": "benchmarks"}
MAPPED = {pkg: path for pkg, path in MAPPED.items() if os.path.isfile(os.path.join(HERE, path, "__init__.py"))}
if os.path.isfile(os.path.join(HERE, "csrc", "bindings.cpp")):  # fastalign._C sources, shipped as data
    MAPPED["fastalign.csrc"] = "csrc"

setup(
    packages=find_packages(include=["fastalign", "fastalign.*"]) + sorted(MAPPED),
    package_dir=MAPPED,
    package_data={"fastalign": ["data/*", "data/**/*"], "fastalign.benchmarks": ["*.sh"],
                  "fastalign.kernels": ["configs/*.json", "configs/*.md"],
                  "fastalign.csrc": ["*.h", "*.cpp", "*/*.h", "*/*.cpp", "*/*.cu"]},
    include_package_data=True,
)
