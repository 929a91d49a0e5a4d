"""API keys: hashing, allowlists, rate limits, reloads, and the HTTP answers."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import yaml

from hydraserve.gateway.app import build_authenticator
from hydraserve.gateway.auth import (
    Authenticator,
    KeyEntry,
    Principal,
    TokenBucket,
    hash_key,
    load_keys,
    main,
    new_key_entry,
)
from hydraserve.gateway.errors import GatewayError
from tests.support.fakes import FakeClusterBackend, make_model, ready_instance

from .conftest import Harness, RunningEngine, fast_settings

StartEngine = Callable[..., Awaitable[RunningEngine]]
StartGateway = Callable[..., Awaitable[Harness]]

ALICE = "hs-alice-key-0123456789"
BOB = "hs-bob-key-0123456789"


def write_keys(path: Path, entries: list[dict[str, object]]) -> Path:
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return write_keys(
        tmp_path / "keys.yaml",
        [
            {"name": "alice", "sha256": hash_key(ALICE), "models": ["m", "team-*"]},
            {"name": "bob", "sha256": hash_key(BOB), "models": ["*"],
             "requestsPerMinute": 6, "burst": 2},
        ],
    )  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- unit ---------------------------------------------------------------------------------


def test_keys_are_stored_as_sha256_only() -> None:
    key, entry = new_key_entry("svc", ["m"])
    assert key.startswith("hs-") and len(key) > 40
    assert entry.sha256 == hash_key(key)
    assert key not in entry.model_dump_json()


def test_authenticate_accepts_the_right_key_only(keys_file: Path) -> None:
    auth = Authenticator.from_file(keys_file)
    assert auth.authenticate(f"Bearer {ALICE}").name == "alice"
    assert auth.authenticate(f"bearer  {BOB} ").name == "bob"
    for header, code in [
        (None, "missing_api_key"),
        ("", "missing_api_key"),
        (f"Basic {ALICE}", "invalid_authorization_header"),
        ("Bearer ", "invalid_authorization_header"),
        ("Bearer hs-wrong", "invalid_api_key"),
        (f"Bearer {ALICE}x", "invalid_api_key"),
    ]:
        with pytest.raises(GatewayError) as refused:
            auth.authenticate(header)
        assert refused.value.status == 401 and refused.value.code == code
        assert refused.value.headers["WWW-Authenticate"] == "Bearer"
        assert ALICE not in refused.value.message


def test_allowlist_patterns() -> None:
    principal = Principal("alice", ("m", "team-*"))
    assert principal.sees("default", "m") and principal.sees("ns", "team-x")
    assert not principal.sees("default", "mm") and not principal.sees("default", "other")
    assert Principal("root", ("*",)).sees("any-namespace", "anything")


def test_model_patterns_match_the_canonical_id_or_the_bare_name() -> None:
    principal = Principal("a", ("team-a/*", "shared"))
    assert principal.sees("team-a", "llama") and principal.sees("team-b", "shared")
    assert not principal.sees("team-b", "llama")


def test_namespace_scope_applies_on_top_of_the_models() -> None:
    principal = Principal("a", ("*",), ("team-a", "lab-*"))
    assert principal.sees("team-a", "m") and principal.sees("lab-1", "m")
    assert not principal.sees("team-b", "m") and not principal.sees("team-ab", "m")
    # Both must match: a model pattern cannot widen the namespace scope.
    assert not Principal("a", ("team-b/*",), ("team-a",)).sees("team-b", "m")


def test_namespaces_default_to_all_and_load_from_the_keys_file(tmp_path: Path) -> None:
    path = write_keys(
        tmp_path / "keys.yaml",
        [
            {"name": "a", "sha256": hash_key(ALICE), "namespaces": ["team-a"]},
            {"name": "b", "sha256": hash_key(BOB)},
        ],
    )
    auth = Authenticator.from_file(path)
    alice = auth.authenticate(f"Bearer {ALICE}")
    assert alice.namespaces == ("team-a",) and alice.models == ("*",)
    assert auth.authenticate(f"Bearer {BOB}").namespaces == ("*",)


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=1.0, burst=2, now=0.0)
    assert bucket.take(0.0) == 0 and bucket.take(0.0) == 0
    assert bucket.take(0.0) == pytest.approx(1.0)
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(1.0) == 0


def test_rate_limit_is_429_with_retry_after(keys_file: Path) -> None:
    clock = Clock()
    auth = Authenticator.from_file(keys_file, clock=clock)
    auth.authenticate(f"Bearer {BOB}")
    auth.authenticate(f"Bearer {BOB}")
    with pytest.raises(GatewayError) as limited:
        auth.authenticate(f"Bearer {BOB}")
    assert limited.value.status == 429
    assert limited.value.code == "rate_limit_exceeded"
    assert limited.value.headers["Retry-After"] == "10"  # 6 per minute
    for _ in range(10):
        auth.authenticate(f"Bearer {ALICE}")  # alice has no limit; bob's is his own
    clock.now += 10.0
    auth.authenticate(f"Bearer {BOB}")


def test_keys_file_errors_name_the_file_and_problem(tmp_path: Path) -> None:
    bad = write_keys(tmp_path / "bad.yaml", [{"name": "x", "sha256": "hs-plain-key"}])
    with pytest.raises(ValueError, match=r"bad\.yaml.*keys\.0\.sha256") as error:
        load_keys(bad)
    assert "hs-plain-key" not in str(error.value)  # a key pasted by mistake is not echoed
    dup = write_keys(tmp_path / "dup.yaml", [{"name": "x", "sha256": hash_key("a")},
                                             {"name": "x", "sha256": hash_key("b")}])  # fmt: skip
    with pytest.raises(ValueError, match="unique"):
        load_keys(dup)
    with pytest.raises(ValueError, match="cannot read"):
        load_keys(tmp_path / "missing.yaml")


def test_reload_picks_up_a_rotated_secret_and_survives_a_broken_one(
    keys_file: Path, tmp_path: Path
) -> None:
    auth = Authenticator.from_file(keys_file)
    assert not auth.reload_if_changed()
    # A Secret volume swaps a symlink to a new file on update.
    new_file = write_keys(tmp_path / "keys-v2.yaml", [{"name": "carol", "sha256": hash_key("c")}])
    keys_file.unlink()
    os.symlink(new_file, keys_file)
    assert auth.reload_if_changed()
    assert auth.key_names == ["carol"]
    with pytest.raises(GatewayError):
        auth.authenticate(f"Bearer {ALICE}")
    new_file.write_text("keys: [this is: not valid")
    assert not auth.reload_if_changed()
    assert auth.key_names == ["carol"]  # the old keys stay


def test_auth_on_without_keys_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="HYDRASERVE_GATEWAY_API_KEYS_FILE"):
        build_authenticator(fast_settings(auth_enabled=True, api_keys_file=None))
    assert build_authenticator(fast_settings(auth_enabled=False)) is None


def test_settings_default_to_auth_on() -> None:
    from hydraserve.gateway import GatewaySettings

    assert GatewaySettings().auth_enabled is True


def test_key_generator_prints_the_key_once_and_a_valid_entry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["--name", "svc", "--namespaces", "team-a", "--models", "demo", "team-*",
          "--requests-per-minute", "120"])  # fmt: skip
    out = capsys.readouterr().out
    key = out.splitlines()[1].removeprefix("# ").strip()
    entry = KeyEntry.model_validate(yaml.safe_load(out)["keys"][0])
    assert entry.sha256 == hash_key(key)
    assert entry.models == ["demo", "team-*"] and entry.requests_per_minute == 120
    assert entry.namespaces == ["team-a"]
    main(["--name", "all"])
    assert yaml.safe_load(capsys.readouterr().out)["keys"][0]["namespaces"] == ["*"]


# --- over HTTP ----------------------------------------------------------------------------


@pytest.fixture
async def gw(keys_file: Path, start_engine: StartEngine, start_gateway: StartGateway) -> Harness:
    engine = await start_engine()
    backend = FakeClusterBackend([make_model("m"), make_model("secret-model")])
    for name in ("m", "secret-model"):
        backend.set_instances(name, [ready_instance(name, f"{name}-0", engine.url)])
    settings = fast_settings(auth_enabled=True, api_keys_file=keys_file)
    return await start_gateway(backend, settings)


BODY = {"model": "m", "prompt": "x", "max_tokens": 1}


async def test_missing_and_wrong_keys_are_401(gw: Harness) -> None:
    for headers in ({}, {"Authorization": "Bearer hs-nope"}):
        response = await gw.client.post("/v1/completions", json=BODY, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    assert (await gw.client.get("/v1/models")).status_code == 401
    assert await gw.metric("hydraserve_gateway_rejections_total", model="_unknown",
                           reason="invalid_api_key") == 1  # fmt: skip


async def test_a_model_outside_the_keys_scope_is_the_same_404_as_a_missing_one(
    gw: Harness,
) -> None:
    headers = {"Authorization": f"Bearer {ALICE}"}
    ok = await gw.client.post("/v1/completions", json=BODY, headers=headers)
    assert ok.status_code == 200
    # No probing (decision 0502): a hidden model answers exactly as a missing one.
    for hidden, missing in (("secret-model", "zzzzzz-model"),
                            ("default/secret-model", "default/zzzzzz-model")):  # fmt: skip
        answers = []
        for name in (hidden, missing):
            completion = await gw.client.post(
                "/v1/completions", json={**BODY, "model": name}, headers=headers
            )
            card = await gw.client.get(f"/v1/models/{name}", headers=headers)
            answers.append(
                [(r.status_code, r.json()["error"]["code"],
                  r.json()["error"]["message"].replace(name, "NAME")) for r in (completion, card)]
            )  # fmt: skip
        assert answers[0] == answers[1]
        assert answers[0][0][:2] == (404, "model_not_found")


async def test_model_list_shows_only_allowed_models(gw: Harness) -> None:
    alice = await gw.client.get("/v1/models", headers={"Authorization": f"Bearer {ALICE}"})
    assert [m["id"] for m in alice.json()["data"]] == ["default/m"]
    bob = await gw.client.get("/v1/models", headers={"Authorization": f"Bearer {BOB}"})
    assert [m["id"] for m in bob.json()["data"]] == ["default/m", "default/secret-model"]


async def test_rate_limited_key_gets_429_with_retry_after(gw: Harness) -> None:
    headers = {"Authorization": f"Bearer {BOB}"}
    statuses = [
        (await gw.client.post("/v1/completions", json=BODY, headers=headers)).status_code
        for _ in range(4)
    ]
    assert statuses[:2] == [200, 200]
    assert statuses[2:] == [429, 429]
    limited = await gw.client.post("/v1/completions", json=BODY, headers=headers)
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"


async def test_keys_never_appear_in_logs(gw: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    for key in (ALICE, BOB, "hs-wrong-key-value"):
        await gw.client.post("/v1/completions", json=BODY,
                             headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    captured = capsys.readouterr()
    logs = captured.out + captured.err
    assert "request.done" in logs  # the access log did run
    for key in (ALICE, BOB, "hs-wrong-key-value"):
        assert key not in logs
    assert "key=alice" in logs or '"key": "alice"' in logs


async def test_metrics_can_require_a_key_that_sees_everything(
    keys_file: Path, start_gateway: StartGateway
) -> None:
    # /metrics names every tenant's models: with the setting, only a key over all of them.
    backend = FakeClusterBackend([make_model("m", namespace="team-a")])
    settings = fast_settings(auth_enabled=True, api_keys_file=keys_file, metrics_require_key=True)
    gw = await start_gateway(backend, settings)
    assert (await gw.client.get("/metrics")).status_code == 401
    alice = await gw.client.get("/metrics", headers={"Authorization": f"Bearer {ALICE}"})
    assert alice.status_code == 403 and alice.json()["error"]["code"] == "metrics_not_allowed"
    bob = await gw.client.get("/metrics", headers={"Authorization": f"Bearer {BOB}"})
    assert bob.status_code == 200 and "hydraserve_gateway_requests" in bob.text
