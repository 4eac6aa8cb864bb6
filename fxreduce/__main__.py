"""``python -m fxreduce`` and the ``fxreduce`` console script."""

import os
import sys

from .cli import main as run


def main() -> int:
    try:
        return run(sys.argv[1:])
    except BrokenPipeError:
        # The reader went away (`fxreduce cost ... | head`): stop quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
