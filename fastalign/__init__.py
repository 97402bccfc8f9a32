"""fastalign: fused ops and a minimal trainer for LLM alignment."""
__version__ = "0.1.0"

from fastalign.ops import *  # noqa: F401,F403,E402
from fastalign.ops import __all__ as _ops_all  # noqa: E402
from fastalign.integrations.transformers import patch  # noqa: E402  (imports transformers only when called)

__all__ = ["__version__", *_ops_all, "patch"]
