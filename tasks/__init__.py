"""Flyte tasks: thin typed wrappers over miles_lib (no algorithm code here)."""
