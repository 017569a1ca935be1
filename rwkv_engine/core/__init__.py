"""The model and nothing about editing (no imports of pipeline or cli)."""
