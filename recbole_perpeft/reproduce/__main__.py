"""``python -m recbole_perpeft.reproduce``: the old form of ``recbole-perpeft reproduce`` (reproduce/cli.py),
kept for one release."""

from recbole_perpeft.cli_common import deprecated_alias
from recbole_perpeft.reproduce.cli import main

if __name__ == "__main__":
    deprecated_alias("python -m recbole_perpeft.reproduce", "recbole-perpeft reproduce")
    main()
