"""Checkpoint files: every load is weights_only, and a bad file says what is wrong with it."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import REPO

from imgpipe.models.checkpoints import CheckpointError, read_checkpoint_state, read_torch_file, save_atomically


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.pt"
    torch.save({"state_dict": torch.nn.Linear(3, 2).state_dict()}, path)
    return path


def test_a_good_checkpoint_loads(good):
    assert set(read_checkpoint_state(good)) == {"weight", "bias"}


@pytest.mark.parametrize("damage, message", [
    (lambda path, data: path.write_bytes(data[: len(data) // 2]), r"is truncated or corrupt \(RuntimeError: "
                                                                  r"PytorchStreamReader failed reading zip archive"),
    (lambda path, data: path.write_bytes(b""), r"is empty \(0 bytes\)"),
    (lambda path, data: path.write_text("epoch,loss\n1,0.5\n"), r"is not a PyTorch checkpoint"),
    (lambda path, data: torch.save(torch.nn.Linear(3, 2), path), r"holds pickled Python objects besides tensors.*"
                                                                 r"save model.state_dict\(\) instead"),
    (lambda path, data: path.unlink(), r"does not exist"),
])
def test_a_bad_file_is_named_with_what_is_wrong(good, damage, message):
    damage(good, good.read_bytes())
    with pytest.raises(CheckpointError, match=message) as error:
        read_torch_file(good)
    assert str(good) in str(error.value)
    assert "weights_only=False" not in str(error.value)  # never advise loading untrusted pickles


def test_a_legacy_format_file_cut_short_is_reported_as_truncated(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="legacy.pt' is truncated or corrupt"):
        read_torch_file(path)


def test_saving_replaces_the_file_only_when_complete(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    save_atomically({"epoch": 1}, path)
    save_atomically({"epoch": 2}, path)
    assert read_torch_file(path) == {"epoch": 2}
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]  # no temporary file left behind


def test_every_torch_load_in_the_code_is_weights_only():
    calls = []
    for source in sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "workflow").rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                weights_only = {k.arg: k.value for k in node.keywords}.get("weights_only")
                calls.append((source.name, node.lineno, isinstance(weights_only, ast.Constant) and weights_only.value))
    assert calls, "no torch.load found: the scan is broken"
    assert all(safe is True for _, _, safe in calls), calls
