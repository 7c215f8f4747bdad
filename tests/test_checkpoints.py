"""Checkpoint writers are atomic as a whole: a kill between any two writes resumes to the same result.

Every checkpoint goes through :class:`diffkit.artifacts.CheckpointStore` (tensors under a step-named file,
then one pointer switch). A "kill" here is an exception raised at the n-th file switch
(``diffkit.artifacts._replace``), for every n of a run: nothing after it happens, as after SIGKILL.
"""

from __future__ import annotations

import pytest
import torch

import diffkit.artifacts as artifacts
from diffkit.artifacts import ArtifactError, CheckpointStore, atomic_write_json, read_json


class Killed(BaseException):
    """Not an Exception: no handler of the code under test catches it (like a SIGKILL)."""


def kill_at(monkeypatch, n: int) -> list:
    real, calls = artifacts._replace, []

    def replace(tmp, path):
        calls.append(path)
        if len(calls) == n:
            raise Killed
        real(tmp, path)

    monkeypatch.setattr(artifacts, "_replace", replace)
    return calls


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_kill_between_writes_leaves_the_previous_checkpoint(tmp_path, monkeypatch, n):
    store = CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(3)}, {"note": "one"})
    kill_at(monkeypatch, n)
    try:
        store.save(2, {"w": torch.full((3,), 2.0)}, {"note": "two"})
        store.save(3, {"w": torch.full((3,), 3.0)}, {"note": "three"})
    except Killed:
        pass
    monkeypatch.undo()
    info, tensors = store.load()
    # The pointer is the only switch: the tensors are always those of the step it names.
    assert torch.equal(tensors["w"], torch.full((3,), float(info["step"])))
    assert info["step"] == {1: 1, 2: 1, 3: 2}[n]


def test_written_files_are_shared_and_nan_is_refused(tmp_path):
    import os
    import stat

    store = CheckpointStore(tmp_path)
    path = store.save(5, {"w": torch.zeros(2)}, {})
    umask = os.umask(0)
    os.umask(umask)
    for f in (path, store.pointer):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        atomic_write_json(tmp_path / "x.json", {"loss": float("nan")})
    assert not (tmp_path / "x.json").exists() and [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []
    (tmp_path / "checkpoint-00000005.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ArtifactError, match="is not a readable safetensors file"):
        store.load()
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ArtifactError, match="cannot read"):
        read_json(tmp_path / "bad.json")


def test_mask_learning_resumes_to_the_same_masks_after_a_kill_at_every_write(load_tiny, tmp_path, monkeypatch):
    from diffkit.pruning import MaskLearningConfig, learn_masks

    prompts = ["a red star", "a blue circle", "a green square"]
    cfg = MaskLearningConfig(num_inference_steps=2, guidance_scale=5.0, epochs=1, checkpoint_every=1, seed=0)
    full = learn_masks(load_tiny("sd15"), prompts, cfg, checkpoint_dir=tmp_path / "full", progress=False)
    writes = 2 * full.steps_done  # per checkpoint: the tensor file, then the pointer
    for n in range(1, writes + 1):
        folder = tmp_path / f"kill{n}"
        kill_at(monkeypatch, n)
        with pytest.raises(Killed):
            learn_masks(load_tiny("sd15"), prompts, cfg, checkpoint_dir=folder, progress=False)
        monkeypatch.undo()
        resumed = learn_masks(load_tiny("sd15"), prompts, cfg, checkpoint_dir=folder, progress=False)
        assert resumed.history == full.history, n
        assert all(torch.equal(resumed.logits[k], full.logits[k]) for k in full.logits), n
