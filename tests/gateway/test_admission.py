from __future__ import annotations

from hydraserve.backends.base import InstancePhase, InstanceView, ModelView
from hydraserve.gateway.admission import Admission, admit, describe_progress
from tests.support.fakes import make_model, ready_instance


def test_a_free_instance_and_an_empty_queue_dispatch_at_once() -> None:
    assert admit(0, 10, instance_available=True) == Admission.DISPATCH


def test_newcomers_never_overtake_waiting_requests() -> None:
    assert admit(3, 10, instance_available=True) == Admission.QUEUE


def test_no_instance_queues_until_the_queue_is_full() -> None:
    assert admit(0, 2, instance_available=False) == Admission.QUEUE
    assert admit(1, 2, instance_available=False) == Admission.QUEUE
    assert admit(2, 2, instance_available=False) == Admission.REJECT
    assert admit(5, 2, instance_available=True) == Admission.REJECT


def test_progress_description_names_starting_instances_and_failures() -> None:
    failed = InstanceView(
        name="m-0", model="m", pp=1, phase=InstancePhase.FAILED, error="out of GPU memory"
    )
    starting = InstanceView(name="m-1", model="m", pp=2, phase=InstancePhase.STARTING)
    view = ModelView(make_model("m"), desired_replicas=1, instances=(failed, starting))
    text = describe_progress(view)
    assert "1 starting" in text and "0 ready" in text
    assert "m-0 failed: out of GPU memory" in text


def test_progress_description_of_a_broken_or_deleted_model() -> None:
    assert describe_progress(None) == "the model was deleted"
    broken = ModelView(make_model("m"), error="not in the store: /models/m")
    assert describe_progress(broken) == "not in the store: /models/m"
    ok = ModelView(make_model("m"), 1, (ready_instance("m", "m-0", "http://x"),))
    assert "1 ready" in describe_progress(ok)
