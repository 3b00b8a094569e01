"""SAN: the side adapter network on the shared frozen CLIP backbone.

Xu et al., "Side Adapter Network for Open-Vocabulary Semantic Segmentation", CVPR 2023. The
official code is MendelXu/SAN (detectron2): ``san/model/san.py`` (the model),
``san/model/side_adapter/side_adapter.py`` (``RegionwiseSideAdapterNetwork``, ``MLPMaskDecoder``),
``san/model/layers.py`` (``AddFusion``, ``MLP``), ``san/model/clip_utils/visual.py``
(``FeatureExtractor``, ``RecWithAttnbiasHead._build_attn_biases``) and
``san/model/clip_utils/classifier.py`` (``LearnableBgOvClassifier``); mmsegmentation 1.2.2
re-implements it as ``SideAdapterCLIPHead`` + ``MultimodalEncoderDecoder``. This package follows the
two where they agree and the official code where they differ (said where it happens).

For an image ``I`` (normalised, ``H × W`` multiples of 32) and ``C`` class embeddings ``t_c``:

1. CLIP input ``I' = bilinear(I, ×s)`` (``s`` = 0.5; 0.7 for ViT-L/14-336, the official
   ``CLIP_RESOLUTION``). The trunk runs CLIP's first ``K`` blocks unchanged (9 of 12 for B/16,
   18 of 24 for L/14, ``FEATURE_LAST_LAYER_IDX``) with SAN's own trained copy of the position
   embedding (bicubic to the grid by size, ``resize_pos_embed2d``), keeping the tokens
   ``F_j`` after ``ln_pre`` (``j = 0``) and after blocks ``j`` (1-indexed: 3, 6, 9 for B/16).
2. Side network on ``I``: a plain ViT (patch 16, width 240, 6 heads, MLP 960, 8 blocks, no
   class token, no final norm) over ``[Q queries; patches]``; ``x₀ = [q; P] + [e_q; e_P]`` and
   after every block but the last the position embeddings are added again. The fusion map
   ``j → i`` ("0→0, 3→1, 6→2, 9→3") adds ``resize(Conv1×1(LN2d(F_j)))`` (bilinear to the side
   grid) to the patch tokens after side block ``i`` (``i = 0``: before the first block).
3. MLP mask decoder on the tokens after side blocks 7 and 8 (3 layers, ReLU, 240 → 256):
   ``q' = MLP_q(q)``, ``P' = MLP_p(P)``, masks ``M = ⟨q', P'⟩`` at 1/16, and per CLIP head
   ``n`` the attention bias ``B_n = a·⟨q', MLP_b(P)_n⟩ + b`` (``a, b`` one learned scalar pair).
4. Recognition: ``Q`` [SOS] tokens, copies of the trunk's class token, run through CLIP's last
   blocks (3 for B/16) together with ``[cls; patches]`` under the mask of ``_build_attn_biases``:
   ``B`` max-pooled to the CLIP grid; [SOS]ᵢ → patches: ``B``; [SOS]ᵢ → [SOS]ᵢ: 0; every
   token → another [SOS] and [SOS] → cls: −100; cls/patches → cls/patches: 0. Then ``ln_post``
   and ``proj``: embeddings ``e_q``.
5. Class logits ``exp(τ)·cos(e_q, t_c)`` over ``[t_1 … t_C; t_void]`` (a learned void
   embedding appended, the set renormalised; ``τ`` CLIP's logit scale); semantic scores
   ``S_c = Σ_q softmax(logits_q)_c · sigmoid(M_q)`` for ``c < C``, at the image's resolution.

What SAN trains lives in ``SanHead`` (side network, fusion, decoder, the CLIP position
embedding copy, the void embedding: 8.37 M parameters for B/16); the CLIP weights stay the
backbone's and never enter the head's state dict or optimizer.

Departures from mmseg 1.2.2, following the official code: SanSegmenter resizes the mask
logits to the image before the sigmoid (``sem_seg_postprocess`` before ``semantic_inference``,
``SEM_SEG_POSTPROCESS_BEFORE_INFERENCE = True``) where mmseg resizes the semantic scores.
ovdense additions: classes may have synonyms (each synonym is a prompt; a class's score is
the max over its synonyms); a CLIP input that is not a patch multiple is cropped to one
(the official ``conv1`` drops the same remainder).

The package: ``model.py`` (configuration, side network, ``SanHead``, semantic scores) and
``segmenter.py`` (checkpoints and ``SanSegmenter``); every name is importable from here.
"""

from ovdense.heads.san.model import (
    HEAD_FORMAT,
    TEST_LONG_SIDE,
    VILD_TEMPLATES,
    Fusion,
    LayerNorm2d,
    MaskDecoder,
    Mlp,
    SanConfig,
    SanHead,
    SanOutput,
    SideAttention,
    SideBlock,
    SideMlp,
    build_attn_mask,
    semantic_scores,
)
from ovdense.heads.san.segmenter import (
    TOY_HEAD_FILE,
    SanSegmenter,
    default_head_checkpoint,
    head_parameters,
    load_head,
    save_head,
)

__all__ = [
    "HEAD_FORMAT", "TEST_LONG_SIDE", "TOY_HEAD_FILE", "VILD_TEMPLATES", "Fusion", "LayerNorm2d",
    "MaskDecoder", "Mlp", "SanConfig", "SanHead", "SanOutput", "SanSegmenter", "SideAttention",
    "SideBlock", "SideMlp", "build_attn_mask", "default_head_checkpoint", "head_parameters",
    "load_head", "save_head", "semantic_scores",
]
