"""Anomaly maps for defect localisation: WinCLIP / WinCLIP+ (``winclip.py``)."""
