"""Where our YAML property files are: a leaf module, so that code which only reads them (the dataset
preparation's command line) does not import Config and, through it, everything Config imports."""

from __future__ import annotations

from pathlib import Path

PROPERTIES_DIR = Path(__file__).resolve().parent / "properties"  # package data (setup.cfg)
