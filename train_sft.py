"""Cold-start SFT: teach the policy the tool patterns from multi-turn, multi-image trajectories.

    # CPU, the toy world (python data/toyworld/prepare.py first): the main command's SFT stage, ~8 minutes
    python train_sft.py --model data/toyworld/out/model --data data/toyworld/out/sft.jsonl --out runs/sft_toy \
        --steps 2500 --lr 3e-3 --warmup 20 --min-lr-ratio 0.1 --batch-tokens 3300
    # one GPU, Qwen2.5-VL-3B, full fine-tuning (fp32 weights and AdamW, bf16 autocast)
    python train_sft.py --model Qwen/Qwen2.5-VL-3B-Instruct --data sft.jsonl --out runs/sft_3b \
        --epochs 2 --lr 1e-5 --warmup 50 --batch-tokens 16384 --grad-accum 8 --grad-checkpointing --freeze-vision
    # one GPU, Qwen2.5-VL-7B with LoRA (frozen bf16 base, fp32 adapters)
    python train_sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --data sft.jsonl --out runs/sft_7b_lora \
        --epochs 2 --lr 1e-4 --lora-rank 64 --lora-alpha 128 --batch-tokens 16384 --grad-accum 8 --grad-checkpointing

Data: trajectory JSONL in the messages format of DESIGN.md (the toy world's sft.jsonl is one),
image paths relative to the file. Every record is checked before training starts.

Loss: the NLL of the tokens the policy writes (assistant content and its <|im_end|>; loss_mask
1), computed with sequence_logprobs (never [B, L, V] logits) and divided by the number of such
tokens in the whole optimizer step, so the gradient does not depend on how the step is split into
micro-batches. Prompts, tool responses, role headers and padding have loss_mask 0.

Writes to --out: step_{N:06d}/ checkpoints (weights or LoRA adapters, tokenizer, image processor,
args.json, trainer.pt), metrics.jsonl, and final/ (a plain model load_policy reads; LoRA merged).
--resume continues from the newest checkpoint with the same data order.
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

import mmsearch_r1 as core
import tools


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model, data, output
    ap.add_argument("--model", help="hub id or local folder of a Qwen2/2.5/3-VL model")
    ap.add_argument("--data", help="trajectory JSONL (messages format)")
    ap.add_argument("--out", default="runs/sft", help="folder for checkpoints, metrics.jsonl and final/")
    ap.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    ap.add_argument("--max-length", type=int, default=8192,
                    help="tokens per trajectory; longer ones are cut at an assistant-turn boundary, or dropped")
    ap.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    ap.add_argument("--max-pixels", type=int, default=None, help="question images resized to at most this many pixels")
    ap.add_argument("--cache-mb", type=int, default=2048,
                    help="keep built trajectories (images, pixel values, tokens) in memory, up to this many MB per data file")
    ap.add_argument("--crop-max-pixels", type=int, default=None, help="tool images resized to at most this many pixels")
    # optimization
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is not given")
    ap.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at this fraction of --lr")
    ap.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    ap.add_argument("--batch-tokens", type=int, default=8192,
                    help="micro-batch budget in padded tokens (rows x longest row)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--seed", type=int, default=0, help="data order and LoRA initialization seed")
    # memory
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward")
    ap.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    ap.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2 (default: DDP)")
    # LoRA
    ap.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0 = full fine-tuning)")
    ap.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 x rank)")
    ap.add_argument("--lora-targets", default=",".join(core.LORA_TARGETS), help="comma-separated linear layer names")
    ap.add_argument("--merge", default=None, metavar="CKPT",
                    help="only merge a LoRA checkpoint into a plain model written to --out, then exit")
    # validation
    ap.add_argument("--val-data", default=None, help="trajectory JSONL for the validation loss")
    ap.add_argument("--eval-tasks", default=None, help="task JSONL: run the agent on a few tasks at each eval")
    ap.add_argument("--eval-limit", type=int, default=32, help="tasks from --eval-tasks per eval")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between validations")
    ap.add_argument("--max-turns", type=int, default=6, help="agent eval: assistant turns")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="agent eval: tokens per turn")
    tools.add_tool_arguments(ap)
    # logging and checkpoints
    ap.add_argument("--save-every", type=int, default=200, help="steps between checkpoints (and at the end)")
    ap.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.merge is None and (not args.model or not args.data):
        ap.error("--model and --data are required (or --merge CKPT)")
    for name in ("data", "val_data", "eval_tasks"):
        if getattr(args, name) and not Path(getattr(args, name)).is_file():
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: no such file")
    if Path(args.out).is_file():
        ap.error(f"--out {args.out} is a file; give a folder")
    if args.lr <= 0 or args.batch_tokens <= 0 or args.grad_accum <= 0 or args.lora_rank < 0 or args.max_turns < 1:
        ap.error("--lr, --batch-tokens, --grad-accum and --max-turns must be positive, --lora-rank >= 0")
    args.lora_alpha = args.lora_alpha or 2 * args.lora_rank
    if args.fsdp and (args.val_data or args.eval_tasks):
        ap.error("--fsdp runs no periodic validation (every rank holds a shard); run eval.py on a checkpoint")
    if args.eval_tasks:
        tools.check_tool_args(args)
    return args


# ---------------------------------------------------------------------------------------------- data


def cut_to_fit(policy, record, max_length):
    """(trajectory, record) with at most max_length tokens: the whole record, or its messages up to
    the last assistant turn that fits (images trimmed to match); (None, record) if none fits."""
    traj = core.trajectory_from_record(policy, record, record["_root"])
    if len(traj.input_ids) <= max_length:
        return traj, record
    ends = [i for i, m in enumerate(record["messages"]) if m["role"] == "assistant"]
    for end in reversed(ends[:-1]):
        messages = record["messages"][:end + 1]
        n_images = sum(p["type"] == "image" for m in messages for p in core._content_parts(m["content"]))
        shorter = {**record, "messages": messages, "images": list(record.get("images", []))[:n_images]}
        traj = core.trajectory_from_record(policy, shorter, record["_root"])
        if len(traj.input_ids) <= max_length:
            return traj, shorter
    return None, record


def trajectory_bytes(traj):
    """Rough memory of a built trajectory: its images, their pixel values and its token lists."""
    pixels = sum(pv.numel() * pv.element_size() for pv, _ in traj.image_inputs)
    return pixels + sum(len(im.getbands()) * im.width * im.height for im in traj.images) + 64 * len(traj.input_ids)


def trajectory(policy, record):
    """The record's trajectory: the one built at loading if it was kept (see load_sft_data), else
    built again (loading its images, running the image processor, tokenizing)."""
    return record.get("_traj") or core.trajectory_from_record(policy, record, record["_root"])


def read_sft_records(path, skip_bad):
    """The trajectory records of a JSONL file that pass core.check_trajectory_record, and the counts
    so far; run before the model loads, so a bad file stops the run in seconds. A bad record stops
    the run with its line number and problem, or is skipped and counted with skip_bad."""
    unreadable = [] if skip_bad else None   # lines that are not JSON objects: skipped and counted with skip_bad
    try:
        rows = core.load_jsonl(path, unreadable)
    except ValueError as e:
        raise SystemExit(f"train_sft: {e}. Fix the line, or pass --skip-bad to skip such lines.") from None
    bad = len(unreadable or [])
    counts = {"records": bad + len(rows), "bad": bad, "cut": 0, "dropped (too long)": 0, "kept": 0}
    records = []
    for record in rows:
        problem = core.check_trajectory_record(record)
        if problem is None:
            records.append(record)
        else:
            skip_or_stop(path, record, problem, skip_bad, counts)
    if not records:
        raise SystemExit(f"train_sft: no usable records in {path} ({counts})")
    return records, counts


def skip_or_stop(path, record, problem, skip_bad, counts):
    """A bad record: counted with skip_bad, else the run stops naming its line and problem."""
    if not skip_bad:
        raise SystemExit(f"train_sft: {path}:{record['_line']}: {problem}. Fix the record, or pass "
                         "--skip-bad to skip such records.")
    counts["bad"] += 1


def load_sft_data(path, policy, max_length, skip_bad, quiet=False, cache_mb=0, read=None):
    """Records checked and tokenized once: (records, lengths, loss tokens, counts). read: what
    read_sft_records(path, skip_bad) returned, when the caller read the file before loading the model.
    The built trajectories are kept in record["_traj"] until they take cache_mb MB: rebuilding one
    every step cost a sixth of a toy-world SFT step (image processor and tokenizer)."""
    from tqdm.auto import tqdm
    rows, counts = read or read_sft_records(path, skip_bad)
    records, lengths, n_loss = [], [], []
    cached = 0   # bytes of the trajectories kept
    for record in tqdm(rows, desc=f"tokenizing {Path(path).name}", disable=quiet):
        try:
            traj, record_fit = cut_to_fit(policy, record, max_length)
        except ValueError as e:   # e.g. an image file that cannot be read
            skip_or_stop(path, record, str(e), skip_bad, counts)
            continue
        if traj is None:
            counts["dropped (too long)"] += 1
            continue
        counts["cut"] += record_fit is not record
        size = trajectory_bytes(traj)
        if cached + size <= cache_mb * 2**20:
            cached += size
            counts["kept"] += 1
            record_fit = {**record_fit, "_traj": traj}
        records.append(record_fit)
        lengths.append(len(traj.input_ids))
        n_loss.append(sum(traj.loss_mask))
    if not records:
        raise SystemExit(f"train_sft: no usable records in {path} ({counts})")
    return records, lengths, n_loss, counts


def step_micro_batches(micro_batches, step, grad_accum, seed):
    """The micro-batches of optimizer step `step`: each epoch visits every micro-batch once in an
    order fixed by (seed, epoch), so a resumed run sees exactly the data an uninterrupted one would."""
    per_epoch = math.ceil(len(micro_batches) / grad_accum)
    epoch, j = divmod(step, per_epoch)
    order = list(range(len(micro_batches)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [micro_batches[i] for i in order[j * grad_accum:(j + 1) * grad_accum]]


def accumulate_gradients(policy, micro_batches, n_tokens, autocast=contextlib.nullcontext, step=None, world=1,
                         filler=None):
    """Forward and backward this rank's micro-batches (lists of trajectories) of one optimizer
    step; the loss is normalized by `n_tokens`, the loss tokens of the whole step over all ranks
    (times `world`: DDP and FSDP2 average gradients over ranks), so N ranks make the update one
    process makes with the same global batch. `step`: the distributed loss module (gradients are
    reduced on the last micro-batch). A rank left without a micro-batch runs `filler` at weight 0:
    every rank must join the reduction. Returns this rank's share of the step's loss."""
    step = step or (lambda fn: fn())
    work = [(trajs, 1.0) for trajs in micro_batches] or [(filler, 0.0)]
    total = 0.0
    for i, (trajs, weight) in enumerate(work):
        with core.gradient_sync(step, i == len(work) - 1):
            batch = core.collate(policy, trajs)
            with autocast():
                loss = step(lambda: core.masked_nll(policy, batch, n_tokens / world)) * weight
            loss.backward()
        total += loss.item() / world
    return total


@torch.no_grad()
def validation_loss(policy, records, lengths, n_loss, batch_tokens, autocast):
    """Mean NLL per loss token over a trajectory set."""
    total = 0.0
    for mb in core.pack_by_tokens(lengths, batch_tokens):
        batch = core.collate(policy, [trajectory(policy, records[i]) for i in mb])
        with autocast():
            total += core.masked_nll(policy, batch, 1).item()
    return total / max(1, sum(n_loss))


# ---------------------------------------------------------------------------------------------- main


def merge_only(args):
    with core.stop_on_bad_input("train_sft"):
        policy = core.load_policy(args.merge, device="cpu")   # a LoRA checkpoint loads merged
    core.save_weights(policy, args.out)
    print(f"train_sft: merged {args.merge} -> {args.out}")


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge_only(args)
    from tqdm.auto import tqdm
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dist, device = core.init_distributed(args.device)   # torchrun: rank, world size, this rank's device
    on_gpu = device.type == "cuda"
    # Full fine-tuning keeps fp32 weights and optimizer state (bf16 autocast on a GPU); LoRA keeps
    # the frozen base in bf16 on a GPU and trains fp32 adapters.
    dtype = torch.bfloat16 if (args.lora_rank and on_gpu) else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext
    resume_from = core.resume_point(out, args.resume, "train_sft", dist.main)

    # the data files read and checked before the model loads: a bad one stops the run in seconds
    train_read = read_sft_records(args.data, args.skip_bad)
    val_read = read_sft_records(args.val_data, True) if args.val_data else None
    eval_tasks = core.read_tasks(args.eval_tasks, "train_sft")[:args.eval_limit] if args.eval_tasks else None
    toolbox = tools.toolbox_from_args(args) if eval_tasks else None   # indexes a local corpus

    torch.manual_seed(args.seed)   # the LoRA initialization
    # model: the base, or a full checkpoint to resume; LoRA adapters wrapped around the base
    start = resume_from if (resume_from and not args.lora_rank) else args.model
    with core.stop_on_bad_input("train_sft"):
        policy = core.load_policy(start, device=device, dtype=dtype, max_pixels=args.max_pixels,
                                  crop_max_pixels=args.crop_max_pixels)
        if args.lora_rank:
            core.add_lora(policy.model, args.lora_rank, args.lora_alpha, args.lora_targets.split(","))
            if resume_from:
                core.load_adapters(policy.model, resume_from)
    if args.freeze_vision:
        policy.model.model.visual.requires_grad_(False)
    if args.grad_checkpointing:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_train = sum(p.numel() for p in core.trainable_parameters(policy.model))
    # the loss under DDP / FSDP2 when run by torchrun (as is, in one process)
    step_fn = core.distribute(policy, dist, args.fsdp)
    params = core.trainable_parameters(policy.model)   # after distribute: FSDP2 replaces them
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))

    # data: tokenized and measured once, packed into micro-batches by token budget
    records, lengths, n_loss, counts = load_sft_data(args.data, policy, args.max_length, args.skip_bad, args.quiet,
                                                     args.cache_mb, read=train_read)
    filler = [trajectory(policy, records[0])]
    micro_batches = core.pack_by_tokens(lengths, args.batch_tokens)
    per_step = args.grad_accum * dist.world   # micro-batches per optimizer step, over all ranks
    per_epoch = math.ceil(len(micro_batches) / per_step)
    total = args.steps or max(1, round(args.epochs * per_epoch))
    val = load_sft_data(args.val_data, policy, args.max_length, True, args.quiet, args.cache_mb,
                        read=val_read)[:3] if args.val_data else None
    if toolbox:
        toolbox.for_policy(policy)
    print(f"train_sft: {counts['records']} records: {len(records)} used, {counts['bad']} bad (skipped), "
          f"{counts['cut']} cut at a turn boundary, {counts['dropped (too long)']} dropped as longer than "
          f"{args.max_length} tokens, {counts['kept']} kept in memory; {len(micro_batches)} micro-batches, {per_epoch} steps/epoch, {total} steps; "
          f"{n_train / 1e6:.2f}M trainable parameters ({'LoRA' if args.lora_rank else 'full'}) on {device}"
          + (f"; rank {dist.rank} of {dist.world} ({'FSDP2' if args.fsdp else 'DDP'})" if dist.world > 1 else ""))

    metrics_path = out / "metrics.jsonl"
    step = core.start_step(resume_from, optimizer, step_fn, metrics_path, dist.main, "train_sft")
    if dist.main:
        (out / "args.json").write_text(json.dumps(vars(args), indent=2))

    bar = tqdm(total=total, initial=step, desc="sft", unit="step", disable=args.quiet or not dist.main)
    with open(metrics_path if dist.main else os.devnull, "a", encoding="utf-8") as log:
        while step < total:
            t0 = time.time()
            policy.model.train()
            lr = core.lr_at(step, total, args.lr, args.warmup, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = step_micro_batches(micro_batches, step, per_step, args.seed)
            n_tokens = sum(n_loss[i] for mb in micro for i in mb)   # over all ranks' micro-batches
            mine = micro[dist.rank::dist.world]                      # this rank's share
            trajs = [[trajectory(policy, records[i]) for i in mb] for mb in mine]
            loss = dist.sum(accumulate_gradients(policy, trajs, n_tokens, autocast, step_fn, dist.world, filler))
            grad_norm = core.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, args.clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - t0
            seen = sum(lengths[i] for mb in micro for i in mb)   # tokens/s of the whole job
            row = {"step": step, "loss": loss, "tokens": n_tokens, "lr": lr, "grad_norm": grad_norm,
                   "dt": dt, "tok/s": seen / dt}
            if (val or eval_tasks) and dist.main and (step % args.eval_every == 0 or step == total):
                policy.model.eval()
                if val:
                    row["val_loss"] = validation_loss(policy, *val, args.batch_tokens, autocast)
                if eval_tasks:
                    with torch.no_grad(), autocast():
                        lines = core.evaluate(policy, eval_tasks, toolbox, temperature=0.0, max_turns=args.max_turns,
                                              max_new_tokens=args.max_new_tokens, image_dir=out / "eval_images",
                                              progress=False)
                    row["eval_acc"] = core.summarize(lines)["accuracy (avg@n)"]
            dist.barrier()   # the other ranks wait for rank 0's evaluation
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(1)
            if dist.main:
                tqdm.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                           file=sys.stdout)
            if step % args.save_every == 0 or step == total:
                full = core.full_states(step_fn, optimizer)   # gathered from the shards under --fsdp
                if dist.main:
                    core.save_checkpoint(out, step, policy, optimizer, {"step": step}, vars(args), args.keep_last, full)
                dist.barrier()
    bar.close()
    state = core.full_states(step_fn, optimizer)[0]
    final = core.save_final(policy, out, args.model, state) if dist.main else out / "final"
    dist.barrier()
    if dist.main:
        print(f"train_sft: done, {step} steps; final model in {final}")
    return final


if __name__ == "__main__":
    main()
