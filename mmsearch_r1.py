"""The core of a multimodal search agent: policy loading, chat format, trajectories and
loss masks, and the fused log-prob kernel.

Read top to bottom:
  1. device and dtype, the model families we know, `load_policy`
  2. `build_tiny_policy`: a from-scratch Qwen2.5-VL / Qwen3-VL and BPE tokenizer for tests
  3. the chat format: `Trajectory`, segment-wise tokenization with loss masks, messages JSONL
  4. `token_logprobs`: chunked log-softmax with a hand-written backward (never [N, V] logits)
  5. `sequence_logprobs`: model -> final hidden states -> `token_logprobs` on masked positions

Usage:
    policy = load_policy("Qwen/Qwen2.5-VL-3B-Instruct")       # or a local folder
    traj = trajectory_from_record(policy, json.loads(line), root="data/")
    batch = collate(policy, [traj])
    logp, _ = sequence_logprobs(policy, batch)                 # (B, L), 0 where loss_mask is 0
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from tools import TOOL_SCHEMAS

# ----------------------------------------------------------------------------------------------
# 1. Device, dtype, model families, load_policy


def resolve_device(device=None, dtype=None):
    """Pick the device once (cuda > mps > cpu) and the dtype (bf16 on a GPU that has it, else fp32)."""
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    device = torch.device(device)
    if dtype is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    elif isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    return device, dtype


# The crop-box convention each family was trained with (DESIGN.md, Tools): Qwen2.5-VL grounds
# in absolute pixels of the resized image it sees; Qwen2-VL and Qwen3-VL on a 0-1000 grid.
CROP_CONVENTION = {"qwen2_vl": "rel1000", "qwen2_5_vl": "abs", "qwen3_vl": "rel1000"}

# Special tokens the chat format needs; the tool tags are ordinary added tokens.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TAG_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
              "<think>", "</think>", "<answer>", "</answer>"]


@dataclass
class Policy:
    """A loaded model with its tokenizer, image processor and family settings."""
    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    model_type: str          # "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl"
    crop_convention: str     # "abs" | "rel1000" | "rel"
    device: torch.device
    dtype: torch.dtype
    ids: dict                # token ids: im_start, im_end, vision_start, vision_end, image_pad, endoftext
    merge_size: int          # vision tokens merged per side: N image tokens = t*h*w / merge_size**2

    @property
    def eos_ids(self):
        return {self.ids["im_end"], self.ids["endoftext"]}

    def encode_text(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_image(self, image):
        """Process one PIL image -> (pixel_values [P, D], grid_thw [3]); tokens = prod(grid) / merge**2."""
        out = self.image_processor(images=[image], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"][0]

    def shown_size(self, image):
        """(width, height) of `image` as the model sees it, after the processor's resize."""
        _, grid = self.encode_image(image)
        patch = self.image_processor.patch_size
        return int(grid[2]) * patch, int(grid[1]) * patch


def load_policy(path, device=None, dtype=None):
    """Load a Qwen2-VL / Qwen2.5-VL / Qwen3-VL policy from a hub id or a local folder.

    Uses AutoTokenizer and AutoImageProcessor (PIL backend) rather than AutoProcessor, which
    needs torchvision in transformers 5; image placeholders are expanded by `add_message`.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    path = str(path)
    local = Path(path)
    looks_local = local.is_absolute() or path.startswith(".") or path.count("/") != 1
    if looks_local and not local.exists():
        raise FileNotFoundError(f"load_policy: no model folder at {path!r}. Pass a local folder "
                                "with config.json (e.g. from data/toyworld/prepare.py) or a hub id "
                                "like 'Qwen/Qwen2.5-VL-3B-Instruct'.")
    if local.is_dir() and not (local / "config.json").exists():
        raise FileNotFoundError(f"load_policy: {path!r} has no config.json; is it a model folder?")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in CROP_CONVENTION:
        raise ValueError(f"load_policy: model type {config.model_type!r} is not supported; "
                         f"supported: {', '.join(sorted(CROP_CONVENTION))}.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS[1:6] if t not in vocab]
    if missing:
        raise ValueError(f"load_policy: the tokenizer at {path!r} lacks the special tokens {missing}; "
                         "the chat format needs the Qwen-VL ChatML and vision tokens.")
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    device, dtype = resolve_device(device, dtype)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
    names = {"endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
             "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "image_pad": "<|image_pad|>"}
    ids = {k: vocab.get(tok, vocab["<|im_end|>"]) for k, tok in names.items()}
    if ids["image_pad"] != config.image_token_id:
        raise ValueError(f"load_policy: tokenizer's <|image_pad|> is {ids['image_pad']} but the model "
                         f"expects image_token_id {config.image_token_id}; tokenizer and model don't match.")
    return Policy(model, tokenizer, image_processor, config.model_type, CROP_CONVENTION[config.model_type],
                  device, dtype, ids, config.vision_config.spatial_merge_size)


# ----------------------------------------------------------------------------------------------
# 2. Tiny policies for tests and the toy world: the real architecture, a few hundred K parameters


def build_tiny_policy(out_dir, texts, family="qwen2_5_vl", vocab_size=512, hidden=64, layers=2,
                      heads=4, kv_heads=2, vision_hidden=32, vision_depth=2, max_pixels=112 * 112,
                      seed=0):
    """Train a byte-level BPE tokenizer on `texts`, build a random tiny VLM of the real
    architecture (`family` = "qwen2_5_vl" or "qwen3_vl"), and save model, tokenizer and image
    processor with `save_pretrained`. Returns the folder; `load_policy(folder)` loads it back."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Tokenizer: the Qwen2 pre-tokenizer split (regex, then byte-level), BPE trained on `texts`.
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(texts) + TOOL_SCHEMA_TEXTS, trainer)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(out_dir)
    vocab = tokenizer.get_vocab()

    # Image processor: Qwen2-VL's (PIL backend); Qwen3-VL uses 16-pixel patches instead of 14.
    patch = 16 if family == "qwen3_vl" else 14
    factor = patch * 2
    Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, min_pixels=factor * factor,
                             max_pixels=max_pixels).save_pretrained(out_dir)

    token_ids = dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
                     vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    head_dim = hidden // heads
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, bos_token_id=vocab["<|endoftext|>"],
                eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"])
    # mrope: the rotary frequencies split between (temporal, height, width), summing to head_dim/2
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=2, out_hidden_size=hidden, patch_size=patch, spatial_merge_size=2,
                      fullatt_block_indexes=[vision_depth - 1], window_size=factor * 2)
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config
        text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "mrope_section": mrope, "mrope_interleaved": True})
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=2, out_hidden_size=hidden, patch_size=patch, spatial_merge_size=2,
                      deepstack_visual_indexes=[0], num_position_embeddings=64)
    else:
        raise ValueError(f"build_tiny_policy: family must be 'qwen2_5_vl' or 'qwen3_vl', got {family!r}")
    config = Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    model.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# 3. Chat format and trajectories
#
#   <|im_start|>system\n{tools}<|im_end|>\n                       loss_mask 0
#   <|im_start|>user\n<|vision_start|><|image_pad|>*N<|vision_end|>{question}<|im_end|>\n   0
#   <|im_start|>assistant\n                                        0
#   <think>...</think><tool_call>{...}</tool_call><|im_end|>       1  (what the policy samples)
#   \n                                                             0
#   <|im_start|>user\n<tool_response>\n...\n</tool_response><|im_end|>\n    0  (tool output)
#
# Each segment is tokenized once and appended; a trajectory is never decoded and re-encoded.

TOOL_SCHEMA_TEXTS = [json.dumps(t) for t in TOOL_SCHEMAS]
CONVENTION_TEXT = {
    "abs": "absolute pixel coordinates of the image as you see it",
    "rel1000": "coordinates on a 0-1000 grid relative to the image's width and height",
    "rel": "fractions between 0 and 1 of the image's width and height",
}


def system_prompt(crop_convention="abs"):
    """The system message: how to think, call tools and answer, and every tool's JSON schema."""
    tools = "\n".join(TOOL_SCHEMA_TEXTS)
    return ("You answer questions about images. Think inside <think>...</think>. To use tools, write "
            "one or more <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call> blocks and end "
            "your turn; results come back inside <tool_response>. When you know the answer, write "
            "<answer>...</answer>.\n"
            f"Tools:\n{tools}\n"
            f"Boxes are [x1, y1, x2, y2] in {CONVENTION_TEXT[crop_convention]}.")


@dataclass
class Trajectory:
    """One conversation as the model saw it, token for token.

    loss_mask[t] is 1 exactly on tokens the policy sampled (assistant content and its closing
    <|im_end|>), 0 on system, user, tool-response and role-header tokens. logprobs[t] is the
    sampling log-prob of token t (0.0 where loss_mask is 0)."""
    input_ids: list = field(default_factory=list)
    loss_mask: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    images: list = field(default_factory=list)        # PIL images, in order of appearance
    image_inputs: list = field(default_factory=list)  # (pixel_values, grid_thw) per image
    messages: list = field(default_factory=list)
    id: str = ""
    tool_calls: list = field(default_factory=list)
    finish_reason: str | None = None
    turns: int = 0
    meta: dict = field(default_factory=dict)

    def append(self, ids, mask, logprobs=None):
        self.input_ids.extend(ids)
        self.loss_mask.extend([mask] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))


def _content_parts(content):
    """Normalize message content to a list of {"type": "text"|"image", ...} parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
            raise ValueError(f"content part {part!r} must be {{'type': 'text', 'text': ...}} or {{'type': 'image'}}")
    return content


def encode_content(policy, traj, parts, images):
    """Token ids for message content: text runs tokenized as they are, each image expanded to
    <|vision_start|> + N x <|image_pad|> + <|vision_end|> with N from the processor's grid.
    Appends the images (and their processed pixels) to `traj`; `images` is consumed in order."""
    ids, images = [], list(images)
    for part in parts:
        if part["type"] == "text":
            ids += policy.encode_text(part["text"]) if part["text"] else []
            continue
        if not images:
            raise ValueError("a message has more {'type': 'image'} parts than images were given")
        image = images.pop(0)
        pixel_values, grid = policy.encode_image(image)
        n = int(grid.prod()) // policy.merge_size ** 2
        ids += [policy.ids["vision_start"]] + [policy.ids["image_pad"]] * n + [policy.ids["vision_end"]]
        traj.images.append(image)
        traj.image_inputs.append((pixel_values, grid))
    return ids


def add_message(policy, traj, role, content, images=()):
    """Tokenize one message and append it to `traj` with its loss mask (see the table above).
    role "tool" is rendered as a user turn wrapped in <tool_response>...</tool_response>."""
    parts = _content_parts(content)
    enc = policy.encode_text
    traj.messages.append({"role": role, "content": content})
    traj.append([policy.ids["im_start"]] + enc(("user" if role == "tool" else role) + "\n"), 0)
    if role == "tool":
        parts = [{"type": "text", "text": "<tool_response>\n"}] + list(parts) + \
                [{"type": "text", "text": "\n</tool_response>"}]
    body = encode_content(policy, traj, parts, images)
    if role == "assistant":
        traj.append(body + [policy.ids["im_end"]], 1)
        traj.append(enc("\n"), 0)
    else:
        traj.append(body + [policy.ids["im_end"]] + enc("\n"), 0)


def new_trajectory(policy, task, system=None):
    """The prompt of a rollout: system message, then the user turn with the task's image(s) and question."""
    traj = Trajectory(id=str(task.get("id", "")))
    add_message(policy, traj, "system", system if system is not None else system_prompt(policy.crop_convention))
    images = task_images(task)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": task["question"]}]
    add_message(policy, traj, "user", content, images)
    return traj


def load_image(path):
    """Open an image file as RGB, with an error that names the file when it can't be read."""
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}. Check that the file exists and is a "
                         "valid PNG/JPEG.") from None
    image.info["path"] = str(path)
    return image


def task_images(task, root=None):
    """The images of a task record (`image`: path or list of paths, or PIL images), loaded."""
    paths = task.get("images", task.get("image"))
    paths = [] if paths is None else paths if isinstance(paths, list) else [paths]
    root = Path(root) if root is not None else Path(task.get("_root", "."))
    return [p if isinstance(p, Image.Image) else load_image(root / p) for p in paths]


def trajectory_from_record(policy, record, root=None):
    """A messages-JSONL record -> Trajectory, tokenized segment by segment with loss masks.
    Image paths are relative to `root` (the data file's folder)."""
    if "messages" not in record:
        raise ValueError(f"record {record.get('id', '?')!r} has no 'messages' list")
    images = task_images(record, root)
    traj = Trajectory(id=str(record.get("id", "")))
    for key in ("finish_reason", "turns", "tool_calls"):
        if key in record:
            setattr(traj, key, record[key])
    traj.meta = {k: v for k, v in record.items()
                 if k not in ("id", "images", "image", "messages", "finish_reason", "turns", "tool_calls")}
    for msg in record["messages"]:
        parts = _content_parts(msg["content"])
        n_images = sum(p["type"] == "image" for p in parts)
        add_message(policy, traj, msg["role"], msg["content"], images[:n_images])
        images = images[n_images:]
    if images:
        raise ValueError(f"record {traj.id!r} lists {len(images)} more image(s) than its messages use")
    return traj


def trajectory_to_record(traj, image_dir=None):
    """Trajectory -> messages-JSONL record. Images loaded from files keep their paths; others
    (crops) are saved as PNG under `image_dir`."""
    paths = []
    for i, image in enumerate(traj.images):
        if "path" in image.info:
            paths.append(image.info["path"])
            continue
        if image_dir is None:
            raise ValueError("trajectory_to_record: this trajectory has images made in memory (crops); "
                             "pass image_dir= to save them")
        path = Path(image_dir) / f"{traj.id or 'traj'}_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        image.info["path"] = str(path)
        paths.append(str(path))
    record = {"id": traj.id, "images": paths, "messages": traj.messages}
    record.update(finish_reason=traj.finish_reason, turns=traj.turns, tool_calls=traj.tool_calls, **traj.meta)
    return record


def collate(policy, trajs):
    """Right-pad trajectories into one batch on the policy's device.

    Returns input_ids, attention_mask, loss_mask (B, L); position_ids (3, B, L), the Qwen-VL
    multimodal rotary positions computed over each row's real tokens; pixel_values and
    image_grid_thw of every image in row order; mm_token_type_ids (1 on image pads)."""
    B, L = len(trajs), max(len(t.input_ids) for t in trajs)
    pad = policy.ids["endoftext"]
    input_ids = torch.full((B, L), pad, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    loss_mask = torch.zeros((B, L), dtype=torch.long)
    for b, t in enumerate(trajs):
        n = len(t.input_ids)
        input_ids[b, :n] = torch.tensor(t.input_ids)
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = torch.tensor(t.loss_mask)
    image_inputs = [x for t in trajs for x in t.image_inputs]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
             "mm_token_type_ids": (input_ids == policy.ids["image_pad"]).long(),
             "pixel_values": torch.cat([p for p, _ in image_inputs]) if image_inputs else None,
             "image_grid_thw": torch.stack([g for _, g in image_inputs]) if image_inputs else None}
    batch["position_ids"], _ = policy.model.model.get_rope_index(
        input_ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=attention_mask)
    return {k: (v.to(policy.device) if v is not None else None) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# 4. The fused log-prob kernel
#
# log p(y | h) = z_y - logsumexp(z),  z = h @ W.T / T.  The naive way materializes z for all N
# tokens ([N, V] floats: 2.5 GB at N=4096, V=151936) and autograd keeps several copies. Here the
# forward walks chunks of tokens, keeping only logsumexp per token; the backward recomputes each
# chunk's logits and writes the gradient directly:
#   d logp_i / d z = onehot(y_i) - p_i
#   d H_i / d z    = -p_i * (log p_i + H_i)            (entropy H_i = lse_i - sum_j p_ij z_ij)
# and through z = h W^T / T:  dh = dz W / T,  dW = dz^T h / T.

LOGIT_BUDGET = 1 << 25   # floats of logits per chunk (128 MB in fp32) when chunk_size is None


def _chunk_logits(h, weight, temperature, out):
    """(c, H) @ (V, H).T / T -> `out` (c, V), computed in out's dtype (fp32, or fp64 for gradcheck).
    Writing into one reused buffer avoids a fresh 100 MB allocation (and its page faults) per chunk."""
    if h.dtype == out.dtype:
        torch.mm(h, weight.t(), out=out)
    else:   # bf16/fp16 GEMM, then upcast: the log-softmax itself is always done in fp32
        out.copy_(h @ weight.t())
    return out.div_(temperature) if temperature != 1.0 else out


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        N, V = hidden.shape[0], weight.shape[0]
        logp = hidden.new_empty(N, dtype=acc)
        lse = hidden.new_empty(N, dtype=acc)
        ent = hidden.new_empty(N if with_entropy else 0, dtype=acc)
        buf = hidden.new_empty((min(chunk_size, N), V), dtype=acc)            # (c, V) logits
        ebuf = torch.empty_like(buf) if with_entropy else None
        for s in range(0, N, chunk_size):
            c = min(chunk_size, N - s)
            z = _chunk_logits(hidden[s:s + c], weight, temperature, buf[:c])
            m = z.amax(dim=-1, keepdim=True)                                    # (c, 1) for stability
            target = z.gather(1, targets[s:s + c, None])[:, 0]
            z.sub_(m)                                                           # z' = z - max
            e = torch.exp(z, out=ebuf[:c]) if with_entropy else z.exp_()        # exp(z')
            total = e.sum(-1)
            lse[s:s + c] = m[:, 0] + total.log()
            logp[s:s + c] = target - lse[s:s + c]
            if with_entropy:   # H = lse - sum_j p_j z_j = log(total) - sum_j e_j z'_j / total
                ent[s:s + c] = total.log() - z.mul_(e).sum(-1) / total
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        T, C = ctx.temperature, ctx.chunk_size
        acc = lse.dtype
        N, V = hidden.shape[0], weight.shape[0]
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp
        use_ent = ctx.with_entropy and g_ent is not None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        buf = hidden.new_empty((min(C, N), V), dtype=acc)
        pbuf = torch.empty_like(buf) if use_ent else None
        rows = torch.arange(min(C, N), device=hidden.device)
        for s in range(0, N, C):
            c = min(C, N - s)
            h = hidden[s:s + c]
            logp_all = _chunk_logits(h, weight, T, buf[:c]).sub_(lse[s:s + c, None])   # (c, V) log p
            g = g_logp[s:s + c, None]
            if use_ent:   # dz = g (onehot - p) - g_H p (log p + H)
                p = torch.exp(logp_all, out=pbuf[:c])
                dz = logp_all.add_(ent[s:s + c, None]).mul_(p).mul_(-g_ent[s:s + c, None])
                dz.sub_(p.mul_(g))
            else:         # dz = g (onehot - p)
                dz = logp_all.exp_().mul_(-g)
            dz[rows[:c], targets[s:s + c]] += g[:, 0]
            if T != 1.0:
                dz.div_(T)
            if need_h:
                if hidden.dtype == acc:
                    torch.mm(dz, weight, out=grad_h[s:s + c])
                else:
                    grad_h[s:s + c] = dz.to(weight.dtype) @ weight
            if need_w:
                grad_w.addmm_(dz.t(), h.to(acc))
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=None, with_entropy=False):
    """log softmax(hidden @ weight.T / temperature)[targets], without ever holding [N, V] logits.

    hidden (N, H), weight (V, H), targets (N,) -> log-probs (N,) in float32 (float64 for float64
    inputs), and the entropy (N,) of each row's distribution when `with_entropy`. Differentiable
    in hidden and weight (tied embeddings too). chunk_size: tokens per chunk; by default as many
    as fit LOGIT_BUDGET floats of logits."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: want hidden (N, H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"token_logprobs: targets {tuple(targets.shape)} must be ({hidden.shape[0]},)")
    if chunk_size is None:
        chunk_size = max(1, LOGIT_BUDGET // weight.shape[0])
    return _TokenLogprobs.apply(hidden, weight, targets.long(), float(temperature), int(chunk_size),
                                bool(with_entropy))


# ----------------------------------------------------------------------------------------------
# 5. Sequence log-probs: the model up to its final hidden states, then the kernel


def final_hidden_states(policy, batch):
    """Run the language model (with the vision tower) up to the final norm: (B, L, H)."""
    out = policy.model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"], pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"],
        use_cache=False)
    return out.last_hidden_state


def sequence_logprobs(policy, batch, temperature=1.0, with_entropy=False):
    """Per-token log-probs of a collated batch, computed only where loss_mask is 1.

    Returns logp (B, L) float32 with logp[b, t] = log p(token t | tokens < t) at positions where
    loss_mask[b, t] == 1 and 0 elsewhere (so it lines up with loss_mask), and the entropy (B, L)
    of the distribution token t was drawn from (or None)."""
    hidden = final_hidden_states(policy, batch)                     # (B, L, H)
    mask = batch["loss_mask"][:, 1:].bool()                         # predict token t+1 from t
    h = hidden[:, :-1][mask]                                        # (N, H)
    targets = batch["input_ids"][:, 1:][mask]                       # (N,)
    weight = policy.model.get_output_embeddings().weight            # (V, H)
    out = token_logprobs(h, weight, targets, temperature, with_entropy=with_entropy)
    logp_n, ent_n = out if with_entropy else (out, None)
    B, L = batch["input_ids"].shape
    logp = hidden.new_zeros((B, L), dtype=torch.float32)
    logp[:, 1:][mask] = logp_n.float()
    ent = None
    if with_entropy:
        ent = hidden.new_zeros((B, L), dtype=torch.float32)
        ent[:, 1:][mask] = ent_n.float()
    return logp, ent
