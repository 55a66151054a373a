"""Experiments as committed data: their summaries, the pages rendered from them (later: plans and executors)."""
