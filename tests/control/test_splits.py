"""Split and shadow steps in the store (real SQLite files) and the checks before a version is
made of them; the rollout's own rules (its steps, its judgement) on plain numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotswap.control.domain import TensorSpec
from hotswap.control.errors import InvalidArgument
from hotswap.control.rollout import Rollout, RolloutStep, Served, check_percents, judge
from hotswap.control.splits import SplitRequest
from hotswap.control.store import Store

FLOAT18 = (TensorSpec("float_input", "tensor(float)", (-1, 18)),)
OTHER18 = (TensorSpec("input", "tensor(float)", (-1, 18)),)  # xgb: another name, same shape
FLOAT4 = (TensorSpec("x", "tensor(float)", (-1, 4)),)
OUT = (TensorSpec("variable", "tensor(float)", (-1, 1)),)
OUT_INT = (TensorSpec("label", "tensor(int64)", (-1,)),)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "hotswap.db")
    s.create_workspace("ws")
    for i, (name, inputs, outputs) in enumerate(
        [("rf", FLOAT18, OUT), ("xgb", OTHER18, OUT), ("narrow", FLOAT4, OUT),
         ("classes", FLOAT18, OUT_INT)]
    ):  # fmt: skip
        s.add_model_version("ws", name, f"{i:064x}", 10, inputs, outputs)
    s.create_pipeline("ws", "p")
    return s


def _version(store: Store, *splits: SplitRequest, steps: tuple[str, ...] = ("rf",)) -> object:
    return store.create_pipeline_version("ws", "p", [(m, "") for m in steps], splits)


def test_splits_are_stored_whole_and_read_back(tmp_path: Path, store: Store) -> None:
    made = store.create_pipeline_version(
        "ws",
        "p",
        [("rf", ""), ("rf", "")],
        [
            SplitRequest(0, "random", (("rf", ""), ("xgb", "")), (90, 10), "user"),
            SplitRequest(1, "key", (("rf", ""), ("xgb", "")), (), "card", ("gold",)),
        ],
    )
    store.close()
    again = Store(tmp_path / "hotswap.db").pipeline_version("ws", "p", made.number)
    assert again.splits == made.splits
    random, key = again.splits
    assert [m.name for m in random.models] == ["rf", "xgb"]
    assert (random.kind, random.weights, random.key) == ("random", (90.0, 10.0), "user")
    assert (key.kind, key.key, key.key_values, key.weights) == ("key", "card", ("gold",), ())
    assert [m.sha256 for m in again.models()] == [
        *(s.sha256 for s in again.steps),
        random.models[1].sha256,
        key.models[1].sha256,
    ]


@pytest.mark.parametrize(
    ("split", "message"),
    [
        (SplitRequest(3, "random", (("rf", ""), ("xgb", "")), (1, 1)), "names step 3"),
        (SplitRequest(0, "", (("rf", ""), ("xgb", "")), (1, 1)), "has no kind"),
        (SplitRequest(0, "random", (("rf", ""),), (1,)), "has 1 model"),
        (SplitRequest(0, "random", (("xgb", ""), ("rf", "")), (1, 1)), "starts with 'xgb'"),
        (SplitRequest(0, "random", (("rf", ""), ("rf", "")), (1, 1)), "names a model twice"),
        (SplitRequest(0, "random", (("rf", ""), ("xgb", "")), (1,)), "1 weight(s) for 2"),
        (SplitRequest(0, "random", (("rf", ""), ("xgb", "")), (1, -1)), "each must be a number"),
        (SplitRequest(0, "random", (("rf", ""), ("xgb", "")), (0, 0)), "one above 0"),
        (SplitRequest(0, "random", (("rf", ""), ("xgb", "")), (1, float("nan"))), "each must"),
        (SplitRequest(0, "random", (("rf", ""), ("xgb", "")), (1e308, 1e308)), "one above 0"),
        (SplitRequest(0, "random", (("rf", ""),) * 17, (1,) * 17), "more than 16 models"),
        (SplitRequest(0, "shadow", (("rf", ""), ("rf", ""))), "names a model twice"),
        (SplitRequest(0, "key", (("rf", ""), ("xgb", "")), (), ""), "without a key column"),
        (SplitRequest(0, "key", (("rf", ""), ("xgb", "")), (), "k", ("a", "b")), "2 key value"),
        (SplitRequest(0, "shadow", (("rf", ""), ("xgb", "")), (1, 1)), "takes no weights"),
        (SplitRequest(0, "random", (("rf", ""), ("narrow", "")), (1, 1)), "'narrow' inputs"),
        (SplitRequest(0, "random", (("rf", ""), ("classes", "")), (1, 1)), "'classes' outputs"),
    ],
)
def test_a_split_that_cannot_be_served_is_refused_saying_why(
    store: Store, split: SplitRequest, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        _version(store, split)
    assert store.pipeline_versions("ws", "p") == []  # nothing was made


def test_a_shadow_may_give_other_outputs_but_must_take_the_inputs(store: Store) -> None:
    made = _version(store, SplitRequest(0, "shadow", (("rf", ""), ("classes", ""), ("xgb", ""))))
    assert [m.name for m in made.splits[0].models] == ["rf", "classes", "xgb"]  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument, match="'narrow' inputs"):
        _version(store, SplitRequest(0, "shadow", (("rf", ""), ("narrow", ""))))


def test_one_split_per_step_and_bounded_sizes_before_any_look_up(store: Store) -> None:
    split = SplitRequest(0, "random", (("rf", ""), ("xgb", "")), (1, 1))
    with pytest.raises(InvalidArgument, match="step 0 has two splits"):
        _version(store, split, split, steps=("rf", "rf"))
    with pytest.raises(InvalidArgument, match="2 splits for 1 step"):
        _version(store, split, split)
    # Refused before a name is resolved: an unknown model would be NOT_FOUND otherwise.
    with pytest.raises(InvalidArgument, match="at most 64 steps"):
        _version(store, steps=("no-such-model",) * 65)
    many = SplitRequest(0, "random", (("no-such-model", ""),) * 10_000, (1,) * 10_000)
    with pytest.raises(InvalidArgument, match="more than 16"):
        _version(store, many)


def test_a_key_split_may_send_several_values_to_one_model(store: Store) -> None:
    split = SplitRequest(0, "key", (("rf", ""), ("xgb", ""), ("xgb", "")), (), "k", ("a", "b"))
    made = _version(store, split)
    assert [m.name for m in made.splits[0].models] == ["rf", "xgb", "xgb"]  # type: ignore[attr-defined]


def test_rollout_steps_increase_to_100() -> None:
    assert check_percents([]) == (5, 25, 50, 100)
    assert check_percents([10, 100]) == (10, 100)
    for bad in ([5, 25], [50, 25, 100], [0, 100], [10, 10, 100], [10, 150], [float("inf")]):
        with pytest.raises(InvalidArgument):
            check_percents(bad)


def _rollout() -> Rollout:
    return Rollout("id", "ws", "p", 0, {"name": "rf", "version": "1"},
                   {"name": "gbr", "version": "2"}, 1, (50, 100), 60, 0.01, 1.5, 20)  # fmt: skip


def test_the_judgement_names_the_limit_broken() -> None:
    rollout = _rollout()
    step = RolloutStep(50, 2, 0, champion=Served(100, 100, 0, 1_000_000))
    step.challenger = Served(100, 100, 1, 1_000_000)  # 1% errors: at the limit, not over
    assert judge(rollout, step) == ""
    step.challenger = Served(100, 100, 2, 1_000_000)
    assert judge(rollout, step).startswith("challenger error rate 2.0% (2 of 100 requests)")
    step.challenger = Served(1, 1, 1, 10_000)  # one failure in one request breaks it at once
    assert "100.0%" in judge(rollout, step)
    step.challenger = Served(100, 100, 0, 1_600_000)  # 1.6x the champion's time a row
    assert "= 1.60x the champion's" in judge(rollout, step)
    step.challenger = Served(19, 19, 0, 190_000_000)  # slow, but fewer than min_requests
    assert judge(rollout, step) == ""
