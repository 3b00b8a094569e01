"""Heads on the shared backbone, one file each."""
