"""From the engine's recorded copies to the store layout (pure: no engine needed)."""

from __future__ import annotations

from hydraserve.store.engine_layout import (
    CopyRecord,
    ParamShape,
    RankProbe,
    adoptable_bytes,
    layer_partitions,
    order_units,
    plan_units,
    stage_units,
)


def copy(ckpt: str, param: str | None, dst: int, n: int, src: int = 0, linear: bool = True):  # type: ignore[no-untyped-def]
    return CopyRecord(
        checkpoint=ckpt, param=param, dst_offset=dst, numel=n, src_offset=src, linear=linear
    )


def probe(
    params: dict[str, list[int]], copies: list[CopyRecord], pp: int = 1, rank: int = 0
) -> RankProbe:
    return RankProbe(
        pp=pp,
        rank=rank,
        params={n: ParamShape(shape=s, dtype="BF16") for n, s in params.items()},
        copies=copies,
    )


CHECKPOINT = {
    "embed": (40, "BF16"),
    "l0.q": (16, "BF16"),
    "l0.k": (8, "BF16"),
    "l0.v": (8, "BF16"),
    "l0.norm": (4, "BF16"),
    "head": (40, "BF16"),
}
PARAMS = {"embed": [10, 4], "l0.qkv": [8, 4], "l0.norm": [4], "head": [10, 4]}


def whole(**overrides: list[CopyRecord]) -> RankProbe:
    copies = {
        "embed": [copy("embed", "embed", 0, 40)],
        "qkv": [
            copy("l0.k", "l0.qkv", 16, 8),
            copy("l0.q", "l0.qkv", 0, 16),
            copy("l0.v", "l0.qkv", 24, 8),
        ],
        "norm": [copy("l0.norm", "l0.norm", 0, 4)],
        "head": [copy("head", "head", 0, 40)],
    }
    copies.update(overrides)
    return probe(PARAMS, [c for group in copies.values() for c in group])


def test_a_parameter_tiled_by_whole_checkpoint_tensors_is_one_zero_copy_unit() -> None:
    units = {u.name: u for u in plan_units(whole(), CHECKPOINT)}
    qkv = units["l0.qkv"]
    assert qkv.param == "l0.qkv"
    assert [(s.checkpoint, s.numel) for s in qkv.sources] == [
        ("l0.q", 16),
        ("l0.k", 8),
        ("l0.v", 8),
    ]
    assert "l0.q" not in units  # stored once, fused
    assert all(u.param == u.name for u in units.values())


def test_repacked_or_converted_bytes_take_the_copy_path_by_checkpoint_name() -> None:
    repacked = whole(
        qkv=[
            copy("l0.q", "l0.qkv", 0, 16, linear=False),
            copy("l0.k", "l0.qkv", 16, 8),
            copy("l0.v", "l0.qkv", 24, 8),
        ]
    )
    units = {u.name: u for u in plan_units(repacked, CHECKPOINT)}
    assert "l0.qkv" not in units
    assert {units[n].param for n in ("l0.q", "l0.k", "l0.v")} == {None}
    fp32 = {**CHECKPOINT, "l0.norm": (4, "F32")}  # the engine converts it to bf16
    assert {u.name: u.param for u in plan_units(whole(), fp32)}["l0.norm"] is None


def test_a_gap_or_a_partial_tensor_is_not_adopted() -> None:
    gap = whole(qkv=[copy("l0.q", "l0.qkv", 0, 16), copy("l0.v", "l0.qkv", 24, 8)])
    assert "l0.qkv" not in {u.name for u in plan_units(gap, CHECKPOINT)}
    # Only half of a checkpoint tensor in a parameter: a loader of another engine version
    # could not give load_weights the whole tensor back.
    half = whole(norm=[copy("l0.norm", "l0.norm", 0, 2), copy("l0.norm", "l0.norm", 2, 2, src=0)])
    assert {u.name: u.param for u in plan_units(half, CHECKPOINT)}["l0.norm"] is None


def test_slices_of_one_pre_fused_tensor_merge_back_into_it() -> None:
    # Phi-3: the checkpoint's qkv is already fused; the engine copies it in three slices.
    checkpoint = {"l0.qkv": (32, "BF16")}
    fused = probe(
        {"l0.qkv": [8, 4]},
        [
            copy("l0.qkv", "l0.qkv", 0, 16, 0),
            copy("l0.qkv", "l0.qkv", 16, 8, 16),
            copy("l0.qkv", "l0.qkv", 24, 8, 24),
        ],
    )
    [unit] = plan_units(fused, checkpoint)
    assert unit.param == "l0.qkv" and len(unit.sources) == 1 and unit.sources[0].numel == 32


def test_a_tensor_two_parameters_read_is_not_adopted_by_either() -> None:
    shared = whole(head=[copy("embed", "head", 0, 40)])
    units = {u.name: u for u in plan_units(shared, CHECKPOINT)}
    assert units["embed"].param is None and "head" not in {u.param for u in units.values()}
    assert units["head"].param is None  # never read: stays in the file, in no stage


def test_units_follow_the_engines_parameter_order_whatever_the_checkpoint_order() -> None:
    reordered = dict(reversed(list(CHECKPOINT.items())))
    a = [u.name for u in order_units(whole(), plan_units(whole(), CHECKPOINT))]
    b = [u.name for u in order_units(whole(), plan_units(whole(), reordered))]
    assert a == b == ["embed", "l0.qkv", "l0.norm", "head"]


def test_a_rank_needs_exactly_what_its_parameters_read() -> None:
    units = order_units(whole(), plan_units(whole(), CHECKPOINT))
    # Rank 1 of 2 builds the layer's norm and the head, and an embedding it never loads.
    last = probe(
        {"l0.norm": [4], "head": [10, 4], "embed": [10, 4]},
        [copy("l0.norm", "l0.norm", 0, 4), copy("head", "head", 0, 40)],
        pp=2,
        rank=1,
    )
    needed, unfilled = stage_units(last, units)
    assert needed == ["l0.norm", "head"] and unfilled == ["embed"]


def test_layers_are_balanced_by_bytes_with_the_ends_counted() -> None:
    # Embedding 100, four layers of 10, head 100: the ends weigh on the first and last stage.
    sizes: list[tuple[int | None, int]] = [
        (None, 100),
        (0, 10),
        (1, 10),
        (2, 10),
        (3, 10),
        (None, 100),
    ]
    partitions = layer_partitions(sizes, 4, 4)
    assert partitions[1] == [4]
    assert partitions[2] == [2, 2]
    assert sum(partitions[3]) == 4 and partitions[3][1] == 2
    assert partitions[4] == [1, 1, 1, 1]


def test_a_row_parallel_shard_is_strided_and_not_adoptable() -> None:
    # tp 2, rank 0: the column-parallel qkv shard is three contiguous slices; the
    # row-parallel o_proj shard is every row's first half (not contiguous in the source).
    rank = RankProbe(
        pp=1,
        rank=0,
        tp=2,
        tp_rank=0,
        params={
            "qkv": ParamShape(shape=[4, 4], dtype="BF16"),
            "o": ParamShape(shape=[4, 2], dtype="BF16"),
        },
        copies=[
            copy("q", "qkv", 0, 8, src=0),
            copy("k", "qkv", 8, 4, src=0),
            copy("v", "qkv", 12, 4, src=0),
            copy("o", "o", 0, 8, src=0, linear=False),
        ],
    )
    assert adoptable_bytes(rank) == (32, 48)
