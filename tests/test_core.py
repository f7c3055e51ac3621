"""Chat format, loss masks, record round-trip, load_policy errors, sequence_logprobs."""
import copy as copy_module
import json
import shutil

import pytest
import torch
from PIL import Image

import mmsearch_r1 as core


def render(messages, image_tokens=()):
    """The whole conversation as one string, the way the Qwen2.5 / Qwen3 chat templates lay it out
    (consecutive tool messages share one user turn): an independent oracle for the chat format."""
    image_tokens, out = list(image_tokens), []
    for i, msg in enumerate(messages):
        content = msg["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        body = "".join(p["text"] if p["type"] == "text" else
                       "<|vision_start|>" + "<|image_pad|>" * image_tokens.pop(0) + "<|vision_end|>"
                       for p in parts)
        if msg["role"] == "tool":
            first = i == 0 or messages[i - 1]["role"] != "tool"
            last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
            out.append(("<|im_start|>user" if first else "") + f"\n<tool_response>\n{body}\n</tool_response>"
                       + ("<|im_end|>\n" if last else ""))
        else:
            out.append(f"<|im_start|>{msg['role']}\n{body}<|im_end|>\n")
    return "".join(out)


def full_ids(policy, messages, image_tokens=()):
    """The rendered conversation tokenized at once by the checkpoint's own tokenizer."""
    return policy.tokenizer(render(messages, image_tokens), add_special_tokens=False)["input_ids"]


def add_all(policy, traj, messages, images=()):
    core.trajectory_from_record(policy, {"messages": messages, "images": list(images)})


CALL = ('<think>zoom in</think>\n<tool_call>\n{"name": "crop", "arguments": {"bbox_2d": [1, 2, 30, 40]}}\n</tool_call>')
MESSAGES = [
    {"role": "system", "content": core.system_prompt("abs")},
    {"role": "user", "content": "What tower is this? It's in France."},
    {"role": "assistant", "content": CALL},
    {"role": "tool", "content": "1. Eiffel Tower - Paris (example.org)"},
    {"role": "assistant", "content": "<think>It is Paris.</think><answer>Eiffel Tower</answer>"},
]


@pytest.mark.parametrize("fixture", ["policy", "policy3"])
def test_segment_tokenization_equals_full_text(fixture, request):
    policy = request.getfixturevalue(fixture)
    traj = core.trajectory_from_record(policy, {"messages": MESSAGES})
    assert traj.input_ids == full_ids(policy, MESSAGES)


def test_image_pads_match_processor_grid(policy):
    images = [Image.new("RGB", (150, 100), "red"), Image.new("RGB", (40, 90), "blue")]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "tool", "content": [{"type": "text", "text": "crop:"}, {"type": "image"}]}]
    traj = core.trajectory_from_record(policy, {"messages": msgs, "images": images})
    counts = []
    for image in images:
        grid = policy.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        counts.append(int(grid.prod()) // policy.merge_size ** 2)
    assert traj.input_ids.count(policy.ids["image_pad"]) == sum(counts)
    assert traj.input_ids == full_ids(policy, msgs, counts)
    assert [tuple(g.tolist()) for _, g in traj.image_inputs] == \
        [tuple(policy.encode_image(im)[1].tolist()) for im in images]


@pytest.mark.parametrize("fixture", ["policy", "policy3"])
def test_loss_mask_is_assistant_content_and_im_end(fixture, request):
    policy = request.getfixturevalue(fixture)
    traj = core.trajectory_from_record(policy, {"messages": MESSAGES})
    masked = [t for t, m in zip(traj.input_ids, traj.loss_mask) if m]
    want = []
    for m in MESSAGES:
        if m["role"] == "assistant":
            want += core.encode_assistant(policy, m["content"]) + [policy.ids["im_end"]]
    assert masked == want
    # every masked run ends with <|im_end|> and starts right after "<|im_start|>assistant\n"
    header = [policy.ids["im_start"]] + policy.encode_text("assistant\n")
    starts = [i for i in range(1, len(traj.loss_mask)) if traj.loss_mask[i] and not traj.loss_mask[i - 1]]
    assert len(starts) == 2
    for s in starts:
        assert traj.input_ids[s - len(header):s] == header


def test_record_round_trip(policy, tmp_path):
    Image.new("RGB", (80, 60), "green").save(tmp_path / "q.png")
    Image.new("RGB", (50, 50), "white").save(tmp_path / "crop.png")
    record = {"id": "ex1", "images": ["q.png", "crop.png"], "reward": 1.0, "messages": [
        MESSAGES[0],
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]},
        {"role": "assistant", "content": CALL},
        {"role": "tool", "content": [{"type": "text", "text": "crop 1:"}, {"type": "image"}]},
        {"role": "assistant", "content": "<answer>Paris</answer>"}]}
    line = json.dumps(record)
    traj = core.trajectory_from_record(policy, json.loads(line), root=tmp_path)
    assert len(traj.images) == 2 and traj.meta["reward"] == 1.0
    back = core.trajectory_to_record(traj)
    assert back["messages"] == record["messages"]
    assert [p.split("/")[-1] for p in back["images"]] == record["images"]
    again = core.trajectory_from_record(policy, json.loads(json.dumps(back)))
    assert again.input_ids == traj.input_ids and again.loss_mask == traj.loss_mask


def test_record_errors(policy, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image.*bad.png"):
        core.trajectory_from_record(policy, {"images": ["bad.png"], "messages": []}, root=tmp_path)
    with pytest.raises(ValueError, match="more .*image.* parts than images"):
        core.trajectory_from_record(policy, {"messages": [{"role": "user", "content": [{"type": "image"}]}]})
    with pytest.raises(ValueError, match="no 'messages'"):
        core.trajectory_from_record(policy, {"id": "x"})


@pytest.mark.parametrize("fixture", ["policy", "policy3"])
def test_sequence_logprobs_match_model_logits(fixture, request):
    policy = request.getfixturevalue(fixture)
    trajs = []
    for size, question in [((120, 90), "Where?"), ((60, 100), "Where is this tower? " * 5)]:
        traj = core.new_trajectory(policy, {"id": "a", "image": Image.new("RGB", size, "red"), "question": question})
        core.add_message(policy, traj, "assistant", CALL)
        core.add_tool_results(policy, traj, [[{"type": "text", "text": "crop:"}, {"type": "image"}], "a second result."],
                              [Image.new("RGB", (56, 84), "blue")])
        core.add_message(policy, traj, "assistant", "<answer>Paris</answer>")
        trajs.append(traj)
    batch = core.collate(policy, trajs)
    logp, ent = core.sequence_logprobs(policy, batch, temperature=0.7, with_entropy=True)
    with torch.no_grad():
        logits = policy.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids",
                                                       "pixel_values", "image_grid_thw")}).logits.float()
    # the reference: a plain log-softmax over the ids the policy may sample (Policy.sample_mask)
    ref_all = torch.log_softmax(logits[:, :-1].masked_fill(~policy.sample_mask, float("-inf")) / 0.7, -1)
    ref = ref_all.gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    ref_ent = -(ref_all.exp() * ref_all.masked_fill(~policy.sample_mask, 0.0)).sum(-1)
    mask = batch["loss_mask"][:, 1:].bool()
    assert mask.sum() > 20
    torch.testing.assert_close(logp[:, 1:][mask], ref[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[:, 1:][mask], ref_ent[mask], atol=1e-4, rtol=0)
    assert (logp[:, 1:][~mask] == 0).all() and (logp[:, 0] == 0).all()
    logp.sum().backward()   # gradients reach the model through the kernel
    assert policy.model.lm_head.weight.grad is not None
    policy.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fixture", ["policy", "policy3"])
def test_shared_prefix_runs_once_with_the_same_logprobs_and_gradients(fixture, request, monkeypatch):
    """Rows sharing their system prompt: it runs once, and log-probs and gradients equal running
    every row whole. The shared part ends before the first differing token and before any image."""
    policy = request.getfixturevalue(fixture)
    trajs = []
    for question in ["Where?", "Which city is this tower in?", "What is it?"]:
        traj = core.new_trajectory(policy, {"image": Image.new("RGB", (56, 56), "red"), "question": question})
        core.add_message(policy, traj, "assistant", "<answer>Paris</answer>")
        trajs.append(traj)
    batch = core.collate(policy, trajs)
    P = core.shared_prefix_length(batch)
    first_image = int(batch["mm_token_type_ids"][0].argmax())
    assert 0 < P <= first_image   # the system prompt and the user turn's header, up to its image
    results = []
    for saving in (0.25, 2.0):   # 2.0: never share
        monkeypatch.setattr(core, "SHARED_PREFIX_SAVING", saving)
        assert (core.shared_prefix_length(batch) > 0) == (saving < 1)
        logp, _ = core.sequence_logprobs(policy, batch)
        logp.sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in core.trainable_parameters(policy.model)]))
        policy.model.zero_grad(set_to_none=True)
    (shared, g_shared), (whole, g_whole) = results
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=0)
    for a, b in zip(g_shared, g_whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["policy", "policy3"])
def test_positions_ignore_padding(fixture, request):
    """A row's multimodal positions are the same alone and beside a longer row, and equal the
    model's own get_rope_index over the padded batch, also after the trajectory grows."""
    policy = request.getfixturevalue(fixture)
    a = core.new_trajectory(policy, {"image": Image.new("RGB", (90, 60)), "question": "Hi?"})
    b = core.new_trajectory(policy, {"image": Image.new("RGB", (200, 150)), "question": "A much longer question here?"})

    def model_positions(batch):
        return policy.model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                                 image_grid_thw=batch["image_grid_thw"],
                                                 attention_mask=batch["attention_mask"])[0]
    alone = core.collate(policy, [a])["position_ids"]
    both = core.collate(policy, [b, a])
    n = len(a.input_ids)
    assert torch.equal(alone[:, 0, :n], both["position_ids"][:, 1, :n])
    assert torch.equal(both["position_ids"], model_positions(both))
    core.add_tool_results(policy, a, [[{"type": "text", "text": "crop:"}, {"type": "image"}]], [Image.new("RGB", (56, 84))])
    grown = core.collate(policy, [b, a])   # a's kept positions are recomputed for its new tokens
    assert grown["position_ids"].shape[2] > both["position_ids"].shape[2]
    assert torch.equal(grown["position_ids"], model_positions(grown))


@pytest.mark.parametrize("fixture", ["policy", "policy3", "qwen2_vl"])
def test_patch_embedding_matmul_equals_conv3d(fixture, request):
    """load_policy's matmul patch embedding computes the Conv3d's map (values and gradients), on
    the model and on a deepcopy of it (which must run on its own weights, not the original's)."""
    if fixture == "qwen2_vl":   # no tiny Qwen2-VL policy: its patch embedding module alone
        from types import SimpleNamespace
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed
        model = SimpleNamespace(model=SimpleNamespace(visual=SimpleNamespace(patch_embed=PatchEmbed(14, 2, 3, 32))))
        core.embed_patches_with_matmul(model)
    else:
        model = request.getfixturevalue(fixture).model
    embed = model.model.visual.patch_embed
    pixels = torch.randn(40, embed.proj.weight[0].numel(), requires_grad=True)
    conv = type(embed).forward(embed, pixels)   # the class's own Conv3d forward
    (g_conv,) = torch.autograd.grad(conv.square().sum(), pixels)
    ours = embed(pixels)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), pixels)
    assert embed.forward.__func__ is core._patch_embed_forward
    torch.testing.assert_close(ours, conv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_ours, g_conv, atol=1e-4, rtol=1e-5)
    if fixture != "qwen2_vl":
        copy = copy_module.deepcopy(model).model.visual.patch_embed
        with torch.no_grad():
            copy.proj.weight.zero_()
        bias = copy.proj.bias if copy.proj.bias is not None else torch.zeros(copy.proj.weight.shape[0])
        assert torch.equal(copy(pixels), bias.expand(40, -1))   # the copy runs on its own weights
        torch.testing.assert_close(embed(pixels), ours)   # the original keeps its weights


def test_load_policy_errors(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        core.load_policy(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        core.load_policy(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(FileNotFoundError, match="cannot load a model config"):
        core.load_policy(tmp_path / "broken")
    cfg = json.loads((tiny_dir / "config.json").read_text())
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' is not supported"):
        core.load_policy(bad)
    # a tokenizer without the vision tokens
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    notok = tmp_path / "notok"
    notok.mkdir()
    (notok / "config.json").write_text(json.dumps(cfg))
    tk = Tokenizer(models.WordLevel({"a": 0, "<|im_start|>": 1, "<|im_end|>": 2}, unk_token="a"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(notok)
    with pytest.raises(ValueError, match="lacks the special tokens.*vision_start"):
        core.load_policy(notok)


@pytest.mark.parametrize("damage, part", [("model.safetensors", "weights"), ("truncate", "weights"),
                                          ("tokenizer.json", "tokenizer"), ("preprocessor_config.json", "image processor")])
def test_an_incomplete_checkpoint_names_the_part_and_stops_a_script(tiny_dir, tmp_path, damage, part):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    if damage == "truncate":   # a save cut short
        with open(folder / "model.safetensors", "r+b") as f:
            f.truncate(1000)
    else:
        (folder / damage).unlink()
    with pytest.raises(ValueError, match=f"cannot load the {part} from .*Is the folder complete"):
        core.load_policy(folder)
    with pytest.raises(SystemExit, match=f"^eval: load_policy: cannot load the {part}"):
        with core.stop_on_bad_input("eval"):
            core.load_policy(folder)


def test_tiny_policy_round_trips_through_save_pretrained(policy, tiny_dir):
    again = core.load_policy(tiny_dir)
    for (n1, p1), (n2, p2) in zip(policy.model.state_dict().items(), again.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert policy.model_type == "qwen2_5_vl" and policy.crop_convention == "abs"
    assert 1e5 < sum(p.numel() for p in policy.model.parameters()) < 5e6


@pytest.mark.parametrize("init_std", [None, 64 ** -0.5])
def test_tiny_policy_weights_start_at_the_asked_scale(tmp_path, init_std):
    """build_tiny_policy draws its weights (language model and vision tower) at init_std, by default 0.02."""
    folder = core.build_tiny_policy(tmp_path / "m", ["a few words for the tokenizer"] * 10, hidden=64, init_std=init_std)
    weights = core.load_policy(folder).model.state_dict()
    want = init_std or 0.02
    for name in ("model.language_model.layers.0.self_attn.q_proj.weight", "model.language_model.embed_tokens.weight",
                 "model.visual.blocks.0.attn.qkv.weight"):
        assert abs(float(weights[name].std()) - want) < 0.1 * want, name


def test_hub_id_offline_fails_fast(monkeypatch):
    import time
    monkeypatch.setattr(core, "_hub_reachable", lambda timeout=3.0: False)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match="hub is not reachable and it is not in the local cache"):
        core.load_policy("no-such-org/no-such-model")
    assert time.monotonic() - t0 < 10


def test_models_load_without_hub_kernels(tiny_dir, monkeypatch):
    """transformers 5.25 turns hub kernels on unless told otherwise (it then needs the `kernels`
    package and swaps layers for downloaded code); load_policy must say use_kernels=False. CI runs
    an older transformers, where the flag is a no-op, so the keyword itself is checked."""
    from transformers import AutoModelForImageTextToText
    seen = []
    real = AutoModelForImageTextToText.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        seen.append(kwargs.get("use_kernels"))
        return real(cls, *args, **kwargs)
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(from_pretrained))
    core.load_policy(tiny_dir, device="cpu")
    assert seen == [False]
