"""GPU sizing for the cluster: bf16 memory per model replica / training worker, replicas per node, throughput.

Why: cluster.yaml picks GPU node types for the 7B and 13B presets; these pure functions say whether a preset
fits a GPU (tests/test_cluster_config.py checks every node type with them) and fill the README's sizing table.
Everything here is an ESTIMATE from parameter counts and model dimensions (no GPU was measured):
weights in bf16, plus a KV cache and activation headroom sized by the workload, plus allocator slack and the
CUDA context. Throughput is a roofline: compute-bound encoders and prefill at an assumed utilisation, and
memory-bandwidth-bound greedy decoding.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

GIB = 1024**3
BF16_BYTES = 2
FP32_BYTES = 4
#: Per trainable parameter under AdamW with bf16 autocast: fp32 master weight + fp32 grad + exp_avg + exp_avg_sq.
ADAMW_TRAINABLE_BYTES = 4 * FP32_BYTES
#: K and V are cached per layer and token.
KV_TENSORS = 2
#: ViT MLP hidden width / model width (SAM ViT-H: 5120 / 1280); sets the size of a block's live activations.
VIT_MLP_RATIO = 4
#: Hidden-size-wide bf16 tensors alive while one decoder layer is recomputed and back-propagated under
#: gradient checkpointing: q, k, v, attention output, three MLP tensors of ~2.7x width, and their gradients.
LLM_LAYER_LIVE_WIDTHS = 24
#: PyTorch's caching allocator rarely packs tensors perfectly; headroom on top of what the tensors need.
ALLOCATOR_SLACK = 0.10
#: CUDA context, cuBLAS/cuDNN workspaces and kernels resident on the device before any tensor.
CUDA_CONTEXT_GIB = 1.0
#: Share of a GPU's memory a plan may use: these are estimates, so a fit must keep a margin.
USABLE_GPU_FRACTION = 0.95


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs to know about one GSVA preset (built from gsva.config by `shape_from_preset`)."""

    name: str
    llm_params: int  # Llama decoder incl. embed_tokens and lm_head: read once per generated token
    vision_params: int  # CLIP vision tower
    sam_encoder_params: int  # SAM image encoder
    other_params: int  # projector, SAM prompt encoder + mask decoder, text_hidden_fcs
    trainable_params: int  # what fine-tuning updates (LoRA, lm_head, embed_tokens, mask decoder, text head)
    llm_layers: int
    llm_hidden: int
    kv_dim: int  # per layer and token: num_key_value_heads * head_dim
    vocab_size: int
    image_tokens: int  # image features spliced into the LLM prompt
    clip_tokens: int  # tokens the CLIP tower runs per image (patches + CLS)
    sam_tokens: int  # tokens SAM's image encoder runs per image
    sam_dim: int
    sam_heads: int

    @property
    def total_params(self) -> int:
        return self.llm_params + self.vision_params + self.sam_encoder_params + self.other_params


@dataclass(frozen=True)
class InferenceLoad:
    """One annotate replica's working set (defaults: a generate-mode batch of Shapes/gRefCOCO-like images)."""

    images_per_batch: int = 4  # annotate --batch-size
    text_prompt_tokens: int = 96  # system prompt + question naming ~4 expressions, without image tokens
    answer_tokens: int = 48  # generated "Sure, a:[SEG], b:[REJ], ..." plus end of sequence
    expressions_per_image: int = 4
    mfu: float = 0.35  # assumed fraction of the GPU's dense bf16 peak reached by encoders and prefill
    bandwidth_efficiency: float = 0.7  # assumed fraction of memory bandwidth reached by batched decoding

    @property
    def sequence_tokens(self) -> int:
        return self.text_prompt_tokens + self.answer_tokens


@dataclass(frozen=True)
class TrainLoad:
    """One DDP training worker's working set (one GPU, gradient checkpointing on, as the official recipe)."""

    samples_per_worker: int = 20  # official GSVA batch per GPU
    text_tokens: int = 160  # system prompt, question with 3 expressions, templated answer


@dataclass(frozen=True)
class GPU:
    """A GPU model's published figures; memory as CUDA reports it (nvidia-smi total)."""

    name: str
    ray_accelerator_type: str  # what Ray's autodetection advertises as accelerator_type:<X>
    memory_gib: float
    bf16_dense_tflops: float
    bandwidth_gbs: float


@dataclass(frozen=True)
class Instance:
    """An EC2 instance type's published shape."""

    name: str
    vcpus: int
    memory_gib: int
    gpu: GPU | None = None
    gpus: int = 0


L40S = GPU("L40S", "L40S", 46068 / 1024, 362.05, 864.0)
A100_40G = GPU("A100-40G", "A100", 40960 / 1024, 312.0, 1555.0)
A100_80G = GPU("A100-80G", "A100", 81920 / 1024, 312.0, 2039.0)
H100 = GPU("H100-SXM", "H100", 81559 / 1024, 989.4, 3350.0)

INSTANCES: dict[str, Instance] = {
    i.name: i
    for i in (
        Instance("m6i.2xlarge", 8, 32),
        Instance("m6i.8xlarge", 32, 128),
        Instance("g6e.12xlarge", 48, 384, L40S, 4),
        Instance("p4d.24xlarge", 96, 1152, A100_40G, 8),
        Instance("p4de.24xlarge", 96, 1152, A100_80G, 8),
        Instance("p5.48xlarge", 192, 2048, H100, 8),
    )
}


def instance(name: str) -> Instance:
    """The catalogue entry for an EC2 instance type, with a clear error for one it does not know."""
    if name not in INSTANCES:
        raise KeyError(f"instance type {name!r} is not in pipeline.cluster.sizing.INSTANCES ({', '.join(INSTANCES)}): "
                       "add its vCPUs, memory and GPUs there before using it in cluster.yaml")
    return INSTANCES[name]


def _sam_encoder_peak_bytes(shape: ModelShape) -> int:
    """Live activations of one image in SAM's encoder: an eager global-attention map plus a block's MLP."""
    attention = shape.sam_heads * shape.sam_tokens**2 * BF16_BYTES
    block = shape.sam_tokens * shape.sam_dim * (1 + VIT_MLP_RATIO) * BF16_BYTES
    return attention + block


def _with_overheads(tensor_bytes: float) -> float:
    return tensor_bytes * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB * GIB


def inference_memory_bytes(shape: ModelShape, load: InferenceLoad = InferenceLoad()) -> float:
    """GPU memory one bf16 inference replica needs: weights + KV cache + logits + SAM activations + overheads."""
    weights = shape.total_params * BF16_BYTES
    seq = shape.image_tokens + load.sequence_tokens
    kv_cache = KV_TENSORS * shape.llm_layers * shape.kv_dim * BF16_BYTES * seq * load.images_per_batch
    logits = seq * shape.vocab_size * FP32_BYTES * load.images_per_batch  # teacher-forced keeps every position
    sam = _sam_encoder_peak_bytes(shape) * load.images_per_batch
    return _with_overheads(weights + kv_cache + logits + sam)


def training_memory_bytes(shape: ModelShape, load: TrainLoad = TrainLoad()) -> float:
    """GPU memory one DDP worker needs: frozen bf16 weights, AdamW state of the trainable part, activations.

    With gradient checkpointing the LLM keeps one hidden state per layer and sample, recomputes one layer at
    a time, and the loss needs fp32 logits and their gradient; the frozen SAM encoder runs without grad.
    """
    frozen = (shape.total_params - shape.trainable_params) * BF16_BYTES
    trainable = shape.trainable_params * ADAMW_TRAINABLE_BYTES
    seq = shape.image_tokens + load.text_tokens
    n = load.samples_per_worker
    checkpoints = shape.llm_layers * seq * shape.llm_hidden * BF16_BYTES * n
    recomputed_layer = seq * shape.llm_hidden * LLM_LAYER_LIVE_WIDTHS * BF16_BYTES * n
    logits = 2 * seq * shape.vocab_size * FP32_BYTES * n
    sam = _sam_encoder_peak_bytes(shape)  # images are encoded one micro-batch at a time, activations freed
    return _with_overheads(frozen + trainable + checkpoints + recomputed_layer + logits + sam)


def replicas_per_gpu(shape: ModelShape, gpu: GPU, load: InferenceLoad = InferenceLoad()) -> int:
    """How many inference replicas one GPU holds (0: the preset does not fit one GPU at this load)."""
    return math.floor(gpu.memory_gib * GIB * USABLE_GPU_FRACTION / inference_memory_bytes(shape, load))


def replicas_per_node(shape: ModelShape, node: Instance, load: InferenceLoad = InferenceLoad()) -> int:
    if node.gpu is None:
        return 0
    return node.gpus * replicas_per_gpu(shape, node.gpu, load)


def training_fits(shape: ModelShape, gpu: GPU, load: TrainLoad = TrainLoad()) -> bool:
    return training_memory_bytes(shape, load) <= gpu.memory_gib * GIB * USABLE_GPU_FRACTION


def images_per_second_per_gpu(shape: ModelShape, gpu: GPU, load: InferenceLoad = InferenceLoad()) -> float:
    """Roofline throughput of generate mode on one GPU (replicas sharing a GPU share this figure).

    Per image: SAM + CLIP encoders and the prompt prefill are compute-bound (2 FLOPs per parameter and token);
    each greedy decoding step reads the LLM weights once for the whole batch (bandwidth-bound).
    """
    flops = 2 * (shape.sam_encoder_params * shape.sam_tokens + shape.vision_params * shape.clip_tokens
                 + shape.llm_params * (shape.image_tokens + load.text_prompt_tokens))
    compute_s = flops / (gpu.bf16_dense_tflops * 1e12 * load.mfu)
    step_s = shape.llm_params * BF16_BYTES / (gpu.bandwidth_gbs * 1e9 * load.bandwidth_efficiency)
    decode_s_per_image = load.answer_tokens * step_s / load.images_per_batch
    return 1.0 / (compute_s + decode_s_per_image)


def inference_rows(shapes: list[ModelShape], nodes: list[Instance],
                   load: InferenceLoad = InferenceLoad()) -> list[dict]:
    """One row per (preset, GPU node type) for annotate: memory per replica, replicas and throughput per node."""
    rows = []
    for shape in shapes:
        for node in (n for n in nodes if n.gpu is not None):
            replicas = replicas_per_node(shape, node, load)
            images_s = images_per_second_per_gpu(shape, node.gpu, load) * node.gpus if replicas else 0.0
            rows.append({"preset": shape.name, "params_b": shape.total_params / 1e9, "instance": node.name,
                         "gpus": f"{node.gpus} x {node.gpu.name}",
                         "replica_gib": inference_memory_bytes(shape, load) / GIB,
                         "replicas_per_node": replicas, "images_per_s": images_s,
                         "expressions_per_s": images_s * load.expressions_per_image})
    return rows


def training_rows(shapes: list[ModelShape], nodes: list[Instance], load: TrainLoad = TrainLoad()) -> list[dict]:
    """One row per (preset, GPU node type) for train: memory per DDP worker and whether one GPU holds it."""
    return [{"preset": shape.name, "trainable_m": shape.trainable_params / 1e6, "instance": node.name,
             "gpus": f"{node.gpus} x {node.gpu.name}", "worker_gib": training_memory_bytes(shape, load) / GIB,
             "fits": training_fits(shape, node.gpu, load)}
            for shape in shapes for node in nodes if node.gpu is not None]


def _markdown(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def format_inference_table(rows: list[dict]) -> str:
    """Markdown of `inference_rows`; every computed column is labelled ESTIMATED."""
    return _markdown(
        ["preset", "params", "node", "GPUs", "GiB per replica (ESTIMATED)", "replicas per node (ESTIMATED)",
         "images/s per node (ESTIMATED)", "expressions/s per node (ESTIMATED)"],
        [[r["preset"], f"{r['params_b']:.2f} B", r["instance"], r["gpus"], f"{r['replica_gib']:.1f}",
          str(r["replicas_per_node"]), f"{r['images_per_s']:.1f}", f"{r['expressions_per_s']:.1f}"]
         for r in rows])


def format_training_table(rows: list[dict]) -> str:
    """Markdown of `training_rows`; every computed column is labelled ESTIMATED."""
    return _markdown(
        ["preset", "trainable", "node", "GPUs", "GiB per DDP worker (ESTIMATED)", "fits one GPU (ESTIMATED)"],
        [[r["preset"], f"{r['trainable_m']:.0f} M", r["instance"], r["gpus"], f"{r['worker_gib']:.1f}",
          "yes" if r["fits"] else "no"] for r in rows])


def shape_from_preset(name: str) -> ModelShape:
    """Exact parameter counts of a gsva.config preset, from the project's own builders on the meta device.

    Meta tensors have shapes but no storage, so counting a 13B model costs a second and no memory. Trainable
    parameters follow GSVA's recipe: LoRA (r x (in + out) per targeted projection), embed_tokens, lm_head,
    SAM's mask decoder and text_hidden_fcs.
    """
    import torch

    from gsva.builder import build_mllm, build_sam, build_text_hidden_fcs
    from gsva.config import preset
    from gsva.tokens import token_ids

    cfg = preset(name)
    with torch.device("meta"):
        mllm = build_mllm(cfg, token_ids(cfg).image)
        sam = build_sam(cfg.sam)
        text_fcs = build_text_hidden_fcs(cfg.llm.hidden_size, cfg.sam.prompt_dim)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    language_model, lm_head = mllm.model.language_model, mllm.lm_head
    lora = sum(cfg.lora.r * (m.in_features + m.out_features)
               for n, m in language_model.named_modules() if n.rsplit(".", 1)[-1] in cfg.lora.targets)
    embed = language_model.get_input_embeddings()
    head_dim = cfg.llm.hidden_size // cfg.llm.num_heads
    return ModelShape(
        name=name,
        llm_params=count(language_model) + count(lm_head),
        vision_params=count(mllm.model.vision_tower),
        sam_encoder_params=count(sam.image_encoder),
        other_params=(count(mllm.model.multi_modal_projector) + count(sam.prompt_encoder)
                      + count(sam.mask_decoder) + count(text_fcs)),
        trainable_params=lora + count(embed) + count(lm_head) + count(sam.mask_decoder) + count(text_fcs),
        llm_layers=cfg.llm.num_layers,
        llm_hidden=cfg.llm.hidden_size,
        kv_dim=mllm.config.text_config.num_key_value_heads * head_dim,
        vocab_size=cfg.llm.vocab_size,
        image_tokens=cfg.vision.num_image_tokens,
        clip_tokens=cfg.vision.num_image_tokens + 1,
        sam_tokens=cfg.sam.embedding_size**2,
        sam_dim=cfg.sam.encoder_dim,
        sam_heads=cfg.sam.encoder_heads,
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.cluster.sizing [PRESET ...]`: print the README's sizing tables (estimates)."""
    names = (argv if argv is not None else sys.argv[1:]) or ["gsva-7b", "gsva-13b"]
    shapes = [shape_from_preset(n) for n in names]
    gpu_nodes = [i for i in INSTANCES.values() if i.gpu is not None]
    print(format_inference_table(inference_rows(shapes, gpu_nodes)))
    print()
    print(format_training_table(training_rows(shapes, gpu_nodes)))


if __name__ == "__main__":
    main()
