"""`ctxpeft adapters` against a live server (a real uvicorn server on loopback): push a trained
folder, list, show, caption with it, delete; the exit codes of each failure; and `validate`,
offline, rejecting each invalid folder with its reason.

The round trip pushes the reduced demo's trained `count` adapter (tests/e2e/conftest.py) under
a new name, so the caption it must give is known. The `validate` matrix runs against the tiny
test backbone, saved to a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.format import CONFIG_FILE, WEIGHTS_FILE, save_adapter
from service.cli import main
from tests.e2e import conftest as e2e
from tests.e2e.conftest import (
    ACME_ADMIN,
    ACME_CAPTION,
    BETA_ADMIN,
    DemoBuild,
    Service,
    bearer,
    image_file,
    running_demo,
)
from tests.e2e.test_http_caption import COUNT, IMAGE
from tests.service.adapter_fixtures import random_adapter, tiny_backbone

# The session fixture of tests/e2e, shared here: one demo build for the whole run.
reduced_demo = e2e.reduced_demo
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def service(reduced_demo: DemoBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_demo(
        reduced_demo,
        tmp_path_factory.mktemp("cli-store"),
        default_max_new_tokens=32,
        max_new_tokens_limit=64,
    ) as running:
        yield running


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def ctxpeft(capsys: pytest.CaptureFixture[str]) -> Run:
    """`ctxpeft <args>` in this process: (exit code, stdout, stderr)."""

    def run(*args: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def remote(service: Service, key: str = ACME_ADMIN) -> list[str]:
    return ["--url", service.url, "--api-key", key]


def caption(service: Service, adapter: str) -> httpx.Response:
    return httpx.post(
        f"{service.url}/caption",
        files=image_file(IMAGE),
        data={"adapter": adapter},
        headers=bearer(ACME_ADMIN),
        timeout=60,
    )


# --- the round trip ---------------------------------------------------------------------------
def test_push_list_show_caption_delete(
    service: Service, reduced_demo: DemoBuild, ctxpeft: Run
) -> None:
    trained = reduced_demo.store_dir / "public" / "count" / "v1"
    code, out, err = ctxpeft("adapters", "push", trained, "--name", "my-count", *remote(service))
    assert (code, out.strip(), err) == (0, "my-count: uploaded version 1", "")

    code, out, _ = ctxpeft("adapters", "list", *remote(service))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "OWNER",
        "LATEST",
        "METHOD",
        "CONTEXTS",
        "RANK",
        "DESCRIPTION",
    ]
    rows = {line.split()[0]: line.split()[1:6] for line in lines[1:]}
    assert rows["my-count"] == ["own", "v1", "lora", "image,text", "8"]
    assert rows["count"][:2] == ["public", "v1"] and rows["colors"][:2] == ["public", "v1"]

    code, out, _ = ctxpeft("adapters", "list", "--json", *remote(service))
    listed = json.loads(out)
    assert sorted((a["name"], a["public"]) for a in listed["adapters"]) == [
        ("colors", True),
        ("count", True),
        ("my-count", False),
    ]

    code, out, _ = ctxpeft("adapters", "show", "my-count", *remote(service))
    assert code == 0
    shown = dict(line.split(":", 1) for line in out.splitlines())
    assert shown["name"].strip() == "my-count" and shown["owner"].strip() == "own"
    assert shown["versions"].strip() == "v1 (latest v1)"
    code, out, _ = ctxpeft("adapters", "show", "my-count", "--json", *remote(service))
    assert json.loads(out)["latest_version"] == 1

    # The pushed version serves at once, with the trained adapter's caption.
    response = caption(service, "my-count")
    assert response.status_code == 200, response.text
    assert response.json()["caption"] == COUNT

    # A second push is a new version; delete removes both.
    code, out, _ = ctxpeft(
        "adapters", "push", trained, "--name", "my-count", "--json", *remote(service)
    )
    assert (code, json.loads(out)) == (0, {"name": "my-count", "version": 2})
    code, out, _ = ctxpeft("adapters", "delete", "my-count", *remote(service))
    assert (code, out.strip()) == (0, "my-count: deleted 2 versions")
    assert caption(service, "my-count").status_code == 404
    code, _, err = ctxpeft("adapters", "show", "my-count", *remote(service))
    assert code == 3 and "404 adapter_not_found" in err


def test_push_names_a_store_version_folder_after_its_adapter(
    service: Service, reduced_demo: DemoBuild, tmp_path: Path, ctxpeft: Run
) -> None:
    folder = tmp_path / "counter" / "v7"
    shutil.copytree(reduced_demo.store_dir / "public" / "count" / "v1", folder)
    code, out, _ = ctxpeft("adapters", "push", folder, *remote(service))
    assert (code, out.strip()) == (0, "counter: uploaded version 1")
    assert ctxpeft("adapters", "delete", "counter", *remote(service))[0] == 0


def test_the_exit_codes_say_what_went_wrong(
    service: Service, reduced_demo: DemoBuild, tmp_path: Path, ctxpeft: Run
) -> None:
    trained = reduced_demo.store_dir / "public" / "count" / "v1"
    # 1: refused by the service (an invalid upload, with its reason)
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    config = json.loads((broken / CONFIG_FILE).read_text())
    (broken / CONFIG_FILE).write_text(json.dumps({**config, "base_fingerprint": "0" * 64}))
    code, out, err = ctxpeft("adapters", "push", broken, "--json", *remote(service))
    assert code == 1 and "422 invalid_adapter" in err and "fingerprint" in err
    assert json.loads(out)["error"]["type"] == "invalid_adapter"
    # 2: usage
    assert ctxpeft("adapters", "push", tmp_path / "absent", *remote(service))[0] == 2
    assert ctxpeft("adapters", "list", "--url", "ftp://x", "--api-key", "k")[0] == 2
    with pytest.raises(SystemExit) as usage:
        main(["adapters", "frobnicate"])
    assert usage.value.code == 2
    # 3: not found (another tenant's adapter answers exactly like a missing one)
    assert ctxpeft("adapters", "delete", "count", *remote(service, BETA_ADMIN))[0] == 3
    assert ctxpeft("adapters", "show", "nothing-here", *remote(service))[0] == 3
    # 4: the key
    code, _, err = ctxpeft("adapters", "list", "--url", service.url)
    assert code == 4 and "401 unauthorized" in err and "CTXPEFT_API_KEY" in err
    assert ctxpeft("adapters", "list", *remote(service, "wrong-key-000000000000"))[0] == 4
    code, _, err = ctxpeft(
        "adapters", "push", trained, "--name", "x", *remote(service, ACME_CAPTION)
    )
    assert code == 4 and "403 forbidden" in err
    # 5: no service there
    closed = service.url.rsplit(":", 1)[0] + ":9"  # the discard port: nothing listens
    code, _, err = ctxpeft("adapters", "list", "--url", closed, "--timeout", "10")
    assert code == 5 and "cannot reach the service" in err


def test_the_installed_command_reads_url_and_key_from_the_environment(service: Service) -> None:
    env = {**os.environ, "CTXPEFT_URL": service.url, "CTXPEFT_API_KEY": ACME_ADMIN}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "adapters", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert {a["name"] for a in json.loads(done.stdout)["adapters"]} == {"count", "colors"}


# --- validate, offline ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-backbone") / "tiny"
    tiny_backbone().save(folder)
    return folder


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    folder = tmp_path / "valid"
    save_adapter(random_adapter(tiny_backbone(), seed=3, rank=8), folder)
    return folder


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE))


def _first_lora_b(tensors: dict[str, torch.Tensor]) -> str:
    return next(name for name in sorted(tensors) if name.endswith("lora_B"))


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    tensors[_first_lora_b(tensors)][0, 0] = float("nan")


def _reshape(tensors: dict[str, torch.Tensor]) -> None:
    name = _first_lora_b(tensors)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])


INVALID: dict[str, tuple[Callable[[Path], None], str]] = {
    "no config": (lambda f: (f / CONFIG_FILE).unlink(), "missing adapter_config.json"),
    "no weights": (lambda f: (f / WEIGHTS_FILE).unlink(), "missing adapter.safetensors"),
    "a pickle beside it": (lambda f: (f / "adapter.bin").write_bytes(b"\x80\x04."), "pickle"),
    "config not JSON": (lambda f: (f / CONFIG_FILE).write_text("{oops"), "invalid adapter_config"),
    "weights not safetensors": (
        lambda f: (f / WEIGHTS_FILE).write_bytes(b"\x00" * 64),
        "not a valid safetensors file",
    ),
    "another backbone": (
        lambda f: _edit_config(f, base_fingerprint="f" * 64),
        "base fingerprint mismatch",
    ),
    "wrong layer count": (lambda f: _edit_config(f, num_layers=5), "5 layers"),
    "a missing tensor": (
        lambda f: _edit_tensors(f, lambda t: t.pop(_first_lora_b(t))),
        "missing tensors",
    ),
    "a wrong shape": (lambda f: _edit_tensors(f, _reshape), "shape mismatch"),
    "a NaN": (lambda f: _edit_tensors(f, _nan), "non-finite values"),
}


@pytest.mark.parametrize("case", INVALID)
def test_validate_rejects_each_invalid_folder_with_its_reason(
    valid: Path, tiny_folder: Path, ctxpeft: Run, case: str
) -> None:
    spoil, reason = INVALID[case]
    spoil(valid)
    code, out, err = ctxpeft("adapters", "validate", valid, "--backbone", tiny_folder)
    assert code == 1, (out, err)
    assert out == "" and reason in err and "is not a valid adapter" in err
    code, out, _ = ctxpeft("adapters", "validate", valid, "--backbone", tiny_folder, "--json")
    report = json.loads(out)
    assert code == 1 and report["valid"] is False and reason in report["error"]


def test_validate_accepts_a_valid_folder_and_checks_the_rank_limit(
    valid: Path, tiny_folder: Path, ctxpeft: Run
) -> None:
    code, out, err = ctxpeft("adapters", "validate", valid, "--backbone", tiny_folder)
    fingerprint = tiny_backbone().fingerprint()
    assert (code, err) == (0, "")
    assert out.strip() == (
        f"ok: {valid} is a valid adapter (lora, contexts image+text, rank 8) for backbone "
        f"{fingerprint[:12]}"
    )
    code, out, _ = ctxpeft("adapters", "validate", valid, "--backbone", tiny_folder, "--json")
    assert json.loads(out) == {
        "folder": str(valid),
        "backbone": fingerprint,
        "valid": True,
        "method": "lora",
        "contexts": ["image", "text"],
        "rank": 8,
    }
    code, _, err = ctxpeft(
        "adapters", "validate", valid, "--backbone", tiny_folder, "--max-rank", "4"
    )
    assert code == 1 and "rank 8 is greater than max_rank 4" in err


def test_validate_the_demo_adapter_against_the_demo_backbone(
    reduced_demo: DemoBuild, tiny_folder: Path, ctxpeft: Run
) -> None:
    trained = reduced_demo.store_dir / "public" / "count" / "v1"
    code, out, _ = ctxpeft("adapters", "validate", trained, "--backbone", reduced_demo.backbone_dir)
    assert code == 0 and out.startswith("ok:")
    # The same folder against another backbone: the fingerprint says it was not trained on it.
    code, _, err = ctxpeft("adapters", "validate", trained, "--backbone", tiny_folder)
    assert code == 1 and "base fingerprint mismatch" in err


def test_validate_usage_errors(valid: Path, tmp_path: Path, ctxpeft: Run) -> None:
    code, _, err = ctxpeft("adapters", "validate", tmp_path / "absent", "--backbone", "x")
    assert code == 2 and "is not a folder" in err
    code, _, err = ctxpeft(
        "adapters", "validate", valid, "--backbone", "no-such", "--runtime-dir", tmp_path
    )
    assert code == 2 and "backbone 'no-such' is neither a preset" in err
