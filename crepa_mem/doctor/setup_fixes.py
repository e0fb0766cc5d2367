"""Findings for failures of the setup rather than of CREPA's memory: NVML and the driver (each of NVML's
failures with its own fix), the container toolkit, torch builds, torch.hub and its cache, pinned host
memory, tensors on two devices. The machine check (`machine`) uses the same NVML texts as the log check."""
from __future__ import annotations

from typing import Any, Mapping

from crepa_mem.doctor.findings import Finding

NVML_TEXTS: dict[str, tuple[str, str]] = {  # code → (what happened, what to do)
    "nvml_unavailable": (
        "The NVIDIA management library (libnvidia-ml) could not be loaded",
        "Install the NVIDIA driver's utilities (nvidia-smi must run); in a container run with --gpus all and the "
        "NVIDIA container toolkit (on WSL2 the library is /usr/lib/wsl/lib/libnvidia-ml.so.1, from the Windows "
        "driver)."),
    "nvml_unknown_error": (
        "NVML failed with \"Unknown Error\": inside a container this means the container lost its GPU devices "
        "(systemd revoked the device permissions, e.g. after `systemctl daemon-reload` on the host)",
        "Restart the container (docker restart / delete the pod): it regains the GPUs. To stop it recurring, "
        "on the host run `sudo nvidia-ctk system create-dev-char-symlinks --create-all` (NVIDIA container toolkit "
        "≥ 1.12; install it as a udev rule), or switch Docker to the cgroupfs driver "
        "(\"exec-opts\": [\"native.cgroupdriver=cgroupfs\"] in /etc/docker/daemon.json). Outside a container, "
        "reboot."),
    "driver_library_mismatch": (
        "The loaded NVIDIA kernel module and the user-space driver library have different versions "
        "(\"Driver/library version mismatch\": the driver was updated while the old module is still loaded)",
        "Reboot so the new kernel module loads; if it persists after a reboot, reinstall one driver version "
        "(remove the other packages, e.g. `apt list --installed | grep nvidia`), then check `nvidia-smi`."),
    "nvidia_smi_failed": (
        "nvidia-smi could not talk to the NVIDIA kernel module",
        "Check `lsmod | grep nvidia` and `dmesg | grep -i nvidia`. After a kernel update the module must be rebuilt "
        "(`sudo dkms autoinstall`, or reinstall the driver); with Secure Boot on, the module must be signed and "
        "enrolled (`mokutil --sb-state`). Reboot, then `nvidia-smi` must list the GPU."),
    "driver_not_loaded": (
        "The NVIDIA library is installed but the driver is not loaded: CUDA cannot see any GPU",
        "Load the driver (`sudo modprobe nvidia`, or reboot after a driver update) until `nvidia-smi` lists the GPU; "
        "for a container, the host's driver must be loaded before the container starts."),
    "driver_too_old": (
        "The NVIDIA driver is older than the CUDA runtime torch was built for",
        "Update the driver, or install a torch wheel built for an older CUDA (pip's --index-url "
        "https://download.pytorch.org/whl/cu121 …)."),
    "torch_without_cuda": (
        "This torch build has no CUDA support",
        "Install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu124, "
        "matching your driver)."),
}

DINOV2_NAMES = ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vits14_reg",
                "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg")
"""The DINOv2 backbones torch.hub's facebookresearch/dinov2 serves (the heads _lc/_ld/_dd are not encoders)."""

_HUB_CACHE = "~/.cache/torch/hub/facebookresearch_dinov2_main"
_HUB = {  # kind → (message, fix)
    "stale_cache": (
        "torch.hub's cached copy of facebookresearch/dinov2 has no {name}: the cache predates the models with "
        "registers (the name itself is valid)",
        "Reload the repository once: torch.hub.load('facebookresearch/dinov2', '{name}', force_reload=True), or "
        "delete " + _HUB_CACHE + " so the next run fetches the current hubconf.py."),
    "missing_hubconf": (
        "torch.hub found no hubconf.py{where}: the directory passed to torch.hub.load is not a hub repository "
        "(or its cache was half extracted)",
        "Point torch.hub.load(..., source='local') at the repository root, the folder that holds hubconf.py (a "
        "clone of facebookresearch/dinov2), or delete the broken cache folder under ~/.cache/torch/hub and load it "
        "again online."),
    "rate_limit": (
        "GitHub refused torch.hub's repository check (API rate limit)",
        "Pass trust_repo=True (torch ≥ 1.12 skips the check for a trusted repo) or skip_validation=True, or set "
        "GITHUB_TOKEN; once the repository is cached, later runs do not ask GitHub."),
    "hubconf_failed": (
        "An error was raised inside torch.hub or the repository's hubconf.py, not by the encoder name",
        "Reload the repository (force_reload=True, or delete " + _HUB_CACHE + "): an old cache can import code "
        "the installed torch no longer has; if it persists, the repository's hubconf needs a newer torch/Python."),
}


def setup_finding(code: str, d: Mapping[str, Any], at: str, details: dict) -> list[Finding]:
    """The finding for one setup event (empty when `code` is not one)."""
    if code in NVML_TEXTS:
        msg, fix = NVML_TEXTS[code]
        return [Finding(code, "error", f"{msg}{at}.", fix, details)]
    if code == "unknown_encoder":
        name = d.get("name") or "?"
        return [Finding(code, "error", f"The encoder {name!r} is not a known DINOv2 model{at}.",
                        'Set "crepa_encoder" to one of ' + ", ".join(n for n in DINOV2_NAMES if n != name) + ".",
                        details)]
    if code == "encoder_hub_error":
        msg, fix = _HUB[d.get("kind", "hubconf_failed")]
        where = f" at {d['path']}" if d.get("path") else ""
        return [Finding(code, "error", msg.format(name=d.get("name"), where=where) + f"{at}.",
                        fix.format(name=d.get("name")), details)]
    if code == "encoder_weights_missing":
        repo = d.get("repo") or "the DINOv2 repository"
        return [Finding(code, "error", f"The encoder's weights could not be loaded: {repo} is not cached and the "
                        f"hub is unreachable{at}.",
                        "On a machine with internet, fill the cache (`hf download facebook/dinov2-giant`, or run once "
                        "online), then copy ~/.cache/huggingface (and ~/.cache/torch/hub for SimpleTuner) over; or set "
                        '"crepa_mem_encoder_path" to a local directory.', details)]
    if code == "device_mismatch":
        return [_device_mismatch(d, at, details)]
    return []


def _device_mismatch(d: Mapping[str, Any], at: str, details: dict) -> Finding:
    devs = " and ".join(d.get("devices") or ["two devices"])
    if d.get("offload_in_traceback") or d.get("offload_in_log"):
        cause = ("an offload hook moved weights while the step ran" if d.get("offload_in_traceback") else
                 "an offload or RamTorch conversion left part of the model on another device")
        fix = ("Limit RamTorch to the DiT's blocks (\"ramtorch_target_modules\": \"blocks.*\") so the CREPA projector "
               "and the teacher stay where they are; let crepa-mem place the teacher (\"crepa_mem_encoder_tier\": "
               "\"swap\" instead of converting DINOv2); do not mix accelerate cpu_offload with group offloading on "
               "one module.")
    else:  # nothing in the log moves weights: the trainer put a tensor on the wrong device
        cause = ("a placement bug in the trainer: one input was left on the wrong device (nothing in this log moves "
                 "weights between devices)")
        fix = ("Update the trainer (and diffusers/accelerate) to the latest release: such placement bugs are fixed "
               "upstream. If it persists there, report it to the trainer with this traceback.")
    return Finding("device_mismatch", "error", f"Tensors on {devs} met in one operation{at}: {cause}.", fix,
                   details)


def pinned_finding(event, at: str, details: dict) -> Finding:
    """An OOM raised by a pinned (page-locked) host allocation: host memory, not GPU memory."""
    d = event.data
    wsl = d.get("wsl")
    msg = (f"A pinned (page-locked) host allocation failed{at}: `{d.get('exception', '')[:160]}` was raised by "
           f"{' → '.join(event.frames[-2:]) or 'a pin_memory / non-blocking copy'}. This is host memory, not GPU "
           "memory" + (" (WSL2 caps pinned memory far below the RAM size)" if wsl else "") + ".")
    fix = ("Pin less: fewer blocks on the swap/offload path (blocks_to_swap, \"ramtorch_target_modules\"), crepa-mem's "
           "\"crepa_mem_encoder_tier\": \"device\" (plain host copies) instead of swap/stream, DataLoader "
           "pin_memory=False, or the trainer's non-pinned fallback (musubi-tuner: no --use_pinned_memory_for_block_swap"
           "). Raise the locked-memory limit: `ulimit -l unlimited` (limits.conf memlock), `docker run --ulimit "
           "memlock=-1`" + ("; on WSL2 pinned memory stays limited whatever ulimit says: train without pinning "
                            "or on native Linux" if wsl else "") + ". Check free host RAM (`free -g`).")
    return Finding("pinned_memory_limited", "error", msg, fix, {**details, "source": "log"})
