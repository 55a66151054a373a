"""Train and evaluate a model, RecBole style; or compare models over seeds (see recbole_perpeft/cli.py).

    python run_recbole_perpeft.py --model=GlobalPEFT --dataset=ml-100k [--key=value ...]

The same entry point is installed as the console script ``recbole-perpeft``."""

from recbole_perpeft.cli import main

if __name__ == "__main__":
    main()
