"""`ctxpeft train` and `ctxpeft eval` through `service.cli.main`, on a COCO-format folder the
test writes (synthetic images) and a tiny saved backbone: loadable new versions, every
bad-data case's message, and an interrupted run that loses no earlier version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapters.backbone import Backbone
from adapters.config import BackboneConfig
from adapters.data.synthetic import SyntheticCaptions, write_coco, write_jsonl
from adapters.format import load_adapter
from service.cli import main
from service.store import AdapterStore

REPO = Path(__file__).resolve().parents[2]
TINY = BackboneConfig(
    name="tiny-cli",
    vision={
        "model_type": "vit",
        "image_size": 16,
        "patch_size": 8,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    },
    lm={
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    image_size=16,
)
FAST = ["--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--rank", "2", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread, as `ctxpeft demo` runs: on models this small a second intra-op
    thread only adds synchronisation, and on a busy machine it spins (10x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = Backbone.build(TINY)
    folder = tmp_path_factory.mktemp("backbone") / "tiny"
    backbone.save(folder)
    return folder


@pytest.fixture(scope="module")
def fingerprint(backbone_dir: Path) -> str:
    return str(json.loads((backbone_dir / "backbone.json").read_text())["fingerprint"])


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """Six synthetic 'count' images in COCO captions format: captions.json + images/."""
    return write_coco(SyntheticCaptions("count", "train", 6, seed=0), tmp_path / "coco")


def train(data: Path | None, store: Path, backbone: Path, *extra: str) -> int:
    args = ["train", *([str(data)] if data else []), "--name", "shapes", "--store", str(store)]
    return main([*args, "--backbone", str(backbone), *FAST, *extra])


def test_coco_folder_trains_a_loadable_new_version_each_run(
    coco: Path, tmp_path: Path, backbone_dir: Path, fingerprint: str, capsys
) -> None:
    store_dir = tmp_path / "store"
    assert train(coco, store_dir, backbone_dir) == 0
    out = capsys.readouterr().out
    assert "loaded 6 records from captions.json" in out
    assert "epoch 1/1: train loss" in out and "val perplexity" in out
    assert "wrote public/shapes@v1" in out
    store = AdapterStore(store_dir)
    backbone = Backbone.load(backbone_dir)
    adapter = load_adapter(
        store.path(store.latest("public", "shapes")),  # type: ignore[arg-type]
        backbone.dims,
        fingerprint,
        vision_dim=backbone.vision_dim,
    )
    assert adapter.config.method == "lora" and adapter.config.rank == 2
    assert adapter.config.contexts == ("image", "text")
    first = (store_dir / "public/shapes/v1/adapter.safetensors").read_bytes()

    assert train(coco, store_dir, backbone_dir, "--tenant", "acme", "--seed", "1") == 0
    assert train(coco, store_dir, backbone_dir, "--seed", "1") == 0
    assert "wrote public/shapes@v2" in capsys.readouterr().out
    assert store.versions("public", "shapes") == [1, 2]
    assert store.versions("acme", "shapes") == [1]
    # Version 1 was not overwritten by the second run.
    assert (store_dir / "public/shapes/v1/adapter.safetensors").read_bytes() == first


def test_jsonl_with_explicit_validation_and_agnostic_ia3(
    tmp_path: Path, backbone_dir: Path
) -> None:
    train_file = write_jsonl(SyntheticCaptions("colors", "train", 4), tmp_path / "train")
    val_file = write_jsonl(SyntheticCaptions("colors", "val", 2), tmp_path / "val")
    store = tmp_path / "store"
    extra = ["--val", str(val_file), "--method", "ia3", "--contexts", "agnostic"]
    assert train(train_file, store, backbone_dir, *extra) == 0
    config = json.loads((store / "public/shapes/v1/adapter_config.json").read_text())
    assert (config["method"], config["contexts"]) == ("ia3", ["all"])


def test_eval_reports_all_metrics(coco: Path, tmp_path: Path, backbone_dir: Path, capsys) -> None:
    store = tmp_path / "store"
    assert train(coco, store, backbone_dir) == 0
    capsys.readouterr()
    args = ["eval", str(coco), "--name", "shapes", "--store", str(store)]
    assert main([*args, "--backbone", str(backbone_dir), "--json", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["adapter"] == "public/shapes@v1"
    assert metrics["images"] == 6 and metrics["captions"] == 6
    assert set(metrics) >= {"perplexity", "exact_match", "bleu4", "cider"}
    assert metrics["perplexity"] > 1.0
    args = ["eval", "--synthetic", "count", "--size", "3", "--name", "nope", "--store", str(store)]
    assert main([*args, "--backbone", str(backbone_dir)]) == 2
    assert "error: adapter public/nope not found" in capsys.readouterr().err


def _break_image(coco: Path, name: str, content: bytes | None) -> None:
    path = coco.parent / "images" / name
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)


def test_bad_items_are_reported_with_counts_and_names_and_skipped(
    coco: Path, tmp_path: Path, backbone_dir: Path, capsys
) -> None:
    _break_image(coco, "000001.png", None)
    _break_image(coco, "000002.png", b"\x89PNG\r\n\x1a\n not really a png")
    data = json.loads(coco.read_text())
    data["annotations"][3]["caption"] = "   "
    coco.write_text(json.dumps(data))
    assert train(coco, tmp_path / "store", backbone_dir) == 0
    out = capsys.readouterr().out
    assert "loaded 3 records from captions.json; skipped 3:" in out
    assert "1 missing image (000001.png)" in out
    assert "1 corrupt image (000002.png)" in out
    assert "1 empty caption (000003.png)" in out
    assert "wrote public/shapes@v1" in out


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not json", "not valid JSON"),
        ("wrong shape", "neither a COCO captions file"),
        ("no images", "no usable records"),
        ("one image", "need at least 2 usable images"),
        ("missing file", "file not found"),
        (
            "no words known",
            "no word of any caption of captions.json is in the backbone's vocabulary",
        ),
    ],
)
def test_unusable_data_stops_before_training(
    case: str, message: str, coco: Path, tmp_path: Path, backbone_dir: Path, capsys
) -> None:
    data = json.loads(coco.read_text())
    if case == "not json":
        coco.write_text('[{"images": [')
    elif case == "wrong shape":
        coco.write_text(json.dumps({"photos": [], "captions": []}))
    elif case == "no images":
        for image in (coco.parent / "images").iterdir():
            image.unlink()
    elif case == "one image":
        data["annotations"] = data["annotations"][:1]
        coco.write_text(json.dumps(data))
    elif case == "missing file":
        coco.unlink()
    elif case == "no words known":
        for note in data["annotations"]:
            note["caption"] = "zebra giraffe"
        coco.write_text(json.dumps(data))
    store = tmp_path / "store"
    assert train(coco, store, backbone_dir) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") or "\nerror: " in err
    assert message in err
    assert "epoch 1/1" not in out
    assert not (store / "public" / "shapes").exists()


def test_unknown_words_warn_but_train(
    coco: Path, tmp_path: Path, backbone_dir: Path, capsys
) -> None:
    data = json.loads(coco.read_text())
    data["annotations"][0]["caption"] = "one zebra"
    coco.write_text(json.dumps(data))
    assert train(coco, tmp_path / "store", backbone_dir) == 0
    out = capsys.readouterr().out
    assert "warning: 1 of 6 captions of captions.json contain words the backbone's" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Bad Name!"], "invalid adapter name"),
        (["--tenant", "../etc"], "invalid tenant"),
        (["--rank", "0"], "rank must be >= 1"),
        (["--targets", "q_proj,nope"], "invalid lora target"),
        (["--synthetic", "poems"], "unknown synthetic task"),
    ],
)
def test_bad_options_stop_with_a_message(
    args: list[str], message: str, coco: Path, tmp_path: Path, backbone_dir: Path, capsys
) -> None:
    data = [] if "--synthetic" in args else [str(coco)]
    base = ["train", *data, "--name", "shapes", "--store", str(tmp_path / "s")]
    assert main([*base, "--backbone", str(backbone_dir), *FAST, *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_backbone_says_how_to_build_it(tmp_path: Path, coco: Path, capsys) -> None:
    args = ["train", str(coco), "--name", "x", "--runtime-dir", str(tmp_path / "rt"), *FAST]
    assert main(args) == 2
    assert "run `ctxpeft demo` to build it" in capsys.readouterr().err


def test_interrupted_training_keeps_earlier_versions(
    coco: Path, tmp_path: Path, backbone_dir: Path
) -> None:
    store_dir = tmp_path / "store"
    assert train(coco, store_dir, backbone_dir) == 0
    before = (store_dir / "public/shapes/v1/adapter.safetensors").read_bytes()
    args = [sys.executable, "-m", "service.cli", "train", str(coco), "--name", "shapes"]
    args += ["--store", str(store_dir), "--backbone", str(backbone_dir), *FAST, "--threads", "1"]
    args[args.index("--epochs") + 1] = "100000"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("epoch 1/"):  # training is under way
            process.send_signal(signal.SIGINT)
            break
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 130, "".join(lines) + rest
    assert "interrupted: no version written" in rest
    store = AdapterStore(store_dir)
    assert store.versions("public", "shapes") == [1]
    assert (store_dir / "public/shapes/v1/adapter.safetensors").read_bytes() == before
    assert not [p for p in (store_dir / "public/shapes").iterdir() if p.name.startswith(".tmp")]
