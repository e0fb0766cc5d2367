"""crepa_mem.trace.call: the whole CREPA call (real compute_loss and backward) on the fake GPU, by phase;
host → device traffic per side against weights × passes."""
import pytest

from crepa_mem.profiles import get_encoder, get_vae
from crepa_mem.teacher.placement import module_bytes
from crepa_mem.trace.workloads import TeacherSettings, Workload, build_encoder, trace_candidate

SMALL = dict(model="wan-2.1-1.3b", frames=9, height=64, width=64, encoder="dinov2_vits14", image_size=56)
CONSTANTS = 2 * 3 * 4  # ImageNet mean and std, made from Python lists on the device once per encoder chunk (fp32)


def test_phases_split_the_call_and_the_loss_comes_after_the_teacher_let_go():
    r = trace_candidate(Workload(**SMALL), TeacherSettings(encoder_tier="swap", vae_tier="swap", chunk=1))
    assert {"decode", "encode", "teacher", "loss", "step"} <= set(r.phases)
    # swap: the teacher's weights have left before the loss phase, which holds only the regularizer's side
    assert r.loss_peak_bytes < min(r.phases["decode"], r.phases["encode"])
    assert r.peak_bytes == max(r.teacher_peak_bytes, r.loss_peak_bytes)


def test_h2d_bytes_are_weights_times_passes_for_swap():
    w = Workload(**SMALL)
    chunks = w.shapes()["dit_frames"]
    r = trace_candidate(w, TeacherSettings(encoder_tier="swap", vae_tier="swap", chunk=1))
    assert r.h2d_bytes["vae"] == get_vae("wan-2.1").params * 2  # bf16, once per step
    assert r.h2d_bytes["encoder"] == module_bytes(build_encoder("dinov2_vits14")) + chunks * CONSTANTS
    gpu = trace_candidate(w, TeacherSettings(chunk=1))
    assert gpu.h2d_bytes == {"vae": 0, "encoder": chunks * CONSTANTS}


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_streamed_encoder_moves_its_weights_once_per_step_whatever_the_chunk(chunk):
    """Layer-major: every chunk passes a layer before the next one loads, so the weights cross once."""
    w = Workload(**SMALL)
    frames = w.shapes()["dit_frames"]
    calls = -(-frames // chunk) if chunk else 1
    r = trace_candidate(w, TeacherSettings(encoder_tier="stream", chunk=chunk))
    assert r.h2d_bytes["encoder"] == module_bytes(build_encoder("dinov2_vits14")) + calls * CONSTANTS


def test_a_feature_cache_for_the_chunked_loss_stays_on_the_host():
    """Staged: the clip's features never sit on the GPU, only the chunks' windows of them: the teacher side
    holds the projector with its Adam states and the latents alone."""
    w = Workload(**SMALL)
    s = w.shapes()
    latents = 4 * w.batch * s["latent_channels"] * s["latent_frames"] * s["latent_height"] * s["latent_width"]
    staged = trace_candidate(w, TeacherSettings(feature_cache=True, loss_chunk=1))
    assert staged.teacher_peak_bytes == staged.weights_bytes + latents
    whole = trace_candidate(w, TeacherSettings(feature_cache=True))
    features = 4 * w.batch * s["dit_frames"] * s["encoder_tokens"] * 384  # ViT-S/14 fp32
    assert whole.teacher_peak_bytes == whole.weights_bytes + latents + features


def test_the_teachers_features_wait_on_the_host_for_the_chunked_loss():
    """With crepa_mem_loss_chunk the encoder writes each call's tokens to the host: the encode phase no longer
    holds the clip's features on the GPU, and the loss phase holds only each chunk's window of them."""
    w = Workload(**SMALL)
    s = w.shapes()
    features = 4 * w.batch * s["dit_frames"] * s["encoder_tokens"] * 384  # ViT-S/14 fp32
    on_gpu = trace_candidate(w, TeacherSettings(encoder_tier="swap", vae_tier="swap", chunk=1))
    staged = trace_candidate(w, TeacherSettings(encoder_tier="swap", vae_tier="swap", chunk=1, loss_chunk=1))
    assert on_gpu.phases["encode"] - staged.phases["encode"] >= features * 0.9
    assert staged.host_peak_bytes >= features
