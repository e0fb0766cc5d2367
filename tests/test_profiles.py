"""Profiles: built-in TOML data, name matching, SimpleTuner names, user profile directories."""
from __future__ import annotations

import pytest

from crepa_mem import profiles as P
from crepa_mem.errors import CrepaConfigError, ProfileNotFoundError

CHECKPOINTS = ["wan-2.1-1.3b", "wan-2.1-14b", "wan-2.2-ti2v-5b", "wan-2.2-a14b", "ltxvideo-2b", "ltxvideo-13b",
               "sanavideo-2b", "kandinsky5-video-lite", "kandinsky5-video-pro"]
GPUS = ["rtx3090", "rtx4090", "rtx5090", "rtx-a6000", "l40s", "a100-40gb", "a100-80gb", "h100-pcie", "h100-sxm",
        "h200", "b200"]


def test_builtin_catalog_has_every_required_entry():
    assert set(CHECKPOINTS) <= {m.name for m in P.list_models()}
    assert set(GPUS) <= {g.name for g in P.list_gpus()}
    assert {"dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"} <= {e.name for e in P.list_encoders()}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_profiles_are_consistent(name):
    m = P.get_model(name)
    assert 0 <= m.recommended_block < m.num_blocks
    m.check_shape(m.default_frames, m.default_height, m.default_width)  # the default shape is legal
    assert m.latent_frames(m.default_frames) >= 1 and m.tokens_per_frame(m.default_height, m.default_width) > 0
    assert m.vae.params == m.vae.params_encoder + m.vae.params_decoder


def test_family_names_give_the_documented_default_checkpoint():
    assert P.get_model("wan").name == "wan-2.1-1.3b"
    assert P.get_model("ltxvideo").name == "ltxvideo-2b"
    assert P.get_model("sanavideo").name == "sanavideo-2b"
    assert P.get_model("kandinsky5_video").name == "kandinsky5-video-lite"
    assert P.family_defaults()["wan"] == "wan-2.1-1.3b"


def test_names_match_case_insensitively_with_aliases_and_hub_ids():
    assert P.get_model("WAN-2.1-14B").name == "wan-2.1-14b"
    assert P.get_model("Wan-AI/Wan2.1-T2V-14B-Diffusers").name == "wan-2.1-14b"
    assert P.get_gpu("RTX 4090").name == "rtx4090"
    assert P.get_gpu("h100").name == "h100-sxm"
    assert P.get_gpu("NVIDIA GeForce RTX 4090").name == "rtx4090"  # NVML's device name
    assert P.get_gpu("NVIDIA H100 80GB HBM3").name == "h100-sxm"
    assert P.match_gpu("NVIDIA Tesla T4") is None


def test_gpu_specs_are_real_cards():
    g = P.get_gpu("rtx4090")
    assert g.memory_bytes == 24564 * 2**20 and g.pcie_gen == 4 and g.pcie_width == 16 and g.bf16_tflops == 165.2
    assert P.get_gpu("h100-sxm").bf16_tflops == 989.0 and P.get_gpu("h100-sxm").pcie_gen == 5


def test_encoders_accept_simpletuner_aliases_reg_variants_and_hub_ids():
    assert P.get_encoder("dino_v2_g").name == "dinov2_vitg14"
    assert P.get_encoder("dinov2_s").name == "dinov2_vits14"
    assert P.get_encoder("dinov2-vitb14").name == "dinov2_vitb14"
    assert P.get_encoder("facebook/dinov2-large").name == "dinov2_vitl14"
    reg = P.get_encoder("dinov2_vitg14_reg")
    assert reg.num_register_tokens == 4 and reg.hub_id == "facebook/dinov2-with-registers-giant"


def _dinov2_params(e: P.EncoderProfile) -> int:
    """transformers' Dinov2Model parameter count from the profile's shapes (hub image size 518)."""
    d, i, p = e.hidden_size, e.intermediate_size, e.patch_size
    embed = 3 * p * p * d + d + 2 * d + e.num_register_tokens * d + ((518 // p) ** 2 + 1) * d
    mlp = (2 * (d * i + i) + i * d + d) if e.mlp == "swiglu" else (d * i + i + i * d + d)
    layer = 2 * d + 4 * (d * d + d) + d + 2 * d + mlp + d
    return embed + e.num_layers * layer + 2 * d


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
                                  "dinov2_vitg14_reg"])
def test_encoder_shapes_account_for_every_parameter(name):
    e = P.get_encoder(name)
    assert _dinov2_params(e) == e.params


def test_param_formula_matches_transformers_on_tiny_models():
    from transformers import Dinov2Config, Dinov2Model

    for swiglu in (False, True):
        cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=518, patch_size=14,
                           use_swiglu_ffn=swiglu)
        real = sum(t.numel() for t in Dinov2Model(cfg).parameters())
        inter = (int(32 * 4 * 2 / 3) + 7) // 8 * 8 if swiglu else 128
        e = P.EncoderProfile("tiny", "", 32, 2, 2, inter, "swiglu" if swiglu else "mlp", 0)
        assert _dinov2_params(e) == real


def test_vae_parameter_counts_match_diffusers():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan

    for cls, name in ((AutoencoderKLWan, "wan-2.1"), (AutoencoderKLHunyuanVideo, "hunyuanvideo")):
        with init_empty_weights():
            vae = cls()
        count = lambda *prefixes: sum(t.numel() for n, t in vae.named_parameters() if n.startswith(prefixes))
        v = P.get_vae(name)
        assert (count("encoder", "quant_conv"), count("decoder", "post_quant_conv")) == (v.params_encoder,
                                                                                        v.params_decoder)


def test_vae_stream_block_params_are_the_largest_group_diffusers_offloads():
    import torch

    from crepa_mem.teacher.stream import StreamPlacement
    from crepa_mem.trace.runtime import FAKE_GPU, fake_gpu, materialize
    from crepa_mem.trace.workloads import build_vae

    with fake_gpu():  # bf16: 2 bytes per parameter
        groups = StreamPlacement(materialize(build_vae("hunyuanvideo"), "cpu", torch.bfloat16),
                                 exec_device=FAKE_GPU).groups()
    assert max(groups) == 2 * P.get_vae("hunyuanvideo").stream_block_params


def test_simpletuner_family_and_flavour():
    assert P.model_from_simpletuner("wan", None).name == "wan-2.1-1.3b"
    assert P.model_from_simpletuner("wan", "t2v-480p-14b-2.1").name == "wan-2.1-14b"
    assert P.model_from_simpletuner("wan", "ti2v-5b-2.2").name == "wan-2.2-ti2v-5b"
    assert P.model_from_simpletuner("wan", "i2v-14b-2.2-low").name == "wan-2.2-a14b"
    assert P.model_from_simpletuner("ltxvideo", "0.9.5").name == "ltxvideo-2b"
    assert P.model_from_simpletuner("sanavideo", "2b-480p").name == "sanavideo-2b"
    assert P.model_from_simpletuner("kandinsky5_video", "t2v-pro-sft-5s-hd").name == "kandinsky5-video-pro"
    with pytest.raises(ProfileNotFoundError, match="did you mean t2v-480p-14b-2.1"):
        P.model_from_simpletuner("wan", "t2v-480p-14b-2.2")
    with pytest.raises(ProfileNotFoundError):
        P.model_from_simpletuner("flux", None)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ProfileNotFoundError, match="did you mean wan"):
        P.get_model("wann")
    with pytest.raises(ProfileNotFoundError, match="rtx4090"):
        P.get_gpu("rtx4099")
    with pytest.raises(ProfileNotFoundError, match="dinov2_vitg14"):
        P.get_encoder("dinov2_vitg15")


def test_impossible_shapes_are_explained():
    m = P.get_model("wan")
    with pytest.raises(CrepaConfigError, match=r"1 \+ k×4.*77, 81"):
        m.check_shape(80, 480, 832)
    with pytest.raises(CrepaConfigError, match="multiple of 16"):
        m.check_shape(81, 500, 832)
    with pytest.raises(CrepaConfigError, match="multiple of 32"):
        P.get_model("ltxvideo").check_shape(161, 512, 720)


def test_user_profile_dir_adds_and_overrides(tmp_path, monkeypatch):
    (tmp_path / "mine.toml").write_text(
        '[gpu.mycard]\nmemory_gib = 12\npcie_gen = 3\npcie_width = 8\nbf16_tflops = 50.0\naliases = ["my card"]\n'
        '[gpu.rtx4090]\nmemory_gib = 20\n'
        '[model."wan-tiny"]\nfamily = "wan"\ndiffusers_class = "WanTransformer3DModel"\nblocks_attr = "blocks"\n'
        'num_blocks = 2\nhidden_size = 64\npatch_size = [1, 2, 2]\nparams = 1000\nvae = "wan-2.1"\n'
        'recommended_block = 1\ndefault_frames = 9\ndefault_height = 64\ndefault_width = 64\n')
    assert P.get_gpu("My Card", tmp_path).memory_bytes == 12 * 2**30
    g = P.get_gpu("rtx4090", tmp_path)
    assert g.memory_bytes == 20 * 2**30 and g.bf16_tflops == 165.2  # field-level override keeps the rest
    assert P.get_model("wan-tiny", str(tmp_path)).vae.name == "wan-2.1"
    assert P.get_gpu("rtx4090").memory_bytes == 24564 * 2**20  # built-ins untouched without the dir
    monkeypatch.setenv(P.ENV_VAR, str(tmp_path))
    assert P.get_gpu("mycard").pcie_width == 8


def test_bad_user_profiles_are_reported(tmp_path):
    with pytest.raises(CrepaConfigError, match="existing directory"):
        P.get_gpu("rtx4090", tmp_path / "missing")
    (tmp_path / "bad.toml").write_text("[gpu.x\n")
    with pytest.raises(CrepaConfigError, match="valid TOML"):
        P.get_gpu("rtx4090", tmp_path)
    (tmp_path / "bad.toml").write_text("[gpus.x]\nmemory_gib = 1\n")
    with pytest.raises(CrepaConfigError, match="gpus"):
        P.get_gpu("rtx4090", tmp_path)


@pytest.mark.parametrize("body, match", [
    ('[gpu.x]\nmemory_gib = "24"\npcie_gen = 4\npcie_width = 16\nbf16_tflops = 1.0\n', "memory_gib.*'24'.*a number > 0"),
    ("[gpu.x]\nmemory_gib = -1\n", "memory_gib.*-1.*a number > 0"),
    ("[gpu.x]\nmemory_gib = nan\n", "memory_gib.*nan"),
    ("[gpu.x]\npcie_gen = 4.5\n", "pcie_gen.*an integer ≥ 0"),
    ("[gpu.x]\naliases = \"x\"\n", "aliases.*a list of strings"),
    ("[model.m]\npatch_size = [1, 2]\n", "patch_size.*a list of 3 integers ≥ 1"),
    ("[model.m]\nnum_blocks = true\n", "num_blocks.*an integer ≥ 1"),
    ("[encoder.e]\nhidden_size = 0\n", "hidden_size.*an integer ≥ 1"),
    ("[vae]\nx = 1\n", r"\[vae.x\].*a table of fields"),
])
def test_wrong_types_and_ranges_in_profile_files_are_one_line(tmp_path, body, match):
    (tmp_path / "bad.toml").write_text(body)
    with pytest.raises(CrepaConfigError, match=match) as err:
        P.list_gpus(tmp_path)
    assert str(tmp_path / "bad.toml") in str(err.value) and "\n" not in str(err.value)


def test_profiles_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, crepa_mem.profiles as P; P.list_models(); "
            "print(','.join(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


@pytest.mark.parametrize("nvml_name,card,gib", [
    ("NVIDIA L4", "l4", 22.49), ("NVIDIA A10G", "a10g", 22.49), ("NVIDIA L40S", "l40s", 44.99),
    ("NVIDIA GeForce RTX 4080", "rtx4080", 15.99), ("NVIDIA GeForce RTX 4070 Ti", "rtx4070ti", 11.99),
    ("NVIDIA RTX 6000 Ada Generation", "rtx6000-ada", 47.99), ("NVIDIA A40", "a40", 44.99)])
def test_cards_people_train_on_resolve_from_their_nvml_names(nvml_name, card, gib):
    from crepa_mem.profiles import get_gpu

    g = get_gpu(nvml_name)
    assert g.name == card and g.memory_bytes / 2**30 == pytest.approx(gib, abs=0.01) and g.bf16_tflops > 0


def test_kandinsky5_default_shape_is_5_seconds_at_24_fps_and_pro_is_hd():
    from crepa_mem.profiles import get_model

    # diffusers' Kandinsky 5 video docs: Lite 512×768, the Pro ("hd" flavours) 768×1024, both 121 frames
    for name, shape in (("kandinsky5-video-lite", (121, 512, 768)), ("kandinsky5-video-pro", (121, 768, 1024))):
        m = get_model(name)
        assert (m.default_frames, m.default_height, m.default_width) == shape
        m.check_shape(m.default_frames, m.default_height, m.default_width)  # the VAE and patch grid accept it
    assert all(f.endswith("-hd") for f in get_model("kandinsky5-video-pro").simpletuner_flavours if f.startswith("t2v"))
