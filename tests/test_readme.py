"""The README's "Use" section runs as written, with a tiny offline pipeline where it says
`StableDiffusionPipeline.from_pretrained(...)` (nothing can be downloaded here), and
examples/use.py runs the same calls."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
LOAD = "pipe = StableDiffusionPipeline.from_pretrained(...)"


def use_block() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("```python\n", text.index("\n## Use\n")) + len("```python\n")
    return text[start : text.index("```", start)]


def test_the_readme_use_section_runs_as_written():
    sys.path.insert(0, str(EXAMPLES))
    from offline_pipeline import tiny_stable_diffusion

    block = use_block()
    assert block.count(LOAD) == 1
    code = block.replace(LOAD, "pipe = tiny_stable_diffusion()")
    scope = {"tiny_stable_diffusion": tiny_stable_diffusion}
    exec(compile(code, "README.md (Use)", "exec"), scope)
    assert scope["image"].size == (32, 32)  # the drop-in's prompt-only call, the last one shown


def test_examples_use_runs_every_call_of_the_readme():
    script = (EXAMPLES / "use.py").read_text()
    skipped = {LOAD, "from diffusers import StableDiffusionPipeline"}
    missing = [line for line in use_block().splitlines() if line.strip() and line not in skipped and line not in script]
    assert not missing
    env = dict(os.environ, PYTHONPATH=str(EXAMPLES))
    done = subprocess.run([sys.executable, str(EXAMPLES / "use.py")], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "every call of the README's Use section ran" in done.stdout


MODULAR_LOAD = "pipe = ModularPipeline.from_pretrained(...)  # e.g. an SDXL repo, then pipe.load_components()"


def test_the_readme_modular_section_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the block saves a guider config to ./my-guider
    sys.path.insert(0, str(EXAMPLES))
    from offline_pipeline import tiny_modular_sdxl

    text = (REPO / "README.md").read_text()
    start = text.index("\n## diffusers modular pipelines\n")
    section = text[start : text.index("\n## ", start + 1)]
    blocks = [part.split("```")[0] for part in section.split("```python\n")[1:]]
    assert len(blocks) == 2 and blocks[0].count(MODULAR_LOAD) == 1
    scope = {"tiny_modular_sdxl": tiny_modular_sdxl}
    for k, block in enumerate(blocks):
        exec(compile(block.replace(MODULAR_LOAD, "pipe = tiny_modular_sdxl()"), f"README.md (modular {k})", "exec"), scope)
        assert scope["image"].size == (32, 32)
    saved = scope["SelfAttentionGuidance"].from_pretrained("my-guider")
    assert saved.sag_scale == 0.75 and saved.guidance_scale == 5.0


WAN_LOAD = "pipe = WanPipeline.from_pretrained(...)  # e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def test_the_readme_video_example_runs_as_written():
    sys.path.insert(0, str(EXAMPLES))
    from offline_pipeline import tiny_wan

    text = (REPO / "README.md").read_text()
    start = text.rindex("```python\n", 0, text.index(WAN_LOAD)) + len("```python\n")
    block = text[start : text.index("```", start)]
    assert block.count(WAN_LOAD) == 1
    scope = {"tiny_wan": tiny_wan}
    exec(compile(block.replace(WAN_LOAD, "pipe = tiny_wan()"), "README.md (video)", "exec"), scope)
    assert scope["video"].shape == (33, 256, 256, 3)  # 33 frames of 256x256
