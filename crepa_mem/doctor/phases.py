"""In which phase memory ran out, from traceback frames: diffusers' module paths, and the model code
trainers ship themselves (Wan's `wan/modules/`, HunyuanVideo's `hyvideo/` and musubi-tuner's
`hunyuan_model/`, LTX-Video's `ltx_video/`, ComfyUI's `comfy/ldm/`, VideoX-Fun's `*transformer3d*.py`),
recognised by path, function and class names. Also: whether the failing call was a pinned host copy.

Each frame gets a phase and a strength; the innermost strong frame decides, a weak one (a generic
attention function shared by DiTs and text encoders) only when no frame is strong. Pure text.
"""
from __future__ import annotations

import re
from typing import Iterable

Frame = tuple  # (file, func, source line)

_VAE_FUNCS = {"_decode_latents", "iter_decoded_frames", "decode_selected", "decode_kept_frames", "_decode_clip",
              "tiled_decode", "_temporal_tiled_decode", "decode", "_decode"}
_VAE_DECODE_ANYWHERE = {"vae_decode", "decode_latents", "_decode_latents", "decode_first_stage", "tiled_decode",
                        "spatial_tiled_decode", "temporal_tiled_decode", "decode_tiled", "decode_tiled_",
                        "decode_tiled_3d", "decode_tiled_1d", "iter_decoded_frames", "decode_kept_frames"}
_ENC_FUNCS = {"_encode_frames", "_forward_encoder", "_load_encoder", "forward_features", "encode_tokens",
              "prepare_images"}
_PROJ_FUNCS = {"_project_hidden_states", "project", "compute_loss", "frame_similarity", "align_tokens",
               "resample_tokens"}
_BACKWARD = ("_engine_run_backward", "run_backward")
_DIT_FUNCS = {"model_predict", "call_dit", "apply_model", "_apply_model", "calc_cond_batch", "_calc_cond_batch",
              "sampling_function"}
_ATTENTION_FUNCS = {"attention", "flash_attention", "pay_attention", "sage_attention", "attention_pytorch",
                    "attention_sage", "attention_xformers", "attention_split", "attention_sub_quad", "attention_flash",
                    "optimized_attention", "scaled_dot_product_attention"}
_COMFY_VAE_FUNCS = {"decode", "decode_tiled", "decode_tiled_", "decode_tiled_1d", "decode_tiled_3d", "encode_tiled",
                    "encode_tiled_", "encode_tiled_3d"}  # not `encode`: comfy/sd.py's CLIP has one too

# class names as they show in source lines and messages
_VAE_CLASSES = re.compile(r"\b(?:AutoencoderKL\w*|WanVAE\w*|CausalVideoAutoencoder|AutoencoderKLCausal3D|Decoder3d"
                          r"|VideoDecoder|TAESD\w*)\b")
_DIT_CLASSES = re.compile(r"\b(?:WanModel|WanAttentionBlock|WanSelfAttention|HYVideoDiffusionTransformer"
                          r"|MMDoubleStreamBlock|MMSingleStreamBlock|Transformer3DModel|LTXVModel|\w+Transformer3DModel"
                          r"|BasicTransformerBlock)\b")
_ENC_CLASSES = re.compile(r"\b(?:Dinov2Model|Dinov2WithRegistersModel|DinoVisionTransformer)\b")

_VAE_FILE = re.compile(r"(?:^|_)vae(?:\d|_|\.py$)|autoencoder|taesd|^wan_decode\.py$")  # wan_decode: crepa-mem's
_VAE_DIR = re.compile(r"/(?:autoencoders?|vae|taesd)/")
_FAMILY_DIR = re.compile(r"/(?:wan/modules|wan/models|hyvideo/modules|hunyuan_model|hunyuan_video|ltx_video/models"
                         r"|comfy/ldm/(?!modules/)\w+)/")
_COND_FILE = re.compile(r"modeling_(?:t5|umt5|mt5|clip|llama|llava\w*|qwen\w*|gemma\w*|siglip\w*|mistral\w*)\.py$"
                        r"|/wan/modules/(?:t5|clip|tokenizers|xlm_roberta)\.py$|/comfy/text_encoders/"
                        r"|/comfy/sd1_clip\.py$|/comfy/clip_(?:model|vision)\.py$|/text_encoders?/|text_embeds\.py$"
                        r"|/hunyuan_model/text_encoder")
_COND_FUNCS = {"encode_prompt", "_encode_prompt", "encode_prompts", "_encode_prompts", "encode_from_tokens",
               "encode_token_weights", "get_text_embeddings", "encode_image", "encode_clip_vision"}


def _norm(path: str) -> str:
    return "/" + path.replace("\\", "/").lower().lstrip("/")


def basename(path: str) -> str:
    return re.split(r"[/\\]", path)[-1]  # Windows tracebacks too


def frame_phase(file: str, func: str, src: str) -> tuple[str | None, bool, str | None]:
    """(phase, strong, where-override) of one frame. Phase 'conditioning' is a text or image encoder
    that conditions the DiT: not CREPA's teacher, reported as phase unknown."""
    f = _norm(file)
    name = basename(f)
    crepa_file = "crepa" in f  # SimpleTuner's helpers/training/crepa.py or the crepa_mem package
    if _VAE_DIR.search(f) or "autoencoder_kl" in f or _VAE_FILE.search(name) \
            or f.endswith("/comfy/ldm/modules/diffusionmodules/model.py") \
            or (f.endswith("/comfy/sd.py") and func in _COMFY_VAE_FUNCS):
        return "vae_decode", True, None  # before the encoder rules: a VAE has an `encoder` too
    if "projector" in func.lower() or re.search(r"projector\(|_project_hidden_states", src) \
            or (crepa_file and func in _PROJ_FUNCS):
        return "projector", True, None
    if "dinov2" in f or func in _ENC_FUNCS or _ENC_CLASSES.search(src) \
            or re.search(r"_encode_frames|_forward_encoder|encode_tokens", src) \
            or (crepa_file and "self.encoder(" in src):
        return "encoder", True, None
    if (func in _VAE_FUNCS and crepa_file) or func in _VAE_DECODE_ANYWHERE or _VAE_CLASSES.search(src) \
            or re.search(r"vae\.(?:model\.)?decode\(|first_stage_model\.decode\(|_decode_latents|decode_latents\("
                         r"|iter_decoded_frames", src) \
            or (f.endswith("/nodes.py") and func == "decode" and "comfy" in f):
        return "vae_decode", True, None
    if _COND_FILE.search(f) or func in _COND_FUNCS:
        vision = re.search(r"vision|visual|siglip|/clip\.py$", f) or "image" in func
        return "conditioning", True, "image_encoder" if vision else "text_encoder"
    if re.search(r"/transformers/transformer_|transformer_(wan|ltx|sana|kandinsky|hunyuan)", f) \
            or ("transformer" in name and "/transformers/models/" not in f) \
            or _FAMILY_DIR.search(f) or func in _DIT_FUNCS or func in _BACKWARD or _DIT_CLASSES.search(src) \
            or re.search(r"/comfy/(?:samplers|model_base)\.py$|/comfy/k_diffusion/", f) \
            or re.search(r"\.backward\(|self\.transformer\(|self\.model\(|self\.dit\(", src):
        return "transformer", True, None
    if func in _ATTENTION_FUNCS or f.endswith(("/comfy/ldm/modules/attention.py", "/attention_processor.py",
                                               "/attention_dispatch.py")):
        return "transformer", False, None  # shared with text encoders (ComfyUI) and VAE attention (diffusers)
    return None, False, None


def classify_phase(frames: Iterable[Frame]) -> tuple[str, str | None]:
    """(phase, where): the innermost strong frame decides, else the innermost weak one. A VAE frame
    inside an `encode` call (latent caching) is not CREPA's decode: phase unknown, where 'vae_encode';
    a text or image encoder that conditions the DiT: phase unknown, where 'text_encoder'/'image_encoder'."""
    frames = list(frames)
    weak = None
    for file, func, src in reversed(frames):
        phase, strong, override = frame_phase(file, func, src)
        if phase is None:
            continue
        if not strong:
            weak = weak or (phase, file, func)
            continue
        return _result(phase, file, func, override, frames)
    if weak:
        return _result(weak[0], weak[1], weak[2], None, frames)
    return "unknown", None


def _result(phase: str, file: str, func: str, override: str | None, frames: list) -> tuple[str, str | None]:
    if phase == "conditioning":
        return "unknown", override
    if phase == "vae_decode" and not any("decode" in fn or "decode" in s for _, fn, s in frames):
        return "unknown", "vae_encode"
    where = f"{basename(file)}:{func}"
    if phase == "transformer" and any(fn in (*_BACKWARD, "backward") for _, fn, _ in frames):
        where = "backward"
    return phase, where


_PIN_SRC = re.compile(r"\.pin_memory\(|pin_memory\s*=\s*True|cudaHostAlloc|\bpin_memory\(")
_HOST_COPY = re.compile(r"non_blocking\s*=\s*True")
_CPU_WORDS = re.compile(r"['\"]cpu['\"]|\bcpu\b|to_cpu|offload|swap", re.I)


def pinned_host_copy(frames: Iterable[Frame]) -> bool:
    """Whether the innermost frames pin host memory: `pin_memory()`, `pin_memory=True`, DataLoader's pin
    memory thread, or a non-blocking device→host copy (torch pins the CPU side of those)."""
    inner = list(frames)[-4:]
    if any(fn == "pin_memory" or "pin_memory.py" in f or _PIN_SRC.search(s) for f, fn, s in inner):
        return True
    copy = any(_HOST_COPY.search(s) for _, _, s in inner[-2:])
    return copy and any(_CPU_WORDS.search(f"{fn} {s}") for _, fn, s in inner)


def short_frames(frames: tuple) -> list[str]:
    return [f"{basename(f)}:{fn}" for f, fn, _ in frames[-6:]]
