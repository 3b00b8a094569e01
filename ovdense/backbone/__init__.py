"""The shared CLIP backbone: ``clip.py`` (open_clip wrapper and name resolution),
``dense.py`` (training-free last-block variants), ``prompts.py`` (templates, vocabularies,
text cache)."""
