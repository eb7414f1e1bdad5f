"""The batching semantics shared by every path: per-request calls -> one ``run_batch`` call -> per-request outcomes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batching.errors import BatchResultError, ConfigurationError, MissingArgumentError, UnexpectedArgumentError
from batching.merge import CallSpec, execute, split


def predict(text: str, lang: str, count: int = 0, strict: bool = False, tag: str | None = None, sep: str = "") -> None:
    """The per-request signature most tests use: two required parameters, every falsy kind of default."""


SPEC = CallSpec.from_callable(predict)


def echo_batch(**lists: list[Any]) -> list[dict[str, Any]]:
    """A ``run_batch`` that returns, for each request, the arguments it was called with."""
    size = len(next(iter(lists.values())))
    return [{name: values[i] for name, values in lists.items()} for i in range(size)]


# -- reading the signature ---------------------------------------------------------------------------------------


def test_falsy_defaults_are_defaults_not_required() -> None:
    assert SPEC.names == ("text", "lang", "count", "strict", "tag", "sep")
    assert SPEC.required == ("text", "lang")
    assert SPEC.defaults == {"count": 0, "strict": False, "tag": None, "sep": ""}


def test_bound_method_drops_self() -> None:
    class Model:
        def run(self, text: str, scale: float = 1.0) -> None: ...

    spec = CallSpec.from_callable(Model().run)

    assert spec.names == ("text", "scale")
    assert spec.bind(("hi",), {}) == {"text": "hi"}


def test_var_positional_model_is_a_configuration_error() -> None:
    def run(*texts: str) -> None: ...

    with pytest.raises(ConfigurationError, match=r"\*texts"):
        CallSpec.from_callable(run)


def test_model_without_parameters_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="nothing to batch"):
        CallSpec.from_callable(lambda: None)


# -- binding one request -----------------------------------------------------------------------------------------


def test_positionals_bind_in_signature_order() -> None:
    assert SPEC.bind(("hello", "en", 3), {"sep": "-"}) == {"text": "hello", "lang": "en", "count": 3, "sep": "-"}


def test_too_many_positionals_are_rejected() -> None:
    with pytest.raises(UnexpectedArgumentError, match=r"takes 6 positional argument.* but 7 were given"):
        SPEC.bind(("a", "b", 1, True, "t", "s", "extra"), {})


def test_keyword_only_parameters_cannot_be_filled_positionally() -> None:
    def run(text: str, *, scale: float = 1.0) -> None: ...

    spec = CallSpec.from_callable(run)

    with pytest.raises(UnexpectedArgumentError, match=r"takes 1 positional argument\(s\) \(text\) but 2"):
        spec.bind(("hi", 2.0), {})
    assert spec.bind(("hi",), {"scale": 2.0}) == {"text": "hi", "scale": 2.0}


def test_a_name_given_positionally_and_by_keyword_is_rejected() -> None:
    with pytest.raises(UnexpectedArgumentError, match=r"multiple values for argument.*text"):
        SPEC.bind(("hello",), {"text": "again", "lang": "en"})


def test_unknown_names_are_rejected_and_listed() -> None:
    with pytest.raises(UnexpectedArgumentError, match=r"unexpected argument.*colour, size") as info:
        SPEC.bind(("hello", "en"), {"size": 1, "colour": "red"})
    assert isinstance(info.value, TypeError)


def test_missing_required_arguments_are_named() -> None:
    with pytest.raises(MissingArgumentError, match=r"missing required argument.*: text, lang") as info:
        SPEC.bind((), {"count": 2})
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TypeError)


# -- merging a batch ---------------------------------------------------------------------------------------------


def test_merge_fills_falsy_defaults_for_omitted_parameters() -> None:
    merged = SPEC.merge([(("a", "en"), {}), (("b", "fr"), {"count": 5, "strict": True, "tag": "x", "sep": ","})])

    assert merged.kwargs == {
        "text": ["a", "b"],
        "lang": ["en", "fr"],
        "count": [0, 5],
        "strict": [False, True],
        "tag": [None, "x"],
        "sep": ["", ","],
    }
    assert merged.positions == [0, 1]
    assert merged.rejected == {}


def test_merge_rejects_only_the_request_missing_arguments() -> None:
    merged = SPEC.merge([(("a", "en"), {}), ((), {"count": 1}), (("c",), {"lang": "de"})])

    assert merged.positions == [0, 2]
    assert merged.kwargs["text"] == ["a", "c"]
    assert list(merged.rejected) == [1]
    assert isinstance(merged.rejected[1], MissingArgumentError)


def test_var_keyword_model_turns_extra_names_into_lists_with_none_where_omitted() -> None:
    def run(text: str, **options: Any) -> None: ...

    merged = CallSpec.from_callable(run).merge(
        [(("a",), {"colour": "red"}), (("b",), {}), (("c",), {"size": 3, "colour": "blue"})]
    )

    assert merged.kwargs == {"text": ["a", "b", "c"], "colour": ["red", None, "blue"], "size": [None, None, 3]}


# -- splitting results -------------------------------------------------------------------------------------------


def test_split_accepts_any_sized_sequence_including_numpy_arrays() -> None:
    assert split((1, 2), 2) == [1, 2]
    assert [float(x) for x in split(np.array([0.5, 1.5, 2.5]), 3)] == [0.5, 1.5, 2.5]


def test_split_wrong_length_says_both_lengths() -> None:
    with pytest.raises(BatchResultError, match="returned 2 results for a batch of 3 requests"):
        split([1, 2], 3)


@pytest.mark.parametrize("results", [None, 7, "ab", b"ab", {"a": 1, "b": 2}, (x for x in [1, 2]), np.float64(2.0)])
def test_split_rejects_values_that_are_not_one_result_per_request(results: Any) -> None:
    with pytest.raises(BatchResultError, match="must return a sequence with one result per request"):
        split(results, 2)


def test_split_rejects_a_zero_dimensional_numpy_array() -> None:
    with pytest.raises(BatchResultError, match="ndarray for a batch of 1"):
        split(np.array(5), 1)


# -- executing a batch -------------------------------------------------------------------------------------------


def test_execute_returns_each_request_its_own_result_and_rejects_bad_ones_alone() -> None:
    calls: list[dict[str, list[Any]]] = []

    def run_batch(**lists: list[Any]) -> list[str]:
        calls.append(lists)
        rows = zip(lists["text"], lists["lang"], lists["count"], strict=True)
        return [f"{text}/{lang}/{count}" for text, lang, count in rows]

    outcomes = execute(
        SPEC, run_batch, [(("a", "en"), {}), (("b",), {}), ((), {"text": "c", "lang": "fr", "count": 2})]
    )

    assert outcomes[0] == "a/en/0"
    assert isinstance(outcomes[1], MissingArgumentError)
    assert "lang" in str(outcomes[1])
    assert outcomes[2] == "c/fr/2"
    assert len(calls) == 1 and calls[0]["text"] == ["a", "c"]


def test_execute_does_not_call_run_batch_when_every_request_is_rejected() -> None:
    def run_batch(**lists: list[Any]) -> list[Any]:
        raise AssertionError("run_batch must not be called for an empty batch")

    outcomes = execute(SPEC, run_batch, [((), {}), (("a", "en"), {"nope": 1})])

    assert isinstance(outcomes[0], MissingArgumentError)
    assert isinstance(outcomes[1], UnexpectedArgumentError)


def test_an_exception_in_the_result_list_fails_only_its_request() -> None:
    failure = ValueError("cannot translate 'b'")

    requests: list[tuple[tuple[str, ...], dict[str, Any]]] = [(("a", "en"), {}), (("b", "en"), {}), (("c", "en"), {})]

    outcomes = execute(SPEC, lambda **lists: ["A", failure, "C"], requests)

    assert outcomes == ["A", failure, "C"]


def test_run_batch_raising_fails_every_request_with_that_exception() -> None:
    def run_batch(**lists: list[Any]) -> list[Any]:
        raise KeyError("model not loaded")

    outcomes = execute(SPEC, run_batch, [(("a", "en"), {}), ((), {}), (("c", "en"), {})])

    assert isinstance(outcomes[1], MissingArgumentError)
    for outcome in (outcomes[0], outcomes[2]):
        assert type(outcome) is KeyError
        assert outcome.args == ("model not loaded",)


def test_run_batch_returning_the_wrong_length_fails_every_request() -> None:
    outcomes = execute(SPEC, lambda **lists: ["only one"], [(("a", "en"), {}), (("b", "en"), {})])

    assert [type(o) for o in outcomes] == [BatchResultError, BatchResultError]
    assert "returned 1 results for a batch of 2" in str(outcomes[0])


def test_numpy_results_are_split_per_request() -> None:
    def run(x: float, scale: float = 2.0) -> None: ...

    outcomes = execute(
        CallSpec.from_callable(run),
        lambda x, scale: np.asarray(x) * np.asarray(scale),
        [((1.0,), {}), ((2.0,), {"scale": 10.0})],
    )

    assert [float(o) for o in outcomes] == [2.0, 20.0]


# -- property: execute == bind each request alone, with defaults filled ------------------------------------------

UNKNOWN = "colour"


@st.composite
def a_request(draw: st.DrawFn) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Some parameters positionally (a prefix of the signature), some of the rest by name, maybe an unknown name."""
    n_positional = draw(st.integers(0, len(SPEC.names)))
    args = tuple(draw(st.integers()) for _ in range(n_positional))
    rest = SPEC.names[n_positional:]
    by_name = draw(st.sets(st.sampled_from(rest))) if rest else set()
    kwargs: dict[str, Any] = {name: draw(st.integers()) for name in sorted(by_name)}
    if draw(st.integers(0, 9)) == 0:
        kwargs[UNKNOWN] = "red"
    return args, kwargs


@given(st.lists(a_request(), max_size=12))
def test_execute_matches_binding_each_request_alone(requests: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
    outcomes = execute(SPEC, echo_batch, requests)

    assert len(outcomes) == len(requests)
    for (args, kwargs), outcome in zip(requests, outcomes, strict=True):
        given_values = {**dict(zip(SPEC.names, args, strict=False)), **kwargs}
        if UNKNOWN in kwargs:
            assert isinstance(outcome, UnexpectedArgumentError)
        elif not {"text", "lang"} <= given_values.keys():
            assert isinstance(outcome, MissingArgumentError)
        else:
            assert outcome == {**SPEC.defaults, **given_values}


# -- property: requests of one shape (the common case, merged by binding once) -------------------------------------


def kwargs_model(text: str, scale: float = 1.0, **extra: Any) -> None:
    """A model that takes any other name too: extra names become lists, in sorted order, after the signature's."""


@st.composite
def same_shape(draw: st.DrawFn, spec: CallSpec) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Requests that all carry as many positionals and the same names (maybe unknown ones), with their own values."""
    n_positional = draw(st.integers(0, len(spec.positional)))
    rest = spec.names[n_positional:]
    names = sorted(draw(st.sets(st.sampled_from(rest))) if rest else set())
    if draw(st.booleans()):
        names.append(UNKNOWN)
    count = draw(st.integers(1, 8))
    return [
        (tuple(draw(st.integers()) for _ in range(n_positional)), {name: draw(st.integers()) for name in names})
        for _ in range(count)
    ]


@pytest.mark.parametrize("spec", [SPEC, CallSpec.from_callable(kwargs_model)], ids=["plain", "var-keyword"])
@given(data=st.data())
def test_requests_of_one_shape_merge_as_each_bound_alone(spec: CallSpec, data: st.DataObject) -> None:
    requests = data.draw(same_shape(spec))

    merged = spec.merge(requests)

    expected: list[dict[str, Any]] = []
    for args, kwargs in requests:
        try:
            expected.append(spec.bind(args, kwargs))
        except (MissingArgumentError, UnexpectedArgumentError):
            assert merged.rejected.keys() == set(range(len(requests)))  # one shape: all bind, or none
            assert not merged.kwargs or not any(merged.kwargs.values())
            return
    extra = sorted({name for bound in expected for name in bound} - set(spec.names))
    assert list(merged.kwargs) == [*spec.names, *extra]
    assert merged.positions == list(range(len(requests)))
    assert merged.kwargs == {
        name: [bound.get(name, spec.defaults.get(name)) for bound in expected] for name in [*spec.names, *extra]
    }


def test_requests_of_different_shapes_still_bind_one_by_one() -> None:
    merged = SPEC.merge([(("hi", "en"), {}), ((), {"text": "yo", "lang": "fr", "count": 3}), (("x",), {})])

    assert merged.positions == [0, 1]
    assert merged.kwargs["text"] == ["hi", "yo"] and merged.kwargs["count"] == [0, 3]
    assert isinstance(merged.rejected[2], MissingArgumentError)
