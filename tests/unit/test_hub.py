"""Hub downloads fail with one line naming the config entry, the hub id and the local way out."""

import pytest

from entroflow.lm.hub import HubError, hub_download


def test_no_connection_names_the_entry_and_the_local_alternative():
    with pytest.raises(HubError) as caught, hub_download("models", "qwen3_8b", "Qwen/Qwen3-8B"):
        raise ConnectionError("Couldn't reach the hub")
    message = str(caught.value)
    assert "models.qwen3_8b" in message and "'Qwen/Qwen3-8B'" in message
    assert "source: local" in message and "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_offline_hub_and_missing_repositories_are_named():
    from huggingface_hub.errors import LocalEntryNotFoundError

    expected = r"datasets\.hmmt.*MathArena/hmmt_feb_2025.*no connection"
    with (
        pytest.raises(HubError, match=expected),
        hub_download("datasets", "hmmt", "MathArena/hmmt_feb_2025"),
    ):
        raise LocalEntryNotFoundError("offline")


def test_other_errors_pass_through():
    with pytest.raises(KeyError), hub_download("models", "m", "a/b"):
        raise KeyError("a bug, not the hub")
