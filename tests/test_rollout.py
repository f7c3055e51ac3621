"""The hand-written rollout loop: equality with model.generate, log-probs equal sequence_logprobs
after multi-turn rollouts with crops, batching invariance, limits and finish reasons."""
import pytest
import torch
from PIL import Image

import mmsearch_r1 as core
import tools

CROP0 = "<think>zoom in</think>\n" + core.format_tool_call("crop", {"bbox_2d": [0, 0, 60, 40]})
CROP1 = core.format_tool_call("crop", {"image": 1, "bbox_2d": [4, 4, 40, 30]})
SEARCH = core.format_tool_call("text_search", {"query": "red tower"})
ANSWER = "<think>done</think><answer>Paris</answer>"


def task(i=0, size=(120, 90), question="What is this?"):
    return {"id": f"t{i}", "image": Image.new("RGB", size, (200, 10 * i, 10)), "question": question}


def script(*turns):
    """forced= callable: the given text for each turn, then sampling (None)."""
    return lambda task, turn: turns[turn] if turn < len(turns) else None


BOX = tools.Toolbox(crop_settings=tools.CropSettings(upscale_to=28))


@pytest.mark.parametrize("fixture", ["policy", "policy3"])
def test_greedy_matches_generate(fixture, request):
    policy = request.getfixturevalue(fixture)
    traj = core.rollout(policy, [task()], BOX, temperature=0, max_turns=1, max_new_tokens=24, progress=False)[0]
    prompt = core.new_trajectory(policy, task())
    prompt.append([policy.ids["im_start"]] + policy.encode_text("assistant\n"), 0)
    b = core.collate(policy, [prompt])
    out = policy.model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                                mm_token_type_ids=b["mm_token_type_ids"], do_sample=False, max_new_tokens=24,
                                suppress_tokens=(~policy.sample_mask).nonzero()[:, 0].tolist())
    theirs = out[0, b["input_ids"].shape[1]:].tolist()
    ours = traj.input_ids[len(prompt.input_ids):]
    assert ours[:len(theirs)] == theirs and len(ours) >= len(theirs) - 1


@pytest.mark.parametrize("fixture", ["policy", "policy3"])
def test_multi_turn_logprobs_equal_sequence_logprobs(fixture, request):
    """Two forced crops (the second a crop of the first), then sampling: the log-probs recorded
    while rolling out equal those recomputed on the finished trajectories in one forward."""
    policy = request.getfixturevalue(fixture)
    tasks = [task(0), task(1, (64, 150), "Which city is this tower in? " * 3)]
    for T, top_p in [(1.0, 1.0), (0.7, 0.9)]:
        trajs = core.rollout(policy, tasks, BOX, n=2, temperature=T, top_p=top_p, max_new_tokens=16,
                             forced=script(CROP0, CROP1), seed=3, progress=False)
        batch = core.collate(policy, trajs)
        logp, _ = core.sequence_logprobs(policy, batch, temperature=T)
        for i, t in enumerate(trajs):
            assert len(t.images) == 3 and t.turns == 3
            assert [c["name"] for c in t.tool_calls] == ["crop", "crop"]
            mask = torch.tensor(t.loss_mask, dtype=torch.bool)
            assert mask.sum() > 16 + 20
            diff = (logp[i, :len(t.input_ids)][mask] - torch.tensor(t.logprobs)[mask]).abs().max()
            assert diff < 1e-4, diff
            assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.loss_mask) if not m)
            stats = t.meta["stats"]
            # every token is prefilled or generated exactly once: nothing is re-encoded (the last
            # sampled token and the newline after a final <|im_end|> are never fed to the model)
            ended = t.input_ids[-2] in policy.eos_ids
            assert stats["prefill_tokens"] + stats["generated_tokens"] == len(t.input_ids) - ended


def test_batched_rows_equal_rows_alone(policy):
    tasks = [task(0, (56, 56), "Hi?"), task(1, (200, 150), "A much longer question about this image? " * 6),
             task(2, (90, 60), "Mid-length question here?")]
    forced = script(CROP0)
    together = core.rollout(policy, tasks, BOX, temperature=0, max_new_tokens=20, forced=forced, progress=False)
    for t, traj in zip(tasks, together):
        alone = core.rollout(policy, [t], BOX, temperature=0, max_new_tokens=20, forced=forced, progress=False)[0]
        assert alone.input_ids == traj.input_ids
        assert alone.logprobs == pytest.approx(traj.logprobs, abs=1e-4)
    small = core.rollout(policy, tasks, BOX, temperature=0, max_new_tokens=20, forced=forced, max_batch=2, progress=False)
    assert [t.input_ids for t in small] == [t.input_ids for t in together]


def test_unscored_forced_turns_change_nothing_but_forced_logprobs(policy):
    """score_forced=False (oracle replays) skips the forward pass on all-forced turns: the same
    tokens, tool calls and, on the sampled turn after them, the same log-probs."""
    tasks = [task(0), task(1, (64, 150), "Which city is this tower in? " * 3)]
    kw = dict(temperature=0.7, max_new_tokens=16, forced=script(CROP0, CROP1), seed=3, progress=False)
    scored = core.rollout(policy, tasks, BOX, n=2, **kw)
    unscored = core.rollout(policy, tasks, BOX, n=2, score_forced=False, **kw)
    for a, b in zip(scored, unscored):
        assert a.input_ids == b.input_ids and a.tool_calls == b.tool_calls and a.finish_reason == b.finish_reason
        sampled = len(a.input_ids) - a.meta["stats"]["generated_tokens"] - 1   # the last turn's tokens
        assert b.logprobs[sampled:] == pytest.approx(a.logprobs[sampled:], abs=1e-4)
        forced = [i for i in range(sampled) if a.loss_mask[i]]   # the two crops: never scored
        assert all(b.logprobs[i] == 0.0 for i in forced) and any(a.logprobs[i] != 0.0 for i in forced)


def test_forced_rollout_round_trips_through_records(policy, tmp_path):
    task()["image"].save(tmp_path / "q.png")
    traj = core.rollout(policy, [dict(task(), image="q.png", _root=str(tmp_path))], BOX,
                        forced=script(CROP0, CROP1, ANSWER), progress=False)[0]
    assert traj.finish_reason == "answer" and traj.turns == 3
    record = core.trajectory_to_record(traj, image_dir=tmp_path / "crops")
    assert record["images"][0] == str(tmp_path / "q.png") and len(set(record["images"])) == 3
    again = core.trajectory_from_record(policy, record)
    assert again.input_ids == traj.input_ids and again.loss_mask == traj.loss_mask
    for a, b in zip(again.images, traj.images):
        assert a.size == b.size and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("forced, limits, reason, over_turn", [
    (script(ANSWER), {}, "answer", False),
    (script("I am not sure."), {}, "no_answer", False),
    (script(SEARCH, SEARCH, SEARCH), {"max_turns": 2}, "max_turns", True),
    (script(CROP0, CROP0, CROP0), {"max_images": 2}, "max_images", True),
    (script(CROP0, CROP0, CROP0), {"max_context": 720}, "max_context", True),
    (script(), {"max_context": 640}, "max_context", True),
    (script(), {"max_new_tokens": 5}, "truncated", False),
    (script(), {"max_new_tokens": 200, "temperature": 0}, "repetition", False),
    (script(*['<tool_call>{"name": "fly"}</tool_call>'] * 5), {"max_tool_failures": 2}, "tool_errors", False),
])
def test_finish_reasons(policy, forced, limits, reason, over_turn):
    traj = core.rollout(policy, [task()], BOX, forced=forced, progress=False, **limits)[0]
    assert traj.finish_reason == reason
    assert traj.meta["over_turn"] is over_turn
    assert traj.finish_reason in core.FINISH_REASONS


def test_prompt_over_budget_ends_at_once(policy):
    traj = core.rollout(policy, [task()], BOX, max_context=50, progress=False)[0]
    assert traj.finish_reason == "max_context" and traj.turns == 0


@pytest.mark.parametrize("sampling, message", [({"temperature": -0.5}, "temperature -0.5: 0 is greedy"),
                                               ({"temperature": float("nan")}, "temperature nan"),
                                               ({"top_p": 0.0}, "top_p 0.0"), ({"top_k": -1}, "top_k -1")])
def test_sampling_out_of_range_is_refused_before_any_work(policy, sampling, message):
    with pytest.raises(ValueError, match=f"^sampling: {message}"):
        core.rollout(policy, [task()], BOX, progress=False, **sampling)


def test_bad_limits_and_tasks_are_refused_with_their_names(policy):
    with pytest.raises(ValueError, match="^rollout: max_batch 0, n -1: n must be 0 or more"):
        core.rollout(policy, [task()], BOX, n=-1, max_batch=0, progress=False)
    with pytest.raises(ValueError, match="task 'q1': no 'question' text"):
        core.rollout(policy, [{"id": "q1", "image": task()["image"]}], BOX, progress=False)
    with pytest.raises(ValueError, match="collate: no trajectories"):
        core.collate(policy, [])


def test_tool_failure_mid_rollout_is_observed(policy):
    class Down:
        name = "down"

        def search(self, q, k):
            raise tools.ToolError("search engine is down")
    box = tools.Toolbox(text_search=Down())
    traj = core.rollout(policy, [task()], box, forced=script(SEARCH, ANSWER), progress=False)[0]
    assert traj.finish_reason == "answer"
    tool_turn = [m for m in traj.messages if m["role"] == "tool"][0]
    assert "search engine is down" in str(tool_turn["content"])
    assert traj.meta["stats"]["tool_errors"] == {"text_search": 1}
    assert traj.tool_calls[0]["ok"] is False


def test_repetition_detector():
    assert core.repeats_itself([1, 2, 3] * 20)
    assert core.repeats_itself([7] * 48)
    assert not core.repeats_itself([7] * 47)
    assert not core.repeats_itself(list(range(100)))
    assert not core.repeats_itself([1, 2, 3] * 20 + [4])


def test_roomy_cache_layer_equals_concatenation():
    """The rollout's cache layer writes new keys/values into spare room: the same tensors a
    concatenation gives, through growth past the room, trimmed padding and rows split off."""
    layer = core._roomy_layer_class()()
    want = torch.zeros(2, 2, 0, 4)
    for n in (5, 1, 1, 90, 1, 3):   # 90: more than the room, a new buffer
        new = torch.randn(2, 2, n, 4)
        k, v = layer.update(new, -new)
        want = torch.cat([want, new], dim=2)
        assert torch.equal(k, want) and torch.equal(v, -want)
    layer.keys, layer.values = layer.keys[:, :, 3:], layer.values[:, :, 3:]   # as KVBatch.split_off trims
    layer.batch_select_indices(torch.tensor([1]))
    new = torch.randn(1, 2, 1, 4)
    k, v = layer.update(new, -new)
    want = torch.cat([want[1:, :, 3:], new], dim=2)
    assert torch.equal(k, want) and torch.equal(v, -want)


def test_a_phase_holds_one_copy_of_each_rows_cache():
    """Stacking the rows into a batch cache moves their keys/values (the rows let go of theirs);
    splitting a row off hands it back exactly its own, without the padding."""
    rows = []
    for n in (3, 5):
        row = core.Row(traj=None, task={}, n_cached=n)
        row.kv = [(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)) for _ in range(2)]   # 2 layers
        rows.append(row)
    before = [[(k.clone(), v.clone()) for k, v in r.kv] for r in rows]
    batch = core.KVBatch(rows, "cpu")
    assert all(r.kv is None for r in rows)
    batch.split_off([0, 1])
    for r, kv in zip(rows, before):
        assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(r.kv, kv))


def test_cache_reuse_equals_reencoding_every_turn(policy, monkeypatch):
    """Each turn prefills only the new segment onto the rows' caches; forgetting the caches before
    every turn (tests/bench_rollout.py's baseline, so the benchmark keeps running) re-runs the
    whole context and must give the same tokens and log-probs."""
    import bench_rollout
    tasks = [task(0), task(1, (64, 150), "Which city is this tower in? " * 3)]
    kw = dict(temperature=0, max_new_tokens=16, forced=script(CROP0, SEARCH), progress=False)

    class Empty:
        name = "empty"

        def search(self, q, k):
            return []
    box = tools.Toolbox(crop_settings=tools.CropSettings(upscale_to=28), text_search=Empty())
    reused = core.rollout(policy, tasks, box, **kw)
    monkeypatch.setattr(core, "run_turn", bench_rollout.reencode_every_turn(core.run_turn))
    again = core.rollout(policy, tasks, box, **kw)
    for a, b in zip(reused, again):
        assert a.turns == b.turns == 3 and a.input_ids == b.input_ids and a.tool_calls[1]["ok"]
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
        assert b.meta["stats"]["prefill_tokens"] > a.meta["stats"]["prefill_tokens"]   # it did re-encode
