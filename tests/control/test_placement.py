"""Replica placement: distinct hosts first, then distinct zones, then the old preferences."""

from __future__ import annotations

from hotswap.control.engine_port import EngineRef
from hotswap.control.placement import choose_engines


def _engine(name: str, **labels: str) -> EngineRef:
    return EngineRef(name, f"{name}:1", labels)


def test_replicas_go_to_distinct_hosts_before_a_second_engine_on_one() -> None:
    engines = [_engine("a1", host="n1"), _engine("a2", host="n1"), _engine("b1", host="n2")]
    assert choose_engines(engines, (), (), 2) == ["a1", "b1"]
    # Three replicas on two hosts: the third shares a host, as it must.
    assert choose_engines(engines, (), (), 3) == ["a1", "b1", "a2"]


def test_then_distinct_zones() -> None:
    engines = [
        _engine("e1", host="n1", zone="a"),
        _engine("e2", host="n2", zone="a"),
        _engine("e3", host="n3", zone="b"),
    ]
    assert choose_engines(engines, (), (), 2) == ["e1", "e3"]


def test_spreading_beats_keeping_a_replica_where_it_was() -> None:
    engines = [_engine("a1", host="n1"), _engine("a2", host="n1"), _engine("b1", host="n2")]
    # a1 and a2 serve it today, on one host: the redeploy keeps a1 and moves a2's to b1.
    assert choose_engines(engines, {"a1", "a2"}, (), 2) == ["a1", "b1"]


def test_unlabelled_engines_are_each_a_host_and_keep_the_old_order() -> None:
    engines = [_engine("e3"), _engine("e1"), _engine("e2")]
    assert choose_engines(engines, {"e2"}, (), 2) == ["e2", "e1"]
