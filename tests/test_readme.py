"""Every code block of README.md runs, so a README that drifts from the code fails CI.

How a block is run, by its fence's language:
- ```bash: each command (backslash continuations joined, `# comments` dropped) runs with bash in a
  scratch folder holding tiny stand-ins for the README's placeholders (config.json, train.py, traceback.txt,
  cache/vae latents, a Hugging Face cache with tiny random DINOv2 and Wan VAE under the real hub ids), with
  the STAND_INS rewrites below (full-size shapes and step counts made small). It must exit 0 (doctor may
  exit 1 for a finding, plan 3 for "does not fit") and never print a traceback.
- ```python: exec'd with tiny random models from crepa_mem.testing in place of `transformer`, `vae`, the
  inputs and the accelerator (see python_stand_ins).
- ```json: read by CrepaConfig.from_dict, with no unknown key.
- ```text: not code (a tree, a sample output).
A block that cannot run on a CPU says so in an HTML comment on the line before its fence:
`<!-- readme-test: skip: <why> -->`. Any other fence language, or a skip without a reason, fails here.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import test_multigpu

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = {"bash", "python", "json"}
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*:?\s*(.*?)\s*-->\s*$")

# (pattern, replacement, applies to lines containing): full-size placeholders → tiny stand-ins.
STAND_INS = [
    (r"--frames 81 --height 480 --width 832", "--frames 9 --height 64 --width 64", "crepa-mem trace"),
    (r"--encoder dinov2_vitg14 --image-size 518", "--encoder dinov2_vits14 --image-size 70", "crepa-mem trace"),
    (r"--steps \d+", "--steps 2", "examples/"),
    (r"(examples/train_wan_\w+\.py)(?!.*--steps)", r"\1 --steps 2", "examples/"),
]
PY_STAND_INS = [(r"hidden_size=\d+", "hidden_size=32")]  # the README's Wan width; the stand-in DiT is 32 wide


@dataclass
class Block:
    lang: str
    code: str
    line: int
    skip: str | None

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'untagged'}"


def readme_blocks(text: str | None = None) -> list[Block]:
    text = README.read_text() if text is None else text
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        out.append(Block(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1,
                         skip.group(1) if skip else None))
    return out


def shell_commands(code: str) -> list[str]:
    """One command per line, continuations joined, comments (` # …` and whole-line) dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            commands.append(line)
    return commands


def stand_in(command: str) -> str:
    for pattern, replacement, where in STAND_INS:
        if where in command:
            command = re.sub(pattern, replacement, command)
    return command


BLOCKS = readme_blocks()


def test_blocks_are_found_and_every_one_is_runnable_text_or_says_why_not():
    assert len(BLOCKS) >= 15  # the extraction finds the README's blocks (a broken fence would hide them)
    for b in BLOCKS:
        if b.skip is not None:
            assert len(b.skip) >= 10, f"README line {b.line}: a skip needs its reason: <!-- readme-test: skip: why -->"
        else:
            assert b.lang in RUNNABLE | {"text"}, \
                f"README line {b.line}: fence language {b.lang!r}: use bash, python, json or text, or opt out with " \
                "<!-- readme-test: skip: why --> on the line before"


def test_extraction_handles_continuations_comments_and_markers():
    text = "x\n<!-- readme-test: skip: needs a GPU -->\n```bash\ngpu-thing\n```\n\n```bash\na \\\n  --b 1   # c\n# d\ne\n```\n"
    first, second = readme_blocks(text)
    assert first.skip == "needs a GPU" and second.skip is None
    assert shell_commands(second.code) == ["a --b 1", "e"]
    assert stand_in("python examples/train_wan_lora.py --fixed-batch") == \
        "python examples/train_wan_lora.py --steps 2 --fixed-batch"


# ------------------------------------------------------------------ stand-ins

@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder where the README's relative paths exist, and an offline HF cache with tiny models."""
    import torch

    from crepa_mem.profiles import get_encoder, get_model
    from crepa_mem.testing import tiny_dinov2, tiny_vae

    root = tmp_path_factory.mktemp("readme")
    for name in ("examples", "benchmarks"):
        (root / name).symlink_to(ROOT / name)
    hub = root / "hf" / "hub"
    commit = "0" * 40

    def snapshot(repo: str) -> Path:
        base = hub / ("models--" + repo.replace("/", "--"))
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / "main").write_text(commit)
        return base / "snapshots" / commit

    for name in ("dinov2_vitg14", "dinov2_vits14"):
        tiny_dinov2().save_pretrained(snapshot(get_encoder(name).hub_id))
    tiny_vae("wan").save_pretrained(snapshot(get_model("wan-2.1-14b").hub_id) / "vae")
    (root / "config.json").write_text(json.dumps({
        "model_family": "wan", "model_flavour": "t2v-480p-1.3b-2.1", "crepa_enabled": True, "crepa_block_index": 1,
        "crepa_encoder": "dinov2_vitg14", "crepa_encoder_image_size": 70}))
    oom = (ROOT / "tests" / "fixtures" / "doctor" / "oom_encoder_crepa_mem_rtx3090_torch21.log").read_text()
    (root / "traceback.txt").write_text(oom)
    (root / "train.py").write_text(f"import sys\nsys.stderr.write({oom!r})\nsys.exit(1)\n")  # a run that OOMs
    (root / "cache" / "vae").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        torch.save(torch.randn(16, 3, 4, 4, generator=g), root / "cache" / "vae" / f"clip{i}.pt")
    return root


def _env(scratch: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_VISIBLE", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(HF_HOME=str(scratch / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]), COLUMNS="100")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return env


def _ok_codes(command: str) -> set[int]:
    return {0} | ({1} if "crepa-mem doctor" in command else set()) | ({3} if "crepa-mem plan" in command else set())


# README lines another test runs verbatim with more checks (each a multi-process launch, ~15 s): not twice
RUN_ELSEWHERE = {test_multigpu.README_DDP: "tests/test_multigpu.py (DDP equals 1 process)",
                 test_multigpu.README_FSDP: "tests/test_multigpu.py (FSDP1/2 equal 1 process)"}
ALL_SHELL = [(b, c) for b in BLOCKS if b.lang == "bash" and b.skip is None for c in shell_commands(b.code)]
SHELL = [(b, c) for b, c in ALL_SHELL if c not in RUN_ELSEWHERE]


def test_lines_run_elsewhere_are_still_readme_lines():
    assert set(RUN_ELSEWHERE) <= {c for _, c in ALL_SHELL}, "a README line tests/test_multigpu.py runs has changed"


# One xdist group per block: its commands share the scratch folder and run in order on one worker.
@pytest.mark.parametrize("block, command", [pytest.param(b, c, marks=pytest.mark.xdist_group(f"readme-{b.id}"))
                                            for b, c in SHELL], ids=[f"{b.id}:{c[:50]}" for b, c in SHELL])
def test_shell_command_runs(scratch, block, command):
    run = stand_in(command)
    res = subprocess.run(["bash", "-c", run], cwd=scratch, env=_env(scratch), capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL)
    out = res.stdout + res.stderr
    assert res.returncode in _ok_codes(command), f"README line {block.line}: `{run}` exited {res.returncode}:\n{out[-3000:]}"
    assert "Traceback (most recent call last)" not in out.replace(
        (scratch / "traceback.txt").read_text(), ""), f"README line {block.line}: `{run}`:\n{out[-3000:]}"


# ------------------------------------------------------------------ python and json

def python_stand_ins() -> dict:
    """What the README's snippets take as given: a stock diffusers Wan DiT and VAE (tiny, random), its
    inputs, clean latents of the same shape, a CPU accelerator."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from crepa_mem.testing import tiny_transformer, tiny_transformer_inputs, tiny_vae

    transformer = tiny_transformer("wan", num_layers=3).train()
    inputs = tiny_transformer_inputs("wan", transformer, latent_frames=3, latent_height=8, latent_width=8)
    noisy = inputs["hidden_states"]
    return {"torch": torch, "F": F, "transformer": transformer, "vae": tiny_vae("wan"), "inputs": inputs,
            "clean_latents": torch.randn_like(noisy), "noisy": noisy, "t": inputs["timestep"],
            "text": inputs["encoder_hidden_states"], "target": torch.randn_like(noisy), "global_step": 0,
            "max_steps": 10, "accelerator": Accelerator(cpu=True)}


PYTHON = [b for b in BLOCKS if b.lang == "python" and b.skip is None]


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs(scratch, block, monkeypatch):
    from huggingface_hub import constants

    for key, value in _env(scratch).items():
        if key.startswith("HF_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(scratch / "hf" / "hub"))  # read once at import
    monkeypatch.chdir(scratch)
    code = block.code
    for pattern, replacement in PY_STAND_INS:
        code = re.sub(pattern, replacement, code)
    namespace = python_stand_ins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no GPU here: plan() says it plans for a catalog card
        exec(compile(code, f"README.md:{block.line}", "exec"), namespace)


JSON = [b for b in BLOCKS if b.lang == "json" and b.skip is None]


@pytest.mark.parametrize("block", JSON, ids=[b.id for b in JSON])
def test_json_block_is_a_valid_config(block):
    from crepa_mem import CrepaConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown (misspelled) key warns: fail on it
        cfg = CrepaConfig.from_dict(json.loads(block.code))
    assert cfg.enabled and not cfg.ignored_keys
