"""Metrics: segmentation mIoU (mmseg rules) and anomaly detection."""
