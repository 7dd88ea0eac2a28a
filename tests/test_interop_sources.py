"""Where `pretune import` looks for a model: a local directory, or a hub id (never the network for
something that is plainly a path)."""

import pytest
from conftest import run_cli


def test_import_of_a_missing_directory_says_so_rather_than_a_network_error(tmp_path, capsys, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub", reason="the hf extra is not installed")
    calls = []

    def offline(repo_id, **kw):  # what huggingface_hub raises when the hub cannot be reached
        calls.append(repo_id)
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as e:
            raise huggingface_hub.errors.LocalEntryNotFoundError("Please check your internet connection") from e

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    # a path by its form: refused as a missing directory, without asking the hub
    for src in ("./models/smol", "../models/smol", str(tmp_path / "smol"), "~/no-such-dir-pretune", "models/a/b",
                "org/config.json", "models/smol.safetensors"):
        assert run_cli("import", src, tmp_path / "out") == 2, src
        err = capsys.readouterr().err
        assert f"{src} does not exist: there is no such local directory" in err and "Connect" not in err, err
    assert calls == []
    # org/name form: the hub is asked; unreachable, the error says both what is missing and what hub ids need
    assert run_cli("import", "hf/nonexistent", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert calls == ["hf/nonexistent"]
    assert "hf/nonexistent is not a local directory" in err and "hub cannot be reached" in err
    assert "Hub ids need network access" in err and not (tmp_path / "out").exists()
