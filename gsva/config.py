"""Typed, frozen model configuration and the preset registry (name -> GSVAConfig).

Why frozen dataclasses: a config is a value that is validated once, saved verbatim as ``config.json``
next to the weights, and compared; nothing mutates it after construction. Every size used by the
builder, the preprocessing and the predictor comes from here (image sizes, patch grids, token strings,
pixel statistics), so a checkpoint carries all the constants needed to use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Pixel statistics of the pretrained encoders (facts: SAM and OpenAI-CLIP preprocessing), 0..255 scale.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# OpenAI CLIP statistics on the 0..1 scale (CLIPImageProcessor defaults).
CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
# Prediction modes: "generate" (annotation: the model writes its answer) and "teacher-forced" (the official
# GRES evaluation: one forward over the ground-truth answer).
GENERATE, TEACHER_FORCED = "generate", "teacher-forced"
MODES = (GENERATE, TEACHER_FORCED)
# Trainable policies (gsva.freeze) and the dtypes weights are stored in; torch-free so configs can check them.
ASPECTS = ("crop", "pad")
POLICIES = ("lora", "llm", "llm-sam", "all", "clip", "sam", "projector", "mllm")
DTYPES = ("float32", "bfloat16", "float16")
#: The official conv_type choices (gsva.prompts.TEMPLATES holds their strings).
CONVERSATIONS = ("llava_v1", "llava_llama_2")


@dataclass(frozen=True)
class LLMConfig:
    """Llama decoder (the LLaVA language model)."""

    vocab_size: int  # rows of embed_tokens / lm_head, including GSVA's added tokens and <image>
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower; features from hidden layer ``feature_layer``, CLS dropped."""

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    feature_layer: int = -2
    #: "crop": shortest edge to image_size, centre crop (CLIP's processor; what GSVA and LISA use).
    #: "pad": pad to a square with the mean colour, then resize (LLaVA-1.5's ``image_aspect_ratio=pad``):
    #: nothing of a non-square image is cut off.
    aspect: str = "crop"
    layer_norm_eps: float = 1e-5
    pixel_mean: tuple[float, float, float] = CLIP_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = CLIP_PIXEL_STD

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class SAMConfig:
    """SAM image encoder (ViT), prompt encoder and mask decoder sizes."""

    image_size: int
    patch_size: int
    encoder_dim: int
    encoder_depth: int
    encoder_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    prompt_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for ViT-H at 1024 px)."""
        return self.image_size // self.patch_size

    @property
    def low_res_mask_size(self) -> int:
        """Side of the decoder's mask logits: SAM upscales the embedding grid 4x (256 for ViT-H)."""
        return 4 * self.embedding_size


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the LLM's attention projections (GSVA: q_proj, v_proj; alpha 16; dropout 0.05)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class TokensConfig:
    """Token strings; ids are always looked up in the tokenizer (see gsva.tokens)."""

    seg: str = "[SEG]"
    rej: str = "[REJ]"
    im_start: str = "<im_start>"
    im_end: str = "<im_end>"
    image: str = "<image>"


@dataclass(frozen=True)
class GSVAConfig:
    """The whole model. ``tokenizer`` is "builtin-bpe" (built offline by gsva.tokens, tiny presets)
    or "pretrained" (LLaVA's sentencepiece model, saved with the checkpoint); ``conversation`` is the official
    ``conv_type`` the weights were trained with (gsva.prompts)."""

    name: str
    llm: LLMConfig
    vision: VisionConfig
    sam: SAMConfig
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    tokenizer: str = "builtin-bpe"
    conversation: str = "llava_v1"  # official conv_type: "llava_v1" (every official script) or "llava_llama_2"
    max_expressions_per_prompt: int = 3  # K of a training sample (official num_classes_per_sample default)
    max_new_tokens_per_expression: int = 24  # free generation budget per expression
    seed: int = 0  # random initialisation of presets

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GSVAConfig:
        """Inverse of to_dict (JSON turns tuples into lists; unknown keys are an error)."""
        def sub(kind, value):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(value) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})

        parts = {"llm": LLMConfig, "vision": VisionConfig, "sam": SAMConfig, "lora": LoRAConfig,
                 "tokens": TokensConfig}
        top = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - top
        if unknown:
            raise ValueError(f"unknown GSVAConfig fields: {sorted(unknown)}")
        kwargs = {k: sub(parts[k], v) if k in parts else v for k, v in data.items()}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> GSVAConfig:
        return dataclasses.replace(self, **changes)


def validate(cfg: GSVAConfig) -> None:
    """Reject inconsistent sizes before anything is built (clear messages, no asserts)."""
    problems = []
    if cfg.llm.hidden_size % cfg.llm.num_heads:
        problems.append(f"llm.hidden_size {cfg.llm.hidden_size} not divisible by num_heads {cfg.llm.num_heads}")
    if cfg.vision.image_size % cfg.vision.patch_size:
        problems.append("vision.image_size must be a multiple of vision.patch_size")
    if cfg.vision.aspect not in ASPECTS:
        problems.append(f"vision.aspect must be one of {ASPECTS}, not {cfg.vision.aspect!r}")
    if cfg.vision.hidden_size % cfg.vision.num_heads:
        problems.append("vision.hidden_size must be divisible by vision.num_heads")
    if cfg.sam.image_size % cfg.sam.patch_size:
        problems.append("sam.image_size must be a multiple of sam.patch_size")
    if cfg.sam.encoder_dim % cfg.sam.encoder_heads:
        problems.append("sam.encoder_dim must be divisible by sam.encoder_heads")
    # TwoWayTransformer's cross attention halves the width; the upscaler divides it by 8.
    if cfg.sam.prompt_dim % 8 or (cfg.sam.prompt_dim // 2) % cfg.sam.decoder_heads:
        problems.append("sam.prompt_dim must be a multiple of 8 and prompt_dim/2 divisible by decoder_heads")
    if cfg.sam.mask_in_chans % 4:
        problems.append("sam.mask_in_chans must be a multiple of 4")
    if any(i < 0 or i >= cfg.sam.encoder_depth for i in cfg.sam.global_attn_indexes):
        problems.append("sam.global_attn_indexes must lie in [0, encoder_depth)")
    if cfg.tokenizer not in ("builtin-bpe", "pretrained"):
        problems.append(f"tokenizer must be 'builtin-bpe' or 'pretrained', not {cfg.tokenizer!r}")
    if cfg.conversation not in CONVERSATIONS:
        problems.append(f"conversation must be one of {CONVERSATIONS}, not {cfg.conversation!r}")
    if cfg.max_expressions_per_prompt < 1:
        problems.append("max_expressions_per_prompt must be >= 1")
    if cfg.lora.r < 1:
        problems.append("lora.r must be >= 1")
    if problems:
        raise ValueError(f"invalid GSVA config {cfg.name!r}: " + "; ".join(problems))


def sam_differences(a: GSVAConfig, b: GSVAConfig) -> list[str]:
    """The SAM config fields in which two configs differ: a SAM base combines with a LLaVA base when none do."""
    return [f"sam.{f.name}" for f in dataclasses.fields(a.sam) if getattr(a.sam, f.name) != getattr(b.sam, f.name)]


# ----------------------------------------------------------------------------------------------- presets
# GSVA's vocabulary: 32000 Llama tokens + [SEG], [REJ], <im_start>, <im_end> + <image> (transformers'
# Llava needs a real image placeholder token; GSVA uses the sentinel -200 instead).
LLAMA_VOCAB = 32000
GSVA_ADDED_TOKENS = 5

CLIP_VIT_L14_224 = VisionConfig(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                num_layers=24, num_heads=16)
SAM_VIT_H = SAMConfig(image_size=1024, patch_size=16, encoder_dim=1280, encoder_depth=32, encoder_heads=16,
                      global_attn_indexes=(7, 15, 23, 31), window_size=14)

PRESETS: dict[str, GSVAConfig] = {
    # Seconds on a CPU: for tests and wiring.
    "tiny": GSVAConfig(
        name="tiny",
        llm=LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4),
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=2),
        sam=SAMConfig(image_size=64, patch_size=8, encoder_dim=32, encoder_depth=2, encoder_heads=2,
                      global_attn_indexes=(1,), window_size=4, prompt_dim=32, decoder_depth=2,
                      decoder_mlp_dim=64, decoder_heads=2, iou_head_hidden_dim=32),
        lora=LoRAConfig(r=4, alpha=16, dropout=0.05),
    ),
    # Trained from scratch on Shapes-GRES on a CPU: 128 px for both towers; SAM's 16x16 grid gives
    # 64x64 mask logits, i.e. 2 input pixels per logit before bilinear upsampling. CLIP pads to a square
    # (LLaVA-1.5's image_aspect_ratio=pad) instead of the official centre crop: on these 96-160 px non-square
    # images the crop cuts into 19 % of the objects. The padded chain scored val gIoU 0.62 / N-acc 0.98;
    # the same GSVA stage on cropped bases 0.58 / 0.85 (README, "The shipped Shapes-GRES model").
    "shapes": GSVAConfig(
        name="shapes",
        llm=LLMConfig(vocab_size=768, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4),
        vision=VisionConfig(image_size=128, patch_size=16, hidden_size=128, intermediate_size=512,
                            num_layers=4, num_heads=4, aspect="pad"),
        sam=SAMConfig(image_size=128, patch_size=8, encoder_dim=128, encoder_depth=4, encoder_heads=4,
                      global_attn_indexes=(1, 3), window_size=8, prompt_dim=128, decoder_depth=2,
                      decoder_mlp_dim=512, decoder_heads=4, iou_head_hidden_dim=128),
        lora=LoRAConfig(r=8, alpha=16, dropout=0.05),
    ),
    # LLaVA-Lightning-7B-v1-1 (Vicuna v1.1) + CLIP ViT-L/14-224 + SAM ViT-H.
    "gsva-7b": GSVAConfig(
        name="gsva-7b",
        llm=LLMConfig(vocab_size=LLAMA_VOCAB + GSVA_ADDED_TOKENS, hidden_size=4096, intermediate_size=11008,
                      num_layers=32, num_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6),
        vision=CLIP_VIT_L14_224, sam=SAM_VIT_H, tokenizer="pretrained",
        lora=LoRAConfig(r=8, alpha=16, dropout=0.05),
    ),
    # llava-llama-2-13b-chat-lightning-preview + CLIP ViT-L/14-224 + SAM ViT-H. Conversation llava_v1, not the
    # [INST] template: the official scripts pass no --conv_type, so the released 13B weights used the default.
    "gsva-13b": GSVAConfig(
        name="gsva-13b",
        llm=LLMConfig(vocab_size=LLAMA_VOCAB + GSVA_ADDED_TOKENS, hidden_size=5120, intermediate_size=13824,
                      num_layers=40, num_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision=CLIP_VIT_L14_224, sam=SAM_VIT_H, tokenizer="pretrained", conversation="llava_v1",
        lora=LoRAConfig(r=64, alpha=16, dropout=0.05),
    ),
}


def preset(name: str) -> GSVAConfig:
    """The named preset, or a clear error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown GSVA preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
