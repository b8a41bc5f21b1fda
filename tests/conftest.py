"""Shared fixtures: a tiny random-init CLIP checkpoint that builds in milliseconds, and in-process CLI runners."""

import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Two shared cores: one torch thread is several times faster than oversubscribed ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_name() -> str:
    """The tiny open_clip config shipped in embed/model_configs/ (registered by embed.backbone)."""
    return "dfclip-tiny"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model_name) -> Path:
    """A seeded random-init dfclip-tiny state dict saved as .safetensors; returns its path."""
    import open_clip
    from safetensors.torch import save_file

    import dfclip.embed.backbone  # noqa: F401  registers embed/model_configs with open_clip

    with torch.random.fork_rng():  # leave the global RNG as other tests expect it
        torch.manual_seed(0)
        model = open_clip.create_model(tiny_model_name, pretrained=None)
    path = tmp_path_factory.mktemp("tiny_checkpoint") / f"{tiny_model_name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _cli_runner(main_name: str, prog: str, capsys, monkeypatch):
    """Run a real entry point (with its UserError handling) in-process: (exit code, stdout, stderr)."""
    from dfclip import cli

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", [prog, *map(str, args)])
        capsys.readouterr()
        try:
            getattr(cli, main_name)()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def dfembed(capsys, monkeypatch):
    """`dfembed ARGS` through the real entry point, in this process."""
    return _cli_runner("dfembed_main", "dfembed", capsys, monkeypatch)


@pytest.fixture
def dfhead(capsys, monkeypatch):
    """`dfhead ARGS` through the real entry point, in this process."""
    return _cli_runner("dfhead_main", "dfhead", capsys, monkeypatch)
