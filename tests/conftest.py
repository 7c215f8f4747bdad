"""Shared fixtures: tiny zoo pipelines saved once per session, loaded through from_pretrained."""

from __future__ import annotations

import pytest
import torch

from diffkit.zoo import save_tiny_pipeline

torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """A test that sets torch's thread count gets it back afterwards: later tests (and the subprocesses
    they compare with bit for bit) reduce floats with the process's usual number of threads."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """{"sd15": path, "sd2": path, "sdxl": path} of saved tiny pipelines (seed 0)."""
    root = tmp_path_factory.mktemp("zoo")
    return {fam: save_tiny_pipeline(root / fam, fam, seed=0) for fam in ("sd15", "sd2", "sdxl")}


def _load(path):
    import diffkit

    pipe = diffkit.DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def load_tiny(tiny_paths):
    """load_tiny("sd15") -> a fresh diffkit pipeline loaded from disk."""
    return lambda family="sd15": _load(tiny_paths[family])


@pytest.fixture
def gen():
    """gen(seed) -> a CPU torch.Generator."""
    return lambda seed=0: torch.Generator().manual_seed(seed)


@pytest.fixture
def interrupted_erase(load_tiny, monkeypatch):
    """interrupted_erase(cfg, out, method_cls, at=3): run an erasure job on the tiny SD1.5 that a
    KeyboardInterrupt stops in the ``at``-th call of ``method_cls.loss`` (as Ctrl-C would), after the
    checkpoints of the steps before it."""
    from diffkit.erasure import erase

    def run(cfg, out, method_cls, at: int = 3) -> None:
        real, calls = method_cls.loss, []

        def flaky(self, ctx):
            calls.append(1)
            if len(calls) == at:
                raise KeyboardInterrupt
            return real(self, ctx)

        with monkeypatch.context() as m:
            m.setattr(method_cls, "loss", flaky)
            with pytest.raises(KeyboardInterrupt):
                erase(load_tiny("sd15"), cfg, out, progress=False)

    return run
