"""`python -m hsnet_deploy` is the same command as `hsnet-deploy` (the GPU machine runs from source)."""

import sys

from hsnet_deploy.termination import EXIT_INTERRUPTED


def run() -> None:
    """The console script. Ctrl-C while the command's modules load (a second or two, before `main` takes signals
    over) exits 130 like a Ctrl-C at any other moment, without the import's traceback."""
    try:
        from hsnet_deploy.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        sys.exit(EXIT_INTERRUPTED)
    main()


if __name__ == "__main__":
    run()
