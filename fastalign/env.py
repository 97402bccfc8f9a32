"""``python -m fastalign.env`` (same as ``fastalign env``): which backends are present here, and why not."""
from fastalign.cli import env_report

if __name__ == "__main__":
    print(env_report())
