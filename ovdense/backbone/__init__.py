"""The shared CLIP backbone: ``clip.py`` (open_clip wrapper, name resolution, weights),
``text.py`` (the shortest-context text pass), ``dense.py`` (training-free last-block variants),
``runner.py`` (blocks with taps and masks, for the trained heads), ``protocols.py`` (the
methods' papers and official defaults, torch-free), ``prompts.py`` (templates, vocabularies,
class lists, text cache)."""
