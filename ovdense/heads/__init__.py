"""Heads on the shared backbone: one file per head (a package by part, or a second file,
where one passes ~500 lines: ``san/``, ``fvit.py`` + ``fvit_parts.py``), each registered once in
``ovdense.registry``."""
