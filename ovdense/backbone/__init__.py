"""The shared CLIP backbone: ``clip.py`` (open_clip wrapper, name resolution, text encoding),
``dense.py`` (training-free last-block variants), ``protocols.py`` (the methods' papers and
official defaults, torch-free), ``prompts.py`` (templates, vocabularies, text cache)."""
