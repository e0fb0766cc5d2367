import json

from crepa_mem.planning.planner import plan
from crepa_mem.profiles import get_encoder, get_gpu, get_model
from crepa_mem.planning.report import encoder_to_dict, gpu_profile_to_dict, model_to_dict, plan_to_dict


def test_plan_document_has_the_stable_keys_first_and_raw_bytes():
    p = plan("wan-2.1-14b", gpu="rtx4090", train_gib=18)
    d = plan_to_dict(p)
    assert list(d)[:7] == ["gpu", "model", "fits", "settings", "tiers", "estimate", "reasons"]
    assert d["fits"] is p.fits and d["tiers"] == p.tiers and d["reasons"] == p.reasons
    assert d["estimate"]["total_bytes"] == p.estimate.peak_bytes
    assert sum(d["estimate"]["components"].values()) >= d["estimate"]["total_bytes"] > 0
    assert all(isinstance(v, int) for v in d["estimate"]["components"].values())
    assert {"crepa_encoder", "crepa_encoder_image_size", "crepa_spatial_align", "crepa_drop_vae_encoder",
            "crepa_encoder_frames_batch_size"} <= set(d["settings"])
    assert d["gpu"]["total_bytes"] == get_gpu("rtx4090").memory_bytes
    assert json.loads(json.dumps(d)) == d  # plain JSON, nothing to stringify


def test_profile_documents():
    m = model_to_dict(get_model("ltxvideo"))
    assert m["family"] == "ltxvideo" and m["vae"]["temporal_compression"] == 8 and m["patch_size"] == [1, 1, 1]
    assert encoder_to_dict(get_encoder("dinov2_vitg14"))["hub_id"] == "facebook/dinov2-giant"
    g = gpu_profile_to_dict(get_gpu("h100"))
    assert g["name"] == "h100-sxm" and isinstance(g["aliases"], list)
