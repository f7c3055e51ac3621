"""GRPO for the multimodal search agent: rollouts with tools, rewards, leave-one-out advantages,
turn / over-turn / anomaly masking, a clipped policy loss, optional KL and AHPO expert term.

    # CPU, the toy world, from the SFT checkpoint: the main command's GRPO stage (~2 minutes), with
    # the tools showing what the world's SFT data showed (one result, 60-character passages, 112-px crops)
    python train_grpo.py --model runs/sft_toy/final --tasks data/toyworld/out/train.jsonl \
        --eval-tasks data/toyworld/out/val.jsonl --corpus data/toyworld/out/corpus.jsonl \
        --image-index data/toyworld/out/images.jsonl --k 1 --visit-chars 60 --crop-upscale 112 \
        --system "$(cat data/toyworld/out/system.txt)" --max-new-tokens 96 --max-context 4096 \
        --out runs/grpo_toy --steps 25 --lr 3e-4 --temperature 0.7
    # one GPU, Qwen2.5-VL-3B from its SFT checkpoint, a real engine and an LLM judge
    SERPER_API_KEY=... python train_grpo.py --model runs/sft_3b/final --tasks train.jsonl --eval-tasks val.jsonl \
        --backend serper --image-host-dir /srv/www/q --image-host-url https://example.org/q \
        --metric judge --judge-url http://localhost:8000/v1 --judge-model Qwen2.5-72B-Instruct \
        --out runs/grpo_3b --steps 300 --lr 1e-6 --group-size 8 --tasks-per-step 16 --temperature 0.7 \
        --max-turns 10 --grad-checkpointing --freeze-vision

One step: sample --tasks-per-step tasks -> `rollout` with --group-size samples each (a group) ->
rewards -> advantages -> masks -> policy loss over micro-batches -> one optimizer step (or
--ppo-epochs) -> log -> checkpoint; every --eval-every steps the agent is evaluated on
--eval-tasks with the function eval.py uses, and a few trajectories are written as an HTML page.

Where this departs from the papers:
 1. Leave-one-out advantages (Vision-DeepResearch's RLOO) by default, with no std scaling;
    `--advantage grpo` is the original GRPO, `--advantage drgrpo` drops the std (Dr. GRPO).
 2. One optimizer step per batch by default, so the old policy is the current one: the ratio is
    exactly 1 and the loss is the plain policy gradient. The papers use several mini-batches.
 3. Groups whose rewards are all equal carry no policy gradient; without KL they are left out of
    the update (and of the token-mean's denominator) instead of adding zeros.
 4. Over-turn masking (Mini-o3) and anomaly masking (Vision-DeepResearch: repetition, repeated
    tool errors, truncated turns) drop those trajectories from the loss; their rewards still count
    in their group's statistics.
 5. Rollouts are synchronous and run in the training process (the papers use vLLM/SGLang and
    asynchronous rollouts); tool calls within a turn run concurrently.
 6. The sampler's recorded log-probs are never used as old log-probs; their gap to the trainer's
    recomputed log-probs is logged every step (Δlogp) as a health check.
 7. AHPO (MM-HELIX) adds the expert trajectory's NLL for groups with too few successes, weighted
    by --ahpo-weight; MM-HELIX also anneals it, which is left out.
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import mmsearch_r1 as core
import tools

# ---------------------------------------------------------------------------------------------- the math


def _groups(rewards, group_size):
    """(G groups, group_size) rewards as float tensor, NaN where unscorable (None)."""
    r = torch.tensor([math.nan if x is None else float(x) for x in rewards], dtype=torch.float32)
    if len(r) % group_size:
        raise ValueError(f"{len(r)} rewards do not split into groups of {group_size}")
    return r.view(-1, group_size)


def loo_advantages(rewards, group_size):
    """Leave-one-out (RLOO) advantages: A_i = r_i - mean_{j != i} r_j within each group.

    rewards: N = groups x group_size values, a group's samples contiguous; None = unscorable
    (judge failed): its advantage is 0 and it leaves its group's statistics. A sample with no
    scorable group-mate gets 0.
        loo_advantages([1, 0, 1, 1], 2) -> [1, -1, 0, 0]
        loo_advantages([1, 0, 0, 0], 4) -> [1, -1/3, -1/3, -1/3]"""
    r = _groups(rewards, group_size)
    ok = ~r.isnan()
    r0 = r.nan_to_num(0.0)
    n_others = ok.sum(1, keepdim=True) - ok.long()                      # scorable group-mates
    mean_others = (r0.sum(1, keepdim=True) - r0) / n_others.clamp(min=1)
    adv = torch.where(ok & (n_others > 0), r0 - mean_others, torch.zeros_like(r0))
    return adv.view(-1)


def grpo_advantages(rewards, group_size, scale=True, eps=1e-6):
    """GRPO advantages: (r - mean) / (std + eps) over each group's scorable samples (unbiased std);
    scale=False is Dr. GRPO (r - mean). Unscorable samples (None) and groups of one get 0.
        grpo_advantages([1, 0, 0, 1], 2, scale=False) -> [0.5, -0.5, -0.5, 0.5]"""
    r = _groups(rewards, group_size)
    ok = ~r.isnan()
    n = ok.sum(1, keepdim=True)
    r0 = r.nan_to_num(0.0)
    mean = r0.sum(1, keepdim=True) / n.clamp(min=1)
    adv = r0 - mean
    if scale:
        var = ((adv * ok) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
        adv = adv / (var.sqrt() + eps)
    return torch.where(ok & (n > 1), adv, torch.zeros_like(adv)).view(-1)


def aggregate(values, mask, agg, norm=None):
    """Reduce per-token values (B, L) over mask (B, L):
      token-mean           sum over all tokens / number of tokens (or `norm`)
      seq-mean-token-sum   mean over sequences of each sequence's token sum (`norm` = number of sequences)
      seq-mean-token-mean  mean over sequences of each sequence's token mean
    Sequences with no token count for nothing; an all-masked batch gives 0 (finite gradients)."""
    mask = mask.to(values.dtype)
    if agg == "token-mean":
        return (values * mask).sum() / (norm if norm is not None else mask.sum().clamp(min=1))
    per_seq = (values * mask).sum(-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(-1).clamp(min=1)
    elif agg != "seq-mean-token-sum":
        raise ValueError(f"unknown aggregation {agg!r}: token-mean, seq-mean-token-sum or seq-mean-token-mean")
    has = (mask.sum(-1) > 0).to(values.dtype)
    return (per_seq * has).sum() / (norm if norm is not None else has.sum().clamp(min=1))


def policy_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=None, agg="token-mean", norm=None):
    """PPO-clipped surrogate (PAPERS.md): per token -min(ρA, clip(ρ, 1-clip_low, 1+clip_high)·A),
    ρ = exp(logp - old_logp); with dual clip (clip_c > 1) bounded by -clip_c·A where A < 0.
    logp, old_logp, mask (B, L); adv (B,) or (B, L). Returns (loss, stats) with the fraction of
    tokens clipped and the mean ratio. `norm` overrides the aggregation's denominator (the whole
    optimizer step's tokens or sequences, when a step spans micro-batches)."""
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp((logp - old_logp).clamp(max=20.0))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if clip_c is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -clip_c * adv), per_token)
    loss = aggregate(per_token, mask, agg, norm)
    m = mask.bool()
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        stats = {"clipfrac": ((clipped > unclipped) & m).sum().item() / n.item(),
                 "ratio": (ratio * m).sum().item() / n.item()}
    return loss, stats


def kl_k3(logp, ref_logp):
    """The k3 estimator of KL(policy || reference) per token (Schulman, "Approximating KL
    divergence", 2020): exp(ref - logp) - (ref - logp) - 1 >= 0, computed as expm1(d) - d with the
    gap clamped to [-20, 20] so large gaps stay finite."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.expm1(d) - d).clamp(min=0.0)


# ---------------------------------------------------------------------------------------------- the loop's pieces


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model, data, output
    ap.add_argument("--model", required=True, help="hub id or local folder (usually the SFT checkpoint's final/)")
    ap.add_argument("--tasks", required=True, help="task JSONL for training (id, image, question, answers)")
    ap.add_argument("--allow-no-image", action="store_true", help="train on task records that have no image (text-only)")
    ap.add_argument("--eval-tasks", default=None, help="held-out task JSONL evaluated every --eval-every steps")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N held-out tasks")
    ap.add_argument("--out", default="runs/grpo", help="folder for checkpoints, metrics.jsonl, samples/")
    ap.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    ap.add_argument("--max-pixels", type=int, default=None, help="question images resized to at most this many pixels")
    ap.add_argument("--crop-max-pixels", type=int, default=None, help="tool images resized to at most this many pixels")
    # rollout
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ap.add_argument("--tasks-per-step", type=int, default=8, help="groups per step")
    ap.add_argument("--group-size", type=int, default=8, help="samples per task (G)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use it too)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    ap.add_argument("--max-turns", type=int, default=6, help="assistant turns per trajectory")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="tokens per assistant turn")
    ap.add_argument("--max-context", type=int, default=8192, help="tokens per trajectory")
    ap.add_argument("--max-images", type=int, default=8, help="question images plus crops")
    ap.add_argument("--rollout-batch", type=int, default=64, help="rows decoding at once")
    ap.add_argument("--no-tools", action="store_true", help="answer directly, one turn (no toolbox)")
    ap.add_argument("--system", default=None, help="system prompt text (default: the tools prompt, core.system_prompt)")
    ap.add_argument("--dynamic-sampling", action="store_true",
                    help="draw more tasks (up to 3x) until --tasks-per-step groups have unequal rewards")
    # reward
    ap.add_argument("--metric", default="em", choices=core.METRICS, help="correctness metric")
    ap.add_argument("--format-weight", type=float, default=0.1, help="λ: reward = (1-λ)·correct + λ·format")
    ap.add_argument("--search-penalty", type=float, default=0.0, help="MMSearch-R1's penalty on correct answers that searched")
    ap.add_argument("--judge-url", default="", help="OpenAI-compatible base URL (or $JUDGE_BASE_URL)")
    ap.add_argument("--judge-model", default="", help="judge model name (or $JUDGE_MODEL)")
    ap.add_argument("--judge-key", default="", help="judge API key (or $JUDGE_API_KEY)")
    # loss
    ap.add_argument("--advantage", default="loo", choices=["loo", "grpo", "drgrpo"], help="advantage estimator")
    ap.add_argument("--clip-low", type=float, default=0.2, help="ratio clip below 1")
    ap.add_argument("--clip-high", type=float, default=0.28, help="ratio clip above 1 (clip-higher)")
    ap.add_argument("--clip-c", type=float, default=None, help="dual clip bound for negative advantages (e.g. 3)")
    ap.add_argument("--agg", default="token-mean", choices=["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"],
                    help="loss aggregation")
    ap.add_argument("--beta", type=float, default=0.0, help="KL (k3) weight against the frozen start policy")
    ap.add_argument("--ppo-epochs", type=int, default=1, help="optimizer steps per batch (>1: old log-probs from a no-grad pass)")
    ap.add_argument("--no-mask-over-turn", action="store_true", help="train on over-turn trajectories too")
    ap.add_argument("--no-mask-repetition", action="store_true", help="train on trajectories stopped for repetition")
    ap.add_argument("--no-mask-tool-errors", action="store_true", help="train on trajectories stopped by tool errors")
    ap.add_argument("--no-mask-truncated", action="store_true", help="train on trajectories cut by max-new-tokens")
    ap.add_argument("--expert-data", default=None, help="AHPO: expert trajectory JSONL, record id = task id")
    ap.add_argument("--ahpo-threshold", type=int, default=1, help="AHPO fires for groups with fewer successes than this")
    ap.add_argument("--ahpo-weight", type=float, default=0.1, help="ξ: weight of the expert NLL")
    # optimization
    ap.add_argument("--lr", type=float, default=1e-6, help="learning rate (constant after warmup)")
    ap.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="micro-batch budget in padded tokens")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward")
    ap.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    ap.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)   # refused with a reason
    ap.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters (0 = full); the reference is adapters off")
    ap.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 x rank)")
    ap.add_argument("--seed", type=int, default=0, help="task order and sampling seed")
    tools.add_tool_arguments(ap)
    # logging and checkpoints
    ap.add_argument("--eval-every", type=int, default=20, help="steps between held-out evals and sample pages")
    ap.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (and at the end)")
    ap.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    for name in ("tasks", "eval_tasks", "expert_data"):
        if getattr(args, name) and not Path(getattr(args, name)).is_file():
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: no such file")
    if Path(args.out).is_file():
        ap.error(f"--out {args.out} is a file; give a folder")
    if args.group_size < 2:
        ap.error("--group-size must be at least 2: advantages compare samples of the same task")
    if args.lr <= 0 or args.tasks_per_step < 1 or args.ppo_epochs < 1 or args.temperature <= 0 or args.max_turns < 1:
        ap.error("--lr, --temperature, --tasks-per-step, --ppo-epochs and --max-turns must be positive "
                 "(GRPO samples: T > 0)")
    try:
        core.check_sampling(args.temperature, args.top_p, 0)
    except ValueError as e:
        ap.error(f"--temperature / --top-p: {e}")
    if args.fsdp:
        ap.error("--fsdp is for train_sft.py: GRPO rolls out on every rank, which needs the whole model there; "
                 "use DDP (the default under torchrun), with --lora-rank for large models")
    if args.metric == "judge" and not (args.judge_url or args.judge_model):
        ap.error("--metric judge needs --judge-url and --judge-model (or $JUDGE_BASE_URL and $JUDGE_MODEL)")
    if not args.no_tools:
        tools.check_tool_args(args)
    args.lora_alpha = args.lora_alpha or 2 * args.lora_rank
    return args


def tasks_for_step(tasks, step, k, seed, extra=0):
    """Tasks k*step .. of an endless stream of seeded epoch permutations (deterministic, so a resumed
    run draws the same tasks); `extra` more for dynamic sampling."""
    out, i = [], step * k
    while len(out) < k + extra:
        epoch, j = divmod(i, len(tasks))
        order = list(range(len(tasks)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(tasks[order[j]])
        i += 1
    return out


ANOMALIES = {"repetition": "no_mask_repetition", "tool_errors": "no_mask_tool_errors", "truncated": "no_mask_truncated"}


def loss_weights(trajs, args):
    """1 for trajectories the loss trains on, 0 for masked ones, with the count of each kind:
      over_turn  stopped by a budget (turns, context, images) while still working (Mini-o3)
      anomaly    repetition, repeated tool errors, a turn cut at max-new-tokens (Vision-DeepResearch)
    A masked trajectory keeps its reward in its group's statistics; only its loss is dropped."""
    weights, counts = [], Counter()
    for t in trajs:
        if t.meta.get("over_turn") and not args.no_mask_over_turn:
            counts["over_turn"] += 1
            weights.append(0.0)
        elif t.finish_reason in ANOMALIES and not getattr(args, ANOMALIES[t.finish_reason]):
            counts["anomaly"] += 1
            weights.append(0.0)
        else:
            weights.append(1.0)
    return weights, counts


def rollout_and_score(policy, task_list, toolbox, args, seed, endpoint, autocast):
    """Roll out a group per task and score every sample: (trajectories, results lines, rewards).
    Under the update's autocast (bf16 on a GPU): the samples come from the distribution the update
    recomputes, at bf16 speed."""
    rollout_kw = dict(n=args.group_size, temperature=args.temperature, top_p=args.top_p,
                      max_turns=1 if args.no_tools else args.max_turns, max_new_tokens=args.max_new_tokens,
                      max_context=args.max_context, max_images=args.max_images, max_batch=args.rollout_batch,
                      seed=seed, system=args.system, progress=False)
    with autocast():
        trajs = core.rollout(policy, task_list, toolbox, **rollout_kw)
    G = args.group_size
    lines = [core.score_samples(task, trajs[i * G:(i + 1) * G], args.metric, endpoint, toolbox.cache, with_records=False,
                                format_weight=args.format_weight, search_penalty=args.search_penalty)
             for i, task in enumerate(task_list)]
    rewards = [s["reward"] for line in lines for s in line["samples"]]
    return trajs, lines, rewards


def advantages(rewards, args):
    if args.advantage == "loo":
        return loo_advantages(rewards, args.group_size)
    return grpo_advantages(rewards, args.group_size, scale=args.advantage == "grpo")


def informative(rewards, G):
    """Per group: do its scorable rewards differ (is there a policy gradient)?"""
    r = _groups(rewards, G)
    lo = torch.where(r.isnan(), torch.full_like(r, math.inf), r).min(1).values
    hi = torch.where(r.isnan(), torch.full_like(r, -math.inf), r).max(1).values
    return (hi > lo).tolist()


def ahpo_records(lines, experts, threshold):
    """AHPO (MM-HELIX): the expert trajectories of the tasks whose group had fewer than `threshold`
    correct samples; none for groups that already succeed, or tasks without an expert."""
    out = []
    for line in lines:
        successes = sum((s["correct"] or 0) >= 1.0 for s in line["samples"])
        if successes < threshold and str(line["id"]) in experts:
            out.append(experts[str(line["id"])])
    return out


# ---------------------------------------------------------------------------------------------- main


def micro_loss(policy, reference, batch, old_logp, adv, args, norm):
    """One micro-batch's policy loss (+ beta * KL to the reference): (loss, log-probs and entropy
    detached, clip stats, KL value). `old_logp` None: one update per batch, so the ratio is 1."""
    logp, ent = core.sequence_logprobs(policy, batch, args.temperature, with_entropy=True)
    old_logp = logp.detach() if old_logp is None else old_logp
    mask = batch["loss_mask"]
    loss, s = policy_loss(logp, old_logp, adv.to(logp.device), mask, args.clip_low, args.clip_high, args.clip_c,
                          args.agg, norm)
    kl = 0.0
    if args.beta > 0:
        with torch.no_grad():
            if reference is not None:
                ref = core.sequence_logprobs(reference, batch, args.temperature)[0]
            else:
                with core.lora_disabled(policy.model):
                    ref = core.sequence_logprobs(policy, batch, args.temperature)[0]
        kl_term = aggregate(kl_k3(logp, ref), mask, args.agg, norm)
        loss, kl = loss + args.beta * kl_term, kl_term.item()
    return loss, logp.detach(), ent.detach(), s, kl


def main(argv=None):
    args = parse_args(argv)
    from tqdm.auto import tqdm
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dist, device = core.init_distributed(args.device)   # torchrun: rank, world size, this rank's device
    if args.tasks_per_step < dist.world:
        raise SystemExit(f"train_grpo: --tasks-per-step {args.tasks_per_step} < {dist.world} ranks: each rank rolls out whole groups")
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if (args.lora_rank and on_gpu) else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext
    resume_from = core.resume_point(out, args.resume, "train_grpo", dist.main)
    torch.manual_seed(args.seed)

    # tasks, expert data and tools, read before the model loads: a bad file stops the run in seconds
    tasks = core.read_tasks(args.tasks, "train_grpo", args.allow_no_image)
    eval_tasks = core.read_tasks(args.eval_tasks, "train_grpo", args.allow_no_image)[:args.eval_limit] \
        if args.eval_tasks else None
    experts, bad_experts = {}, 0
    if args.expert_data:
        with core.stop_on_bad_input("train_grpo"):
            records = core.load_jsonl(args.expert_data)
        for record in records:
            if core.check_trajectory_record(record) is None:
                experts[str(record.get("id"))] = record
            else:
                bad_experts += 1
    toolbox = tools.toolbox_from_args(args)   # indexes a local corpus: a bad one stops the run here too

    # the policy (and, with --beta, the frozen reference it is kept near)
    start = resume_from if (resume_from and not args.lora_rank) else args.model
    with core.stop_on_bad_input("train_grpo"):
        policy = core.load_policy(start, device=device, dtype=dtype, max_pixels=args.max_pixels,
                                  crop_max_pixels=args.crop_max_pixels)
        reference = None
        if args.lora_rank:   # the reference is the same model with the adapters off: no second copy
            core.add_lora(policy.model, args.lora_rank, args.lora_alpha)
            if resume_from:
                core.load_adapters(policy.model, resume_from)
        elif args.beta > 0:  # full fine-tuning: a frozen copy of the start model
            reference = core.load_policy(args.model, device=device, dtype=dtype)
            reference.model.requires_grad_(False)
    if args.freeze_vision:
        policy.model.model.visual.requires_grad_(False)
    if args.grad_checkpointing:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    step_fn = core.distribute(policy, dist)   # the losses go through DDP under torchrun (as is, in one process)
    params = core.trainable_parameters(policy.model)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))

    # tools and reward
    toolbox.for_policy(policy)
    endpoint = core.JudgeEndpoint(args.judge_url, args.judge_model, args.judge_key) if args.metric == "judge" else None
    metrics_path = out / "metrics.jsonl"
    step = core.start_step(resume_from, optimizer, step_fn, metrics_path, dist.main, "train_grpo")
    if dist.main:
        (out / "args.json").write_text(json.dumps(vars(args), indent=2))
        print(f"train_grpo: {len(tasks)} tasks, {args.tasks_per_step} x {args.group_size} samples per step, "
              f"{args.steps} steps, {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters on {device}; "
              f"{len(experts)} expert trajectories" + (f" ({bad_experts} unusable, skipped)" if bad_experts else "")
              + (f"; rank 0 of {dist.world} (DDP)" if dist.world > 1 else ""))

    G = args.group_size
    bar = tqdm(total=args.steps, initial=step, desc="grpo", unit="step", disable=args.quiet or not dist.main)
    with open(metrics_path if dist.main else os.devnull, "a", encoding="utf-8") as log:
        while step < args.steps:
            t0 = time.time()
            # 1-2. tasks and rollouts (dynamic sampling: more tasks until enough groups carry a gradient)
            policy.model.eval()
            extra = 2 * args.tasks_per_step if args.dynamic_sampling else 0
            pool = tasks_for_step(tasks, step, args.tasks_per_step, args.seed, extra)
            # this rank's share of the step's tasks (and of the extra ones): whole groups, never split
            pool = pool[:args.tasks_per_step][dist.rank::dist.world] + pool[args.tasks_per_step:][dist.rank::dist.world]
            mine = len(range(dist.rank, args.tasks_per_step, dist.world))            # this rank's number of groups
            task_list = pool[:mine]
            seed = ((args.seed * 1_000_003 + step) * 4) * dist.world + dist.rank * 4  # a sampling seed per step, rank, round
            trajs, lines, rewards = rollout_and_score(policy, task_list, toolbox, args, seed, endpoint, autocast)
            drawn = len(task_list)
            while args.dynamic_sampling and sum(informative(rewards, G)) < mine and drawn < len(pool):
                more = pool[drawn:drawn + mine]
                seed += 1
                t2, l2, r2 = rollout_and_score(policy, more, toolbox, args, seed, endpoint, autocast)
                trajs, lines, rewards, task_list, drawn = trajs + t2, lines + l2, rewards + r2, task_list + more, drawn + len(more)
            if args.dynamic_sampling:   # keep the informative groups first, up to tasks-per-step
                flags = informative(rewards, G)
                keep = sorted(sorted(range(len(task_list)), key=lambda g: not flags[g])[:mine])
                trajs = [trajs[g * G + s] for g in keep for s in range(G)]
                lines, task_list = [lines[g] for g in keep], [task_list[g] for g in keep]
                rewards = [rewards[g * G + s] for g in keep for s in range(G)]
            rollout_s = time.time() - t0

            # 3-5. advantages and masks
            adv = advantages(rewards, args)                                          # (N,)
            weights, masked = loss_weights(trajs, args)
            flags = informative(rewards, G)
            zero_var = len(flags) - sum(flags)
            train = [i for i, w in enumerate(weights) if w > 0 and (adv[i] != 0 or args.beta > 0)]
            ahpo = ahpo_records(lines, experts, args.ahpo_threshold)

            # 6-7. the policy loss over micro-batches, then the optimizer step(s)
            policy.model.train()
            lr = core.lr_at(step, args.steps, args.lr, args.warmup, min_ratio=1.0)   # constant after warmup
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = core.pack_by_tokens([len(trajs[i].input_ids) for i in train], args.batch_tokens)
            micro = [[train[j] for j in mb] for mb in micro]
            n_tok = dist.sum(sum(sum(trajs[i].loss_mask) for i in train))           # over all ranks
            norm = max(1, n_tok if args.agg == "token-mean" else dist.sum(len(train))) / dist.world   # DDP averages
            old = {}
            if args.ppo_epochs > 1:   # the policy moves between updates: old log-probs from one pass first
                with torch.no_grad(), autocast():
                    for k, mb in enumerate(micro):
                        old[k] = core.sequence_logprobs(policy, core.collate(policy, [trajs[i] for i in mb]),
                                                        args.temperature)[0]
            expert_trajs = [core.trajectory_from_record(policy, r, r["_root"]) for r in ahpo]
            n_expert = sum(sum(t.loss_mask) for t in expert_trajs)
            expert_micro = core.pack_by_tokens([len(t.input_ids) for t in expert_trajs], args.batch_tokens)
            # every rank joins each gradient reduction, with a zero-weight batch if it has nothing to train
            work = [("policy", k, mb, 1.0) for k, mb in enumerate(micro)] + [("ahpo", k, mb, 1.0) for k, mb in enumerate(expert_micro)]
            work = work or [("policy", -1, [0], 0.0)]
            stats = Counter()
            for _ in range(args.ppo_epochs):
                for w, (kind, k, mb, weight) in enumerate(work):
                    with core.gradient_sync(step_fn, w == len(work) - 1):
                        if kind == "ahpo":   # AHPO: the expert's NLL for groups that (almost) all failed
                            batch = core.collate(policy, [expert_trajs[i] for i in mb])
                            with autocast():
                                nll = step_fn(lambda: core.masked_nll(policy, batch, n_expert))
                            (args.ahpo_weight * nll).backward()
                            stats["ahpo_nll"] += nll.item()
                            continue
                        batch = core.collate(policy, [trajs[i] for i in mb])
                        mask = batch["loss_mask"]                                     # (B, L) tokens the policy sampled
                        with autocast():
                            loss, logp, ent, s, kl = step_fn(lambda: micro_loss(policy, reference, batch, old.get(k),
                                                                                adv[mb], args, norm))
                        (loss * weight).backward()
                    if weight == 0:
                        continue
                    stats["kl"] += kl
                    recorded = torch.zeros_like(logp)
                    for b, i in enumerate(mb):
                        recorded[b, :len(trajs[i].logprobs)] = torch.tensor(trajs[i].logprobs, device=logp.device)
                    gap = ((logp - recorded).abs() * mask)
                    stats["dlogp_max"] = max(stats["dlogp_max"], gap.max().item())
                    stats["dlogp_sum"] += gap.sum().item()
                    stats["entropy_sum"] += (ent * mask).sum().item()
                    stats["clipfrac"] += s["clipfrac"] * mask.sum().item()
                    stats["loss"] += loss.item()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip).item() if params else 0.0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - t0

            # 8. log: one line per step, over every rank's groups
            local = {"samples": [dict(s, len=len(trajs[g * G + j].input_ids)) for g, line in enumerate(lines)
                                 for j, s in enumerate(line["samples"])],
                     "groups": len(lines), "stats": dict(stats),
                     "counts": [masked["over_turn"], masked["anomaly"], zero_var, len(train), len(ahpo)]}
            everyone = dist.gather(local)
            samples = [s for r in everyone for s in r["samples"]]
            over_turn, anomaly, zero_var, trained, n_ahpo = [sum(r["counts"][j] for r in everyone) for j in range(5)]
            stats = Counter()
            for r in everyone:
                stats.update({k: v for k, v in r["stats"].items() if k != "dlogp_max"})
            stats["dlogp_max"] = max(r["stats"].get("dlogp_max", 0.0) for r in everyone)
            n = max(1, len(samples))
            calls = Counter()
            for s in samples:
                calls.update(s["tool_calls"])
            scored = [s for s in samples if s["reward"] is not None]
            row = {"step": step, "reward": sum(s["reward"] for s in scored) / max(1, len(scored)),
                   "correct": sum(s["correct"] or 0 for s in samples) / n,
                   "format": sum(s["format"] for s in samples) / n,
                   **{f"calls_{t}": calls[t] / n for t in tools.TOOL_NAMES},
                   "turns": sum(s["turns"] for s in samples) / n,
                   "len": sum(s["len"] for s in samples) / n,
                   "samples": len(samples), "groups": sum(r["groups"] for r in everyone),
                   "masked_over_turn": over_turn, "masked_anomaly": anomaly,
                   "zero_var_groups": zero_var, "trained": trained,
                   "clipfrac": stats["clipfrac"] / max(1, n_tok * args.ppo_epochs),
                   "kl": stats["kl"] / args.ppo_epochs, "entropy": stats["entropy_sum"] / max(1, n_tok * args.ppo_epochs),
                   "ahpo": n_ahpo, "dlogp_max": stats["dlogp_max"],
                   "dlogp_mean": stats["dlogp_sum"] / max(1, n_tok * args.ppo_epochs),
                   "grad_norm": grad_norm, "lr": lr, "rollout_s": rollout_s, "dt": dt,
                   "tok/s": sum(s["len"] for s in samples) / dt}
            if eval_tasks and dist.main and (step % args.eval_every == 0 or step == args.steps):
                policy.model.eval()
                with torch.no_grad(), autocast():
                    results = core.evaluate(policy, eval_tasks, toolbox, metric=args.metric, endpoint=endpoint,
                                            cache=toolbox.cache, image_dir=out / "samples" / "images",
                                            temperature=0.0, max_turns=1 if args.no_tools else args.max_turns,
                                            max_new_tokens=args.max_new_tokens, max_context=args.max_context,
                                            max_images=args.max_images, max_batch=args.rollout_batch,
                                            system=args.system, progress=False)
                row["eval_acc"] = core.summarize(results)["accuracy (avg@n)"]
                core.write_report(out / "samples" / f"step_{step:06d}.html", results[:8], core.summarize(results),
                                  title=f"GRPO step {step}: held-out samples")
            dist.barrier()   # the other ranks wait for rank 0's evaluation
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(1)
            keys = ["step", "reward", "correct", "format", "calls_crop", "calls_image_search", "calls_text_search",
                    "calls_visit", "turns", "len", "masked_over_turn", "masked_anomaly", "zero_var_groups", "clipfrac",
                    "kl", "entropy", "ahpo", "dlogp_max", "dt", "tok/s", "eval_acc"]
            if dist.main:
                tqdm.write(" | ".join(f"{k} {row[k]:.3g}" if isinstance(row[k], float) else f"{k} {row[k]}"
                                      for k in keys if k in row), file=sys.stdout)
            # 9. checkpoint (rank 0 writes; DDP keeps the ranks' weights identical)
            if step % args.save_every == 0 or step == args.steps:
                if dist.main:
                    core.save_checkpoint(out, step, policy, optimizer, {"step": step}, vars(args), args.keep_last)
                dist.barrier()
    bar.close()
    final = core.save_final(policy, out) if dist.main else out / "final"
    dist.barrier()
    if dist.main:
        print(f"train_grpo: done, {step} steps; final model in {final}")
    return final


if __name__ == "__main__":
    main()
