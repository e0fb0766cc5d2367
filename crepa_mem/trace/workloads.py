"""`crepa-mem trace`: the compute-device peak of the teacher path, measured without a GPU.

Full-size models are built on the meta device from their real configs (written out below), given
fake storage, and run on fake tensors on a fake `cuda:0` (crepa_mem.trace_runtime). The peak is the
most bytes of live storage on that device at any moment: resident weights plus the transient peak.
Two runs are compared on one workload:

- baseline: SimpleTuner 4.10's recipe (`simpletuner_teacher`, transcribed below): fp32 DINOv2 and
  the VAE resident on the GPU, every frame decoded by `vae.decode`, every frame encoded in one call,
  frames selected after encoding;
- candidate: the real crepa-mem teacher path (TeacherPath with real `place()` tiers, chunking,
  selection before encoding, Wan's streamed decode) for the given `TeacherSettings`.

Legend: B batch, C latent channels, T latent frames, F pixel frames, N encoder tokens, D width.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from crepa_mem.config import CrepaConfig
from crepa_mem.teacher.encoders import DTYPES
from crepa_mem.errors import CrepaConfigError
from crepa_mem.loss import temporal_indices
from crepa_mem.teacher.path import TeacherFeatures, TeacherPath, denormalize_latents, encode_tokens, module_dtype, IMAGENET_MEAN, IMAGENET_STD
from crepa_mem.teacher.tiers import place
from crepa_mem.trace.runtime import FAKE_GPU, LiveBytes, fake_gpu, materialize

# ---------------------------------------------------------------- real configs
# VAEs by profile name (profiles/models.toml [vae.*]). Latent statistics do not change memory and
# are left at the class defaults (Wan 2.1's are its real ones; the 48 of Wan 2.2 are set to 0/1).
VAE_CONFIGS: dict[str, tuple[str, dict]] = {
    # Wan-AI/Wan2.1-T2V-*-Diffusers vae/config.json == AutoencoderKLWan() defaults
    "wan-2.1": ("AutoencoderKLWan", {}),
    # Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json
    "wan-2.2": ("AutoencoderKLWan", dict(
        base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0, in_channels=12, out_channels=12, is_residual=True,
        patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=[0.0] * 48, latents_std=[1.0] * 48)),
    # Lightricks/LTX-Video-0.9.5 vae (diffusers scripts/convert_ltx_to_diffusers.py, version 0.9.5)
    "ltx-0.9.5": ("AutoencoderKLLTXVideo", dict(
        in_channels=3, out_channels=3, latent_channels=128, block_out_channels=(128, 256, 512, 1024, 2048),
        down_block_types=("LTXVideo095DownBlock3D",) * 4, decoder_block_out_channels=(256, 512, 1024),
        layers_per_block=(4, 6, 6, 2, 2), decoder_layers_per_block=(5, 5, 5, 5),
        spatio_temporal_scaling=(True, True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True,
        patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6, scaling_factor=1.0, encoder_causal=True,
        decoder_causal=False, spatial_compression_ratio=32, temporal_compression_ratio=8)),
    # Lightricks/LTX-Video 0.9.0 vae == AutoencoderKLLTXVideo() defaults
    "ltx-0.9.0": ("AutoencoderKLLTXVideo", {}),
    # hunyuanvideo-community/HunyuanVideo vae == AutoencoderKLHunyuanVideo() defaults (Kandinsky 5)
    "hunyuanvideo": ("AutoencoderKLHunyuanVideo", {}),
}

# facebook/dinov2-* config.json values (patch 14, image 518, layerscale 1.0, eps 1e-6, mlp_ratio 4).
DINOV2_CONFIGS: dict[str, dict] = {
    "dinov2_vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "dinov2_vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "dinov2_vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "dinov2_vitg14": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
}
_DINOV2_COMMON = dict(mlp_ratio=4, image_size=518, patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6)


def build_vae(name: str, device: torch.device | str = "meta") -> torch.nn.Module:
    """The named VAE on the meta device (no memory, no init), or with random weights on `device` (bench)."""
    import diffusers

    if name not in VAE_CONFIGS:
        raise CrepaConfigError("vae", name, valid=" · ".join(VAE_CONFIGS))
    cls, kwargs = VAE_CONFIGS[name]
    with torch.device(device):
        return getattr(diffusers, cls)(**kwargs).eval()


def build_encoder(name: str, device: torch.device | str = "meta") -> torch.nn.Module:
    """A transformers DINOv2 (`_reg`: with 4 registers) on the meta device (or random on `device`), SDPA attention."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from crepa_mem.config import canonical_encoder_name

    key = canonical_encoder_name(name)
    base, registers = key.removesuffix("_reg"), key.endswith("_reg")
    if base not in DINOV2_CONFIGS:
        raise CrepaConfigError("encoder", name, valid=" · ".join(
            [*DINOV2_CONFIGS, *(f"{k}_reg" for k in DINOV2_CONFIGS)]))
    kwargs = {**_DINOV2_COMMON, **DINOV2_CONFIGS[base]}
    cfg = Dinov2WithRegistersConfig(num_register_tokens=4, **kwargs) if registers else Dinov2Config(**kwargs)
    cfg._attn_implementation = "sdpa"  # what transformers picks on a GPU
    with torch.device(device):
        model = (Dinov2WithRegistersModel if registers else Dinov2Model)(cfg)
    return model.eval()


# ---------------------------------------------------------------- what is traced
@dataclass(frozen=True)
class Workload:
    """One training clip: the model's VAE, the clip's shape, the encoder and its input size."""

    model: str
    frames: int
    height: int
    width: int
    encoder: str = "dinov2_vitg14"
    image_size: int = 518
    batch: int = 1
    vae_dtype: str = "bf16"

    def __post_init__(self) -> None:
        for key in ("frames", "height", "width", "batch"):
            if getattr(self, key) < 1:
                raise CrepaConfigError(key, getattr(self, key), valid="a positive integer")
        if self.image_size < 14:
            raise CrepaConfigError("image_size", self.image_size, valid="an integer ≥ 14 (a multiple of 14)")
        if self.vae_dtype not in DTYPES:
            raise CrepaConfigError("vae_dtype", self.vae_dtype, valid=" · ".join(DTYPES))
        self.profile().check_shape(self.frames, self.height, self.width)

    def profile(self):
        from crepa_mem.profiles import get_model

        return get_model(self.model)

    def shapes(self) -> dict[str, int]:
        """Latent grid and frame counts; DiT frames = latent frames / temporal patch."""
        p = self.profile()
        sc = p.vae.spatial_compression
        t = p.latent_frames(self.frames)
        return {"latent_channels": p.vae.latent_channels, "latent_frames": t, "latent_height": self.height // sc,
                "latent_width": self.width // sc, "dit_frames": max(1, t // p.patch_size[0]),
                "encoder_tokens": (self.image_size // 14) ** 2}


@dataclass(frozen=True)
class TeacherSettings:
    """The candidate configuration (the `crepa-mem trace` options)."""

    encoder_tier: str = "gpu"
    vae_tier: str = "gpu"
    chunk: int | None = None
    encoder_dtype: str = "fp32"
    vae_tiling: bool = False
    vae_tile_size: int | None = None
    drop_vae_encoder: bool = False
    feature_cache: bool = False
    stream_engine: str = "group_offload"  # the encoder's stream engine; ramtorch: its loader runs on this thread
    resident_chunks: int = 0
    loss_chunk: int | None = None

    def __post_init__(self) -> None:
        self.config()  # validates every value with CrepaConfig's messages
        if self.chunk is not None and self.chunk < 1:
            raise CrepaConfigError("chunk", self.chunk, valid="an integer ≥ 1 (omit for all frames at once)")
        if self.loss_chunk is not None and self.loss_chunk < 1:
            raise CrepaConfigError("loss_chunk", self.loss_chunk, valid="an integer ≥ 1 (omit for all frames at once)")
        if "cache" in (self.encoder_tier, self.vae_tier) and not self.feature_cache:
            raise CrepaConfigError("tier", "cache", valid="gpu · swap · stream · device",
                                   hint="use --feature-cache to trace the feature cache")

    def config(self) -> CrepaConfig:
        return CrepaConfig(encoder_tier=self.encoder_tier, vae_tier=self.vae_tier, encoder_dtype=self.encoder_dtype,
                           encoder_frames_batch_size=self.chunk or -1, vae_tiling=self.vae_tiling,
                           vae_tile_size=self.vae_tile_size, drop_vae_encoder=self.drop_vae_encoder,
                           feature_cache="<traced>" if self.feature_cache else None,
                           stream_engine=self.stream_engine, stream_resident_chunks=self.resident_chunks,
                           loss_chunk=self.loss_chunk or -1)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TraceResult:
    peak_bytes: int                      # the whole CREPA call: teacher, projection, alignment, backward
    weights_bytes: int                   # resident on the compute device before the step
    phases: dict[str, int] = field(default_factory=dict)   # peak per phase (decode, encode, teacher, loss, step)
    prefetch_bytes: int = 0              # stream tier: the largest block a CUDA side stream prefetches
    host_peak_bytes: int = 0             # the CPU side, for the `device`/`swap`/`stream` tiers
    wall_s: float = 0.0
    teacher_peak_bytes: int = 0          # the teacher step alone (what `estimate.teacher_peak` models)
    loss_peak_bytes: int = 0             # from the features' arrival through the backward
    h2d_bytes: dict[str, int] = field(default_factory=dict)  # host → device per step: vae, encoder


Progress = Callable[[str], None]


# ---------------------------------------------------------------- the baseline recipe
def simpletuner_teacher(vae, encoder, latents_BCThw, image_size: int, target_frames: int):
    """SimpleTuner 4.10's teacher step, as its CrepaRegularizer runs it (REFERENCE §1.2, §1 costs):
    decode every frame with `vae.decode`, keep the whole clip, resize every frame, encode all F frames
    in one call, then keep the T' frames temporal alignment selects."""
    z = denormalize_latents(latents_BCThw, vae).to(module_dtype(vae))
    if type(vae).__name__ == "AutoencoderKLLTXVideo" and getattr(vae.config, "timestep_conditioning", False):
        video = vae.decode(z, torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)).sample
    else:
        video = vae.decode(z).sample
    del z
    video = video.clamp(-1, 1)
    video = (video + 1.0) * 0.5
    video = video.permute(0, 2, 1, 3, 4).contiguous()          # (B, F, 3, H, W), alive until the end
    b, f, c, h, w = video.shape
    frames = video.reshape(b * f, c, h, w)
    frames = F.interpolate(frames, size=(image_size, image_size), mode="bilinear", align_corners=False)
    frames = frames.to(module_dtype(encoder))
    mean = torch.tensor(IMAGENET_MEAN, device=frames.device, dtype=frames.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=frames.device, dtype=frames.dtype).view(1, 3, 1, 1)
    frames = (frames - mean) / std
    tokens = encode_tokens(encoder, frames)                      # all F frames in one call
    del frames
    tokens = tokens.reshape(b, f, tokens.shape[1], tokens.shape[2])
    return tokens.index_select(1, temporal_indices(f, target_frames, device=tokens.device))


# ---------------------------------------------------------------- running one trace
def _count_calls(module, label: str, progress: Progress | None):
    if progress is None or module is None:
        return None
    return module.register_forward_pre_hook(lambda *_: progress(label))


def trace_baseline(workload: Workload, progress: Progress | None = None) -> TraceResult:
    """SimpleTuner's recipe: fp32 encoder and VAE resident on the GPU, all frames in one call."""
    return _trace(workload, TeacherSettings(), progress, baseline=True)


def trace_candidate(workload: Workload, settings: TeacherSettings, progress: Progress | None = None) -> TraceResult:
    """The crepa-mem teacher path with `settings`."""
    return _trace(workload, settings, progress, baseline=False)


def _trace(workload: Workload, settings: TeacherSettings, progress: Progress | None, *, baseline: bool) -> TraceResult:
    from crepa_mem.profiles import get_encoder
    from crepa_mem.trace.call import TracedTeacher, phase_around

    start = time.perf_counter()
    s = workload.shapes()
    profile = workload.profile()
    enc_dtype = DTYPES["fp32" if baseline else settings.encoder_dtype]
    enc_dim = get_encoder(workload.encoder).hidden_size
    with fake_gpu() as tracker:
        latents = torch.empty(workload.batch, s["latent_channels"], s["latent_frames"], s["latent_height"],
                              s["latent_width"], device=FAKE_GPU)
        cfg = CrepaConfig() if baseline else settings.config()
        if settings.feature_cache and not baseline:
            staged = bool(settings.loss_chunk)  # FeatureCacheTeacher: on the host for the chunked loss
            teacher = TracedTeacher(lambda lat, t: _cached_features(workload, s, enc_dim, enc_dtype, staged), tracker,
                                    enc_dim)
            return _finish(workload, tracker, teacher, cfg, latents, (), 0, start)
        from crepa_mem.teacher.vae import prepare_vae

        vae = prepare_vae(materialize(build_vae(profile.vae.name), "cpu", DTYPES[workload.vae_dtype]), cfg)
        encoder = materialize(build_encoder(workload.encoder), "cpu")
        vae_p = place(vae, "gpu" if baseline else settings.vae_tier, compute_device=FAKE_GPU, teacher_device="cpu")
        enc_p = place(encoder, "gpu" if baseline else settings.encoder_tier, compute_device=FAKE_GPU,
                      teacher_device="cpu", dtype=enc_dtype, stream_engine=settings.stream_engine,
                      resident_chunks=settings.resident_chunks)
        weights = tracker.live_bytes(FAKE_GPU) - latents.untyped_storage().nbytes()
        hooks = [_count_calls(getattr(vae, "decoder", None), "decode", progress)]
        if baseline:
            if progress:
                hooks.append(_count_calls(encoder, "encode", progress))
            grid = (workload.image_size // 14,) * 2

            def run(lat, target):
                tokens = simpletuner_teacher(vae, encoder, lat, workload.image_size, target)
                return TeacherFeatures(tokens, grid, [], 0)
        else:
            phase_around(vae_p, tracker, "decode")
            phase_around(enc_p, tracker, "encode")
            path = TeacherPath(vae=vae_p, encoder=enc_p, image_size=workload.image_size,
                               compute_device=FAKE_GPU, frames_per_chunk=settings.chunk,
                               stage_features=bool(settings.loss_chunk),
                               on_chunk=(lambda n: progress("encode")) if progress else None)
            run = path.features
        try:
            return _finish(workload, tracker, TracedTeacher(run, tracker, enc_dim), cfg, latents, (vae_p, enc_p),
                           weights, start)
        finally:
            for h in hooks:
                if h is not None:
                    h.remove()
            enc_p.close()


def _finish(workload: Workload, tracker: LiveBytes, teacher, cfg: CrepaConfig, latents, placements, weights: int,
            start: float) -> TraceResult:
    """The whole call (crepa_mem.trace.call), then each phase's peak with its own prefetch slot."""
    from crepa_mem.trace.call import trace_call

    s, profile = workload.shapes(), workload.profile()
    hidden = (workload.batch, s["dit_frames"], profile.tokens_per_frame(workload.height, workload.width),
              profile.hidden_size)
    resident = trace_call(tracker, teacher, cfg, latents, hidden_shape=hidden)
    phases = {k: v.get(str(FAKE_GPU), 0) for k, v in tracker.phase_peaks.items()}
    by_phase = dict(zip(("decode", "encode"), (_stream_prefetch(p) for p in placements)))
    for name, extra in by_phase.items():  # a side stream prefetches within its own component's phase only
        if name in phases:
            phases[name] += extra
    teacher_peak = max([phases.get("teacher", 0), *(phases.get(n, 0) for n in by_phase)])
    loss_peak = phases.get("loss", 0)
    return TraceResult(peak_bytes=max(phases.get("step", 0), teacher_peak, loss_peak),
                       weights_bytes=max(weights, 0) + resident, phases=phases,
                       prefetch_bytes=max(by_phase.values(), default=0), host_peak_bytes=tracker.peak_bytes("cpu"),
                       wall_s=time.perf_counter() - start, teacher_peak_bytes=teacher_peak,
                       loss_peak_bytes=loss_peak,
                       h2d_bytes={"vae": tracker.h2d.get("decode", 0), "encoder": tracker.h2d.get("encode", 0)})


def _stream_prefetch(placement) -> int:
    """On CUDA the stream tier holds the next block while one runs (a side-stream prefetch the fake
    run, having no streams, does not make): count its largest block once more, in its own phase."""
    if placement.tier != "stream" or not hasattr(placement, "groups"):
        return 0  # RamTorch's loader ran on the traced thread: its window is in the measured peak
    groups = placement.groups()
    return max(groups) if groups else 0


def _cached_features(workload: Workload, s: dict, dim: int, enc_dtype: torch.dtype,
                     staged: bool = False) -> TeacherFeatures:
    """The feature cache: no VAE, no encoder; the selected frames' features in the cache's dtype, read into
    one host buffer that either stays there (`staged`: the chunked loss copies each chunk's frames over)
    or arrives on the GPU (compute_loss casts it to fp32)."""
    shape = (workload.batch, s["dit_frames"], s["encoder_tokens"], dim)
    feats = torch.empty(shape, dtype=enc_dtype, device="cpu" if staged else FAKE_GPU)
    return TeacherFeatures(feats, (workload.image_size // 14,) * 2, [], 0, staged=staged)


def side_report(r: TraceResult) -> dict:
    """One side of the `--json` report: the whole call's peak, its two parts, the device's peak in each phase
    (decode, encode, loss: all that is live then, the regularizer's resident state included) and the
    host → device traffic."""
    return {"peak_bytes": r.peak_bytes, "teacher_peak_bytes": r.teacher_peak_bytes,
            "loss_peak_bytes": r.loss_peak_bytes,
            "phase_peak_bytes": {k: r.phases[k] for k in ("decode", "encode", "loss") if k in r.phases},
            "h2d_bytes": dict(r.h2d_bytes)}


def report(base: TraceResult, cand: TraceResult, settings: TeacherSettings) -> dict:
    """The `--json` report: both sides and baseline / candidate of the whole call's peak."""
    return {"baseline": side_report(base), "candidate": {**side_report(cand), "settings": settings.to_dict()},
            "ratio": base.peak_bytes / cand.peak_bytes if cand.peak_bytes else math.inf}


def compare(workload: Workload, settings: TeacherSettings, progress: Progress | None = None) -> dict:
    """Trace both sides and return `report`."""
    return report(trace_baseline(workload, progress), trace_candidate(workload, settings, progress), settings)


def expected_steps(workload: Workload, settings: TeacherSettings) -> int:
    """Progress total: decoder calls and encoder calls of both runs (Wan decodes per latent frame)."""
    s, p = workload.shapes(), workload.profile()
    per_frame = VAE_CONFIGS[p.vae.name][0] == "AutoencoderKLWan"  # decodes one latent frame per call
    decode = s["latent_frames"] if per_frame else 1
    sel = workload.batch * s["dit_frames"]
    cand_decode = decode * _tiles(workload, settings)
    cand = 0 if settings.feature_cache else cand_decode + (math.ceil(sel / settings.chunk) if settings.chunk else 1)
    return decode + 1 + cand


# diffusers' tiling defaults (tile_sample_min, tile_sample_stride) for the VAEs that tile per decoder call
_TILE_DEFAULTS = {"AutoencoderKLWan": (256, 192), "AutoencoderKLLTXVideo": (512, 448)}


def _tiles(workload: Workload, settings: TeacherSettings) -> int:
    """Decoder calls per decode step under tiling: diffusers' tiled_decode calls the decoder once per tile."""
    cls = VAE_CONFIGS[workload.profile().vae.name][0]
    if not settings.vae_tiling or cls not in _TILE_DEFAULTS:
        return 1
    size, stride = _TILE_DEFAULTS[cls]
    if settings.vae_tile_size:
        size, stride = settings.vae_tile_size, settings.vae_tile_size * 3 // 4
    sc = workload.profile().vae.spatial_compression
    (h, w), tile, step = (workload.height // sc, workload.width // sc), size // sc, max(1, stride // sc)
    if h <= tile and w <= tile:
        return 1
    return len(range(0, h, step)) * len(range(0, w, step))


__all__ = ["Workload", "TeacherSettings", "TraceResult", "trace_baseline", "trace_candidate", "compare", "report",
           "simpletuner_teacher", "build_vae", "build_encoder", "expected_steps", "VAE_CONFIGS", "DINOV2_CONFIGS"]
