"""Run the ``prunekit`` CLI in-process, as a user would from a shell."""

from prunekit.cli.main import main


def run_cli(capsys, *args):
    """Exit code, stdout and stderr of ``prunekit ARGS``."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own exit for a malformed argument
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
