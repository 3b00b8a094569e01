"""mmdet-style config dicts read in plain torch: what training alone reads is skipped, what the
plain path does not reproduce is refused with one ``OvdenseError``."""

from __future__ import annotations

from ovdense.errors import OvdenseError

#: config keys that matter only to training (losses, samplers, init); ignored at inference.
TRAIN_ONLY = {"loss_cls", "loss_bbox", "loss_mask", "init_cfg", "train_cfg", "reg_decoded_bbox",
              "predict_box_type", "type", "requires_grad"}


def unsupported(what: str) -> OvdenseError:
    """The error for an option the plain-torch detector does not reproduce."""
    return OvdenseError(f"the plain-torch detector does not reproduce {what}; run this head through mmdet "
                        "(python tools/test.py CONFIG) or train one with the options of configs/ovdet/")


def check_keys(where: str, cfg: dict, known: set[str]) -> None:
    """Refuse keys of ``cfg`` that are neither ``known`` nor training-only."""
    extra = sorted(set(cfg) - known - TRAIN_ONLY)
    if extra:
        raise unsupported(f"{where} option(s) {extra}")


def is_relu(act_cfg) -> bool:
    """mmcv activation configs: ``None`` (none) or ``ReLU`` (the only one the configs use)."""
    if act_cfg is None:
        return False
    if dict(act_cfg).get("type") == "ReLU":
        return True
    raise unsupported(f"activation {act_cfg!r}")


def pop_type(cfg, expected: str, where: str) -> dict:
    """A copy of ``cfg`` without its ``type``, which must be ``expected`` (or absent)."""
    cfg = dict(cfg)
    kind = cfg.pop("type", expected)
    if kind != expected:
        raise unsupported(f"{where} type {kind!r} (expected {expected})")
    return cfg
