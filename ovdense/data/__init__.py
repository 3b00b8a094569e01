"""Synthetic world and readers/writers of the real dataset layouts."""
