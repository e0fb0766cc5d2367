import pytest
import torch

from crepa_mem.teacher.encoders import hub_id_for, load_encoder
from crepa_mem.errors import CrepaConfigError, EncoderNotAvailableError
from crepa_mem.testing import tiny_dinov2


def test_names_map_to_hub_ids_and_hub_ids_pass_through():
    assert hub_id_for("dinov2_vitg14") == "facebook/dinov2-giant"
    assert hub_id_for("dinov2_vits14") == "facebook/dinov2-small"
    assert hub_id_for("facebook/dinov2-base") == "facebook/dinov2-base"


@pytest.mark.parametrize("registers", [False, True])
def test_loads_a_local_directory_frozen_in_the_asked_dtype(tmp_path, registers):
    tiny_dinov2(registers=registers).save_pretrained(tmp_path / "enc")
    model = load_encoder("dinov2_vitg14", path=tmp_path / "enc", dtype="bf16")
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.bfloat16
    assert type(model).__name__ == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
    assert type(load_encoder(str(tmp_path / "enc"))).__name__ == type(model).__name__  # a directory as the name


def test_missing_weights_say_what_to_fetch_without_touching_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(EncoderNotAvailableError, match="facebook/dinov2-small") as err:
        load_encoder("dinov2_vits14")
    assert "huggingface-cli download facebook/dinov2-small" in str(err.value)
    assert "crepa_mem_encoder_path" in str(err.value)


class _Payload:
    """A pickle that would run code if it were unpickled unsafely."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["unsafe", "corrupt"])
def test_an_unsafe_or_corrupt_pytorch_model_bin_is_one_line_and_never_runs(tmp_path, kind):
    folder = tmp_path / "enc"
    tiny_dinov2().save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    if kind == "unsafe":
        torch.save({"w": _Payload(marker)}, folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x02garbage" * 50)
    with pytest.raises(EncoderNotAvailableError, match="pytorch_model.bin|cannot be loaded|no loadable weights") as err:
        load_encoder(str(folder))
    assert "\n" not in str(err.value) and not marker.exists()


@pytest.mark.parametrize("name,path,key", [("dinov2_vitg14", "nope", "crepa_mem_encoder_path"),
                                           ("./missing", None, "crepa_encoder"),
                                           ("/no/such/folder", None, "crepa_encoder")])
def test_a_local_folder_that_does_not_exist_is_bad_input_at_once(name, path, key, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):  # a local path must never be looked up on the hub
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(CrepaConfigError, match=f"{key}=.*existing local folder") as err:
        load_encoder(name, path=path)
    assert err.value.exit_code == 2


def test_a_local_folder_loads_with_local_files_only(tmp_path, monkeypatch):
    tiny_dinov2().save_pretrained(tmp_path / "enc")
    seen = {}
    from transformers import AutoModel

    real = AutoModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", classmethod(spy))
    load_encoder("dinov2_vits14", path=tmp_path / "enc")
    assert seen["local_files_only"] is True
