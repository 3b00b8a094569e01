"""WinCLIP's compositional prompt ensemble (Jeong et al., CVPR 2023, §3.2 and Appendix).

A prompt is ``template.format(state.format(object))``: every state word of a class (normal or
anomalous) in every template. Two sets are provided:

* ``"paper"`` — 7 normal and 5 anomalous states and 22 templates, the lists of the paper as
  re-used by later work (APRIL-GAN, AnomalyCLIP);
* ``"anomalib"`` — anomalib 2.7's ``winclip/prompting.py``: the paper's lists without
  ``"broken {}"`` and without two templates, one template repeated (for comparing with it).
"""

from __future__ import annotations

NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")

TEMPLATES = (
    "a cropped photo of the {}.", "a cropped photo of a {}.",
    "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.",
    "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)

ANOMALIB_ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
ANOMALIB_TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.",
    "a dark photo of a {}.", "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.",
    "a photo of a small {}.", "a photo of the small {}.", "a photo of a large {}.",
    "a photo of the large {}.", "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.", "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

PROMPT_SETS = {
    "paper": (NORMAL_STATES, ANOMALOUS_STATES, TEMPLATES),
    "anomalib": (NORMAL_STATES, ANOMALIB_ANOMALOUS_STATES, ANOMALIB_TEMPLATES),
}


def state_prompts(object_name: str, prompt_set: str = "paper") -> tuple[list[str], list[str]]:
    """The normal and the anomalous prompts for ``object_name`` (states outer, templates inner)."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; choose from {list(PROMPT_SETS)}")
    normal, anomalous, templates = PROMPT_SETS[prompt_set]

    def compose(states):
        return [t.format(s.format(object_name)) for s in states for t in templates]

    return compose(normal), compose(anomalous)
