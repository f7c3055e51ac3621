"""Answer normalization, exact match, F1, substring match, format check, reward parts."""
import pytest

import mmsearch_r1 as core


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower.", "eiffel tower"), ("1,000", "1000"), ("3.50", "3.5"), ("3.0", "3"),
    ("five", "5"), ("U.S.A.", "usa"), ("  Paris,\n France ", "paris france"), ("A.D. 1889.", "ad 1889"),
    ("3.14", "3.14"), ("an apple", "apple"),
])
def test_normalize(raw, norm):
    assert core.normalize_answer(raw) == norm


def test_matching():
    assert core.exact_match("the eiffel tower", ["Eiffel Tower", "Tour Eiffel"]) == 1.0
    assert core.exact_match("eiffel", ["Eiffel Tower"]) == 0.0
    assert core.exact_match("1,000 metres", "1000 metres") == 1.0
    assert core.substring_match("It is the Eiffel Tower in Paris.", ["eiffel tower"]) == 1.0
    assert core.substring_match("Eiffelturm", ["eiffel"]) == 0.0            # word boundaries
    assert core.f1("Eiffel Tower in Paris", ["Eiffel Tower"]) == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert core.f1("x", ["Eiffel Tower", "x"]) == 1.0 and core.f1("", ["a"]) == 0.0


CALL = '<think>look</think><tool_call>{"name": "text_search", "arguments": {"query": "q"}}</tool_call>'


def traj(*assistant, calls=()):
    msgs = []
    for a in assistant:
        msgs += [{"role": "assistant", "content": a}, {"role": "tool", "content": "results"}]
    return core.Trajectory(messages=msgs[:-1], tool_calls=[{"name": c, "ok": True} for c in calls])


def test_format_check():
    assert core.format_ok(traj(CALL, "<think>ok</think><answer>Paris</answer>")) == 1.0
    assert core.format_ok(traj("<answer>Paris</answer>")) == 1.0
    assert core.format_ok(traj("<answer>a</answer><answer>b</answer>")) == 0.0
    assert core.format_ok(traj("<think>unclosed<answer>a</answer>")) == 0.0
    assert core.format_ok(traj("chatting", "<answer>a</answer>")) == 0.0        # a turn with no call
    assert core.format_ok(traj(CALL)) == 0.0                                     # never answered
    assert core.format_ok(traj('<tool_call>{"name": "x"}</tool_call>', "<answer>a</answer>")) == 0.0


def test_reward_parts_and_search_penalty():
    task = {"question": "q", "answers": ["Paris"]}
    value, parts = core.reward(traj(CALL, "<answer>Paris</answer>", calls=["text_search"]), task)
    assert value == pytest.approx(1.0) and parts == {"answer": "Paris", "correct": 1.0, "format": 1.0, "searched": True}
    value, _ = core.reward(traj(CALL, "<answer>Paris</answer>", calls=["text_search"]), task, search_penalty=0.1)
    assert value == pytest.approx(0.9 * 0.9 + 0.1)
    value, parts = core.reward(traj("<answer>London</answer>"), task)
    assert value == pytest.approx(0.1) and parts["correct"] == 0.0
    value, parts = core.reward(traj("no answer"), task, metric="f1")
    assert value == 0.0 and parts["answer"] is None
    with pytest.raises(ValueError, match="unknown metric"):
        core.reward(traj("<answer>a</answer>"), task, metric="bleu")
