"""`fastalign env` and `fastalign ext status`: the machine report and the extension's status, from the CLI."""
import subprocess
import sys

from fastalign import cli
from fastalign.env import env_report


def test_env_report_names_every_backend():
    report = env_report()
    for needle in ("torch ", "triton:", "extension fastalign._C:", "torch reference: yes", "default backend"):
        assert needle in report


def test_env_command_prints_the_report(capsys):
    assert cli.main(["env"]) == 0
    assert "extension fastalign._C:" in capsys.readouterr().out


def test_python_m_env_matches_the_command():
    out = subprocess.run([sys.executable, "-m", "fastalign.env"], capture_output=True, text=True, check=True).stdout
    assert "torch reference: yes" in out


def test_ext_status_subcommand(capsys):
    code = cli.main(["ext", "status"])
    out = capsys.readouterr().out
    assert "fastalign._C:" in out and "CUDA kernels buildable here:" in out
    assert code == (0 if "fastalign._C: available" in out else 1)


def test_ext_needs_a_subcommand(capsys):
    try:
        cli.main(["ext"])
    except SystemExit as exc:  # argparse: a usage error
        assert exc.code == 2
    else:
        raise AssertionError("fastalign ext without a subcommand must be a usage error")
    assert "build" in capsys.readouterr().err
