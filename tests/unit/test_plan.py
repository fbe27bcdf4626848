"""What `make run` starts for WORKER_PROCESSES (devsinks/plan.py): that many workers, each with
its own log, metrics port and readiness line, and the values the workers would refuse refused
before anything starts."""

from __future__ import annotations

import pytest

from core.settings import Settings
from devsinks.plan import WORKER_READY_LINE, PlanError, Service, plan


def workers(env: dict[str, str]) -> list[Service]:
    return [service for service in plan(env).services if service.argv[-1] == "worker.py"]


def summary(env: dict[str, str]) -> dict[str, str]:
    return dict(plan(env).summary)


def test_one_worker_keeps_the_name_and_log_of_a_single_worker() -> None:
    [worker] = workers({"WORKER_PROCESSES": "1", "ORDERFLOW_DATA_DIR": "/tmp/stack"})
    assert (worker.name, worker.title) == ("worker", "worker")
    assert str(plan({"ORDERFLOW_DATA_DIR": "/tmp/stack"}).log_of(worker)) == (
        "/tmp/stack/logs/worker.log"
    )
    [metrics] = worker.ports
    default = Settings.model_fields["WORKER_METRICS_ADDRESS"].default
    assert (metrics.address, metrics.optional) == (default, True)
    assert worker.env == {"WORKER_METRICS_ADDRESS": default}
    assert summary({"WORKER_PROCESSES": "1"})["Workers"].startswith("1 process (WORKER_PROCESSES)")


def test_each_worker_has_its_own_log_and_metrics_port_and_is_watched_for_readiness() -> None:
    env = {"WORKER_PROCESSES": "3", "WORKER_METRICS_ADDRESS": "127.0.0.1:19464"}
    started = workers(env)
    assert [(w.name, w.title) for w in started] == [
        ("worker-1", "worker 1"),
        ("worker-2", "worker 2"),
        ("worker-3", "worker 3"),
    ]
    stack = plan(env)
    assert len({stack.log_of(worker) for worker in started}) == 3
    addresses = ["127.0.0.1:19464", "127.0.0.1:19465", "127.0.0.1:19466"]
    assert [[port.address for port in worker.ports] for worker in started] == [
        [address] for address in addresses
    ]
    # The child is told its own port, and binds what the stack checks.
    assert [worker.env["WORKER_METRICS_ADDRESS"] for worker in started] == addresses
    # An address you set is one you want: none of them gives way when taken.
    assert not any(port.optional for worker in started for port in worker.ports)
    assert {worker.ready_line for worker in started} == {WORKER_READY_LINE}
    assert len({port.port for port in stack.ports}) == len(stack.ports)
    said = summary(env)
    assert said["Workers"] == (
        "3 processes (WORKER_PROCESSES), logs worker-1.log, worker-2.log, worker-3.log"
    )
    assert said["Worker metrics"] == ", ".join(f"http://{a}/metrics" for a in addresses)


def test_workers_start_before_the_api_and_stop_after_it() -> None:
    names = [service.name for service in plan({"WORKER_PROCESSES": "2"}).services]
    assert names[-3:] == ["worker-1", "worker-2", "api"]


def test_unset_it_starts_the_settings_default() -> None:
    expected = Settings.model_fields["WORKER_PROCESSES"].get_default(call_default_factory=True)
    assert len(workers({})) == expected


def test_without_metrics_no_worker_binds_a_port() -> None:
    started = workers({"WORKER_PROCESSES": "2", "WORKER_METRICS_ADDRESS": ""})
    assert [worker.ports for worker in started] == [[], []]
    assert [worker.env for worker in started] == [{"WORKER_METRICS_ADDRESS": ""}] * 2
    assert "Worker metrics" not in summary({"WORKER_PROCESSES": "2", "WORKER_METRICS_ADDRESS": ""})


def test_a_default_metrics_port_found_taken_turns_off_that_workers_metrics_alone() -> None:
    env = {"WORKER_PROCESSES": "3"}
    taken = workers(env)[1].ports[0]
    assert taken.optional
    replanned = plan(env, gave_way=[taken])
    started = [service for service in replanned.services if service.argv[-1] == "worker.py"]
    assert [len(worker.ports) for worker in started] == [1, 0, 1]
    assert started[1].env == {"WORKER_METRICS_ADDRESS": ""}
    assert started[2].env["WORKER_METRICS_ADDRESS"] == started[2].ports[0].address
    assert taken.address not in dict(replanned.summary)["Worker metrics"]


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two", ""])
def test_a_worker_count_the_workers_would_refuse_is_refused_before_anything_starts(
    value: str,
) -> None:
    with pytest.raises(PlanError, match=f"WORKER_PROCESSES={value!r}"):
        plan({"WORKER_PROCESSES": value})


def test_metrics_ports_past_the_last_port_are_refused() -> None:
    with pytest.raises(PlanError, match="the last would be 65536"):
        plan({"WORKER_PROCESSES": "3", "WORKER_METRICS_ADDRESS": "127.0.0.1:65534"})
    assert len(workers({"WORKER_PROCESSES": "2", "WORKER_METRICS_ADDRESS": "127.0.0.1:65534"})) == 2
