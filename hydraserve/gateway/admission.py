"""Admission: what happens to a request that arrives for a model (pure).

A request goes straight to an instance when one has room and nobody is waiting (FIFO: a
newcomer never overtakes a waiting request); otherwise it waits in the model's bounded
queue until its deadline; when the queue is full it is refused at once (429), before any
work or memory is spent on it.
"""

from __future__ import annotations

from enum import StrEnum

from hydraserve.backends.base import InstancePhase, ModelView
from hydraserve.control import reasons


class Admission(StrEnum):
    DISPATCH = "dispatch"
    QUEUE = "queue"
    REJECT = "reject"


def admit(queue_length: int, queue_capacity: int, instance_available: bool) -> Admission:
    if queue_length == 0 and instance_available:
        return Admission.DISPATCH
    if queue_length >= queue_capacity:
        return Admission.REJECT
    return Admission.QUEUE


def describe_progress(view: ModelView | None) -> str:
    """Why a model has nothing ready yet, in a few words for the 503 message."""
    if view is None:
        return "the model was deleted"
    if view.error:
        return view.error
    counts = {phase: 0 for phase in InstancePhase}
    last_failure = None
    for instance in view.instances:
        counts[instance.phase] += 1
        if instance.phase == InstancePhase.FAILED and instance.error:
            last_failure = f"instance {instance.name} failed: {instance.error}"
    parts = [f"{view.desired_replicas} replica(s) requested"]
    parts.append(f"{counts[InstancePhase.STARTING]} starting")
    parts.append(f"{counts[InstancePhase.READY]} ready")
    if last_failure:
        parts.append(last_failure)
    # Why nothing starts (cannot be placed now, backing off after failures), as the
    # control plane's conditions say it.
    waiting = (reasons.UNSCHEDULABLE, reasons.BACK_OFF)
    parts += [
        f"{c.reason}: {c.message}"
        for c in view.conditions
        if c.status == "False" and c.message and c.reason in waiting
    ]
    return ", ".join(parts)
