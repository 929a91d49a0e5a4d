"""``plan()``: pipeline size, workers' memory, all-card count and nodes for one cold start.

A pure function of its inputs (no I/O, no clock): the operator, the embedded platform and
the simulator all call it with the cluster state they observe.

Search order, cheapest first: pp = 1, 2, … up to the cap and, for each pp, 1 … pp all-card
workers; the first (pp, all-card) whose best placement is predicted to meet both SLOs
wins. Its placement is then re-chosen for packing: among the nodes fast enough for the
TTFT SLO, cached nodes first, then the tightest GPU-memory fit. With no plan meeting both
SLOs, the fallback is pp = 1 on the fastest node (or the fastest TPOT-feasible plan), with
the reason spelled out. One pass over the nodes plus a sort: O(n log n) in the nodes.

Tensor parallelism (``PlanRequest.tp``): a stage is ``tp`` GPUs of one node, each holding
1/tp of the stage's memory, so a node qualifies for a stage when ``tp`` of its GPUs each
have that free; the node's NIC fetches the stage's bytes once for all its ranks (one fetch
per stage, as for tp = 1). An all-card worker holds a whole replica on its ``tp`` GPUs.
When no node can, the pipeline is planned without one (pp >= 2, every stage part-card):
it serves but cannot consolidate, and ``Plan.no_consolidation`` says why.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from operator import attrgetter

from hydraserve.planner.config import PlannerConfig
from hydraserve.planner.costmodel import (
    StageShape,
    admitted_share,
    fetch_budget_s,
    part_card_memory_bytes,
    predict_prefill_s,
    predict_tpot_s,
    predict_ttft,
)
from hydraserve.planner.types import (
    ClusterState,
    GPUState,
    NodeState,
    Plan,
    PlanRequest,
    Prediction,
    StagePlacement,
    Unschedulable,
    per_device_bytes,
)

_DEFAULT_CONFIG = PlannerConfig()
_GIB = float(1 << 30)


def _gib(nbytes: float) -> str:
    # GiB: the unit of the spec (resources.gpuMemoryGiB) the user wrote.
    return f"{nbytes / _GIB:.1f} GiB"


@dataclass(slots=True)
class _Candidate:
    """A node that could host a worker of this model, with what the planner needs of it."""

    position: int  # index in the inventory (first-fit order)
    node: NodeState
    max_free: int  # most memory a worker can get on each of ``tp`` GPUs of this node
    nic_rate: float  # admitted fair share for a new fetch (bytes/s)
    cached: bool  # the model is in this node's host cache
    raw_rate: float  # cache rate if cached, else nic_rate (sort key)


@dataclass(slots=True)
class _Option:
    """One evaluated (pp, all-card) choice with its placement and prediction."""

    pp: int
    all_card: int
    nodes: list[_Candidate]  # by rank
    rates: list[float]  # effective fetch rate per rank
    memory: list[int]  # logical memory per rank (before exclusive-GPU rounding)
    ttft_s: float
    tpot_s: float
    terms: dict[str, float]
    fetch_budget_s: float

    def meets(self, ttft_slo: float, tpot_slo: float) -> bool:
        return self.ttft_s <= ttft_slo and self.tpot_s <= tpot_slo


class _Planner:
    def __init__(self, request: PlanRequest, cluster: ClusterState, config: PlannerConfig):
        self.request = request
        self.model = request.model
        self.cluster = cluster
        self.config = config
        self.cache_rate = (
            config.cache_load_bytes_per_s if config.cache_load_bytes_per_s else math.inf
        )
        self.store_required = 0.0  # set by scan()
        self.busy = False  # admission (a NIC or the store) ruled out some placement
        self.tp = max(1, request.tp)
        self.no_consolidation = ""  # set by run() when no node can hold a replica

    # --- inputs ------------------------------------------------------------------------
    def pp_options(self) -> list[int]:
        cap = min(self.request.max_pp, self.config.max_pp, len(self.cluster.nodes))
        return [pp for pp in sorted(self.model.partitions) if 1 <= pp <= cap]

    def need_all(self) -> int:
        return self.model.replica_bytes

    def need_part(self, pp: int) -> int:
        return max(part_card_memory_bytes(self.model, pp, r) for r in range(pp))

    def replica_fits_idle(self, need: int) -> bool:
        """Whether some node could hold a whole replica (``need`` per GPU) on ``tp`` of
        its GPUs were they idle (only asked when none can now)."""
        tp = self.tp
        for node in self.cluster.nodes:
            totals = [g.total_bytes for g in node.gpus]
            if len(totals) >= tp and heapq.nlargest(tp, totals)[-1] >= need:
                return True
        return False

    def per_gpu(self, need: int) -> int:
        """What each of a worker's ``tp`` GPUs must have free for ``need`` bytes in all."""
        return per_device_bytes(need, self.tp)

    def scan(self, min_need: int) -> tuple[list[_Candidate], int, tuple[int, str], int]:
        """One pass over the inventory: candidates, in-flight fetch count, largest free GPU
        (per GPU of ``tp`` on one node, for the reason when nothing fits) and how many nodes
        admission refused. ``min_need`` is per GPU. Also sets ``store_required``: the store
        rate the tightest protected in-flight fetch needs."""
        config = self.config
        exclusive = config.exclusive_gpus
        key = self.model.key
        use_cache = config.use_cache
        min_rate = config.min_fetch_bytes_per_s
        store = self.cluster.store_bytes_per_s
        track_store = store is not None and config.network_admission
        candidates: list[_Candidate] = []
        active_fetches = 0
        in_flight: list[tuple[float, float, float]] = []  # bytes left, deadline, NIC share
        largest: tuple[int, str] = (0, "")
        refused = 0
        tp = self.tp
        for position, node in enumerate(self.cluster.nodes):
            if node.inflight:
                active = [f for f in node.inflight if not f.low_priority]
                active_fetches += len(active)
                if track_store and active:
                    nic_share = node.nic_bytes_per_s * config.fetch_efficiency / len(active)
                    in_flight += [(f.bytes_left, f.deadline_s, nic_share) for f in active]
            max_free = _room(node.gpus, tp, exclusive)
            if max_free > largest[0]:
                largest = (max_free, node.name)
            if max_free < min_need:
                continue
            cached = use_cache and key in node.cached_models
            if node.inflight:
                nic_rate = admitted_share(node, config)
            else:
                nic_rate = node.nic_bytes_per_s * config.fetch_efficiency
            if nic_rate < min_rate:
                nic_rate = 0.0
                if not cached:
                    refused += 1
                    continue
            raw = self.cache_rate if cached else nic_rate
            candidates.append(_Candidate(position, node, max_free, nic_rate, cached, raw))
        if track_store and store is not None and in_flight:
            # The store is a link every fetch crosses: protect, as at a NIC, the in-flight
            # fetches that meet their deadline at today's share.
            store_now = store / active_fetches
            for bytes_left, deadline, nic_share in in_flight:
                if deadline > 0 and bytes_left <= min(nic_share, store_now) * deadline:
                    self.store_required = max(self.store_required, bytes_left / deadline)
        return candidates, active_fetches, largest, refused

    # --- evaluation ----------------------------------------------------------------------
    def store_share(self, active_fetches: int, pp: int) -> float:
        store = self.cluster.store_bytes_per_s
        if store is None:
            return math.inf
        return store / (active_fetches + pp)

    def effective_rate(self, cand: _Candidate, store_share: float) -> float:
        return self.cache_rate if cand.cached else min(cand.nic_rate, store_share)

    def evaluate(
        self, pp: int, all_card: int, nodes_by_rank: list[_Candidate], store_share: float
    ) -> _Option:
        model, config, request = self.model, self.config, self.request
        stages = model.partitions[pp]
        rates = [self.effective_rate(c, store_share) for c in nodes_by_rank]
        memory = [
            self.need_all() if rank < all_card else part_card_memory_bytes(model, pp, rank)
            for rank in range(pp)
        ]
        fetch_s = max(stages[r][2] / rates[r] if rates[r] > 0 else math.inf for r in range(pp))
        # A serial load to the devices runs on every GPU of the stage at once (each its
        # own host link): what one GPU loads is its share of the biggest stage.
        max_stage_bytes = per_device_bytes(max(s[2] for s in stages), self.tp)
        shapes = [
            StageShape(
                stages[r][1] - stages[r][0], memory[r], nodes_by_rank[r].node.gpu_type, self.tp
            )
            for r in range(pp)
        ]
        if config.exclusive_gpus:
            shapes = [StageShape(s.layers, model.replica_bytes, s.gpu_type, s.tp) for s in shapes]
        prefill = predict_prefill_s(model, shapes, config)
        tpot = predict_tpot_s(model, shapes, config)
        floor = None
        if config.engine_ready_floor_by_gpu_type:
            floor = max(config.floor_for(c.node.gpu_type) for c in nodes_by_rank)
        estimate = predict_ttft(
            waited_s=request.waited_s,
            fetch_s=fetch_s,
            max_stage_bytes=max_stage_bytes,
            prefill_s=prefill,
            config=config,
            floor_s=floor,
        )
        terms = dict(estimate.terms)
        terms["tpot_s"] = tpot
        terms["bottleneck_bytes_per_s"] = min(rates)
        terms["store_share_bytes_per_s"] = store_share
        terms["fetch_efficiency"] = config.fetch_efficiency
        if self.tp > 1:
            terms["tp"] = float(self.tp)
            terms["tensor_parallel_efficiency"] = config.tensor_parallel_efficiency
        budget = fetch_budget_s(
            request.slo.ttft_s, request.waited_s, max_stage_bytes, prefill, config
        )
        return _Option(
            pp, all_card, nodes_by_rank, rates, memory, estimate.ttft_s, tpot, terms, budget
        )

    def assign_ranks(
        self, pp: int, all_nodes: list[_Candidate], part_nodes: list[_Candidate],
        store_share: float,
    ) -> list[_Candidate]:  # fmt: skip
        """Within each group, the biggest stage goes to the fastest node (minimises the
        slowest fetch). All-card workers take the first ranks (stage 0 is the head)."""
        stages = self.model.partitions[pp]
        a = len(all_nodes)
        by_rank: list[_Candidate | None] = [None] * pp
        for group, ranks in ((all_nodes, range(a)), (part_nodes, range(a, pp))):
            ranked = sorted(ranks, key=lambda r: -stages[r][2])
            fastest = sorted(group, key=lambda c: -self.effective_rate(c, store_share))
            for rank, cand in zip(ranked, fastest, strict=True):
                by_rank[rank] = cand
        return [c for c in by_rank if c is not None]

    def greedy(
        self, ordered: list[_Candidate], pp: int, all_card: int, store_share: float
    ) -> list[_Candidate] | None:
        """First ``all_card`` nodes with room for a replica and ``pp - all_card`` more with
        room for a part-card stage, in ``ordered``'s order (fastest first, or inventory
        order for first-fit). For fastest-first this maximises the slowest rate."""
        need_all = self.per_gpu(self.need_all())
        need_part = self.per_gpu(self.need_part(pp)) if pp > 1 else 0
        all_nodes: list[_Candidate] = []
        part_nodes: list[_Candidate] = []
        want_part = pp - all_card
        for cand in ordered:
            if len(all_nodes) < all_card and cand.max_free >= need_all:
                all_nodes.append(cand)
            elif len(part_nodes) < want_part and cand.max_free >= need_part:
                part_nodes.append(cand)
            if len(all_nodes) == all_card and len(part_nodes) == want_part:
                return self.assign_ranks(pp, all_nodes, part_nodes, store_share)
        return None

    def best_fit(
        self, option: _Option, candidates: list[_Candidate], store_share: float
    ) -> _Option | None:
        """Same (pp, all-card), re-placed for packing: among nodes whose rate keeps the
        fetch within the SLO budget, cached nodes first, then the tightest fit."""
        pp, a = option.pp, option.all_card
        budget = option.fetch_budget_s
        if budget <= 0:
            return None
        stages = self.model.partitions[pp]
        need_rate = max(s[2] for s in stages) / budget
        need_all = self.per_gpu(self.need_all())
        need_part = self.per_gpu(self.need_part(pp)) if pp > 1 else 0
        exclusive, tp = self.config.exclusive_gpus, self.tp
        fast = [c for c in candidates if self.effective_rate(c, store_share) >= need_rate]

        def key(c: _Candidate, need: int) -> tuple[bool, int, float, int]:
            leftover = _best_fit_gpus(c.node.gpus, need, tp, exclusive)[1]
            return (not c.cached, leftover, -c.raw_rate, c.position)

        all_nodes = heapq.nsmallest(
            a, (c for c in fast if c.max_free >= need_all), key=lambda c: key(c, need_all)
        )
        if len(all_nodes) < a:
            return None
        taken = {id(c) for c in all_nodes}
        part_nodes = heapq.nsmallest(
            pp - a,
            (c for c in fast if c.max_free >= need_part and id(c) not in taken),
            key=lambda c: key(c, need_part),
        )
        if len(part_nodes) < pp - a:
            return None
        by_rank = self.assign_ranks(pp, all_nodes, part_nodes, store_share)
        refined = self.evaluate(pp, a, by_rank, store_share)
        return refined if refined.meets(self.request.slo.ttft_s, self.request.slo.tpot_s) else None

    # --- result --------------------------------------------------------------------------
    def to_plan(self, option: _Option, reason: str, meets: bool) -> Plan:
        model, config = self.model, self.config
        stages = model.partitions[option.pp]
        # Seconds from placement by which each fetch must end for the prediction to hold
        # (a fallback plan protects its own predicted fetch time).
        deadline = config.fetch_start_delay_s + max(option.fetch_budget_s, option.terms["fetch_s"])
        placements = []
        for rank, cand in enumerate(option.nodes):
            start, end, nbytes = stages[rank]
            all_card = rank < option.all_card
            need = option.memory[rank]
            gpus, _, gpu_total = _best_fit_gpus(
                cand.node.gpus, self.per_gpu(need), self.tp, config.exclusive_gpus
            )
            memory = gpu_total if config.exclusive_gpus else need
            consolidation = (
                model.total_bytes - nbytes if all_card and option.pp > 1 and not cand.cached else 0
            )
            placements.append(
                StagePlacement(
                    rank=rank,
                    node=cand.node.name,
                    gpu=gpus[0],
                    start_layer=start,
                    end_layer=end,
                    memory_bytes=memory,
                    all_card=all_card,
                    fetch_bytes=0 if cand.cached else nbytes,
                    from_cache=cand.cached,
                    fetch_bytes_per_s=option.rates[rank],
                    fetch_deadline_s=math.inf if cand.cached else deadline,
                    consolidation_bytes=consolidation,
                    gpu_type=cand.node.gpu_type,
                    gpus=gpus,
                )
            )
        return Plan(
            pp=option.pp,
            stages=tuple(placements),
            prediction=Prediction(option.ttft_s, option.tpot_s, option.terms),
            reason=reason,
            meets_slo=meets,
            tp=self.tp,
            no_consolidation=self.no_consolidation if option.all_card == 0 else "",
        )

    def run(self) -> Plan | Unschedulable:
        model, request, config = self.model, self.request, self.config
        slo = request.slo
        pps = self.pp_options()
        if not pps:
            return Unschedulable(
                f"model {model.key} has no stage partition usable with max pp "
                f"{min(request.max_pp, config.max_pp)} (partitions: {sorted(model.partitions)})"
            )
        need_all = self.per_gpu(self.need_all())
        multi = [pp for pp in pps if pp > 1]
        # A node without room for a replica can only host part-card stages: the smallest
        # part-card need (per GPU) is the filter.
        min_need = min([need_all] + [self.per_gpu(self.need_part(pp)) for pp in multi])
        candidates, active_fetches, largest, refused = self.scan(min_need)
        self.busy = refused > 0
        replica_fits = any(c.max_free >= need_all for c in candidates)
        if not replica_fits:
            mode = config.part_card_pipelines
            if (
                mode == "never"
                or not multi
                or largest[0] >= need_all
                or not candidates
                or (mode == "too_big_for_any_node" and self.replica_fits_idle(need_all))
            ):
                return self.no_fit(need_all, largest, refused)
            # No node can hold a whole replica on its GPUs: only a pipeline of part-card
            # stages fits. It serves, but there is nowhere to consolidate it.
            self.no_consolidation = self.replica_missing(need_all, largest)
            pps = multi
        if config.placement == "first_fit":
            ordered = sorted(candidates, key=lambda c: c.position)
        else:
            ordered = sorted(candidates, key=lambda c: (-c.raw_rate, c.position))

        notes: list[str] = []
        evaluated: list[_Option] = []
        pp1: _Option | None = None
        for pp in pps:
            share = self.store_share(active_fetches, pp)
            candidates_pp = ordered
            if share < self.store_required:
                # New fetches would slow an in-flight one past its deadline at the store;
                # only a start from a host cache (no fetch) is possible, and only at pp 1.
                notes.append(f"pp={pp}: the store is busy (in-flight fetches need its bandwidth)")
                self.busy = True
                if pp > 1:
                    break
                candidates_pp = [c for c in ordered if c.cached]
            first_a = 1 if pp == 1 else max(1, min(request.min_all_card, pp))
            all_cards = range(first_a, pp + 1) if replica_fits else range(0, 1)
            best_for_pp: _Option | None = None
            for a in all_cards:
                nodes = self.greedy(candidates_pp, pp, a, share)
                if nodes is None:
                    continue
                option = self.evaluate(pp, a, nodes, share)
                evaluated.append(option)
                if pp == 1:
                    pp1 = option
                if option.meets(slo.ttft_s, slo.tpot_s):
                    return self.accept(option, candidates_pp, share)
                if best_for_pp is None or _closer_miss(best_for_pp, option, slo.tpot_s):
                    best_for_pp = option
            if candidates_pp is ordered:
                notes.append(self.note(pp, best_for_pp))
        if not replica_fits and not evaluated:
            return Unschedulable(
                self.no_consolidation.removesuffix(" (it cannot consolidate)")
                + ", and no pipeline of part-card stages fits either: "
                + "; ".join(notes)
            )
        return self.fallback(pp1, evaluated, notes)

    def accept(self, option: _Option, candidates: list[_Candidate], share: float) -> Plan:
        refined = None
        if self.config.placement == "slo_best_fit":
            refined = self.best_fit(option, candidates, share)
        chosen = refined or option
        cached = " from host cache" if any(c.cached for c in chosen.nodes) else ""
        tp = f" x tp={self.tp}" if self.tp > 1 else ""
        reason = (
            f"smallest pp meeting both SLOs: pp={chosen.pp}{tp} with {chosen.all_card} "
            f"all-card worker(s){cached}; predicted TTFT {chosen.ttft_s:.2f} s <= "
            f"{self.request.slo.ttft_s:.2f} s, TPOT {chosen.tpot_s * 1e3:.0f} ms <= "
            f"{self.request.slo.tpot_s * 1e3:.0f} ms"
        )
        if chosen.all_card == 0:
            reason += f"; {self.no_consolidation}"
        return self.to_plan(chosen, reason, meets=True)

    def note(self, pp: int, option: _Option | None) -> str:
        slo = self.request.slo
        if option is None:
            return f"pp={pp}: no placement (memory or network)"
        parts = []
        if option.ttft_s > slo.ttft_s:
            parts.append(f"TTFT {option.ttft_s:.2f} s > {slo.ttft_s:.2f} s")
        if option.tpot_s > slo.tpot_s:
            parts.append(f"TPOT {option.tpot_s * 1e3:.0f} ms > {slo.tpot_s * 1e3:.0f} ms")
        return f"pp={pp} ({option.all_card} all-card): " + ", ".join(parts)

    def fallback(
        self, pp1: _Option | None, evaluated: list[_Option], notes: list[str]
    ) -> Plan | Unschedulable:
        slo = self.request.slo
        chosen = pp1
        label = "pp=1"
        if self.config.fallback == "fastest" or (pp1 is None and self.no_consolidation):
            # (Without room for a replica there is no pp = 1: the fastest pipeline it is.)
            feasible = [o for o in evaluated if o.tpot_s <= slo.tpot_s] or evaluated
            if feasible:
                chosen = min(feasible, key=lambda o: (o.ttft_s, o.pp))
                label = f"the fastest TPOT-feasible plan (pp={chosen.pp})"
        if chosen is not None and self.busy and self.request.defer_when_busy:
            return Unschedulable(
                "no plan meets both SLOs while the network is busy ("
                + "; ".join(notes)
                + "); deferred: retry when in-flight fetches finish"
            )
        if chosen is None:
            return Unschedulable(
                "no admissible placement now: " + "; ".join(notes) + " (retry when fetches finish)"
            )
        reason = "no plan meets both SLOs (" + "; ".join(notes) + f"); falling back to {label}"
        if chosen.all_card == 0:
            reason += f"; {self.no_consolidation}"
        return self.to_plan(chosen, reason, meets=False)

    def no_fit(self, need_all: int, largest: tuple[int, str], refused: int) -> Unschedulable:
        """``need_all`` and ``largest`` are per GPU (of ``tp`` on one node)."""
        key = self.model.key
        if largest[0] >= need_all:
            memory = (
                f"{self.tp} GPUs with {_gib(need_all)} free each"
                if self.tp > 1
                else f"{_gib(need_all)} GPU memory free"
            )
            return Unschedulable(
                f"every node with {memory} for {key} is refusing new "
                f"fetches ({refused} node(s)): admitting one would make an in-flight fetch "
                "miss its deadline; retry when those fetches finish"
            )
        if self.tp > 1:
            return Unschedulable(self.replica_missing(need_all, largest).split(" (it cannot")[0])
        what = "an idle GPU with" if self.config.exclusive_gpus else "a GPU with"
        where = f"{_gib(largest[0])} on {largest[1]}" if largest[1] else "no GPUs"
        return Unschedulable(
            f"no node has {what} {_gib(need_all)} free for a whole replica of {key} "
            f"(largest free: {where})"
        )

    def replica_missing(self, need_all: int, largest: tuple[int, str]) -> str:
        """Why no worker can hold a whole replica (``need_all`` per GPU, ``largest``: the
        most a node offers on each of ``tp`` GPUs)."""
        tp, key = self.tp, self.model.key
        idle = "idle " if self.config.exclusive_gpus else ""
        if tp == 1:
            what = f"no node has an {idle}GPU with {_gib(need_all)} free"
            where = f"{_gib(largest[0])} on {largest[1]}" if largest[1] else "no GPUs"
            best = f"largest free: {where}"
        else:
            what = f"no node has {tp} {idle}GPUs with {_gib(need_all)} free each"
            best = (
                f"best: {_gib(largest[0])} free on each of {tp} GPUs of {largest[1]}"
                if largest[0] > 0
                else f"no node has {tp} {idle}GPUs free"
            )
        return (
            f"{what} for a whole replica of {key} ({_gib(need_all * tp)} at tp={tp}; {best}) "
            "(it cannot consolidate)"
        )


def _closer_miss(current: _Option, new: _Option, tpot_slo: float) -> bool:
    """Whether ``new`` misses the SLOs by less than ``current`` (for the reason text)."""
    current_ok, new_ok = current.tpot_s <= tpot_slo, new.tpot_s <= tpot_slo
    if current_ok != new_ok:
        return new_ok
    return new.ttft_s < current.ttft_s


_free_bytes = attrgetter("free_bytes")


def _room(gpus: tuple[GPUState, ...], tp: int, exclusive: bool) -> int:
    """Most memory each of ``tp`` GPUs of a node can give one worker: the ``tp``-th
    largest free (with exclusive GPUs: among the idle ones, their whole memory)."""
    if exclusive:
        rooms = [g.total_bytes for g in gpus if g.free_bytes >= g.total_bytes]
        if len(rooms) < tp:
            return 0
        return max(rooms) if tp == 1 else heapq.nlargest(tp, rooms)[-1]
    if tp == 1:
        return max(map(_free_bytes, gpus), default=0)
    if len(gpus) < tp:
        return 0
    return heapq.nlargest(tp, [g.free_bytes for g in gpus])[-1]


def _best_fit_gpus(
    gpus: tuple[GPUState, ...], need: int, tp: int, exclusive: bool
) -> tuple[tuple[int, ...], int, int]:
    """(indices, leftover, total) of the ``tp`` GPUs with the least room left after
    ``need`` each (leftover and total summed over them); with exclusive GPUs only idle
    ones count and a worker's room is the whole GPU. ``((), huge, 0)`` when none fit."""
    fits: list[tuple[int, int, int]] = []  # (leftover, index, total)
    for gpu in gpus:
        if exclusive:
            room = gpu.total_bytes if gpu.free_bytes >= gpu.total_bytes else -1
        else:
            room = gpu.free_bytes
        if room >= need:
            fits.append((room - need, gpu.index, gpu.total_bytes))
    if len(fits) < tp:
        return (), 1 << 62, 0
    chosen = [min(fits)] if tp == 1 else heapq.nsmallest(tp, fits)
    return (
        tuple(sorted(index for _, index, _ in chosen)),
        sum(left for left, _, _ in chosen),
        sum(total for _, _, total in chosen),
    )


def plan(
    request: PlanRequest, cluster: ClusterState, config: PlannerConfig | None = None
) -> Plan | Unschedulable:
    """Plan one cold start of ``request.model`` on ``cluster``.

    Returns the smallest pipeline (then fewest all-card workers) predicted to meet both the
    TTFT and the TPOT SLO, placed on distinct nodes with room on ``request.tp`` GPUs each
    and a fetch admitted by every node's NIC; or a pp = 1 fallback with ``meets_slo=False``
    and the reason; or :class:`Unschedulable` saying what is missing and where.
    """
    return _Planner(request, cluster, config or _DEFAULT_CONFIG).run()
