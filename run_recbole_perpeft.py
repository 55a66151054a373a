"""Train and evaluate a model, RecBole style; or compare models over seeds (see recbole_perpeft/cli.py).
The other commands of ``recbole-perpeft`` work here too (``python run_recbole_perpeft.py --help``).

    python run_recbole_perpeft.py --model=GlobalPEFT --dataset=ml-100k [--key=value ...]

The same entry point is installed as the console script ``recbole-perpeft``."""

import sys

from recbole_perpeft.cli import main

if __name__ == "__main__":
    sys.exit(main())
