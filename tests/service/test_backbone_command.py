"""`ctxpeft backbone build|list` on a tiny random-init config (the smol build itself is in the
slow tests/adapters/test_smol.py), and the per-backbone default adapter store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.backbone import Backbone
from adapters.backbone_build import STAMP_FILE, backbone_dir
from service.cli import main
from service.settings import Settings, default_store_dir
from tests.adapters.conftest import TINY


def _tiny_json(tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({**TINY.to_dict(), **changes}))
    return path


def test_build_is_cached_and_the_folder_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _tiny_json(tmp_path)
    runtime = tmp_path / "var"
    assert main(["backbone", "build", str(source), "--runtime-dir", str(runtime)]) == 0
    out = capsys.readouterr().out
    folder = backbone_dir(runtime, "tiny")
    assert f"built {folder}" in out
    fingerprint = json.loads((folder / "backbone.json").read_text())["fingerprint"]
    assert Backbone.load(folder).fingerprint() == fingerprint
    stamp = (folder / STAMP_FILE).stat().st_mtime_ns
    assert main(["backbone", "build", str(source), "--runtime-dir", str(runtime)]) == 0
    assert f"tiny is up to date: {folder} (fingerprint {fingerprint})" in capsys.readouterr().out
    assert (folder / STAMP_FILE).stat().st_mtime_ns == stamp
    # A changed config is a new build (same name: the folder is replaced atomically).
    changed = _tiny_json(tmp_path, image_size=32)
    assert main(["backbone", "build", str(changed), "--runtime-dir", str(runtime)]) == 0
    assert f"built {folder}" in capsys.readouterr().out
    assert Backbone.load(folder).config.image_size == 32
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
    assert main(["backbone", "list", "--runtime-dir", str(runtime)]) == 0
    listing = capsys.readouterr().out
    assert "presets: demo, small, paper, smol" in listing
    assert (
        f"tiny         {json.loads((folder / 'backbone.json').read_text())['fingerprint']}"
        in listing
    )


def test_build_under_another_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runtime = tmp_path / "var"
    args = ["backbone", "build", str(_tiny_json(tmp_path)), "--runtime-dir", str(runtime)]
    assert main([*args, "--name", "mine"]) == 0
    assert Backbone.load(backbone_dir(runtime, "mine")).config.name == "mine"
    assert main([*args, "--name", "../escape"]) == 2
    assert "invalid backbone name '../escape'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("demo", "the demo backbone is pre-trained by `ctxpeft demo`"),
        (
            "nope",
            "'nope' is neither a preset (demo, small, paper, smol) nor a backbone config JSON",
        ),
    ],
)
def test_build_refuses_what_it_cannot_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, message: str
) -> None:
    assert main(["backbone", "build", source, "--runtime-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_missing_weights_package_stops_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _tiny_json(tmp_path, lm="package:ctxpeft-no-such-weights")
    assert main(["backbone", "build", str(source), "--runtime-dir", str(tmp_path / "var")]) == 2
    err = capsys.readouterr().err
    assert "error: the weights package 'ctxpeft-no-such-weights' is not installed" in err
    assert "make smol" in err
    assert not (tmp_path / "var" / "backbones").exists() or not any(
        (tmp_path / "var" / "backbones").iterdir()
    )


def test_bad_config_json_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _tiny_json(tmp_path, connector="conv")
    assert main(["backbone", "build", str(source), "--runtime-dir", str(tmp_path)]) == 2
    assert (
        "is not a valid backbone config: connector must be 'linear' or 'mlp'"
        in capsys.readouterr().err
    )


def test_each_named_backbone_has_its_own_default_store(tmp_path: Path) -> None:
    assert default_store_dir(tmp_path, "demo") == tmp_path / "adapters"
    assert default_store_dir(tmp_path, "smol") == tmp_path / "adapters-smol"
    assert default_store_dir(tmp_path, "var/backbones/smol") == tmp_path / "adapters"
    assert default_store_dir(tmp_path, "mine.json") == tmp_path / "adapters"
    settings = Settings(runtime_dir=tmp_path, backbone="smol")
    assert settings.resolved_store_dir() == tmp_path / "adapters-smol"
    explicit = Settings(runtime_dir=tmp_path, backbone="smol", store_dir=tmp_path / "s")
    assert explicit.resolved_store_dir() == tmp_path / "s"
