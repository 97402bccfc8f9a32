"""``fastalign ext build|status`` (or ``python -m fastalign.ext build|status``): build the optional compiled
extension ``fastalign._C`` ahead of time, or say whether it is available and why not. See :mod:`fastalign._ext`
for the cache and the environment flags."""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from fastalign import _ext

    parser = argparse.ArgumentParser(prog="fastalign ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="compile fastalign._C into the cache (a no-op when a matching build exists)")
    build.add_argument("--no-cuda", action="store_true", help="leave the CUDA kernels out even where nvcc exists")
    build.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    sub.add_parser("status", help="whether fastalign._C is available without building, and where it lives")
    args = parser.parse_args(argv)

    if args.command == "status":
        ok, why = _ext.status()
        cuda_ok, cuda_why = _ext.cuda_buildable()
        print(f"fastalign._C: {'available' if ok else 'unavailable'}: {why}")
        print(f"sources: {_ext.csrc_dir()}; cache: {_ext.cache_dir()}")
        print(f"CUDA kernels buildable here: {'yes' if cuda_ok else 'no'} ({cuda_why})")
        if not ok:
            print(f"build it with: {_ext.BUILD_COMMAND}")
        return 0 if ok else 1
    with_cuda = False if args.no_cuda else None
    start = time.perf_counter()
    try:
        module = _ext.build(with_cuda=with_cuda, verbose=args.verbose)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"fastalign._C ready in {time.perf_counter() - start:.1f} s: {module.__file__} "
          f"(CUDA kernels: {'yes' if module.with_cuda() else 'no'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
