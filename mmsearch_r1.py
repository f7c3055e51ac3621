"""The core of a multimodal search agent: policy loading, chat format, trajectories and
loss masks, the fused log-prob kernel, the rollout loop, rewards, and what the training
scripts share.

Read top to bottom:
  1. device and dtype, the model families we know, `load_policy`
  2. `build_tiny_policy`: a from-scratch Qwen2.5-VL / Qwen3-VL and BPE tokenizer for tests
  3. the chat format: `Trajectory`, segment-wise tokenization with loss masks, messages JSONL
  4. `token_logprobs`: chunked log-softmax with a hand-written backward (never [N, V] logits)
  5. `sequence_logprobs`: model -> final hidden states -> `token_logprobs` on masked positions
  6. `rollout`: the batched multi-turn loop with per-row KV caches and concurrent tool calls
  7. rewards: exact match, F1, an LLM judge, the format check, `reward`
  8. `evaluate`, `score_samples`, `summarize`, `write_report`: the agent eval of eval.py and the trainers
  9. LoRA: `add_lora`, `lora_disabled`, `merge_lora`
 10. training utilities: `masked_nll`, `lr_at`, `pack_by_tokens`, checkpoints
 11. torchrun: `init_distributed`, `distribute` (DDP or FSDP2), gradient sync, gathered checkpoints

Usage:
    policy = load_policy("Qwen/Qwen2.5-VL-3B-Instruct")       # or a local folder
    traj = trajectory_from_record(policy, json.loads(line), root="data/")
    batch = collate(policy, [traj])
    logp, _ = sequence_logprobs(policy, batch)                 # (B, L), 0 where loss_mask is 0
"""
import contextlib
import functools
import inspect
import json
import time
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

import tools
from tools import TOOL_SCHEMAS, load_jsonl, write_jsonl   # core.load_jsonl / write_jsonl to the scripts

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

# The control tokens of the Qwen-VL vocabularies, in their order after the BPE vocabulary.
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
REQUIRED_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
# Tags that are single added tokens in a family's vocabulary; every other tag (<answer>, and in
# Qwen2.5 <think> and <tool_response>) is plain multi-token text there.
ADDED_TAGS = {"qwen2_vl": ["<tool_call>", "</tool_call>"],
              "qwen2_5_vl": ["<tool_call>", "</tool_call>"],
              "qwen3_vl": ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]}
TAGS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"]
POLICY_TAGS = TAGS[:4]            # what the policy writes itself; <tool_response> is the environment's
AGENT_IMAGE_TOKENS = 1024         # default budget of visual tokens per image (question image or crop)


@dataclass
class Policy:
    """A loaded model with its tokenizer, image processor and family settings.

    Text goes in through `plain`: the tokenizer's BPE without its added tokens, so a control-token
    string in a page or a question is ordinary text. Control tokens enter only through the chat
    format (section 3). `sample_mask` (V,) is True on the ids the policy may write: text, the
    tags in POLICY_TAGS, <|im_end|> and <|endoftext|>; never vision, pad or other control tokens,
    nor the output rows past the tokenizer. Sampling and `sequence_logprobs` both use the
    distribution restricted to it."""
    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    model_type: str          # "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl"
    crop_convention: str     # "abs" | "rel1000" | "rel"
    device: torch.device
    dtype: torch.dtype
    ids: dict                # token ids: im_start, im_end, vision_start, vision_end, image_pad, endoftext
    merge_size: int          # vision tokens merged per side: N image tokens = t*h*w / merge_size**2
    plain: object = None     # tokenizers.Tokenizer: the BPE without added tokens
    tag_ids: dict = field(default_factory=dict)    # tag -> id, for the tags that are single tokens
    sample_mask: torch.Tensor = None                # (V,) bool, True where the policy may sample
    min_pixels: int = 0      # image budgets (pixels after the processor's resize)
    max_pixels: int = 0      # question images
    crop_max_pixels: int = 0  # images returned by tools (crops)
    sampling: dict = field(default_factory=dict)    # temperature / top_p / top_k from generation_config.json

    @property
    def eos_ids(self):
        return {self.ids["im_end"], self.ids["endoftext"]}

    def encode_text(self, text):
        """Ids of text the policy did not write (questions, pages, tool results): control-token
        strings are split as ordinary text, invalid unicode is replaced."""
        return self.plain.encode(clean_text(text), add_special_tokens=False).ids

    def encode_image(self, image, max_pixels=None):
        """Process one PIL image -> (pixel_values [P, D], grid_thw [3]); tokens = prod(grid) / merge**2.
        The image is resized to at most `max_pixels` (default: the question-image budget)."""
        size = {"shortest_edge": self.min_pixels, "longest_edge": max_pixels or self.max_pixels}
        out = self.image_processor(images=[image], size=size, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"][0]

    def shown_size(self, image):
        """(width, height) of `image` as the model saw it (recorded when it entered a trajectory;
        else as a question image would be shown)."""
        if "shown_size" in image.info:
            return image.info["shown_size"]
        _, grid = self.encode_image(image)
        patch = self.image_processor.patch_size
        return int(grid[2]) * patch, int(grid[1]) * patch


def clean_text(text):
    """Outside text made safe to tokenize: lone surrogates become '?', NUL becomes U+FFFD."""
    return str(text).encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


def make_policy(model, tokenizer, image_processor, device, dtype, min_pixels=None, max_pixels=None,
                crop_max_pixels=None):
    """Wrap a loaded model, tokenizer and image processor: token ids, the sampling mask, the
    plain tokenizer and the image budgets. Raises ValueError when they don't fit together."""
    from tokenizers import Tokenizer

    config = model.config
    vocab = tokenizer.get_vocab()   # load_policy has checked it holds REQUIRED_SPECIAL
    names = {"endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
             "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "image_pad": "<|image_pad|>"}
    ids = {k: vocab.get(tok, vocab["<|im_end|>"]) for k, tok in names.items()}
    if ids["image_pad"] != config.image_token_id:
        raise ValueError(f"tokenizer's <|image_pad|> is {ids['image_pad']} but the model expects "
                         f"image_token_id {config.image_token_id}; tokenizer and model don't match.")
    added = {tok.content: i for i, tok in tokenizer.added_tokens_decoder.items()}
    tag_ids = {t: added[t] for t in TAGS if t in added}
    # the plain tokenizer: the same BPE and pre-tokenizer with the added tokens removed
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"] = []
    plain = Tokenizer.from_str(json.dumps(spec))
    # sampling mask over the output rows: text, the policy's own tags and the two end tokens
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ValueError(f"the model has {rows} output rows but the tokenizer {len(tokenizer)} tokens")
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[:len(tokenizer)] = True
    mask[list(added.values())] = False
    mask[[ids["im_end"], ids["endoftext"]] + [tag_ids[t] for t in POLICY_TAGS if t in tag_ids]] = True
    factor = image_processor.patch_size * image_processor.merge_size
    own = image_processor.size
    agent = AGENT_IMAGE_TOKENS * factor * factor
    max_pixels = max_pixels or min(own["longest_edge"], agent)
    crop_max_pixels = crop_max_pixels or min(own["longest_edge"], agent)
    min_pixels = min_pixels or own["shortest_edge"]
    for name, value in [("min_pixels", min_pixels), ("max_pixels", max_pixels), ("crop_max_pixels", crop_max_pixels)]:
        if value < factor * factor:
            raise ValueError(f"{name}={value} is below one visual token ({factor}x{factor} = {factor * factor} pixels)")
    gen = getattr(model, "generation_config", None)
    sampling = {k: getattr(gen, k) for k in ("temperature", "top_p", "top_k") if getattr(gen, k, None) is not None}
    return Policy(model, tokenizer, image_processor, config.model_type, CROP_CONVENTION[config.model_type],
                  device, dtype, ids, config.vision_config.spatial_merge_size, plain, tag_ids,
                  mask.to(device), min_pixels, max_pixels, crop_max_pixels, sampling)


def missing_local_model(path):
    """True for a path that can only be a local folder (not an `org/name` hub id) and does not exist."""
    path = str(path)
    looks_local = Path(path).is_absolute() or path.startswith(".") or path.count("/") != 1
    return looks_local and not Path(path).exists()


def _hub_reachable(timeout=3.0):
    """Can we open a connection to the Hugging Face hub (or $HF_ENDPOINT) within `timeout` s?"""
    import os
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_policy(path, device=None, dtype=None, min_pixels=None, max_pixels=None, crop_max_pixels=None):
    """Load a Qwen2-VL / Qwen2.5-VL / Qwen3-VL policy from a hub id or a local folder.

    Uses AutoTokenizer and AutoImageProcessor (PIL backend) rather than AutoProcessor, which
    needs torchvision in transformers 5; image placeholders are expanded by the chat format.
    Image budgets (pixels after resizing): `max_pixels` for question images, `crop_max_pixels`
    for crops; both default to the processor's own limit capped at AGENT_IMAGE_TOKENS tokens.
    A LoRA checkpoint folder (lora.json + adapters.safetensors) loads as its base model with the
    adapters merged in."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    path = str(path)
    local = Path(path)
    if missing_local_model(path):
        raise FileNotFoundError(f"load_policy: no model folder at {path!r}. Pass a local folder "
                                "with config.json (e.g. from data/toyworld/prepare.py) or a hub id "
                                "like 'Qwen/Qwen2.5-VL-3B-Instruct'.")
    if local.is_dir() and (local / "lora.json").exists():   # a LoRA checkpoint: its base + the adapters, merged
        spec = json.loads((local / "lora.json").read_text())
        policy = load_policy(spec["base"], device, dtype, min_pixels, max_pixels, crop_max_pixels)
        add_lora(policy.model, spec["rank"], spec["alpha"], spec["targets"])
        load_adapters(policy.model, local)
        merge_lora(policy.model).requires_grad_(True)
        return policy
    if local.is_dir() and not (local / "config.json").exists():
        raise FileNotFoundError(f"load_policy: {path!r} has no config.json; is it a model folder?")
    # a hub id with the hub out of reach: use the local cache only, and fail in seconds, not after retries
    offline = not local.exists() and not _hub_reachable()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=offline)
    except (OSError, ValueError) as e:   # hub id unknown, no network, unreadable config.json
        why = "the hub is not reachable and it is not in the local cache" if offline else str(e).splitlines()[0]
        raise FileNotFoundError(f"load_policy: cannot load a model config from {path!r} ({why}). "
                                "Check the hub id and your network, or pass a local folder.") from None
    if config.model_type not in CROP_CONVENTION:
        raise ValueError(f"load_policy: model type {config.model_type!r} is not supported; "
                         f"supported: {', '.join(sorted(CROP_CONVENTION))}.")
    tokenizer = _load_part("tokenizer", path, lambda: AutoTokenizer.from_pretrained(path, local_files_only=offline))
    missing = [t for t in REQUIRED_SPECIAL if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"load_policy: the tokenizer at {path!r} lacks the special tokens {missing}; "
                         "the chat format needs the Qwen-VL ChatML and vision tokens.")
    image_processor = _load_part("image processor", path, lambda: AutoImageProcessor.from_pretrained(
        path, backend="pil", local_files_only=offline))
    device, dtype = resolve_device(device, dtype)
    # use_kernels=False: transformers 5.25 otherwise swaps layers for kernels fetched from the hub
    # (the `kernels` package): other numerics, a download, and not the code this file reads
    model = _load_part("weights", path, lambda: AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, local_files_only=offline, use_kernels=False)).to(device).eval()
    embed_patches_with_matmul(model)
    try:
        return make_policy(model, tokenizer, image_processor, device, dtype, min_pixels, max_pixels, crop_max_pixels)
    except ValueError as e:
        raise ValueError(f"load_policy: {path!r}: {e}") from None


def _load_part(what, path, load):
    """load(), with what the libraries raise for a broken or incomplete folder (OSError, ValueError,
    safetensors' own error) turned into one ValueError that names the part."""
    from safetensors import SafetensorError

    try:
        return load()
    except (OSError, ValueError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"load_policy: cannot load the {what} from {path!r} ({first}). Is the folder complete? "
                         "A checkpoint cut short by an interrupted save: use an earlier one.") from e


def embed_patches_with_matmul(model):
    """Run the vision tower's patch embedding, a Conv3d whose kernel equals its stride, as one
    matmul over the flattened patches: the same map (the processor hands patches over already
    flattened in the kernel's order), without conv3d's unfold: 12 -> 3 ms forward + backward of a
    toy SFT step's 1,800 patches on CPU. The weights, their names and the checkpoints stay the Conv3d's."""
    embed = model.model.visual.patch_embed
    embed.forward = types.MethodType(_patch_embed_forward, embed)   # a bound method: deepcopy rebinds it


def _patch_embed_forward(self, pixels):
    w = self.proj.weight                              # [embed_dim, channels, time, patch, patch]
    return torch.nn.functional.linear(pixels.to(w.dtype).view(-1, w[0].numel()), w.view(w.shape[0], -1),
                                      self.proj.bias)


# ----------------------------------------------------------------------------------------------
# 2. Tiny policies for tests and the toy world: the real architecture, a few hundred K parameters


def build_tiny_policy(out_dir, texts, family="qwen2_5_vl", vocab_size=512, hidden=64, layers=2,
                      heads=4, kv_heads=2, intermediate=None, vision_hidden=32, vision_depth=2,
                      max_pixels=112 * 112, model_vocab=None, tie_embeddings=False, vision_window=112, seed=0,
                      init_std=None):
    """Train a byte-level BPE tokenizer on `texts`, build a random tiny VLM of the real
    architecture (`family` = "qwen2_5_vl" or "qwen3_vl"), and save model, tokenizer and image
    processor with `save_pretrained`. Returns the folder; `load_policy(folder)` loads it back.
    The sizes default to a ~220K-parameter model; larger ones (e.g. Qwen2.5-VL-3B's shape for a
    benchmark: hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008,
    model_vocab=151936) work the same. model_vocab: output rows (default: the tokenizer's, rounded
    up past it to a multiple of 64). tie_embeddings: the output layer shares the input embedding,
    as in Qwen2.5-VL-3B. vision_window: Qwen2.5-VL's windowed vision attention, in pixels (its own
    112: 8 x 8 patches; Qwen3-VL has none). The tags that are single tokens follow the family (ADDED_TAGS).
    init_std: the weights' initial standard deviation (default: the configs' 0.02, made for widths in
    the thousands; 1/sqrt(hidden) is the fan-in scale). At width 128, 0.02 leaves the attention
    scores so small that each token attends almost evenly to the whole context for hundreds of
    SFT steps (data/toyworld/NOTES.md, "The tiny model's initial weights")."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if hidden % heads or (hidden // heads) % 2 or heads % kv_heads:
        raise ValueError(f"build_tiny_policy: hidden {hidden} must split into {heads} heads of an even width, "
                         f"and {heads} heads into {kv_heads} key/value groups")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if family not in ("qwen2_5_vl", "qwen3_vl"):
        raise ValueError(f"build_tiny_policy: family must be 'qwen2_5_vl' or 'qwen3_vl', got {family!r}")
    # Tokenizer: the Qwen2 pre-tokenizer split (regex, then byte-level), BPE trained on `texts`
    # and the system prompts; then, as in the real vocabularies, the control tokens and the
    # family's tags as added tokens after the BPE ids.
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(list(texts) + [system_prompt(c) for c in CONVENTION_TEXT], trainer)
    bpe.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TAGS[family]])
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
    # like Qwen's 151,936 rows for ~151,665 tokens, the output layer has rows past the tokenizer
    rows = max(len(tokenizer), model_vocab or -(-(len(tokenizer) + 1) // 64) * 64)
    text = dict(vocab_size=rows, hidden_size=hidden,
                intermediate_size=intermediate or 2 * hidden,
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
                      fullatt_block_indexes=[vision_depth - 1], window_size=vision_window)
    else:
        from transformers import Qwen3VLConfig as Config
        text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "mrope_section": mrope, "mrope_interleaved": True})
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=2, out_hidden_size=hidden, patch_size=patch, spatial_merge_size=2,
                      deepstack_visual_indexes=[0], num_position_embeddings=64)
    if init_std is not None:
        text["initializer_range"] = vision["initializer_range"] = init_std
    config = Config(text_config=text, vision_config=vision, tie_word_embeddings=bool(tie_embeddings), **token_ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    model.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# 3. Chat format and trajectories
#
# The Qwen2.5 / Qwen3 chat templates, rendered piece by piece (<tool_call>, <think> and, in
# Qwen3, <tool_response> are single tokens; elsewhere they are text):
#
#   <|im_start|>system\n{instructions}\n\n# Tools ... <tools>\n{schemas}\n</tools> ...<|im_end|>\n   loss_mask 0
#   <|im_start|>user\n<|vision_start|><|image_pad|>*N<|vision_end|>{question}<|im_end|>\n     0
#   <|im_start|>assistant\n                                                                  0
#   <think>...</think>\n<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call><|im_end|> 1  (what the policy samples)
#   \n                                                                                       0
#   <|im_start|>user\n<tool_response>\n{result 1}\n</tool_response>\n<tool_response>\n{result 2}\n</tool_response><|im_end|>\n   0
#
# Control tokens (ChatML, vision, the single-token tags) come only from this code. Between two
# control tokens, the template's fixed text and the message's text form one run that is
# tokenized at once: byte-level BPE merges across them (".\n" is one token), so this is what
# makes the ids equal those of the rendered conversation tokenized whole. A trajectory is never
# decoded and re-encoded.

CONVENTION_TEXT = {
    "abs": "absolute pixel coordinates of the image as you see it",
    "rel1000": "coordinates on a 0-1000 grid relative to the image's width and height",
    "rel": "fractions between 0 and 1 of the image's width and height",
}


def system_prompt(crop_convention="abs", schemas=None):
    """The system message: our instructions, then the tools exactly as the Qwen2.5 / Qwen3 chat
    templates offer them (a `# Tools` section, one OpenAI-style signature per line). schemas:
    the tools offered (default TOOL_SCHEMAS; a Toolbox's `.schemas` adds the modes it has)."""
    signatures = "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False)
                           for t in (schemas or TOOL_SCHEMAS))
    return ("You answer questions about images. Think inside <think>...</think>, then either call tools "
            "or, when you know the answer, write it inside <answer>...</answer>. Tool results come back "
            "inside <tool_response>...</tool_response>. Images are numbered 0 for the question image, then "
            f"1, 2, ... in the order you receive them. Boxes are [x1, y1, x2, y2] in {CONVENTION_TEXT[crop_convention]}."
            "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{signatures}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def format_tool_call(name, arguments):
    """A tool call as the Qwen templates write it."""
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)}\n</tool_call>'


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
    positions: object = field(default=None, repr=False, compare=False)   # (3, n), kept by row_positions

    def append(self, ids, mask, logprobs=None):
        """Append ids with one mask value for all (int) or one per id (list)."""
        self.input_ids.extend(ids)
        self.loss_mask.extend(mask if isinstance(mask, list) else [mask] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))


def _content_parts(content):
    """Normalize message content to a list of {"type": "text"|"image", ...} parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("text", "image") or \
                (part["type"] == "text" and not isinstance(part.get("text"), str)):
            raise ValueError(f"content part {part!r} must be {{'type': 'text', 'text': str}} or {{'type': 'image'}}")
    return content


def split_tags(policy, text, tags):
    """text -> [str | int]: occurrences of `tags` that are single tokens in this vocabulary become
    their ids; everything else stays text."""
    import re
    ids = {t: policy.tag_ids[t] for t in tags if t in policy.tag_ids}
    if not ids:
        return [text]
    pieces = re.split("(" + "|".join(map(re.escape, ids)) + ")", text)
    return [ids[p] if i % 2 else p for i, p in enumerate(pieces) if p]


def encode_assistant(policy, text):
    """Ids of text the policy writes (forced or SFT assistant turns): its own tags are tokens."""
    return [p for piece in split_tags(policy, clean_text(text), POLICY_TAGS)
            for p in ([piece] if isinstance(piece, int) else policy.encode_text(piece))]


def _content_pieces(policy, parts, images, tags, mask):
    """Message content -> [(piece, mask)]: text with `tags` made tokens, images as PIL images."""
    pieces, images = [], list(images)
    for part in parts:
        if part["type"] == "text":
            pieces += [(p, mask) for p in split_tags(policy, clean_text(part["text"]), tags)]
        elif not images:
            raise ValueError("a message has more {'type': 'image'} parts than images were given")
        else:
            pieces.append((images.pop(0), mask))
    return pieces


def _append_pieces(policy, traj, pieces, max_pixels):
    """Tokenize and append [(piece, mask)] pieces: str (text), int (a control token id) or a PIL
    image (<|vision_start|> + N x <|image_pad|> + <|vision_end|>, N from the processor's grid).
    Neighbouring text pieces are tokenized as one run; a token takes the mask of the piece its
    last character belongs to (a token straddling the assistant header and content is content)."""
    import bisect
    run, ends, masks = "", [], []
    for piece, mask in pieces + [(None, 0)]:
        if isinstance(piece, str):
            run += piece
            ends.append(len(run))
            masks.append(mask)
            continue
        if run:
            enc = policy.plain.encode(run, add_special_tokens=False)
            traj.append(enc.ids, [masks[bisect.bisect_left(ends, max(end, 1))] for _, end in enc.offsets])
            run, ends, masks = "", [], []
        if piece is None:
            break
        if isinstance(piece, int):
            traj.append([piece], mask)
            continue
        pixel_values, grid = policy.encode_image(piece, max_pixels)
        patch = policy.image_processor.patch_size
        piece.info["shown_size"] = (int(grid[2]) * patch, int(grid[1]) * patch)
        n = int(grid.prod()) // policy.merge_size ** 2
        traj.append([policy.ids["vision_start"]] + [policy.ids["image_pad"]] * n + [policy.ids["vision_end"]], mask)
        traj.images.append(piece)
        traj.image_inputs.append((pixel_values, grid))


def add_message(policy, traj, role, content, images=()):
    """Tokenize one message and append it to `traj` with its loss mask (see the table above).
    role "tool" is one tool result in its own user turn; use `add_tool_results` for several."""
    if role == "tool":
        return add_tool_results(policy, traj, [content], images)
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"unknown role {role!r}: use system, user, assistant or tool")
    traj.messages.append({"role": role, "content": content})
    mask = int(role == "assistant")
    tags = POLICY_TAGS if role == "assistant" else TAGS if role == "system" else ()
    pieces = [(policy.ids["im_start"], 0), (role + "\n", 0)]
    pieces += _content_pieces(policy, _content_parts(content), images, tags, mask)
    pieces += [(policy.ids["im_end"], mask), ("\n", 0)]
    _append_pieces(policy, traj, pieces, policy.max_pixels)


def add_tool_results(policy, traj, contents, images=()):
    """Append one user turn holding each tool result in its own <tool_response>...</tool_response>,
    as the Qwen templates group consecutive tool messages. `images`: the results' images in order."""
    open_tag, close_tag = (policy.tag_ids.get(t, t) for t in ("<tool_response>", "</tool_response>"))
    pieces, images = [(policy.ids["im_start"], 0), ("user", 0)], list(images)
    for content in contents:
        parts = _content_parts(content)
        n = sum(p["type"] == "image" for p in parts)
        if n > len(images):
            raise ValueError("a message has more {'type': 'image'} parts than images were given")
        traj.messages.append({"role": "tool", "content": content})
        pieces += [("\n", 0), (open_tag, 0), ("\n", 0)]
        pieces += _content_pieces(policy, parts, images[:n], (), 0)
        pieces += [("\n", 0), (close_tag, 0)]
        images = images[n:]
    pieces += [(policy.ids["im_end"], 0), ("\n", 0)]
    _append_pieces(policy, traj, pieces, policy.crop_max_pixels)


def new_trajectory(policy, task, system=None, schemas=None):
    """The prompt of a rollout: system message (default: system_prompt with these tool schemas),
    then the user turn with the task's image(s) and question."""
    traj = Trajectory(id=str(task.get("id", "")))
    if system is None:
        system = system_prompt(policy.crop_convention, schemas)
    add_message(policy, traj, "system", system)
    images = task_images(task)
    if not isinstance(task.get("question"), str):
        raise ValueError(f"task {traj.id!r}: no 'question' text (a task is id, image, question[, answers])")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": task["question"]}]
    add_message(policy, traj, "user", content, images)
    return traj


MAX_IMAGE_PIXELS = 50_000_000   # a larger image is refused (decompression bombs), before it is decoded


def load_image(path):
    """Open an image file as RGB, with an error that names the file when it can't be read."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{im.width}x{im.height} is larger than {MAX_IMAGE_PIXELS} pixels")
            image = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}. Check that the file exists and is a "
                         "valid PNG/JPEG of a sensible size.") from None
    image.info["path"] = str(Path(path).resolve())
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
                 if k not in ("id", "images", "image", "messages", "finish_reason", "turns", "tool_calls")
                 and not k.startswith("_")}
    messages = record["messages"]
    i = 0
    while i < len(messages):   # consecutive tool messages form one user turn
        j = i + 1
        while messages[i].get("role") == "tool" and j < len(messages) and messages[j].get("role") == "tool":
            j += 1
        contents = [m.get("content") for m in messages[i:j]]
        n_images = sum(p["type"] == "image" for c in contents for p in _content_parts(c))
        if messages[i].get("role") == "tool":
            add_tool_results(policy, traj, contents, images[:n_images])
        else:
            add_message(policy, traj, messages[i].get("role"), contents[0], images[:n_images])
        images = images[n_images:]
        i = j
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


def row_positions(policy, traj):
    """The Qwen-VL multimodal rotary positions (3, n) of a trajectory's tokens (get_rope_index over
    the row alone), kept on it until it grows: an SFT run collates each trajectory many times, and
    this was half of collate's time."""
    if traj.positions is None or traj.positions.shape[1] != len(traj.input_ids):
        traj.positions = rope_positions(policy, traj.input_ids, traj.image_inputs)
    return traj.positions


def rope_positions(policy, ids, image_inputs):
    """get_rope_index's positions (3, n) of one row of ids holding these images, counted from 0."""
    ids = torch.tensor([ids])
    grids = [g for _, g in image_inputs]
    return policy.model.model.get_rope_index(ids, mm_token_type_ids=(ids == policy.ids["image_pad"]).long(),
                                             image_grid_thw=torch.stack(grids) if grids else None)[0][:, 0]


def collate(policy, trajs):
    """Right-pad trajectories into one batch on the policy's device.

    Returns input_ids, attention_mask, loss_mask (B, L); position_ids (3, B, L), each row's
    row_positions (0 on padding); pixel_values and image_grid_thw of every image in row order;
    mm_token_type_ids (1 on image pads)."""
    if not trajs:
        raise ValueError("collate: no trajectories to batch")
    B, L = len(trajs), max(len(t.input_ids) for t in trajs)
    pad = policy.ids["endoftext"]
    input_ids = torch.full((B, L), pad, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    loss_mask = torch.zeros((B, L), dtype=torch.long)
    position_ids = torch.zeros((3, B, L), dtype=torch.long)
    for b, t in enumerate(trajs):
        n = len(t.input_ids)
        input_ids[b, :n] = torch.tensor(t.input_ids)
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = torch.tensor(t.loss_mask)
        position_ids[:, b, :n] = row_positions(policy, t)
    image_inputs = [x for t in trajs for x in t.image_inputs]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
             "position_ids": position_ids, "mm_token_type_ids": (input_ids == policy.ids["image_pad"]).long(),
             "pixel_values": torch.cat([p for p, _ in image_inputs]) if image_inputs else None,
             "image_grid_thw": torch.stack([g for _, g in image_inputs]) if image_inputs else None}
    return {k: (v.to(policy.device) if v is not None else None) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# 4. The fused log-prob kernel
#
# log p(y | h) = z_y - logsumexp(z),  z = h @ W.T / T.  The naive way materializes z for all N
# tokens ([N, V] floats: 2.5 GB at N=4096, V=151936) and autograd keeps several copies. Here the
# forward walks chunks of tokens, keeping only logsumexp per token; the backward walks blocks of
# the vocabulary against all N tokens (each token's logsumexp known, a block's probabilities need no
# other block) and turns each block's recomputed probabilities into the gradient in the same buffer:
#   d logp_i / d z = onehot(y_i) - p_i
#   d H_i / d z    = -p_i * (log p_i + H_i)            (entropy H_i = lse_i - sum_j p_ij z_ij)
# so dz = -d with d = p (g + g_H (log p + H)) - g onehot(y), and through z = h W^T / T:
#   dh = -d W / T,   dW = -d^T h / T.
# Without g_H, d = g (p - onehot(y)): the g is applied to the small (N, H) side instead of the (N, V) one.

CHUNK_TOKENS = 512        # tokens per forward chunk: fewer, larger chunks mean fewer passes over W ...
LOGIT_BUDGET = 1 << 25    # ... but at most this many floats of logits per chunk (128 MB in fp32)
# A CPU without bf16 matrix units (AMX) runs bf16/fp16 GEMMs 2-3x slower than fp32 ones (0.61-0.83 s against
# 0.28-0.38 s at 2048x512x32000 on this project's host): there the kernel computes in fp32 (_fp32_gemms)
FP32_GEMMS_ON_CPU = not (hasattr(torch.cpu, "get_capabilities") and torch.cpu.get_capabilities().get("amx_bf16"))
MIN_BLOCK_ROWS = 256      # vocabulary rows per backward block at least (its GEMMs are only as wide as the block)
BLOCKED = -1e30           # logit of an id outside vocab_mask: exp() is exactly 0, and 0 * BLOCKED stays finite


def _chunk_logits(h, weight, temperature, out, blocked=None, shift=None, low=None):
    """(c, H) @ (V, H).T / T - shift[:, None] -> `out` (c, V), in out's dtype (fp32, or fp64 for
    gradcheck), with the ids in `blocked` (LongTensor) set to BLOCKED. Reused buffers (`out`, and
    `low` in the inputs' dtype for bf16/fp16) avoid a fresh allocation (and its page faults) per chunk."""
    if h.dtype == out.dtype:   # 1/T and the shift ride on the GEMM (addmm's alpha, beta): no extra pass
        if shift is None:
            torch.mm(h, weight.t(), out=out) if temperature == 1.0 else \
                torch.addmm(out, h, weight.t(), beta=0, alpha=1 / temperature, out=out)
        else:
            torch.addmm(shift[:, None].neg(), h, weight.t(), alpha=1 / temperature, out=out)
    else:   # bf16/fp16 GEMM, then upcast: the log-softmax itself is always done in fp32
        out.copy_(torch.mm(h, weight.t(), out=low))
        if temperature != 1.0:
            out.div_(temperature)
        if shift is not None:
            out.sub_(shift[:, None])
    return out.index_fill_(1, blocked, BLOCKED) if blocked is not None else out


def _fp32_gemms(hidden):
    """bf16/fp16 inputs whose GEMMs run in fp32 (FP32_GEMMS_ON_CPU); elsewhere they run in the inputs' dtype."""
    return hidden.dtype in (torch.bfloat16, torch.float16) and hidden.device.type == "cpu" and FP32_GEMMS_ON_CPU


def _backward_blocks(hidden, weight, targets, lse, ent, g_logp, g_ent, T, C, blocked, need_h, need_w):
    """The backward's pass over the vocabulary, a block of W's rows at a time against all N tokens:
    (∂hidden, ∂W) in the inputs' dtypes, None where not needed. g_ent None: the entropy's gradient is zero."""
    acc = lse.dtype
    N, V = hidden.shape[0], weight.shape[0]
    up = _fp32_gemms(hidden)
    x = hidden.to(acc) if up else hidden                  # the GEMMs' dtype: fp32 here, else the inputs'
    B = min(V, max(MIN_BLOCK_ROWS, C * V // max(2 * N, 1)))   # vocabulary rows per block: half a forward chunk's
    # floats, which leaves room for the two (N, H) tensors below
    buf = hidden.new_empty(N * B, dtype=acc)              # flat: a short last block's view stays contiguous
    pbuf = torch.empty_like(buf) if g_ent is not None else None
    low = None if x.dtype == acc else torch.empty_like(buf, dtype=x.dtype)   # bf16/fp16 GEMM operands
    side = 1.0 if g_ent is not None else g_logp[:, None]  # g on the (N, H) side when d = g (p - onehot)
    on_target = g_logp if g_ent is not None else torch.ones_like(g_logp)     # what d loses at each target
    dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    xg = (side * x.to(acc)).to(x.dtype) if need_w else None
    grad_w = torch.empty_like(weight) if need_w else None
    for v in range(0, V, B):
        b = min(B, V - v)
        wb = weight[v:v + b].to(acc) if up else weight[v:v + b]
        ids = None if blocked is None else blocked[(blocked >= v) & (blocked < v + b)] - v   # this block's
        lo = None if low is None else low[:N * b].view(N, b)
        logp_all = _chunk_logits(x, wb, T, buf[:N * b].view(N, b), ids, shift=lse, low=lo)
        if g_ent is not None:   # d = p (g + g_H (log p + H)) - g onehot
            p = torch.exp(logp_all, out=pbuf[:N * b].view(N, b))
            d = logp_all.add_(ent[:, None]).mul_(g_ent[:, None].to(acc)).add_(g_logp[:, None]).mul_(p)
        else:                   # d = p - onehot, the g applied to (N, H) tensors
            d = logp_all.exp_()
        rows = ((targets >= v) & (targets < v + b)).nonzero()[:, 0]
        d[rows, targets[rows] - v] -= on_target[rows]
        dl = d if lo is None else lo.copy_(d)   # bf16/fp16: both GEMMs run in the inputs' dtype, as naive's do
        if need_h:
            dh += dl @ wb
        if need_w:   # -d^T h / T, the scale inside the GEMM, written in place (or cast on the copy from fp32)
            if grad_w.dtype == dl.dtype:
                torch.addmm(wb, dl.t(), xg, beta=0, alpha=-1 / T, out=grad_w[v:v + b])
            else:
                grad_w[v:v + b] = torch.addmm(wb, dl.t(), xg, beta=0, alpha=-1 / T)
    grad_h = dh.mul_(-side / T).to(hidden.dtype) if need_h else None
    return grad_h, grad_w


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy, blocked):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        N, V = hidden.shape[0], weight.shape[0]
        logp = hidden.new_empty(N, dtype=acc)
        lse = hidden.new_empty(N, dtype=acc)
        ent = hidden.new_empty(N if with_entropy else 0, dtype=acc)
        # W frozen (LoRA): dh = (g W[y] - g p W) / T needs only p W (N, H), made here from the
        # probabilities at hand; the backward then needs no pass over the vocabulary at all.
        frozen_w = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        pw = hidden.new_empty((N, hidden.shape[1]) if frozen_w else (0,), dtype=acc)
        x, w = (hidden.float(), weight.float()) if _fp32_gemms(hidden) else (hidden, weight)
        buf = hidden.new_empty((min(chunk_size, N), V), dtype=acc)            # (c, V) logits
        ebuf = torch.empty_like(buf) if with_entropy else None
        low = None if x.dtype == acc else torch.empty_like(buf, dtype=x.dtype)
        for s in range(0, N, chunk_size):
            c = min(chunk_size, N - s)
            lo = low[:c] if low is not None else None
            z = _chunk_logits(x[s:s + c], w, temperature, buf[:c], blocked, low=lo)
            target = z.gather(1, targets[s:s + c, None])[:, 0]
            m = z.amax(dim=-1, keepdim=True)                                    # (c, 1) for stability
            z.sub_(m)                                                           # z' = z - max
            e = torch.exp(z, out=ebuf[:c]) if with_entropy else z.exp_()        # exp(z')
            total = e.sum(-1)
            lse[s:s + c] = m[:, 0] + total.log()
            logp[s:s + c] = target - lse[s:s + c]
            if with_entropy:   # H = lse - sum_j p_j z_j = log(total) - sum_j e_j z'_j / total
                ent[s:s + c] = total.log() - z.mul_(e).sum(-1) / total
            if frozen_w:       # p W, with p = e / total
                p = e.div_(total[:, None])
                pw[s:s + c] = p @ w if lo is None else (lo.copy_(p) @ w).to(acc)
        ctx.save_for_backward(hidden, weight, targets, lse, ent, pw)
        ctx.blocked = blocked
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, targets, lse, ent, pw = ctx.saved_tensors
        T, C = ctx.temperature, ctx.chunk_size
        acc = lse.dtype
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.to(acc)
        use_ent = ctx.with_entropy and g_ent is not None and bool(g_ent.any())   # entropy only logged: zeros
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if len(pw) and not use_ent:   # W frozen: dh = g (W[y] - p W) / T, from the forward's p W
            g = g_logp[:, None]
            return ((g * (weight[targets].to(acc) - pw) / T).to(hidden.dtype),) + (None,) * 6
        grad_h, grad_w = _backward_blocks(hidden, weight, targets, lse, ent, g_logp, g_ent if use_ent else None,
                                          T, C, ctx.blocked, need_h, need_w)
        return grad_h, grad_w, None, None, None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=None, with_entropy=False,
                   vocab_mask=None):
    """log softmax(hidden @ weight.T / temperature)[targets], without ever holding [N, V] logits.

    hidden (N, H), weight (V, H), targets (N,) -> log-probs (N,) in float32 (float64 for float64
    inputs), and the entropy (N,) of each row's distribution when `with_entropy`. Differentiable
    in hidden and weight (tied embeddings too). chunk_size: tokens per forward chunk (default
    CHUNK_TOKENS, fewer when LOGIT_BUDGET says so, half that for bf16/fp16, a quarter on a CPU
    computing them in fp32); the backward's vocabulary blocks hold half as many floats.
    vocab_mask (V,) bool: the softmax runs over these ids only (the policy's sampling
    distribution, Policy.sample_mask); targets must lie inside it."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: want hidden (N, H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"token_logprobs: targets {tuple(targets.shape)} must be ({hidden.shape[0]},)")
    if not chunk_size:   # bf16/fp16 chunks hold their logits twice (fp32 and the inputs' dtype): half the tokens;
        # computing in fp32 on a CPU (FP32_GEMMS_ON_CPU) holds an fp32 copy of W besides: a quarter
        low = hidden.dtype in (torch.bfloat16, torch.float16)
        share = 4 if _fp32_gemms(hidden) else 2 if low else 1
        chunk_size = max(1, min(CHUNK_TOKENS, LOGIT_BUDGET // weight.shape[0]) // share)
    blocked = None
    if vocab_mask is not None:
        if vocab_mask.shape != weight.shape[:1]:
            raise ValueError(f"token_logprobs: vocab_mask {tuple(vocab_mask.shape)} must be ({weight.shape[0]},)")
        outside = ~vocab_mask.to(hidden.device)
        bad = targets[outside[targets]]
        if len(bad):
            raise ValueError(f"token_logprobs: target id(s) {sorted(set(bad.tolist()))[:5]} are outside vocab_mask "
                             "(control or vision tokens where the policy writes): check the data's loss mask")
        blocked = outside.nonzero()[:, 0] if outside.any() else None   # ids, not a mask: index_fill_ touches only them
    return _TokenLogprobs.apply(hidden, weight, targets.long(), float(temperature), int(chunk_size),
                                bool(with_entropy), blocked)


# ----------------------------------------------------------------------------------------------
# 5. Sequence log-probs: the model up to its final hidden states, then the kernel


SHARED_PREFIX_SAVING = 0.25   # share a prefix only when that saves this share of the batch's tokens


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class):
    """The keyword a model's forward takes its KV cache by: `cache` in newer transformers (5.24
    warns that `past_key_values` goes in 5.40), `past_key_values` in older ones (5.18)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def lm_forward(lm, cache, **inputs):
    """The language model's forward (policy.model.model) with `cache` (a Cache or None)."""
    return lm(**inputs, **{_cache_keyword(type(lm)): cache})


def shared_prefix_length(batch):
    """Leading columns that are the same text in every row: same tokens, same positions, no image
    (in the agent's chat format: the system prompt). 0 unless running them once instead of per row
    saves SHARED_PREFIX_SAVING of the batch's tokens: the rows' rest then attends over a cache with
    a mask (a cache offset rules out SDPA's is_causal path, which skips the masked-out half), so a
    small saving costs more than it brings (on the toy world's SFT batches, 125 shared tokens: rows of
    ~200 tokens 0.39 -> 0.23 s forward + backward, rows of ~600 even, rows of ~1000 0.34 -> 0.44 s)."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    B, L = ids.shape
    differs = (ids != ids[:1]).any(0) | (pos != pos[:, :1]).any(1).any(0) | batch["mm_token_type_ids"].bool().any(0)
    differs[-1] = True   # leave at least one column to run per row
    n = int(differs.int().argmax())
    return n if (B - 1) * n >= SHARED_PREFIX_SAVING * B * L else 0


def final_hidden_states(policy, batch):
    """Run the language model (with the vision tower) up to the final norm: (B, L, H).

    The rows' shared prefix (shared_prefix_length) runs once, as one row, and every row's rest
    attends to its keys and values: the same states, without computing the system prompt B times.
    Its gradient is the sum over the rows: autograd sums over the repeat.
    No attention mask: collate pads on the right, and under causal attention a real token never
    sees the padding after it, so only the pads' own (unused) states change; without a prefix SDPA
    then takes its is_causal path (a fifth less time per toy SFT step; FlashAttention on a GPU).
    Positions come from collate's padding-aware position_ids."""
    from transformers import DynamicCache

    lm, P = policy.model.model, shared_prefix_length(batch)
    cache, prefix = None, None
    if P:
        cache = DynamicCache()
        prefix = lm_forward(lm, cache, input_ids=batch["input_ids"][:1, :P],
                            position_ids=batch["position_ids"][:, :1, :P], use_cache=True).last_hidden_state
        cache.batch_repeat_interleave(batch["input_ids"].shape[0])
    out = lm_forward(lm, cache, input_ids=batch["input_ids"][:, P:], attention_mask=None,
                     position_ids=batch["position_ids"][:, :, P:], pixel_values=batch["pixel_values"],
                     image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"][:, P:],
                     use_cache=P > 0)
    if not P:
        return out.last_hidden_state
    return torch.cat([prefix.expand(out.last_hidden_state.shape[0], -1, -1), out.last_hidden_state], dim=1)


def sequence_logprobs(policy, batch, temperature=1.0, with_entropy=False):
    """Per-token log-probs of a collated batch, computed only where loss_mask is 1, under the
    policy's sampling distribution (softmax over Policy.sample_mask, the one the rollout samples from).

    Returns logp (B, L) float32 with logp[b, t] = log p(token t | tokens < t) at positions where
    loss_mask[b, t] == 1 and 0 elsewhere (so it lines up with loss_mask), and the entropy (B, L)
    of the distribution token t was drawn from (or None)."""
    hidden = final_hidden_states(policy, batch)                     # (B, L, H)
    mask = batch["loss_mask"][:, 1:].bool()                         # predict token t+1 from t
    h = hidden[:, :-1][mask]                                        # (N, H)
    targets = batch["input_ids"][:, 1:][mask]                       # (N,)
    weight = policy.model.get_output_embeddings().weight            # (V, H)
    out = token_logprobs(h, weight, targets, temperature, with_entropy=with_entropy, vocab_mask=policy.sample_mask)
    logp_n, ent_n = out if with_entropy else (out, None)
    B, L = batch["input_ids"].shape
    logp = hidden.new_zeros((B, L), dtype=torch.float32)
    logp[:, 1:][mask] = logp_n.float()
    ent = None
    if with_entropy:
        ent = hidden.new_zeros((B, L), dtype=torch.float32)
        ent[:, 1:][mask] = ent_n.float()
    return logp, ent


# ----------------------------------------------------------------------------------------------
# 6. The multi-turn rollout loop
#
# Our own decoding over model.forward with a KV cache, in calling order:
#   rollout -> run_turn -> prefill (new tokens of every row, batched) -> decode_one_token (repeat)
#           -> _after_turn (finish, or run every row's calls concurrently and add_tool_results)
#
# Each row (one sample of one task) keeps its own keys/values between turns, with no holes. A
# phase of the loop stacks the active rows into one batch cache, left-padding shorter rows (the
# padding is masked out); a new segment is right-padded. Positions are passed explicitly, so
# padding never shifts a row's rotary positions. Rows that end their turn are split off at once
# and stop costing compute. Only tokens not yet in a row's cache are ever run through the model:
# the prompt once, then per turn the closing <|im_end|>, the tool response and the next header.

FINISH_REASONS = ("answer", "no_answer", "max_turns", "max_context", "max_images", "truncated",
                  "repetition", "tool_errors")
OVER_TURN = ("max_turns", "max_context", "max_images")   # stopped by a budget while still working


@dataclass
class Row:
    """Rollout state of one trajectory: what its KV cache holds and where its positions are."""
    traj: Trajectory
    task: dict
    kv: list | None = None        # per layer (keys, values), each (1, heads, n_cached, head_dim)
    n_cached: int = 0             # tokens of traj.input_ids whose keys/values are in kv
    n_images_cached: int = 0      # images of traj.image_inputs whose tokens are in kv
    next_pos: int = 0             # rotary position of the next token
    tool_failures: int = 0        # consecutive turns whose calls all failed
    turn_tokens: list = field(default_factory=list)
    turn_logprobs: list = field(default_factory=list)
    turn_end: str | None = None   # "im_end" | "length" | "repetition" | "max_context" | "forced"
    stats: dict = field(default_factory=lambda: {"generated_tokens": 0, "prefill_tokens": 0,
                                                 "tool_calls": Counter(), "tool_errors": Counter()})


@functools.cache   # one class, built on first use (transformers is imported lazily)
def _roomy_layer_class():
    """transformers' DynamicLayer, but its keys and values are views into buffers with room for
    more tokens: a decoded token is written into the room instead of concatenated (which copies
    the whole cache of every layer for every token: a tenth of a tiny model's rollout). A layer
    whose tensors were replaced (rows split off, padding trimmed) gets a new buffer on its next
    update."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, new = self.get_seq_length(), key_states.shape[-2]
            buf = getattr(self, "room", None)
            if (buf is None or n + new > buf[0].shape[-2] or buf[0].shape[:2] != key_states.shape[:2]
                    or (n and self.keys.data_ptr() != buf[0].data_ptr())):
                B, H, _, D = key_states.shape
                size = n + new + 64 + n // 8   # room for the rest of a turn, grown as it goes
                buf = (key_states.new_empty((B, H, size, D)), value_states.new_empty((B, H, size, D)))
                if n:
                    buf[0][:, :, :n], buf[1][:, :, :n] = self.keys, self.values
                self.room = buf
            buf[0][:, :, n:n + new], buf[1][:, :, n:n + new] = key_states, value_states
            self.keys, self.values = buf[0][:, :, :n + new], buf[1][:, :, :n + new]
            return self.keys, self.values

    return RoomyLayer


class KVBatch:
    """The rows decoding together: one cache (B, heads, T, head_dim) and its validity mask."""

    def __init__(self, rows, device):
        from transformers.cache_utils import Cache
        layer_class = _roomy_layer_class()
        self.rows = rows
        T = max(r.n_cached for r in rows)
        self.mask = torch.zeros((len(rows), T), dtype=torch.long, device=device)
        layers = []
        if T > 0:
            n_layers = len(rows[0].kv)
            for layer in range(n_layers):
                k0, v0 = rows[0].kv[layer]
                k = k0.new_zeros((len(rows), k0.shape[1], T, k0.shape[3]))
                v = v0.new_zeros((len(rows), v0.shape[1], T, v0.shape[3]))
                for b, r in enumerate(rows):              # left-pad: a row's tokens end at T
                    k[b, :, T - r.n_cached:] = r.kv[layer][0][0]
                    v[b, :, T - r.n_cached:] = r.kv[layer][1][0]
                layer = layer_class()
                layer.update(k, v)
                layers.append(layer)
        for b, r in enumerate(rows):
            self.mask[b, T - r.n_cached:] = 1
            r.kv = None   # the batch holds them now (split_off hands each row its own back): one copy, not two
        self.cache = Cache(layers=layers) if layers else Cache(layer_class_to_replicate=layer_class)

    def split_off(self, done):
        """Move rows `done` (batch indices) out: each gets its own keys/values without padding."""
        if not done:
            return
        kvs = [(layer.keys, layer.values) for layer in self.cache.layers]
        for b in done:
            valid = self.mask[b].bool()
            # boolean indexing copies: each row gets tensors of its own (no .clone(), a second copy)
            self.rows[b].kv = [(k[b:b + 1, :, valid], v[b:b + 1, :, valid]) for k, v in kvs]
        gone = set(done)
        keep = [b for b in range(len(self.rows)) if b not in gone]
        self.rows = [self.rows[b] for b in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask[index]
        self.cache.batch_select_indices(index)
        lead = int(self.mask.argmax(1).min()) if keep else 0   # columns that are padding in every row left
        if lead:   # drop them: rows that shared a batch with a longer row stop attending over its padding
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]


def repeats_itself(tokens, max_n=16, min_repeats=4, min_span=48):
    """True when the tail of `tokens` is one n-gram (n <= max_n) repeated: at least
    `min_repeats` times and over at least `min_span` tokens. A model stuck in a loop."""
    for n in range(1, max_n + 1):
        span = max(n * min_repeats, min_span)
        if len(tokens) >= span and tokens[-span:-n] == tokens[-span + n:]:
            return True
    return False


def check_sampling(temperature, top_p, top_k):
    """ValueError naming each setting `sample` cannot use: temperature < 0, top_p outside (0, 1], top_k < 0."""
    rules = [(temperature >= 0, f"temperature {temperature}: 0 is greedy, else above 0"),
             (0 < top_p <= 1, f"top_p {top_p}: the nucleus mass lies in (0, 1]"),
             (top_k >= 0, f"top_k {top_k}: 0 is off, else the number of ids kept")]
    bad = [why for ok, why in rules if not ok]
    if bad:
        raise ValueError("sampling: " + "; ".join(bad))


def sample(logits, temperature, top_p, generator, mask=None, top_k=0):
    """Sample one token per row from (B, V) logits, only among the ids where `mask` (V,) is True.
    Returns tokens (B,) and their float32 log-probs under the temperature-scaled distribution
    restricted to `mask` (before top-k/top-p truncation): the distribution that
    sequence_logprobs(..., temperature) recomputes. Temperature 0 is greedy (log-probs at T = 1)."""
    logits = logits.float()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    if top_k and top_k < probs.shape[-1]:   # keep the k most likely ids
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:   # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        probs = probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def _segment_positions(policy, row):
    """Rotary positions (3, n) of the row's uncached tokens, and the next free position: the
    positions get_rope_index gives over the whole sequence (DESIGN.md), computed for the segment
    alone. Every span's positions count on from the largest one before it, so the segment's are
    its own get_rope_index (which counts from 0) shifted by row.next_pos; a text-only segment is
    a plain range. This saves re-indexing the whole history every turn."""
    start, seg = row.next_pos, row.traj.input_ids[row.n_cached:]
    images = row.traj.image_inputs[row.n_images_cached:]
    if not images:
        return torch.arange(start, start + len(seg)).expand(3, -1), start + len(seg)
    pos = rope_positions(policy, seg, images)
    return pos + start, start + int(pos.max()) + 1


def _lm_head(policy, hidden):
    return policy.model.get_output_embeddings()(hidden)


@torch.no_grad()
def prefill(policy, rows, temperature):
    """Run every row's uncached tokens (prompt, or tool response + header, plus any forced
    assistant text) through the model in one batch. Returns the KVBatch and the (B, V) logits at
    each row's last token. Forced tokens get their log-probs from these logits (teacher forcing)."""
    batch = KVBatch(rows, policy.device)
    segs = [r.traj.input_ids[r.n_cached:] for r in rows]
    B, n = len(rows), max(len(s) for s in segs)
    ids = torch.full((B, n), policy.ids["endoftext"], dtype=torch.long)
    seg_mask = torch.zeros((B, n), dtype=torch.long)
    positions = torch.zeros((3, B, n), dtype=torch.long)
    pixels, grids = [], []
    for b, (r, seg) in enumerate(zip(rows, segs)):
        ids[b, :len(seg)] = torch.tensor(seg)
        seg_mask[b, :len(seg)] = 1
        pos, r.next_pos = _segment_positions(policy, r)
        positions[:, b, :len(seg)] = pos
        new_images = r.traj.image_inputs[r.n_images_cached:]   # arrived since the last prefill
        pixels += [pv for pv, _ in new_images]
        grids += [g for _, g in new_images]
        r.stats["prefill_tokens"] += len(seg)
    dev = policy.device
    batch.mask = torch.cat([batch.mask, seg_mask.to(dev)], dim=1)
    out = lm_forward(
        policy.model.model, batch.cache, input_ids=ids.to(dev), attention_mask=batch.mask,
        position_ids=positions.to(dev), use_cache=True,
        pixel_values=torch.cat(pixels).to(dev) if pixels else None,
        image_grid_thw=torch.stack(grids).to(dev) if grids else None)
    hidden = out.last_hidden_state                                       # (B, n, H)
    last = torch.tensor([len(s) - 1 for s in segs], device=dev)
    logits = _lm_head(policy, hidden[torch.arange(B, device=dev), last])  # (B, V)
    for b, r in enumerate(rows):
        if r.turn_end == "forced":   # log p(token i) comes from the hidden state at i - 1
            forced = range(len(r.traj.input_ids) - len(r.turn_tokens), len(r.traj.input_ids))
            at = torch.tensor([i - 1 - r.n_cached for i in forced], device=dev)
            z = _lm_head(policy, hidden[b, at]).float().masked_fill(~policy.sample_mask, float("-inf"))
            t = torch.tensor([r.traj.input_ids[i] for i in forced], device=dev)
            lp = torch.log_softmax(z / (temperature or 1.0), -1).gather(1, t[:, None])[:, 0]
            for i, v in zip(forced, lp.tolist()):
                r.traj.logprobs[i] = v
        r.n_cached, r.n_images_cached = len(r.traj.input_ids), len(r.traj.image_inputs)
    return batch, logits


@torch.no_grad()
def decode_one_token(policy, batch, tokens):
    """Feed one token per row (B,), append it to the cache; returns the next (B, V) logits."""
    dev = policy.device
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
    pos = torch.tensor([r.next_pos for r in batch.rows], device=dev).view(1, -1, 1).expand(3, -1, 1)
    mask = None if batch.mask.all() else batch.mask   # no padding: no mask to build, SDPA's unmasked path
    out = lm_forward(policy.model.model, batch.cache, input_ids=tokens.view(-1, 1).to(dev), attention_mask=mask,
                     position_ids=pos, use_cache=True)
    for r in batch.rows:
        r.next_pos += 1
    return _lm_head(policy, out.last_hidden_state[:, -1])


def run_turn(policy, rows, limits, generator, score_forced=True):
    """One assistant turn for `rows`: prefill, then sample until every row has ended its turn."""
    if not score_forced and all(r.turn_end == "forced" for r in rows):
        return   # nothing to sample and no log-probs wanted: no forward pass (the next prefill takes these tokens)
    batch, logits = prefill(policy, rows, limits["temperature"])
    live = [r.turn_end is None for r in batch.rows]   # forced rows are already done
    batch.split_off([b for b, alive in enumerate(live) if not alive])
    logits = logits[torch.tensor(live, device=logits.device)] if not all(live) else logits
    eos = policy.eos_ids
    while batch.rows:
        tokens, logp = sample(logits, limits["temperature"], limits["top_p"], generator, policy.sample_mask,
                              limits["top_k"])
        done = []
        for b, (r, t, lp) in enumerate(zip(batch.rows, tokens.tolist(), logp.tolist())):
            r.turn_tokens.append(t)
            r.turn_logprobs.append(lp)
            r.stats["generated_tokens"] += 1
            if t in eos:
                r.turn_end = "im_end"
            elif len(r.turn_tokens) >= limits["max_new_tokens"]:
                r.turn_end = "length"
            elif r.n_cached + len(r.turn_tokens) >= limits["max_context"]:
                r.turn_end = "max_context"
            elif repeats_itself(r.turn_tokens):
                r.turn_end = "repetition"
            if r.turn_end:
                done.append(b)
        keep = [b for b in range(len(batch.rows)) if b not in done]
        batch.split_off(done)
        if not batch.rows:
            break
        logits = decode_one_token(policy, batch, tokens[torch.tensor(keep, device=tokens.device)])
    # append the sampled tokens; all but the last went through the model, so they are cached
    for r in rows:
        if r.turn_end != "forced":
            last_fed = len(r.turn_tokens) - 1
            r.traj.append(r.turn_tokens, 1, r.turn_logprobs)
            r.n_cached += last_fed


def _copy_prompt(traj):
    """A fresh trajectory with traj's prompt: its own lists, the (never modified) images shared."""
    return Trajectory(input_ids=list(traj.input_ids), loss_mask=list(traj.loss_mask), logprobs=list(traj.logprobs),
                      images=list(traj.images), image_inputs=list(traj.image_inputs), messages=list(traj.messages),
                      id=traj.id)


def _end(row, reason):
    row.traj.finish_reason = reason
    row.traj.meta["over_turn"] = reason in OVER_TURN
    row.kv = None   # free the cache


def rollout(policy, tasks, toolbox, n=1, max_turns=6, max_new_tokens=512, max_context=8192, max_images=8,
            temperature=1.0, top_p=1.0, top_k=0, seed=0, max_batch=16, max_tool_failures=3, forced=None,
            score_forced=True, system=None, progress=True):
    """Sample `n` multi-turn trajectories per task, all rows decoding together.

    tasks: dicts with `image` (path(s) or PIL images), `question`, `id`. toolbox: a tools.Toolbox
    (or anything with `run(calls, images, parse_errors) -> Observation`).
    Limits: max_turns (assistant turns), max_new_tokens (per turn), max_context (tokens),
    max_images (question images plus crops), max_batch (rows decoding at once: bounds memory),
    max_tool_failures (consecutive turns whose calls all failed).
    Sampling: temperature (0 = greedy), top_p, top_k (0 = off), always restricted to the ids in
    policy.sample_mask (text, the policy's tags, <|im_end|>): never a vision or control token.
    forced: optional callable (task, turn) -> assistant text or None; forced text is scored by
    the model (its log-probs recorded) instead of sampled. For tests and oracle trajectories;
    score_forced=False skips the model on turns where every row is forced (no log-probs recorded).
    Returns trajectories in task order (n per task), each with finish_reason, tool_calls,
    per-token sampling log-probs and meta["stats"], meta["over_turn"]."""
    from tqdm.auto import tqdm

    check_sampling(temperature, top_p, top_k)
    sizes = dict(max_turns=max_turns, max_new_tokens=max_new_tokens, max_context=max_context, max_batch=max_batch)
    bad = [f"{k} {v}" for k, v in sizes.items() if v < 1] + ([f"n {n}"] if n < 0 else [])
    if bad:
        raise ValueError(f"rollout: {', '.join(bad)}: n must be 0 or more, the limits at least 1")
    limits = dict(max_new_tokens=max_new_tokens, max_context=max_context, temperature=temperature, top_p=top_p,
                  top_k=top_k)
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    schemas = getattr(toolbox, "schemas", None)   # the modes this toolbox has are the ones offered
    # each task's prompt built once (its images processed once), then copied for its n samples
    prompts = [new_trajectory(policy, task, system, schemas) for task in tasks]
    rows = [Row(_copy_prompt(prompt), task) for prompt, task in zip(prompts, tasks) for _ in range(n)]
    left = Counter(i // n for i in range(len(rows)))
    bar = tqdm(total=len(tasks), desc="rollout", unit="task", disable=not progress)
    header = [policy.ids["im_start"]] + policy.encode_text("assistant\n")
    for start in range(0, len(rows), max_batch):
        group = rows[start:start + max_batch]
        t0 = time.time()
        active = list(group)
        for r in active:
            if len(r.traj.images) > max_images:
                _end(r, "max_images")
            elif len(r.traj.input_ids) + len(header) >= max_context:
                _end(r, "max_context")
        active = [r for r in active if r.traj.finish_reason is None]
        turn = 0
        while active:
            for r in active:   # the assistant header, then forced text if any
                r.traj.append(header, 0)
                r.turn_tokens, r.turn_logprobs, r.turn_end = [], [], None
                text = forced(r.task, turn) if forced else None
                if text is not None:
                    ids = encode_assistant(policy, text) + [policy.ids["im_end"]]
                    r.traj.append(ids, 1)
                    r.turn_tokens, r.turn_end = ids, "forced"
            run_turn(policy, active, limits, generator, score_forced)
            turn += 1
            for r in active:
                r.traj.turns = turn
                if r.turn_end in ("im_end", "forced"):
                    r.traj.append(policy.encode_text("\n"), 0)
            active = _after_turn(policy, active, toolbox, turn, max_turns, max_images, max_context,
                                 max_tool_failures, header)
        dt = time.time() - t0
        for i, r in enumerate(group, start):
            r.traj.meta["stats"] = {**r.stats, "tool_calls": dict(r.stats["tool_calls"]),
                                    "tool_errors": dict(r.stats["tool_errors"]), "wall_time": dt}
            left[i // n] -= 1
            bar.update(left[i // n] == 0)
    bar.close()
    return [r.traj for r in rows]


def _after_turn(policy, rows, toolbox, turn, max_turns, max_images, max_context, max_tool_failures, header):
    """Read each row's turn: finish it, or run its tool calls and append the tool response.
    Every row's calls of this turn run concurrently. Returns the rows that go on."""
    from concurrent.futures import ThreadPoolExecutor

    from tools import parse_tool_calls

    work = []
    for r in rows:
        body = [t for t in r.turn_tokens if t not in policy.eos_ids]
        text = policy.tokenizer.decode(body, skip_special_tokens=False)
        r.traj.messages.append({"role": "assistant", "content": text})
        calls, errors = parse_tool_calls(text)
        if r.turn_end in ("length", "repetition", "max_context"):
            _end(r, {"length": "truncated"}.get(r.turn_end, r.turn_end))
        elif "<answer>" in text:
            _end(r, "answer")
        elif not calls and not errors:
            _end(r, "no_answer")
        elif turn >= max_turns:
            _end(r, "max_turns")
        else:
            work.append((r, calls, errors))
    if not work:
        return []
    with ThreadPoolExecutor(max_workers=len(work)) as pool:
        observations = list(pool.map(lambda w: toolbox.run(w[1], list(w[0].traj.images), w[2]), work))
    going = []
    for (r, calls, errors), obs in zip(work, observations):
        for res in obs.results:
            r.stats["tool_calls"][res["name"]] += 1
            r.stats["tool_errors"][res["name"]] += not res["ok"]
            r.traj.tool_calls.append({"turn": turn, **res})
        n_tried = len(calls) + len(errors)
        r.tool_failures = r.tool_failures + 1 if obs.errors >= n_tried else 0
        if r.tool_failures >= max_tool_failures:
            _end(r, "tool_errors")
        elif len(r.traj.images) + len(obs.images) > max_images:
            _end(r, "max_images")
        else:
            add_tool_results(policy, r.traj, obs.responses, obs.images)
            if len(r.traj.input_ids) + len(header) + 1 >= max_context:
                _end(r, "max_context")
            else:
                going.append(r)
    return going


# ----------------------------------------------------------------------------------------------
# 7. Rewards: answer matching, an LLM judge, and the reward of a trajectory

ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}


def normalize_answer(text):
    """Lower-case; numbers unified ("1,000" -> "1000", "3.50" -> "3.5", "five" -> "5"); punctuation,
    articles and extra whitespace removed."""
    import re
    import string
    text = str(text).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)                                 # 1,000 -> 1000
    text = re.sub(r"\b(\d+)\.(\d*?)0+\b", lambda m: m.group(1) + ("." + m.group(2) if m.group(2) else ""), text)
    text = re.sub(r"(?<=\d)\.(?!\d)", " ", text)                                    # "1889." -> "1889 "
    text = re.sub(r"(?<=\w)\.(?=\w)(?!\d)", "", text)                               # "u.s.a" -> "usa"
    text = "".join(" " if (c in string.punctuation and c != ".") else c for c in text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)                                  # keep decimal points only
    tokens = [NUMBER_WORDS.get(t, t) for t in text.split()]
    return " ".join([t for t in tokens if t not in ARTICLES] or tokens)   # "A" alone is an option letter


def _answer_list(answers):
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(pred, answers):
    """1.0 if the normalized prediction equals any normalized answer, else 0.0."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(a) for a in _answer_list(answers)))


def substring_match(pred, answers):
    """1.0 if any normalized answer appears in the normalized prediction (on word boundaries)."""
    p = f" {normalize_answer(pred)} "
    return float(any(normalize_answer(a) and f" {normalize_answer(a)} " in p for a in _answer_list(answers)))


def f1(pred, answers):
    """Token F1 between prediction and answer, the best over the answers."""
    p = normalize_answer(pred).split()
    best = 0.0
    for a in _answer_list(answers):
        g = normalize_answer(a).split()
        common = sum((Counter(p) & Counter(g)).values())
        if common:
            precision, recall = common / len(p), common / len(g)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def first_number(text):
    """The first number in `text` ("1,889" -> 1889.0), or None."""
    import re
    m = re.search(r"-?\d+(?:\.\d+)?", re.sub(r"(?<=\d),(?=\d{3}\b)", "", str(text)))
    return float(m.group()) if m else None


def numeric_match(pred, answers, ranges=()):
    """InfoSeek's numeric scoring: a number is right within 10% of a numeric answer (or inside one
    of its `ranges`, [low, high]); anything else falls back to exact match."""
    import re
    p = first_number(pred)
    if p is not None:
        if any(low <= p <= high for low, high in ranges):
            return 1.0
        for a in _answer_list(answers):
            if re.fullmatch(r"-?\d+(\.\d+)?", normalize_answer(a)) and abs(p - float(normalize_answer(a))) <= 0.1 * abs(float(normalize_answer(a))):
                return 1.0
    return exact_match(pred, answers)


def token_recall(pred, answers):
    """Share of the answer's tokens found in the prediction, the best over the answers (DynVQA)."""
    p = Counter(normalize_answer(pred).split())
    best = 0.0
    for a in _answer_list(answers):
        g = Counter(normalize_answer(a).split())
        if g:
            best = max(best, sum((p & g).values()) / sum(g.values()))
    return best


def choice_letter(pred, options):
    """The option a prediction names: its letter ("B", "(B)", "B. Paris") or an option's text.
    Without `options`, any letter A-H."""
    import re
    m = re.match(r"^\s*\(?([A-H])\b\)?(?:[.):,]|\s|$)", str(pred))
    if m and (not options or m.group(1) in options):
        return m.group(1)
    return next((L for L, text in options.items() if normalize_answer(text) == normalize_answer(pred)), None)


def choice_match(pred, answers, options):
    """1.0 if the prediction names (by letter or by text) an option whose letter is an answer."""
    return float(choice_letter(pred, options) in _answer_list(answers))


def extract_answer(text):
    """The content of the last <answer>...</answer> in `text`, or None."""
    import re
    found = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return found[-1].strip() if found else None


class JudgeEndpoint(tools.ChatEndpoint):
    """The judge's OpenAI-compatible endpoint (vLLM, Ollama, OpenAI...). Empty fields fall back to
    $JUDGE_BASE_URL, $JUDGE_MODEL, $JUDGE_API_KEY."""
    env = "JUDGE"
    flags = "--judge-url and --judge-model"


JUDGE_PROMPT = """You grade answers to questions about images. Decide whether the predicted answer
means the same as one of the reference answers. Accept aliases, synonyms, other spellings and
transliterations of the same entity, and extra detail that does not contradict the reference.
For numbers, accept small rounding differences (within 1%) and other units or formats of the
same value. Reject an answer that is vaguer than the reference, names a different entity, or hedges
between several answers.

Question: {question}
Reference answers: {answers}
Predicted answer: {pred}

Reply with exactly one word on the last line: CORRECT or INCORRECT."""


def parse_verdict(text):
    """1.0 / 0.0 from a judge reply whose last non-empty line is CORRECT or INCORRECT (optionally
    bold or followed by a full stop); None for anything else."""
    import re
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return None
    m = re.fullmatch(r"(?:verdict:\s*)?\**\s*(CORRECT|INCORRECT)\s*\**\.?", lines[-1], re.IGNORECASE)
    return None if m is None else float(m.group(1).upper() == "CORRECT")


def judge(question, pred, answers, endpoint, cache=None):
    """An LLM's verdict on `pred`: 1.0 correct, 0.0 incorrect, None when the judge could not
    answer (unreachable, malformed reply): unscorable, never silently 0. Cached in the tool cache."""
    if pred is None or not str(pred).strip():
        return 0.0
    prompt = JUDGE_PROMPT.format(question=question, answers=json.dumps(_answer_list(answers), ensure_ascii=False),
                                 pred=pred)

    def ask():
        content = endpoint.complete(prompt)
        verdict = parse_verdict(content)
        if verdict is None:
            raise tools.ToolError(f"judge reply is not CORRECT/INCORRECT: {str(content)[-80:]!r}")
        return verdict
    try:
        if cache is None:
            return ask()
        return cache.fetch(tools.Cache.key(endpoint.name, "judge", prompt), ask)
    except tools.ToolError:
        return None


def format_ok(traj):
    """The format check: every assistant turn before the last made tool calls (and parsed cleanly);
    the last holds exactly one <answer>...</answer>; <think> tags are balanced."""
    from tools import parse_tool_calls
    turns = [m["content"] for m in traj.messages if m["role"] == "assistant"]
    if not turns or any(not isinstance(t, str) for t in turns):
        return 0.0
    for text in turns:
        if text.count("<think>") != text.count("</think>"):
            return 0.0
    for text in turns[:-1]:
        calls, errors = parse_tool_calls(text)
        if not calls or errors or "<answer>" in text:
            return 0.0
    last = turns[-1]
    return float(last.count("<answer>") == 1 and last.count("</answer>") == 1 and "<tool_call>" not in last)


METRICS = ("em", "f1", "substring", "judge", "numeric", "recall", "choice")


def reward(traj, task, metric="em", format_weight=0.1, search_penalty=0.0, endpoint=None, cache=None):
    """(value, parts) for a finished trajectory.

    value = (1 - format_weight) * correct * (1 - search_penalty * searched) + format_weight * format
    (DeepMMSearch-R1: format_weight 0.1 with an LLM judge; MMSearch-R1: 0.9 EM + 0.1 format and a
    10% penalty on correct answers that searched). metric: one of METRICS; a multiple-choice task
    (with `options`) is scored by its letter whatever the metric but "judge".
    With the judge unable to answer, value and parts["correct"] are None (unscorable)."""
    last = next((m["content"] for m in reversed(traj.messages) if m["role"] == "assistant"), "")
    pred = extract_answer(last) if isinstance(last, str) else None
    answers = task.get("answers", [])
    if pred is None:
        correct = 0.0
    elif task.get("options") and metric != "judge":   # multiple choice: the letter decides
        correct = choice_match(pred, answers, task["options"])
    elif metric == "choice":   # options only in the question text (V* Bench): the letter still decides
        correct = choice_match(pred, [a.strip("() .").upper() for a in _answer_list(answers)], {})
    elif metric == "numeric":
        correct = numeric_match(pred, answers, task.get("answer_ranges", ()))
    elif metric == "recall":
        correct = token_recall(pred, answers)
    elif metric == "em":
        correct = exact_match(pred, answers)
    elif metric == "f1":
        correct = f1(pred, answers)
    elif metric == "substring":
        correct = substring_match(pred, answers)
    elif metric == "judge":
        if endpoint is None:
            raise ValueError("reward(metric='judge') needs endpoint=JudgeEndpoint(...)")
        correct = judge(task["question"], pred, answers, endpoint, cache)
    else:
        raise ValueError(f"unknown metric {metric!r}: use {', '.join(METRICS)}")
    searched = any(c["name"] in ("image_search", "text_search", "visit") for c in traj.tool_calls)
    fmt = format_ok(traj)
    parts = {"answer": pred, "correct": correct, "format": fmt, "searched": searched}
    if correct is None:
        return None, parts
    value = (1 - format_weight) * correct * (1 - search_penalty * searched) + format_weight * fmt
    return value, parts


# ----------------------------------------------------------------------------------------------
# 8. Agent evaluation: roll out, score, summarize, report (eval.py, and the trainers' periodic evals)

# Benchmarks ship their records with many names for the same fields. A record's fields are looked
# up at its top level, then one level down in nested objects (LiveVQA's `level1_qa.question`,
# FVQA's `reward_model.ground_truth`). The question and image are the first key present; the
# answers are merged from every answer key present.
ID_KEYS = ("id", "qid", "question_id", "data_id", "doc_id", "idx", "sample_id", "index")
QUESTION_KEYS = ("question", "query", "prompt", "problem", "q", "text")
ANSWER_KEYS = ("answers", "answer", "answer_eval", "candidate_answers", "alternative_gt_answers",
               "Ground_Truth_List", "solution", "gold", "gold_answer", "label", "ground_truth", "target")
IMAGE_KEYS = ("images", "image", "image_path", "image_file", "img", "img_path", "image_url", "file_path", "image_id")
OPTION_KEYS = ("options", "choices")
LETTERS = "ABCDEFGH"


def record_values(record, keys):
    """[(key, value)] of `keys` present (not None, "" or []) in the record or one level down."""
    found = []
    for scope in [record] + [v for v in record.values() if isinstance(v, dict)]:
        found += [(k, scope[k]) for k in keys if k in scope and scope[k] is not None and scope[k] != "" and scope[k] != []]
    return found


def question_text(value):
    """A record's question: text, or a chat list whose user turns hold it (FVQA, MMSearch parquet)."""
    import re
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        parts = []
        for m in value:
            if m.get("role", "user") != "user":
                continue
            content = m.get("content")
            parts += [content] if isinstance(content, str) else \
                [c.get("text", "") for c in content or [] if isinstance(c, dict) and c.get("type") == "text"]
        value = re.sub(r"<image>", "", "\n".join(parts)).strip() or None
    if not isinstance(value, str):
        raise ValueError(f"the question is a {type(value).__name__}, not text")
    return value


def decode_image(value):
    """An image given inline: raw bytes, a base64 string (or data: URI), or {"bytes": ...} -> PIL."""
    import base64
    import io
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, str):
        try:
            value = base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value, validate=True)
        except ValueError:
            raise ValueError("an inline image that is not valid base64") from None
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"an inline image must be bytes or base64 text, got {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(value)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"an inline image of {im.width}x{im.height} is larger than {MAX_IMAGE_PIXELS} pixels")
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError):
        raise ValueError("an inline image that is not a readable PNG/JPEG") from None


def looks_like_base64(text):
    """An image written inline as text: a data: URI, or base64 of a PNG/JPEG/GIF/WebP file."""
    import re
    return text.startswith(("data:image/", "iVBOR", "/9j/", "R0lGOD", "UklGR")) or \
        (len(text) > 256 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", text) is not None)


def answer_list(values):
    """(answers, ranges) from every answer field present: strings, numbers, lists of them, and
    InfoSeek's numeric {"wikidata": value, "range": [low, high]}. Anything else is an error."""
    answers, ranges = [], []
    for key, value in values:
        if isinstance(value, str) and "<answer>" in value:   # a `solution` written as the model would
            value = extract_answer(value) or value
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, dict) and "wikidata" in v:
                answers.append(str(v["wikidata"]))
                if isinstance(v.get("range"), list) and len(v["range"]) == 2:
                    ranges.append([float(v["range"][0]), float(v["range"][1])])
            elif isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip():
                answers.append(str(v).strip())
            elif v not in (None, ""):
                raise ValueError(f"the answers under {key!r} hold a {type(v).__name__}; expected text or a list of texts")
    return list(dict.fromkeys(answers)), ranges


def multiple_choice(record, question, answers):
    """Options from keys A..H or an `options`/`choices` list (or letter->text dict): the question
    with its options appended, the options {letter: text}, and the answers as letters."""
    options = {L: str(record[L]).strip() for L in LETTERS if isinstance(record.get(L), (str, int, float))
               and str(record[L]).strip() and str(record[L]) != "nan"}
    listed = record_values(record, OPTION_KEYS)
    if not options and listed:
        value = listed[0][1]
        options = {str(k).upper(): str(v) for k, v in value.items()} if isinstance(value, dict) else \
            {LETTERS[i]: str(v) for i, v in enumerate(value[:len(LETTERS)])} if isinstance(value, list) else {}
    if len(options) < 2:
        return question, None, answers
    letters = []
    for a in answers:
        letter = a.strip().strip("().").upper()
        match = letter if letter in options else next(
            (L for L, text in options.items() if normalize_answer(text) == normalize_answer(a)), None)
        if match:
            letters.append(match)
    if not letters:
        raise ValueError(f"a multiple-choice record whose answer {answers[0]!r} is neither an option letter "
                         f"({', '.join(options)}) nor an option's text")
    shown = "\n".join(f"{L}. {text}" for L, text in options.items())
    return f"{question}\n\nOptions:\n{shown}\nAnswer with the option's letter.", options, list(dict.fromkeys(letters))


def read_tasks(path, who, allow_no_image=False):
    """A task JSONL read as eval.py reads benchmarks (task_from_record), for the trainers' training
    and periodic-eval tasks: a bad record stops the run before training, naming its line."""
    tasks = []
    with stop_on_bad_input(who):
        rows = load_jsonl(path)
    for row in rows:
        try:
            tasks.append(task_from_record(row, row["_root"], allow_no_image=allow_no_image,
                                          default_id=str(row["_line"])))
        except ValueError as e:
            raise SystemExit(f"{who}: {path} line {row['_line']}: {e}") from None
    return tasks


def task_from_record(record, root, image_root=None, image_ext=None, allow_no_image=False, inline_dir=None,
                     fetch=None, default_id=None):
    """A benchmark record -> our task {id, question, answers, image, _root, [options], [answer_ranges]}
    (its other keys kept), or a ValueError saying which key is wrong and what to do.
    Image paths are relative to `image_root` (default `root`, the data file's folder), `image_ext`
    appended to a bare id; inline images (base64, {"bytes"}) are written under `inline_dir`; an
    image URL is downloaded by `fetch(url) -> bytes` into `inline_dir`, or is an error without it.
    default_id: the id of a record that has none (its line number)."""
    found = record_values(record, QUESTION_KEYS)
    if not found:
        raise ValueError(f"no question (keys tried: {', '.join(QUESTION_KEYS)}, also one level down)")
    question = question_text(found[0][1])
    answers, ranges = answer_list(record_values(record, ANSWER_KEYS))
    if not answers:
        raise ValueError(f"no answers (keys tried: {', '.join(ANSWER_KEYS)}); a task needs at least one to be scored")
    question, options, answers = multiple_choice(record, question, answers)
    rid = record_values(record, ID_KEYS)
    task = {k: v for k, v in record.items() if k not in (*QUESTION_KEYS, *ANSWER_KEYS, *IMAGE_KEYS)
            and not isinstance(v, (bytes, bytearray))}
    task.update(id=str(rid[0][1]) if rid else default_id, question=question, answers=answers, _root=str(root))
    if options:
        task["options"] = options
    if ranges:
        task["answer_ranges"] = ranges
    found = record_values(record, IMAGE_KEYS)
    if not found:
        if not allow_no_image:
            raise ValueError(f"no image (keys tried: {', '.join(IMAGE_KEYS)}); a question about an image "
                             "without it scores nothing meaningful (--allow-no-image to run it anyway)")
        task["image"] = []
        return task
    key, value = found[0]
    try:
        task["image"] = [_task_image(v, root, image_root, image_ext, inline_dir, fetch)
                         for v in (value if isinstance(value, list) else [value])]
    except ValueError as e:
        raise ValueError(f"the image under {key!r}: {e}") from None
    return task


def _task_image(v, root, image_root, image_ext, inline_dir, fetch):
    """One image value of a record -> a file path (or a PIL image when inline_dir is None)."""
    import hashlib
    if isinstance(v, dict) and v.get("bytes") is None and v.get("path"):
        v = v["path"]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    saved = Path(inline_dir) / f"{hashlib.sha256(repr(v).encode()).hexdigest()[:16]}.png" if inline_dir else None
    url = isinstance(v, str) and v.startswith(("http://", "https://"))
    if url and (fetch is None or saved is None):
        raise ValueError(f"it is a URL ({v[:80]}); download the images and give --image-root, "
                         "or pass --fetch-images to download them")
    if url or isinstance(v, (bytes, bytearray, dict)) or (isinstance(v, str) and looks_like_base64(v)):
        if saved is not None and saved.exists():   # fetched or decoded on an earlier run
            return str(saved)
        image = decode_image(fetch(v) if url else v)
        if saved is None:
            return image
        saved.parent.mkdir(parents=True, exist_ok=True)
        image.save(saved)
        return str(saved)
    if not isinstance(v, str):
        raise ValueError(f"it is a {type(v).__name__}; expected a path, URL, base64 or bytes")
    path = Path(image_root or root) / v
    if image_ext and not path.suffix:
        path = path.with_name(path.name + (image_ext if image_ext.startswith(".") else "." + image_ext))
    if not path.is_file():
        raise ValueError(f"cannot read image {str(path)!r}: no such file; put the images there, or give "
                         "--image-root FOLDER" + ("" if path.suffix else " and --image-ext jpg"))
    return str(path.resolve())



def score_samples(task, trajs, metric="em", endpoint=None, cache=None, image_dir=None, with_records=True,
                  **reward_kw):
    """One results line for a task's samples: id, question, answers, and per sample the answer,
    correct, reward (and its format part), finish_reason, turns, tool calls, tokens and (with
    with_records) the trajectory record. reward_kw: format_weight, search_penalty."""
    samples = []
    for s, traj in enumerate(trajs):
        traj.id = f"{task['id']}_s{s}"
        value, parts = reward(traj, task, metric=metric, endpoint=endpoint, cache=cache, **reward_kw)
        stats = traj.meta.get("stats", {})
        sample = {"answer": parts["answer"], "correct": parts["correct"], "reward": value,
                  "format": parts["format"], "finish_reason": traj.finish_reason, "turns": traj.turns,
                  "tool_calls": Counter(c["name"] for c in traj.tool_calls),
                  "tool_errors": sum(not c["ok"] for c in traj.tool_calls),
                  "generated_tokens": stats.get("generated_tokens", 0),
                  "prefill_tokens": stats.get("prefill_tokens", 0)}
        if with_records:
            sample["trajectory"] = trajectory_to_record(traj, image_dir=image_dir)
            sample["trajectory"].pop("stats", None)
        samples.append(sample)
    line = {"id": task["id"], "question": task["question"], "answers": task["answers"], "samples": samples}
    return dict(line, type=task["type"]) if "type" in task else line   # a benchmark's question type, for reports


def evaluate(policy, tasks, toolbox, n=1, metric="em", endpoint=None, cache=None, image_dir=None, **rollout_kw):
    """Roll out `n` samples per task and score them: one results line per task (what eval.py
    writes to results.jsonl), with time_s."""
    t0 = time.time()
    trajs = rollout(policy, tasks, toolbox, n=n, **rollout_kw)
    lines = [score_samples(task, trajs[i * n:(i + 1) * n], metric, endpoint, cache, image_dir)
             for i, task in enumerate(tasks)]
    for line in lines:
        line["time_s"] = (time.time() - t0) / max(1, len(tasks))
    return lines


def summarize(results):
    """The numbers of the summary table, from results lines alone (eval.py's results.jsonl)."""
    from tools import TOOL_NAMES
    ok = [r for r in results if "error" not in r]
    wall_time = sum(r.get("time_s", 0.0) for r in ok)
    samples = [s for r in ok for s in r["samples"]]
    scored = [s for s in samples if s["correct"] is not None]
    n = max(1, len(samples))
    gen = sum(s["generated_tokens"] for s in samples)
    return {
        "examples": len(results), "errors": len(results) - len(ok), "samples": len(samples),
        "accuracy (avg@n)": sum(s["correct"] for s in scored) / max(1, len(scored)),
        "pass@n": sum(any((s["correct"] or 0) >= 1.0 for s in r["samples"]) for r in ok) / max(1, len(ok)),
        "unscorable": len(samples) - len(scored),
        "direct-answer rate": sum(s["answer"] is not None and not s["tool_calls"] for s in samples) / n,
        **{f"uses {t}": sum(bool(s["tool_calls"].get(t)) for s in samples) / n for t in TOOL_NAMES},
        "tool calls / example": sum(sum(s["tool_calls"].values()) for s in samples) / n,
        "tool errors": sum(s["tool_errors"] for s in samples),
        "turns": sum(s["turns"] for s in samples) / n,
        "generated tokens": gen / n,
        "finish reasons": dict(Counter(s["finish_reason"] for s in samples)),
        "wall time s": wall_time,
        "tokens / s": gen / wall_time if wall_time > 0 else 0.0,
    }


def image_tag(path):
    """An <img> with the file inlined as base64 (the report is one self-contained file)."""
    import base64
    import html
    p = Path(path)
    try:
        data = base64.b64encode(p.read_bytes()).decode()
    except OSError:
        return f"<em>(missing image {html.escape(str(path))})</em>"
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(p.name)}">'


REPORT_STYLE = """
body {font-family: system-ui, sans-serif; max-width: 1100px; margin: auto; padding: 0 12px}
table {border-collapse: collapse; margin: 4px 0} td {border: 1px solid #ccc; padding: 2px 8px; vertical-align: top}
pre, td, p {white-space: pre-wrap; overflow-wrap: anywhere} pre {margin: 2px 0; font-size: 13px}
details.card {border: 1px solid #999; margin: 6px 0; padding: 4px 8px} summary {cursor: pointer}
.card.correct {border-left: 6px solid #2a2} .card.wrong, .card.error {border-left: 6px solid #c22}
.card.unscorable, .card.partial {border-left: 6px solid #aa2}
.turn {margin: 6px 0; padding: 4px; background: #f6f6f6} .assistant {background: #eef4ff}
img {max-width: 300px; max-height: 300px; border: 1px solid #ccc; vertical-align: top}
#filters select {margin-right: 12px}"""

REPORT_SCRIPT = """
function filterCards() {
  const want = {}; document.querySelectorAll('#filters select').forEach(s => want[s.name] = s.value);
  let shown = 0;
  document.querySelectorAll('details.card').forEach(c => {
    const ok = Object.entries(want).every(([k, v]) => !v || (c.dataset[k] || '').split(' ').includes(v));
    c.style.display = ok ? '' : 'none'; shown += ok;
  });
  document.getElementById('shown').textContent = shown;
}"""


def write_report(path, results, summary, title="mmsearch-r1 evaluation"):
    """A page to keep open: the run's settings and summary on top, then filters (verdict, finish
    reason, question type, tool used) over collapsible cards, one per sample: the question image,
    each turn (reasoning, tool calls, crops beside the call that made them, results as the model
    saw them), the answer and the verdict."""
    import html
    esc = html.escape
    cards, values = [], {"verdict": set(), "finish": set(), "type": set(), "tool": set()}
    for r in results:
        if "error" in r:
            values["verdict"].add("error")
            cards.append(f'<details class="card error" data-verdict="error"><summary>{esc(str(r["id"]))}: error'
                         f'</summary><p>{esc(r["error"])}</p></details>')
            continue
        for s_i, s in enumerate(r["samples"]):
            traj = s["trajectory"]
            images = iter(traj["images"])
            turns = []
            for m in traj["messages"]:
                if m["role"] == "system":
                    continue
                parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
                body = "".join(image_tag(next(images, "")) if p["type"] == "image"
                               else f"<pre>{esc(p['text'])}</pre>" for p in parts)
                turns.append(f'<div class="turn {m["role"]}"><b>{m["role"]}</b>{body}</div>')
            verdict = {1.0: "correct", 0.0: "wrong", None: "unscorable"}.get(s["correct"], "partial")
            used = sorted(s["tool_calls"]) or ["none"]
            data = {"verdict": verdict, "finish": str(s["finish_reason"]), "type": str(r.get("type", "")), "tool": used}
            for k, v in data.items():
                values[k].update(v if isinstance(v, list) else [v] if v else [])
            attrs = " ".join(f'data-{k}="{esc(" ".join(v) if isinstance(v, list) else v)}"' for k, v in data.items())
            cards.append(
                f'<details class="card {verdict}" {attrs}><summary><b>{esc(str(r["id"]))} sample {s_i}</b>: {verdict} '
                f'&middot; {esc(r["question"][:120])} &middot; answer {esc(str(s["answer"]))[:60]} &middot; '
                f'{esc(str(s["finish_reason"]))}, {s["turns"]} turns, {sum(s["tool_calls"].values())} calls</summary>'
                f'<p><b>Gold:</b> {esc(" | ".join(r["answers"]))}</p>{"".join(turns)}</details>')

    def cell(v):
        if isinstance(v, dict):
            return "<br>".join(f"{esc(str(k))}: {esc(str(round(x, 4) if isinstance(x, float) else x))}" for k, x in v.items())
        return esc(str(round(v, 4) if isinstance(v, float) else v))
    settings = summary.get("settings", {})
    rest = {k: v for k, v in summary.items() if k != "settings"}
    tables = (f"<h2>Summary</h2><table>{''.join(f'<tr><td>{esc(k)}</td><td>{cell(v)}</td></tr>' for k, v in rest.items())}</table>"
              + (f"<details><summary>Run settings</summary><table>"
                 f"{''.join(f'<tr><td>{esc(k)}</td><td>{cell(v)}</td></tr>' for k, v in settings.items())}</table></details>"
                 if settings else ""))
    filters = "".join(f'<label>{k} <select name="{k}" onchange="filterCards()"><option value="">all</option>'
                      + "".join(f'<option>{esc(v)}</option>' for v in sorted(vals)) + "</select></label>"
                      for k, vals in values.items() if vals)
    page = (f'<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
            f'<title>{esc(title)}</title><style>{REPORT_STYLE}</style><script>{REPORT_SCRIPT}</script></head><body>'
            f'<h1>{esc(title)}</h1>{tables}<h2>Samples (<span id="shown">{len(cards)}</span> shown)</h2>'
            f'<div id="filters">{filters}</div>{"".join(cards)}</body></html>')
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(page, encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# 9. LoRA (Hu et al. 2021, arXiv 2106.09685), hand-written
#
#   y = W x + (alpha / r) * B A x,   A (r, in) random, B (out, r) zero: training starts at the base model.
# Only A and B train; W stays frozen (and can stay in bf16). With the adapters switched off the
# model is the base model again: GRPO's reference policy for free.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(torch.nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        import math
        self.base, self.rank, self.alpha, self.scale = base, rank, alpha, alpha / rank
        self.enabled = True
        dev = base.weight.device
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features, device=dev))     # (r, in), fp32
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=dev))    # (out, r)
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        update = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        return y + (update * self.scale).to(y.dtype)


def add_lora(model, rank=16, alpha=32, targets=LORA_TARGETS):
    """Wrap the language model's linear layers named in `targets` with LoRALinear and freeze
    everything else. Returns the number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    language_model = model.model.language_model
    wrapped = 0
    for name, module in list(language_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, torch.nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"add_lora: no linear layer of the language model is named one of {list(targets)}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


class lora_disabled:
    """`with lora_disabled(model):` runs the base model (GRPO's frozen reference policy)."""

    def __init__(self, model):
        self.modules = lora_modules(model)

    def __enter__(self):
        for m in self.modules:
            m.enabled = False

    def __exit__(self, *exc):
        for m in self.modules:
            m.enabled = True


def merge_lora(model):
    """Fold every adapter into its base weight (W += scale * B A) and unwrap: a plain model that
    save_pretrained writes and load_policy reads."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    delta = (child.lora_B @ child.lora_A) * child.scale
                    child.base.weight += delta.to(child.base.weight.dtype)
                setattr(module, name, child.base)
    return model


def lora_state_dict(model):
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


# ----------------------------------------------------------------------------------------------
# 10. Training utilities shared by train_sft.py and train_grpo.py: the masked NLL, the learning
# rate schedule, micro-batches by token budget, checkpoints


def masked_nll(policy, batch, n_tokens):
    """Sum of -log p over the tokens with loss_mask 1, divided by `n_tokens`: the number of loss
    tokens in the whole optimizer step, so that micro-batches of any split sum to the same
    gradient (a mean of per-micro-batch means would weight short micro-batches more). Tool
    responses, prompts, role headers and padding have loss_mask 0 and contribute nothing."""
    logp, _ = sequence_logprobs(policy, batch)                       # (B, L), 0 where loss_mask is 0
    return -logp.sum() / max(1, n_tokens)


def lr_at(step, total, lr, warmup=0, min_ratio=0.1):
    """Linear warmup for `warmup` steps, then cosine decay to min_ratio * lr at `total`."""
    import math
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def pack_by_tokens(lengths, budget):
    """Indices sorted by length, cut into micro-batches whose padded size (rows x longest row)
    stays within `budget` tokens (a longer single row gets a micro-batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def save_checkpoint(out_dir, step, policy, optimizer, state, args, keep_last=None, full=(None, None)):
    """Write `out_dir/step_{step:06d}/` atomically (into a temporary folder, then renamed, so a kill
    never leaves half a checkpoint): the weights (save_pretrained, or only the LoRA adapters and
    the base model's name), tokenizer, image processor, args.json, and trainer.pt (optimizer
    state, RNG states and the loop's `state`). Keeps the newest `keep_last` checkpoints.
    full: (model, optimizer) state dicts gathered from a sharded run (`full_states`), else local."""
    import random
    import shutil
    out_dir = Path(out_dir)
    final, tmp = out_dir / f"step_{step:06d}", out_dir / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(policy, tmp, base=args.get("model"), state_dict=full[0])
    # this process's GPU only: get_rng_state_all would open a CUDA context on every visible GPU
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    optim = {"optimizer": optimizer.state_dict()} if full[1] is None else {"optimizer_full": full[1]}
    torch.save({**optim, "rng": rng, **state}, tmp / "trainer.pt")
    (tmp / "args.json").write_text(json.dumps(args, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep_last:
        for old in sorted(out_dir.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights(policy, folder, base=None, state_dict=None):
    """A folder load_policy reads: the full model, or (LoRA) the adapters plus lora.json naming the
    base. state_dict: the model's weights gathered from a sharded run (else the model's own)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    loras = lora_modules(policy.model)
    if loras:
        if base is None:
            raise ValueError("save_weights: a LoRA model needs the base model's path or hub id")
        base = str(Path(base).resolve()) if Path(base).exists() else str(base)   # a local folder, or a hub id
        adapters = lora_state_dict(policy.model) if state_dict is None else \
            {k: v.contiguous() for k, v in state_dict.items() if ".lora_" in k}
        save_file(adapters, str(folder / "adapters.safetensors"))
        (folder / "lora.json").write_text(json.dumps({"base": base, "rank": loras[0].rank,
                                                      "alpha": loras[0].alpha,
                                                      "targets": sorted({n.rsplit(".", 1)[-1] for n, m in
                                                                         policy.model.named_modules()
                                                                         if isinstance(m, LoRALinear)})}))
    else:
        policy.model.save_pretrained(folder, state_dict=state_dict)
    policy.tokenizer.save_pretrained(folder)
    policy.image_processor.save_pretrained(folder)


def load_adapters(model, folder):
    """Load adapters.safetensors into a model already wrapped by add_lora (same rank and targets)."""
    from safetensors.torch import load_file
    weights = load_file(str(Path(folder) / "adapters.safetensors"))
    missing = set(lora_state_dict(model)) ^ set(weights)
    if missing:
        raise ValueError(f"{folder}: the adapters don't match this model's LoRA layers ({sorted(missing)[:3]} ...)")
    model.load_state_dict(weights, strict=False)


def latest_checkpoint(out_dir):
    """The newest complete `step_*` folder under out_dir, or None."""
    found = sorted(p for p in Path(out_dir).glob("step_*") if (p / "trainer.pt").exists())
    return found[-1] if found else None


def resume_point(out_dir, resume, who, main=True):
    """The checkpoint a run continues from: with --resume the newest in out_dir (None, said aloud by
    the main process, when there is none yet); without it a folder that has checkpoints is refused,
    so a new run never mixes its checkpoints and metrics with an old one's."""
    found = latest_checkpoint(out_dir)
    if not resume and found is not None:
        raise SystemExit(f"{who}: {out_dir} already has checkpoints; pass --resume to continue, or another --out")
    if resume and found is None and main:
        print(f"{who}: --resume but no checkpoint in {out_dir}; starting fresh")
    return found if resume else None


def start_step(resume_from, optimizer, step, metrics_path, main, who):
    """The step a run starts at: 0, or its checkpoint's, with the optimizer and RNG states restored
    and the metrics lines the interrupted run logged past that step dropped (by the main process)."""
    if resume_from is None:
        return 0
    at = load_trainer_state(resume_from, optimizer, step)["step"]
    if main:
        trim_metrics(metrics_path, at)
    print(f"{who}: resumed from {resume_from} at step {at}")
    return at


def load_trainer_state(folder, optimizer, step=None):
    """Restore the optimizer and RNG states saved by save_checkpoint; returns the loop state.
    step: the (sharded) training module, needed when the run shards its parameters."""
    import random
    # onto the CPU (the optimizer moves its state to each parameter's device): saved from rank 0's
    # GPU, the whole optimizer state would otherwise land on GPU 0 in every rank
    state = torch.load(Path(folder) / "trainer.pt", weights_only=False, map_location="cpu")
    if (step is not None and is_sharded(step)) != ("optimizer_full" in state):
        raise SystemExit(f"{folder} was saved by a run {'with' if 'optimizer_full' in state else 'without'} --fsdp; "
                         "resume it the same way (any number of ranks)")
    if "optimizer_full" in state:
        load_sharded_optimizer(step, optimizer, state.pop("optimizer_full"))
    else:
        optimizer.load_state_dict(state.pop("optimizer"))
    rng = state.pop("rng")
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


@contextlib.contextmanager
def stop_on_bad_input(who):
    """For the command-line scripts: a data file or model folder that cannot be read (load_jsonl and
    load_policy raise OSError / ValueError naming it) stops the run with `who: <that message>`
    instead of a traceback."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise SystemExit(f"{who}: {e}") from None


def check_trajectory_record(record):
    """The problem with a trajectory record (messages JSONL, DESIGN.md), or None when it is usable
    as SFT data: known roles, well-formed content, every tool turn answering an assistant turn that
    made tool calls, tool calls that parse, image parts matching the listed images, files readable."""
    from tools import parse_tool_calls
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "no 'messages' list"
    images = record.get("images", record.get("image"))
    images = [] if images is None else images if isinstance(images, list) else [images]
    n_parts, previous = 0, None
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant", "tool"):
            return f"message {i}: unknown role {role!r} (use system, user, assistant or tool)"
        try:
            parts = _content_parts(m.get("content"))
        except ValueError as e:
            return f"message {i}: {e}"
        n_parts += sum(p["type"] == "image" for p in parts)
        text = "".join(p.get("text", "") for p in parts)
        if role == "tool" and previous not in ("assistant_call", "tool"):
            return f"message {i}: a tool turn with no assistant tool call before it"
        if role == "assistant" and "<tool_call>" in text:
            calls, errors = parse_tool_calls(text)
            if errors:
                return f"message {i}: the assistant's tool call does not parse: {errors[0][:160]}"
        previous = "assistant_call" if role == "assistant" and "<tool_call>" in text else role
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn: nothing to train on"
    if n_parts != len(images):
        return f"{n_parts} image part(s) in the messages but {len(images)} image(s) listed"
    root = Path(record.get("_root", "."))
    for p in images:
        if not isinstance(p, str):
            return f"image {p!r} is not a path"
        try:
            with Image.open(root / p) as im:
                im.verify()
        except (OSError, ValueError) as e:
            return f"image {p!r} can't be read ({type(e).__name__}: {e})"
    return None


def trim_metrics(path, step):
    """On resume: drop the metrics.jsonl lines a killed run wrote after its last checkpoint `step`
    (and a line it was killed while writing)."""
    path = Path(path)
    kept = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
            if row["step"] <= step:
                kept.append(row)
        except (ValueError, KeyError, TypeError):   # the line the run was writing when it was killed
            pass
    write_jsonl(path, kept)


def save_final(policy, out_dir, base=None, state_dict=None):
    """The end of training: `out_dir/final/`, a plain model folder for load_policy (LoRA merged in).
    state_dict: the weights gathered from a sharded run (with LoRA, `base` names the base model).
    Written into a temporary folder, then renamed, as checkpoints are: a run killed while saving
    leaves no `final/` (whose config.json would say the training finished) but its last checkpoint."""
    import shutil
    final, tmp = Path(out_dir) / "final", Path(out_dir) / ".tmp_final"
    shutil.rmtree(tmp, ignore_errors=True)
    if state_dict is not None and lora_modules(policy.model):   # adapters -> load merged on CPU -> save
        adapters = Path(out_dir) / ".final_adapters"
        save_weights(policy, adapters, base=base, state_dict=state_dict)
        policy, state_dict = load_policy(adapters, device="cpu"), None
        shutil.rmtree(adapters)
    elif lora_modules(policy.model):
        merge_lora(policy.model)
    save_weights(policy, tmp, state_dict=state_dict)
    shutil.rmtree(final, ignore_errors=True)   # a final/ of an earlier run into this folder
    tmp.rename(final)
    return final


# ----------------------------------------------------------------------------------------------
# 11. Past one GPU (torchrun): the few things that differ from one process, in one place.
#     Data parallel with DDP by default; FSDP2 (`fully_shard`) shards the model with --fsdp.


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 for a plain `python` run)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")   # where collectives' tensors live: NCCL takes only CUDA ones

    @property
    def main(self):
        return self.rank == 0

    def sum(self, value):
        """A number summed over the ranks."""
        if self.world == 1:
            return value
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.item()

    def gather(self, obj):
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device=None):
    """(Dist, device) from torchrun's environment: one process per GPU (cuda:LOCAL_RANK, NCCL),
    or per CPU worker (gloo). A plain run gets Dist() and resolve_device(device)."""
    import os
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device)[0]
    if world == 1:
        return Dist(), device
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():   # NCCL bound to this rank's GPU: barrier() and the
        if device.type == "cuda":                  # object collectives then never guess the device
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")
    return Dist(torch.distributed.get_rank(), world, local, device), device


class LossStep(torch.nn.Module):
    """The policy's model as a module DDP / FSDP2 can wrap, called with the loss to compute:
    `step(fn)` returns `fn()`, a closure that uses `policy.model` inside (the model is never
    replaced, so the rest of the code keeps using it as it is; nothing passes through DDP's input
    handling)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn()


def distribute(policy, dist, fsdp=False):
    """The module the training loop computes its losses through: as is (one process), under DDP
    (gradients averaged over ranks after each synced backward), or under FSDP2 (each decoder layer
    and the vision tower sharded on their own, the rest at the root; bf16 parameters with fp32
    gradient reduction on a GPU). Build the optimizer after this: FSDP2 replaces the parameters."""
    step = LossStep(policy.model)
    if dist.world == 1:
        return step
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        on_gpu = policy.device.type == "cuda"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if on_gpu else None, reduce_dtype=torch.float32)
        for layer in policy.model.model.language_model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(policy.model.model.visual, mp_policy=mp)
        return fully_shard(step, mp_policy=mp)
    from torch.nn.parallel import DistributedDataParallel
    ids = [policy.device.index] if policy.device.type == "cuda" else None
    # some batches leave parts unused (no image: the vision tower), hence find_unused_parameters
    return DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True)


def gradient_sync(step, sync):
    """Context for one micro-batch: gradients are reduced over ranks only when `sync` (the last
    micro-batch of an optimizer step); the others accumulate locally."""
    import contextlib
    if hasattr(step, "no_sync"):   # DDP
        return contextlib.nullcontext() if sync else step.no_sync()
    if hasattr(step, "set_requires_gradient_sync"):   # FSDP2
        step.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def is_sharded(step):
    return hasattr(step, "set_requires_gradient_sync")


def grad_norm_value(norm):
    """clip_grad_norm_'s result as a float (a DTensor under FSDP2)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_states(step, optimizer):
    """Under FSDP2: (model state dict, optimizer state dict) gathered in full on CPU (a collective:
    every rank calls it). Otherwise (None, None): the local ones are already full."""
    if not is_sharded(step):
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(step, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in model_sd.items()}, optim_sd


def load_sharded_optimizer(step, optimizer, optim_sd):
    """Load a full optimizer state (saved by a sharded run) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(step, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
