"""An unreadable optimizer.pt is named, the checkpoint declared unusable for ΔH/Fisher, and no
advice to lower `weights_only` (which would run the file's pickle code) reaches the user."""

from __future__ import annotations

import pytest
import torch

from entroflow.lm.checkpoints import PARAM_NAMES_FILE, CheckpointError, load_adam_state


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def truncated(path):
    torch.save({"state": {}, "param_groups": []}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "write,reason",
    [
        (lambda p: p.write_bytes(b""), "truncated or damaged"),
        (truncated, "truncated or damaged"),
        (lambda p: p.write_bytes(b"not torch at all"), "not unpickled"),
        (lambda p: torch.save({"x": Payload()}, p), "not unpickled"),
    ],
    ids=["empty", "truncated", "garbage", "pickle-payload"],
)
def test_unreadable_optimizer_state_is_one_line(tmp_path, capsys, write, reason):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / PARAM_NAMES_FILE).write_text("[]")
    write(folder / "optimizer.pt")
    with pytest.raises(CheckpointError) as caught:
        load_adam_state(folder)
    message = str(caught.value)
    assert str(folder / "optimizer.pt") in message and reason in message
    assert "cannot be used for ΔH or the Fisher kernel" in message
    assert "weights_only" not in message and "\n" not in message
    assert "must never run" not in capsys.readouterr().out


def test_unreadable_parameter_names_are_named(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / PARAM_NAMES_FILE).write_text("[not json")
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    with pytest.raises(CheckpointError, match=PARAM_NAMES_FILE):
        load_adam_state(folder)
