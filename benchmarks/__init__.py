"""Side-by-side benchmarks: fastalign vs naive PyTorch, TRL, Liger-Kernel and Cut Cross-Entropy.

Run ``python -m benchmarks --help`` (or ``fastalign bench --help``). Installed as ``fastalign.benchmarks``.
"""
