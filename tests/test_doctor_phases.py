"""Phases from traceback frames: diffusers' paths and the trainers' own model code (Wan, HunyuanVideo,
LTX-Video, ComfyUI, VideoX-Fun) by path, function and class names; conditioning encoders; pinned host copies."""
from __future__ import annotations

import pytest

from crepa_mem.doctor.phases import classify_phase, frame_phase, pinned_host_copy


def test_phase_rules_on_frames():
    backward = [("/x/accelerate/accelerator.py", "backward", "loss.backward(**kwargs)"),
                ("/x/torch/autograd/graph.py", "_engine_run_backward",
                 "return Variable._execution_engine.run_backward(")]
    assert classify_phase(backward) == ("transformer", "backward")
    vae_encode = [("/st/helpers/caching/vae.py", "encode_images", "latents = self.vae.encode(pixels)"),
                  ("/x/diffusers/models/autoencoders/autoencoder_kl_wan.py", "encode", "out = self.encoder(x)"),
                  ("/x/torch/nn/modules/conv.py", "_conv_forward", "return F.conv3d(")]
    assert classify_phase(vae_encode) == ("unknown", "vae_encode")
    t5 = [("/x/transformers/models/t5/modeling_t5.py", "forward", "encoder_outputs = self.encoder(")]
    assert classify_phase(t5) == ("unknown", "text_encoder")  # a text encoder is not CREPA's encoder
    windows = [("C:\\st\\.venv\\Lib\\site-packages\\diffusers\\models\\transformers\\transformer_wan.py",
                "forward", "")]
    assert classify_phase(windows) == ("transformer", "transformer_wan.py:forward")
    assert classify_phase([("/x/torch/optim/adamw.py", "step", "")]) == ("unknown", None)
    assert classify_phase([]) == ("unknown", None)


@pytest.mark.parametrize("frames, phase", [
    ([("/st/helpers/training/crepa.py", "_decode_latents", "decoded = vae.decode(latents).sample")], "vae_decode"),
    ([("/venv/crepa_mem/teacher.py", "iter_decoded_frames", "")], "vae_decode"),
    ([("/venv/crepa_mem/teacher/wan_decode.py", "decode_kept_frames", "x, decoded = _tiled(vae, z, keep)"),
      ("/venv/crepa_mem/teacher/wan_decode.py", "_causal_conv_one_buffer", "return nn.Conv3d.forward(self, buf)")],
     "vae_decode"),
    ([("/st/helpers/training/crepa.py", "_forward_encoder", "output = self.encoder(images)")], "encoder"),
    ([("/venv/crepa_mem/teacher.py", "encode_tokens", "out = encoder(pixel_values=images)")], "encoder"),
    ([("/root/.cache/torch/hub/facebookresearch_dinov2_main/dinov2/layers/block.py", "forward", "")], "encoder"),
    ([("/st/helpers/training/crepa.py", "_project_hidden_states", "projected = self.projector(flattened)")],
     "projector"),
    ([("/venv/crepa_mem/loss.py", "frame_similarity", "")], "projector"),
    ([("/st/helpers/models/wan/model.py", "model_predict", "model_output = self.model(")], "transformer"),
])
def test_phase_of_single_frames(frames, phase):
    assert classify_phase(frames)[0] == phase


@pytest.mark.parametrize("frames, phase, where", [
    ([("/mt/src/musubi_tuner/wan/modules/model.py", "forward", "x = block(x, **kwargs)"),
      ("/mt/src/musubi_tuner/wan/modules/attention.py", "flash_attention", "x = sdpa(q, k, v)")],
     "transformer", "attention.py:flash_attention"),
    ([("StableAvatar-main/wan/models/wan_fantasy_transformer3d_1B.py", "attention", "out = sdpa(")],
     "transformer", "wan_fantasy_transformer3d_1B.py:attention"),
    ([("/HunyuanVideo/hyvideo/modules/models.py", "forward", "img, txt = block(*double_block_args)")],
     "transformer", "models.py:forward"),
    ([("/LTX-Video/ltx_video/models/transformers/transformer3d.py", "forward", "hidden_states = block(")],
     "transformer", "transformer3d.py:forward"),
    ([("C:\\ComfyUI\\comfy\\samplers.py", "_calc_cond_batch", ""),
      ("C:\\ComfyUI\\comfy\\ldm\\wan\\model.py", "forward", "y = self.self_attn("),
      ("C:\\ComfyUI\\comfy\\ldm\\modules\\attention.py", "attention_pytorch", "out = sdpa(")],
     "transformer", "model.py:forward"),
    ([("/x/wan/modules/vae.py", "decode", "out = self.decoder(x)")], "vae_decode", "vae.py:decode"),
    ([("/mt/hunyuan_model/autoencoder_kl_causal_3d.py", "spatial_tiled_decode", "decoded = self.decoder(tile)")],
     "vae_decode", "autoencoder_kl_causal_3d.py:spatial_tiled_decode"),
    ([("/LTX-Video/ltx_video/models/autoencoders/vae_encode.py", "vae_decode", "")], "vae_decode",
     "vae_encode.py:vae_decode"),
    ([("/ComfyUI/nodes.py", "decode", "images = vae.decode(samples['samples'])"),
      ("/ComfyUI/comfy/sd.py", "decode", "self.first_stage_model.decode(samples)")], "vae_decode", "sd.py:decode"),
    ([("/app/pipeline.py", "__call__", "video = self.vae.decode(latents)"),
      ("/x/torch/nn/modules/conv.py", "_conv_forward", "")], "vae_decode", "pipeline.py:__call__"),
    ([("/app/train.py", "step", "feats = self.teacher(pixels)  # Dinov2Model"),
      ("/x/torch/nn/functional.py", "linear", "")], "encoder", "train.py:step"),  # the class name says DINOv2
    ([("/ComfyUI/comfy/sd1_clip.py", "encode_token_weights", ""),
      ("/ComfyUI/comfy/text_encoders/t5.py", "forward", ""),
      ("/ComfyUI/comfy/ldm/modules/attention.py", "attention_pytorch", "")], "unknown", "text_encoder"),
    ([("/Wan2.1/wan/modules/clip.py", "forward", "x = self.visual(videos)")], "unknown", "image_encoder"),
    ([("/x/comfy/ldm/modules/attention.py", "attention_pytorch", "")], "transformer",
     "attention.py:attention_pytorch"),  # a weak sign alone still decides
])
def test_trainers_own_model_code(frames, phase, where):
    assert classify_phase(frames) == (phase, where)


def test_strong_frames_beat_weak_ones_and_order_matters():
    assert frame_phase("/x/diffusers/models/attention_processor.py", "__call__", "")[:2] == ("transformer", False)
    vae_attention = [("/x/diffusers/models/autoencoders/autoencoder_kl_wan.py", "decode", ""),
                     ("/x/diffusers/models/attention_processor.py", "__call__", "")]
    assert classify_phase(vae_attention)[0] == "vae_decode"


@pytest.mark.parametrize("frames, pinned", [
    ([("/t/utils/data/_utils/pin_memory.py", "pin_memory", "return data.pin_memory(device)")], True),
    ([("/r/ramtorch/modules/linear.py", "__init__", 'torch.empty( out, inp, device="cpu" ).pin_memory()')], True),
    ([("/dp/utils/offloading.py", "prepare_block_devices_before_forward", "weights_to_device(b, torch.device('cpu'))"),
      ("/dp/utils/offloading.py", "weights_to_device", "w.data = w.data.to(device, non_blocking=True)")], True),
    ([("/app/train.py", "step", "x = x.to('cuda', non_blocking=True)")], False),  # host→device: the GPU side
    ([("/wan/modules/model.py", "forward", "y = self.norm1(x)")], False),
])
def test_pinned_host_copies(frames, pinned):
    assert pinned_host_copy(frames) is pinned
