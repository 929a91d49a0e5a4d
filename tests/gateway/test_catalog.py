"""Model ids across namespaces (decision 0502): resolution per caller, and the catalog
in front of backends keyed by canonical id or by bare name."""

from __future__ import annotations

import pytest

from hydraserve.gateway.auth import Principal
from hydraserve.gateway.catalog import Catalog, model_id
from hydraserve.gateway.errors import GatewayError
from tests.support.fakes import FakeClusterBackend, make_model

ALL = Principal("admin")
TEAM_A = Principal("a", ("*",), ("team-a",))
TEAM_B = Principal("b", ("*",), ("team-b",))


def two_tenants() -> tuple[FakeClusterBackend, Catalog]:
    backend = FakeClusterBackend(
        [
            make_model("llama", namespace="team-a"),
            make_model("llama", namespace="team-b"),
            make_model("only-a", namespace="team-a"),
        ],
        qualified_keys=True,
    )
    return backend, Catalog(backend)


def refusal(catalog: Catalog, model: str, who: Principal) -> GatewayError:
    with pytest.raises(GatewayError) as refused:
        catalog.resolve(model, who)
    return refused.value


def test_a_bare_name_unique_in_the_callers_scope_resolves() -> None:
    _, catalog = two_tenants()
    assert model_id(catalog.resolve("llama", TEAM_A)) == "team-a/llama"
    assert model_id(catalog.resolve("llama", TEAM_B)) == "team-b/llama"
    assert model_id(catalog.resolve("only-a", ALL)) == "team-a/only-a"


def test_a_bare_name_shared_by_visible_models_is_400_listing_the_ids() -> None:
    _, catalog = two_tenants()
    error = refusal(catalog, "llama", ALL)
    assert (error.status, error.code, error.param) == (400, "ambiguous_model", "model")
    assert "'team-a/llama'" in error.message and "'team-b/llama'" in error.message


def test_a_qualified_id_resolves_for_whoever_sees_it() -> None:
    _, catalog = two_tenants()
    assert model_id(catalog.resolve("team-b/llama", ALL)) == "team-b/llama"
    assert model_id(catalog.resolve("team-a/llama", TEAM_A)) == "team-a/llama"


def test_an_invisible_model_is_the_same_404_as_a_missing_one() -> None:
    _, catalog = two_tenants()
    for hidden, missing in (("team-a/llama", "team-a/nothing"), ("only-a", "nothing")):
        seen = refusal(catalog, hidden, TEAM_B)
        absent = refusal(catalog, missing, TEAM_B)
        assert (seen.status, seen.code) == (absent.status, absent.code) == (404, "model_not_found")
        assert seen.message.replace(hidden, "X") == absent.message.replace(missing, "X")
        assert seen.headers == absent.headers and seen.type == absent.type


def test_the_model_patterns_narrow_what_a_key_sees() -> None:
    _, catalog = two_tenants()
    only_llama = Principal("l", ("team-a/llama",))
    assert model_id(catalog.resolve("llama", only_llama)) == "team-a/llama"
    assert refusal(catalog, "only-a", only_llama).status == 404
    assert [model_id(v) for v in catalog.visible_models(only_llama)] == ["team-a/llama"]


def test_listing_is_per_caller_and_ordered_by_id() -> None:
    _, catalog = two_tenants()
    assert [model_id(v) for v in catalog.visible_models(TEAM_A)] == [
        "team-a/llama",
        "team-a/only-a",
    ]
    assert [model_id(v) for v in catalog.visible_models(TEAM_B)] == ["team-b/llama"]
    assert len(catalog.visible_models(ALL)) == 3


async def test_a_backend_keyed_by_bare_name_is_addressed_by_its_own_keys() -> None:
    backend = FakeClusterBackend([make_model("m", namespace="team-a")])  # keyed "m"
    catalog = Catalog(backend)
    view = catalog.get_model("team-a/m")
    assert view is not None and model_id(view) == "team-a/m"
    # The same name in another namespace is not this model.
    assert catalog.get_model("team-b/m") is None
    assert catalog.get_model("m") is None  # the catalog speaks canonical ids only
    await catalog.scale("team-a/m", 2)
    assert backend.scale_calls == [("m", 2)]


async def test_a_backend_keyed_by_canonical_id_is_addressed_by_id() -> None:
    backend, catalog = two_tenants()
    await catalog.scale("team-b/llama", 1)
    assert backend.scale_calls == [("team-b/llama", 1)]
    view = catalog.get_model("team-b/llama")
    assert view is not None and view.desired_replicas == 1
    other = catalog.get_model("team-a/llama")
    assert other is not None and other.desired_replicas == 0
