"""Pure memory model of what CREPA adds on the training GPU: named byte terms, summed over phases.

No torch: ints in, ints out. Legend: B batch, F pixel frames, T' latent frames, T_sel teacher frames
(= min(F, T'), frames are selected before encoding), P DiT tokens per latent frame, N encoder patch
tokens per frame, L = N + 1 + registers tokens in the encoder, D_dit / D_enc widths, S encoder image size.

Phases of a training step (what crepa_mem.teacher and the loss really hold; a term alive in several
phases names them joined by '+', e.g. the features live from `encode` through `loss`):
    resident  alive the whole run (tier-`gpu` weights, the projector with its grad and Adam state)
    decode    the VAE decoding the batch's clean latents (no grad); Wan one latent frame at a time
    encode    one chunk of selected frames resized, normalised and run through the encoder (no grad)
    loss      after the teacher let go: features (fp32) → the projection, alignment and cosine terms of the
              captured block output, and their backward (in frame chunks with crepa_mem_loss_chunk)
peak = the largest phase total (each total includes the resident terms).

Tiers change where weights live: gpu = resident; swap = on the device for the module's own phase only
(the teacher decodes everything first, releases the VAE, then brings the encoder in); stream = ~2 blocks
during its own phase; device/cache = nothing on the training GPU.
The coefficients in CALIBRATION come from fake-tensor traces of the real diffusers/transformers modules
(FakeTensorMode + a dispatch mode summing live storage bytes, weights excluded); they are to be refitted
against `crepa_mem.trace` (tests/test_calibration.py checks ±10 %).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from crepa_mem.errors import CrepaConfigError
from crepa_mem.profiles import EncoderProfile, ModelProfile, VaeProfile
from crepa_mem.units import dtype_bytes

PHASES = ("decode", "encode", "loss")
ON_GPU = ("gpu", "swap", "stream")  # tiers that run the module on the training GPU

CALIBRATION = {
    # Live activation elements per decoded pixel-frame at the VAE decoder's peak (bf16 trace at 480×832
    # and 704×1280; linear in area, Wan/Hunyuan independent of clip length, LTX linear in frames). Wan: one
    # decoder call (4 pixel frames) of crepa_mem.teacher.wan_decode's loop at the area it decodes, cache
    # included (trace: Wan 2.1 17 × 480 × 832 untiled 1168; Wan 2.2 17 × 512 × 768 1217).
    "vae_decode_elems": {"wan-2.1": 1168, "wan-2.2": 1217, "hunyuanvideo": 1180, "ltx-0.9.5": 47, "ltx-0.9.0": 47},
    "vae_decode_elems_default": 1300,  # an unknown conv VAE: like Wan/Hunyuan (conservative)
    # Of which Wan's causal-conv cache, alive between latent frames (trace at 480×832 / 704×1280).
    "vae_cache_elems": {"wan-2.1": 592, "wan-2.2": 446},
    "vae_cache_elems_default": 592,
    # Of the cache, what is still on the device at a tile's peak when `stream` keeps it on the host (the entry
    # just cloned, the one in use; trace, Wan 2.1 81 × 480 × 832 tiled; untiled frames peak elsewhere: 0).
    "vae_cache_in_flight_tiled": 0.08,
    # Host → device reads of the cache per decoder call under `stream`, in units of the cache: the whole cache,
    # plus the one-frame slices the blocks re-read to extend their own (trace, Wan 2.1 480×832, 17 and 9 frames).
    "vae_cache_reads": 1.03,
    # Same under vae.enable_tiling(), per pixel-frame of one tile (LTX's tiled decoder peaks lower; Wan's 256-px
    # tile normalises without slices, crepa_mem.teacher.wan_decode.NORM_SLICE_BYTES: trace, Wan 2.1 81 × 480 × 832
    # 1296, Wan 2.2 49 × 704 × 1280 1310).
    "vae_decode_tiled_elems": {"ltx-0.9.5": 45, "ltx-0.9.0": 45, "wan-2.1": 1296, "wan-2.2": 1310},
    # Tiled decode: the output plus the decoded tiles kept until blending, in units of the output
    # (LTX's 512/448 tiles: 1.0; an unknown VAE like diffusers' tiled decoders: 1.4).
    "vae_tiled_output_factor": {"ltx-0.9.5": 1.0, "ltx-0.9.0": 1.0},
    "vae_tiled_output_factor_default": 1.4,
    # Encoder forward (no grad) per token: a·D + b·I elements live at the peak layer
    # (residual, norm, attention output, MLP hidden; SwiGLU holds gate, up and their product).
    "encoder_token_elems_d": 4,
    "encoder_token_elems_i": {"mlp": 2, "swiglu": 3},
    # Copies of one chunk's resized pixels in the encoder dtype on the way in (normalised input and one
    # temporary); the stacked full-size frames and the resize output in the VAE dtype come on top.
    "encoder_input_copies": 2,
    # Stream tier, VAE decoder (diffusers group offloading, block level): at the decode peak the device holds
    # the decoder's top-level convs and the full-resolution resnet running there (0.9–1.2 % of the decoder
    # in all five built-in decoders, crepa_mem.teacher.stream.stream_group_bytes), plus the prefetch slot:
    # the largest group (VaeProfile.stream_block_params; unknown VAE: a quarter of the decoder).
    "vae_stream_running_fraction": 0.012,
    "vae_stream_block_fraction_default": 0.25,
    # diffusers group offloading (crepa_mem.tiers_stream): the running encoder layer plus the prefetched one.
    "stream_window": 2,
    # The chunked loss phase (crepa_mem_loss_chunk): live fp32 elements per chunk row, × D_dit and × D_enc.
    "loss_chunk_rows_d": 4,
    "loss_chunk_rows_e": 1,
    # Bytes per trainable projector parameter: fp32 weight + grad + Adam exp_avg + exp_avg_sq.
    "projector_bytes_per_param": 16,
}


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    phase: str
    """resident, decode, encode, loss, or several joined by '+'."""

    def alive_in(self, phase: str) -> bool:
        return self.phase == "resident" or phase in self.phase.split("+")


@dataclass
class Estimate:
    terms: list[Term]
    peak_bytes: int = 0
    peak_phase: str = "resident"
    phase_bytes: dict[str, int] = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    h2d: dict[str, int] = field(default_factory=dict)  # host → device bytes per step: vae, encoder

    def __post_init__(self) -> None:
        self.phase_bytes = {p: sum(t.bytes for t in self.terms if t.alive_in(p)) for p in PHASES}
        self.phase_bytes["resident"] = sum(t.bytes for t in self.terms if t.phase == "resident")
        self.peak_phase = max(PHASES, key=lambda p: self.phase_bytes[p])
        self.peak_bytes = self.phase_bytes[self.peak_phase]

    @property
    def components(self) -> dict[str, int]:
        return {t.name: t.bytes for t in self.terms}

    def to_dict(self) -> dict:
        return {"total_bytes": self.peak_bytes, "peak_phase": self.peak_phase,
                "components": self.components,
                "phases": {p: self.phase_bytes[p] for p in ("resident", *PHASES)},
                "terms": [{"name": t.name, "bytes": t.bytes, "phase": t.phase} for t in self.terms],
                "h2d_bytes": dict(self.h2d)}


# ---------------------------------------------------------------------------- pieces (all pure)

def encoder_tokens(encoder: EncoderProfile, image_size: int) -> tuple[int, int]:
    """(N patch tokens, L tokens through the encoder incl. CLS and registers) at image size S."""
    n = (image_size // encoder.patch_size) ** 2
    return n, n + 1 + encoder.num_register_tokens


def encoder_embed_params(encoder: EncoderProfile) -> int:
    """Patch embedding + CLS/mask/register tokens + position embeddings (hub image size 518)."""
    d, p = encoder.hidden_size, encoder.patch_size
    return 3 * p * p * d + d + (2 + encoder.num_register_tokens) * d + ((518 // p) ** 2 + 1) * d


def encoder_layer_params(encoder: EncoderProfile) -> int:
    """Parameters of one transformer layer (what the stream tier holds per slot)."""
    return (encoder.params - encoder_embed_params(encoder) - 2 * encoder.hidden_size) // encoder.num_layers


def encoder_activation_bytes(encoder: EncoderProfile, image_size: int, frames: int, dtype: str) -> int:
    """Peak live activations of a no-grad forward over `frames` images (ViT-g bf16 518: ≈48 MiB/frame)."""
    _, tokens = encoder_tokens(encoder, image_size)
    k_i = CALIBRATION["encoder_token_elems_i"].get(encoder.mlp, 3)
    per_token = CALIBRATION["encoder_token_elems_d"] * encoder.hidden_size + k_i * encoder.intermediate_size
    return frames * tokens * per_token * dtype_bytes(dtype)


def encoder_flops_per_frame(encoder: EncoderProfile, image_size: int) -> float:
    """Forward FLOPs per image: 2·params·L for the matmuls + 4·L²·D per layer for attention."""
    _, tokens = encoder_tokens(encoder, image_size)
    return 2.0 * encoder.params * tokens + 4.0 * tokens * tokens * encoder.hidden_size * encoder.num_layers


def decodes_frame_by_frame(vae: VaeProfile) -> bool:
    """Wan's decode runs in crepa-mem's own loop (crepa_mem.teacher.wan_decode), tiled or not: one latent
    frame per decoder call, only the selected frames kept; the others decode in one call."""
    return vae.diffusers_class == "AutoencoderKLWan"


def tiles(vae: VaeProfile, height: int, width: int, tiling: bool) -> bool:
    """Whether the VAE's decode is tiled at this size (diffusers tiles only what exceeds one tile)."""
    return tiling and max(height, width) > vae.tile_sample_min


def decode_area(vae: VaeProfile, height: int, width: int, tiling: bool) -> int:
    """Pixels one decoder call sees: a (full-size) tile when tiled, else the frame."""
    if tiles(vae, height, width, tiling):
        return min(height, vae.tile_sample_min) * min(width, vae.tile_sample_min)
    return height * width


def vae_decode_activation_bytes(vae: VaeProfile, frames: int, height: int, width: int, *, tiling: bool,
                                dtype: str) -> int:
    """Peak live activations of decoding one sample: elements per pixel-frame × frames at once × area."""
    at_once = frames if vae.decode_frames <= 0 else min(frames, vae.decode_frames)
    elems = vae.decode_elems or CALIBRATION["vae_decode_elems"].get(vae.name, CALIBRATION["vae_decode_elems_default"])
    if tiles(vae, height, width, tiling):
        elems = CALIBRATION["vae_decode_tiled_elems"].get(vae.name, elems)
    return int(elems * at_once * decode_area(vae, height, width, tiling)) * dtype_bytes(dtype)


def vae_cache_bytes(vae: VaeProfile, height: int, width: int, dtype: str, *, tiling: bool = False) -> int:
    """Wan's causal-conv cache for one sample, alive between latent frames (part of the decode peak unless
    the `stream` tier keeps it on the host), at the area one decoder call sees (a tile when tiled)."""
    elems = CALIBRATION["vae_cache_elems"].get(vae.name, CALIBRATION["vae_cache_elems_default"])
    return int(elems * vae.temporal_compression * decode_area(vae, height, width, tiling)) * dtype_bytes(dtype)


def vae_weight_bytes(vae: VaeProfile, dtype: str, drop_encoder: bool) -> int:
    return (vae.params_decoder + (0 if drop_encoder else vae.params_encoder)) * dtype_bytes(dtype)


def vae_stream_window_bytes(vae: VaeProfile, dtype: str) -> int:
    """Decoder weights on the device at the decode peak under `stream` (the encoder stays on the host):
    the group running at full resolution with the top-level convs, and the prefetched largest group."""
    block = vae.stream_block_params or CALIBRATION["vae_stream_block_fraction_default"] * vae.params_decoder
    return int(block + CALIBRATION["vae_stream_running_fraction"] * vae.params_decoder) * dtype_bytes(dtype)


def decoder_calls(vae: VaeProfile, latent_frames: int, height: int, width: int, tiling: bool) -> int:
    """Decoder forward calls per sample: Wan decodes one latent frame per call (in every tile when tiled,
    diffusers' loop over tiles at the latent stride); the others decode once, or once per tile."""
    stride = vae.tile_sample_stride
    count = -(-height // stride) * -(-width // stride) if tiles(vae, height, width, tiling) else 1
    return count * (latent_frames if decodes_frame_by_frame(vae) else 1)


def tile_area_sum(vae: VaeProfile, height: int, width: int, tiling: bool) -> int:
    """Pixels over all the tiles one frame is decoded in (edge tiles are smaller; untiled: the frame)."""
    if not tiles(vae, height, width, tiling):
        return height * width
    t, stride = vae.tile_sample_min, vae.tile_sample_stride
    return sum(min(t, height - i) for i in range(0, height, stride)) * sum(min(t, width - j) for j in range(0, width, stride))


def vae_cache_traffic_bytes(vae: VaeProfile, *, latent_frames: int, height: int, width: int, vae_dtype: str,
                            tiling: bool, batch: int = 1) -> int:
    """Host → device bytes of Wan's causal cache per step under `stream` (crepa_mem.teacher.wan_decode.HostCache):
    each decoder call after a tile's first reads the tile's cache back (the second call's entries hold one
    frame, later ones two: latent frames − 1.5 caches per tile), plus the one-frame slices the blocks re-read
    (CALIBRATION["vae_cache_reads"]); as much goes device → host, synchronously."""
    if not decodes_frame_by_frame(vae) or latent_frames < 2:
        return 0
    elems = CALIBRATION["vae_cache_elems"].get(vae.name, CALIBRATION["vae_cache_elems_default"])
    per_pixel = elems * vae.temporal_compression * dtype_bytes(vae_dtype)
    return int(CALIBRATION["vae_cache_reads"] * batch * per_pixel * tile_area_sum(vae, height, width, tiling)
               * (latent_frames - 1.5))


def h2d_bytes(vae: VaeProfile, encoder: EncoderProfile, *, latent_frames: int, height: int, width: int,
              vae_tier: str, encoder_tier: str, vae_dtype: str, encoder_dtype: str, tiling: bool,
              drop_vae_encoder: bool, batch: int = 1) -> dict[str, int]:
    """Bytes copied host → device per step. swap: the module once; stream: the encoder once (layer-major,
    crepa_mem.teacher.stream.BlockStream), the VAE decoder once per decoder call (diffusers group offloading
    moves each block in and out per call; the causal cache of Wan ties a call to one latent frame), and
    Wan's causal cache, which waits on the host between calls (vae_cache_traffic_bytes)."""
    vae_w, enc_w = vae_weight_bytes(vae, vae_dtype, drop_vae_encoder), encoder.params * dtype_bytes(encoder_dtype)
    calls = decoder_calls(vae, latent_frames, height, width, tiling)  # the batch goes through each call together
    stream = vae.params_decoder * dtype_bytes(vae_dtype) * calls + vae_cache_traffic_bytes(
        vae, latent_frames=latent_frames, height=height, width=width, vae_dtype=vae_dtype, tiling=tiling, batch=batch)
    return {"vae": {"swap": vae_w, "stream": stream}.get(vae_tier, 0),
            "encoder": {"swap": enc_w, "stream": enc_w}.get(encoder_tier, 0)}


def projector_params(d_dit: int, d_enc: int) -> int:
    """LayerNorm(D_dit) weight+bias and Linear(D_dit → D_enc) weight+bias."""
    return 2 * d_dit + d_dit * d_enc + d_enc


# ---------------------------------------------------------------------------- the model

def estimate(model: ModelProfile, encoder: EncoderProfile, *, frames: int, height: int, width: int, batch: int = 1,
             image_size: int = 518, encoder_dtype: str = "fp32", vae_dtype: str = "bf16", dit_dtype: str = "bf16",
             encoder_tier: str = "gpu", vae_tier: str = "gpu", vae_tiling: bool = False,
             drop_vae_encoder: bool = False, frames_per_chunk: int | None = None,
             spatial_align: bool = True, loss_chunk: int | None = None) -> Estimate:
    """Bytes CREPA adds on the training GPU for one configuration (see the module docstring)."""
    for key, tier in (("crepa_mem_encoder_tier", encoder_tier), ("crepa_mem_vae_tier", vae_tier)):
        if tier not in (*ON_GPU, "device", "cache"):
            raise CrepaConfigError(key, tier, valid="gpu · swap · stream · device · cache")
    model.check_shape(frames, height, width)
    cache = "cache" in (encoder_tier, vae_tier)
    if cache:
        encoder_tier = vae_tier = "cache"
    eb, vb = dtype_bytes(encoder_dtype), dtype_bytes(vae_dtype)
    d_dit, d_enc = model.hidden_size, encoder.hidden_size
    t_lat = model.latent_frames(frames)
    t_sel = min(frames, t_lat)
    p_dit = model.tokens_per_frame(height, width)
    n_enc, _ = encoder_tokens(encoder, image_size)
    total_frames = batch * t_sel
    chunk = total_frames if not frames_per_chunk or frames_per_chunk <= 0 else min(frames_per_chunk, total_frames)
    terms: list[Term] = []

    def add(name: str, nbytes: float, phase: str) -> None:
        if nbytes > 0:
            terms.append(Term(name, int(nbytes), phase))

    # -- resident: projector (trainable, fp32) with its gradient and Adam's two states
    add("projector", projector_params(d_dit, d_enc) * CALIBRATION["projector_bytes_per_param"], "resident")

    # The teacher (crepa_mem.teacher.TeacherPath.features) decodes the whole batch keeping a copy of each
    # selected frame as it comes, leaves the VAE's `active()` block, and only then encodes the kept
    # frames `chunk` at a time: decode and encode never overlap.
    vae = model.vae
    # -- weights by tier: swap moves a module in for its whole `active()` block, stream keeps ~2 blocks
    vae_w = vae_weight_bytes(vae, vae_dtype, drop_vae_encoder)
    add("vae_weights", {"gpu": vae_w, "swap": vae_w, "stream": vae_stream_window_bytes(vae, vae_dtype)}
        .get(vae_tier, 0), "resident" if vae_tier == "gpu" else "decode")
    enc_w = encoder.params * eb
    stream_w = CALIBRATION["stream_window"] * encoder_layer_params(encoder) * eb
    add("encoder_weights", {"gpu": enc_w, "swap": enc_w, "stream": stream_w}.get(encoder_tier, 0),
        "resident" if encoder_tier == "gpu" else "encode")

    # -- decode
    if vae_tier in ON_GPU:
        lat_h, lat_w = height // vae.spatial_compression, width // vae.spatial_compression
        add("latents", batch * vae.latent_channels * t_lat * lat_h * lat_w * vb, "decode")
        act = batch * vae_decode_activation_bytes(vae, frames, height, width, tiling=vae_tiling, dtype=vae_dtype)
        frame = 3 * height * width * vb
        tiled = tiles(vae, height, width, vae_tiling)
        if decodes_frame_by_frame(vae):  # one latent frame (of one tile) per call, the kept frames gathered
            cache = batch * vae_cache_bytes(vae, height, width, vae_dtype, tiling=vae_tiling)
            add("vae_decode_activations", act - cache, "decode")
            if vae_tier != "stream":  # stream: the cache waits on the host between calls
                add("vae_decode_cache", cache, "decode")
            elif tiled:
                add("vae_decode_cache", cache * CALIBRATION["vae_cache_in_flight_tiled"], "decode")
            if tiled:  # the tile being decoded (its kept frames) and the strips its neighbours blend with
                tile = decode_area(vae, height, width, vae_tiling)
                blend = vae.tile_sample_min - vae.tile_sample_stride
                add("decoded_tile", batch * t_sel * 3 * (tile + blend * (width + vae.tile_sample_min)) * vb, "decode")
        else:  # one call: the whole clip comes out at once (tiled: plus the tiles kept for blending)
            add("vae_decode_activations", act, "decode")
            factor = 1.0
            if tiled:
                factor = CALIBRATION["vae_tiled_output_factor"].get(vae.name,
                                                                   CALIBRATION["vae_tiled_output_factor_default"])
            add("decoded_video", batch * frames * frame * factor, "decode")
        # the selected frames, gathered as they are decoded, wait for the encoder
        add("selected_frames", total_frames * frame, "decode+encode" if encoder_tier in ON_GPU else "decode")

    # -- encode: the kept selected frames (gathered during the decode), one chunk's input and activations
    if encoder_tier in ON_GPU:
        # stacked chunk (VAE dtype) + its resized copy + the normalised input (encoder dtype, one temporary)
        add("encoder_input", chunk * 3 * (height * width * vb + image_size * image_size
                                          * (vb + CALIBRATION["encoder_input_copies"] * eb)), "encode")
        add("encoder_activations", encoder_activation_bytes(encoder, image_size, chunk, encoder_dtype), "encode")
        if encoder_tier == "stream" and chunk < total_frames:  # layer-major: one layer's states of every chunk
            add("encoder_layer_states", (total_frames - chunk) * encoder_tokens(encoder, image_size)[1]
                * encoder.hidden_size * eb, "encode")

    # -- features (B, T_sel, N, D) in the encoder dtype: allocated at the first encoded chunk; from the cache
    # or the other device they arrive after the teacher step. The loss holds them as fp32 (the stored-dtype
    # copy is freed once cast).
    # -- loss (trace: crepa_mem.trace.call, the real compute_loss and its backward), the teacher released.
    # Legend here: M = B·T'·P projected rows, F·t·E the aligned features (t = min(P, N) tokens, or 1).
    rows = batch * t_lat
    m_rows = rows * p_dit
    target = min(p_dit, n_enc) if spatial_align else 1
    aligned = total_frames * target * d_enc * 4  # y: the features aligned and L2-normalised, fp32
    chunked = loss_chunk is not None and 0 < loss_chunk < rows // batch
    on_gpu = "encode+" if encoder_tier in ON_GPU else ""
    # fp32 features are the whole loss's own (a cast copy or y replaces the others); for the chunked loss they
    # wait on the host (staged: written there by the encoder, or read there from a cache) and each chunk casts
    # its own window
    held = eb == 4 and not chunked
    if not chunked and (on_gpu or held):
        add("features", total_frames * n_enc * d_enc * eb, on_gpu + "loss" if held else "encode")
    if not chunked:
        if not held:
            add("features_fp32", total_frames * n_enc * d_enc * 4, "loss")
        # Forward: fp32 hidden copy and LayerNorm output (both saved), the Linear's output, the projected side
        # resampled (when P ≠ t) and normalised, y, one product temporary. Backward, at the Linear's
        # gradient: the fp32 copy, LayerNorm output and its gradient, y. The larger of the two.
        proj_side = rows * target * d_enc * 4 * ((p_dit != target) + 1)
        forward = 2 * m_rows * d_dit * 4 + m_rows * d_enc * 4 + proj_side + 2 * aligned
        backward = 3 * m_rows * d_dit * 4 + aligned
        add("loss_activations", max(forward, backward), "loss")
    else:  # crepa_mem_loss_chunk: chunks recomputed in backward, y made per window (the chunk ± one neighbour)
        add("features_window", batch * min(loss_chunk + 2, t_sel) * target * d_enc * 4, "loss")
        add("hidden_grad", m_rows * d_dit * dtype_bytes(dit_dtype), "loss")  # written chunk by chunk
        m_chunk = batch * loss_chunk * p_dit
        # One chunk's recompute and its gradients (fitted on crepa_mem.trace at Wan 14B / 1.3B and LTX 2B,
        # within −4 … +11 %), plus the chunk's weight gradient next to the one being accumulated.
        add("loss_chunk_activations", (CALIBRATION["loss_chunk_rows_d"] * m_chunk * d_dit
                                       + CALIBRATION["loss_chunk_rows_e"] * m_chunk * d_enc) * 4
            + 2 * d_dit * d_enc * 4, "loss")

    inputs = dict(model=model.name, encoder=encoder.name, frames=frames, height=height, width=width, batch=batch,
                  image_size=image_size, encoder_dtype=encoder_dtype, vae_dtype=vae_dtype, encoder_tier=encoder_tier,
                  vae_tier=vae_tier, vae_tiling=vae_tiling, drop_vae_encoder=drop_vae_encoder,
                  frames_per_chunk=chunk, spatial_align=spatial_align, loss_chunk=loss_chunk, latent_frames=t_lat, teacher_frames=t_sel,
                  dit_tokens_per_frame=p_dit, encoder_tokens_per_frame=n_enc, encoder_dim=d_enc)
    traffic = h2d_bytes(vae, encoder, latent_frames=t_lat, height=height, width=width, vae_tier=vae_tier,
                        encoder_tier=encoder_tier, vae_dtype=vae_dtype, encoder_dtype=encoder_dtype, tiling=vae_tiling,
                        drop_vae_encoder=drop_vae_encoder, batch=batch)
    return Estimate(terms, inputs=inputs, h2d=traffic)


def features_bytes(e: "Estimate") -> int:
    """The clip's teacher features in their dtype (B, T_sel, N, D), wherever they wait: what a feature cache
    reads per step and what a teacher on another device sends back."""
    i = e.inputs
    return i["batch"] * i["teacher_frames"] * i["encoder_tokens_per_frame"] * i["encoder_dim"] * dtype_bytes(
        i["encoder_dtype"])


LOSS_TERMS = ("projector", "features_fp32", "loss_activations", "features_window", "hidden_grad",
              "loss_chunk_activations")


def teacher_peak(e: Estimate) -> int:
    """Peak of the teacher step alone (decode/encode phases without the projector and loss terms):
    what `crepa_mem.trace` measures on its fake GPU."""
    return Estimate([t for t in e.terms if t.name not in LOSS_TERMS]).peak_bytes


def teacher_bytes(model: ModelProfile, encoder: EncoderProfile, **kwargs) -> int:
    """Peak on the *other* GPU when the teacher runs there (`device` tier): VAE and encoder resident."""
    kwargs.update(encoder_tier="gpu", vae_tier="gpu")
    return teacher_peak(estimate(model, encoder, **kwargs))
