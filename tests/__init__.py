"""Tests of recbole_perpeft. Nothing here may reach the network: set before transformers and
huggingface_hub are imported (they read these once)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
