"""Train the demo GPT-2 (IOI, greater-than, induction) from scratch on CPU and write the task CSVs.

    python scripts/train_demo_model.py --out assets/models/demo --tasks-out assets/tasks --steps 4000 --seed 0

The model is a `transformers.GPT2LMHeadModel` with a word-level tokenizer whose pre-tokenizer splits
four-digit years into two two-digit tokens. The weights are saved in float16. With `--tasks-out`, the
held-out task CSVs are written there and the saved checkpoint is evaluated on them.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_tasks  # noqa: E402

BOS, PAD, UNK = "<|endoftext|>", "<pad>", "<unk>"
TASKS = ("ioi", "greater_than", "induction")
BOS_COUNTS, BOS_WEIGHTS = (1, 0, 2), (0.8, 0.1, 0.1)
log = logging.getLogger("train_demo_model")


def build_tokenizer(n_positions: int = 64) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the task vocabulary; digit pairs are split off first (1745 -> 17 45)."""
    vocab = {word: i for i, word in enumerate([BOS, PAD, UNK, *demo_tasks.vocabulary()])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\d\d"), "isolated"), pre_tokenizers.Whitespace()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=n_positions,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, n_layer: int, d_model: int, n_head: int, n_positions: int
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 without dropout."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=d_model,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def pad_batch(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad token id lists into `batch pos` input ids (causal attention never sees the padding)."""
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])


def training_batch(
    rng: random.Random, tokenizer: PreTrainedTokenizerFast, batch_size: int, n_chunks: int = 2
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) chunks of one batch of mixture documents, sorted by length to save padding.

    Most documents start with one BOS, some with none or two. BOS, unscored prefixes and padding have
    label -100 (not predicted).
    """
    words = demo_tasks.vocabulary()
    prefixes, texts = zip(*(demo_tasks.training_text(rng, words) for _ in range(batch_size)))
    encode, limit = tokenizer.backend_tokenizer.encode_batch, tokenizer.model_max_length
    docs = []
    for prefix, text in zip(encode(list(prefixes)), encode(list(texts))):
        unscored = [tokenizer.bos_token_id] * rng.choices(BOS_COUNTS, BOS_WEIGHTS)[0] + prefix.ids
        docs.append(((unscored + text.ids)[:limit], ([-100] * len(unscored) + text.ids)[:limit]))
    docs.sort(key=lambda doc: len(doc[0]))
    size = math.ceil(batch_size / n_chunks)
    return [
        (pad_batch([ids for ids, _ in chunk], tokenizer.pad_token_id), pad_batch([lab for _, lab in chunk], -100))
        for chunk in (docs[i : i + size] for i in range(0, batch_size, size))
    ]


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int,
    eval_every: int,
) -> None:
    """AdamW with warm-up and cosine decay on freshly sampled mixture batches (in place)."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = min(200, steps // 10 + 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, steps, warmup))
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        chunks = training_batch(rng, tokenizer, batch_size)
        n_targets = sum(int((labels[:, 1:] != -100).sum()) for _, labels in chunks)
        for ids, labels in chunks:
            logits = model(input_ids=ids).logits[:, :-1]
            loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum") / n_targets
            loss.backward()
            running += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            elapsed = time.perf_counter() - start
            n = log_every if step % log_every == 0 else step % log_every
            log.info("step %d/%d loss %.4f  %.0fs elapsed, ~%.0fs left",
                     step, steps, running / n, elapsed, elapsed / step * (steps - step))
            running = 0.0
        if step % eval_every == 0 and step < steps:
            model.eval()
            for task in TASKS:
                rows = demo_tasks.task_rows(task, 64, random.Random(f"monitor-{task}"), demo_tasks.vocabulary())
                log.info("  held-out %s: %s", task, _fmt(pair_metrics(model, tokenizer, rows, task)))
            model.train()
    model.eval()


def _fmt(metrics: dict[str, float]) -> str:
    return json.dumps({k: round(v, 4) for k, v in metrics.items()})


@torch.no_grad()
def prompt_logits(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, prompts: list[str]
) -> tuple[torch.Tensor, list[list[int]]]:
    """Logits `batch pos d_vocab` of BOS + each prompt (right-padded), and each prompt's ids without BOS."""
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    ids = pad_batch([[tokenizer.bos_token_id] + p for p in prompt_ids], tokenizer.pad_token_id).to(model.device)
    logits = model(input_ids=ids, attention_mask=ids != tokenizer.pad_token_id).logits
    return logits.float().cpu(), prompt_ids


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """Id of a single vocabulary token; raises ValueError for an unknown one."""
    idx = tokenizer.convert_tokens_to_ids(token)
    if idx == tokenizer.unk_token_id:
        raise ValueError(f"answer token {token!r} is not in the vocabulary")
    return idx


def token_set_mask(tokenizer: PreTrainedTokenizerFast, cells: list[str], d_vocab: int) -> torch.Tensor:
    """`batch d_vocab` 0/1 mask of the token sets given as JSON arrays."""
    mask = torch.zeros(len(cells), d_vocab)
    for row, cell in enumerate(cells):
        mask[row, [token_id(tokenizer, t) for t in json.loads(cell)]] = 1.0
    return mask


def period(ids: list[int]) -> int:
    """Smallest p > 0 such that the sequence repeats itself with period p (its first half's length)."""
    return next(p for p in range(1, len(ids) + 1) if ids[p:] == ids[: len(ids) - p])


def repeated_half_accuracy(logits: torch.Tensor, prompt_ids: list[list[int]]) -> float:
    """Top-1 accuracy at every position of the repeated half of induction prompts (BOS-prefixed logits)."""
    hits = []
    for row, ids in enumerate(prompt_ids):
        half = period(ids)
        for i in range(half, len(ids)):  # token i sits at position i + 1 after BOS
            hits.append(logits[row, i + 1].argmax().item() == ids[i + 1 - half])
    return sum(hits) / len(hits)


def pair_metrics(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, str]], task: str
) -> dict[str, float]:
    """Task metrics at the last prompt token, clean and corrupted (BOS prepended).

    Set answers (cells starting with "[") give a probability difference (sum over the correct set minus
    sum over the incorrect set); single tokens give a logit difference, accuracy and top-1 accuracy.
    Induction also gets the top-1 accuracy over every position of the repeated half.
    """
    clean, clean_ids = prompt_logits(model, tokenizer, [r["clean"] for r in rows])
    corrupted, corrupted_ids = prompt_logits(model, tokenizer, [r["corrupted"] for r in rows])
    if [len(c) for c in clean_ids] != [len(c) for c in corrupted_ids]:
        raise ValueError("clean and corrupted prompts must have the same number of tokens")
    batch = torch.arange(len(rows))
    last = torch.tensor([len(ids) for ids in clean_ids])
    clean_last, corrupted_last = clean[batch, last], corrupted[batch, last]
    if rows[0]["correct"].startswith("["):
        good = token_set_mask(tokenizer, [r["correct"] for r in rows], clean.shape[-1])
        bad = token_set_mask(tokenizer, [r["incorrect"] for r in rows], clean.shape[-1])

        def prob_diff(logits: torch.Tensor) -> torch.Tensor:
            probs = logits.softmax(-1)
            return (probs * good).sum(-1) - (probs * bad).sum(-1)

        pd_clean = prob_diff(clean_last)
        return {
            "accuracy": (pd_clean > 0).float().mean().item(),
            "clean_prob_diff": pd_clean.mean().item(),
            "corrupted_prob_diff": prob_diff(corrupted_last).mean().item(),
        }
    good_ids = torch.tensor([token_id(tokenizer, r["correct"]) for r in rows])
    bad_ids = torch.tensor([token_id(tokenizer, r["incorrect"]) for r in rows])
    ld_clean = clean_last[batch, good_ids] - clean_last[batch, bad_ids]
    metrics = {
        "accuracy": (ld_clean > 0).float().mean().item(),
        "top1_accuracy": (clean_last.argmax(-1) == good_ids).float().mean().item(),
        "clean_logit_diff": ld_clean.mean().item(),
        "corrupted_logit_diff": (corrupted_last[batch, good_ids] - corrupted_last[batch, bad_ids]).mean().item(),
    }
    if task == "induction":
        metrics["repeated_half_accuracy"] = repeated_half_accuracy(clean, clean_ids)
    return metrics


def task_metrics(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, csv_path: str | Path) -> dict[str, float]:
    """`pair_metrics` on a task CSV (columns clean, corrupted, correct, incorrect); the task is its stem."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return pair_metrics(model, tokenizer, rows, Path(csv_path).stem)


def write_task_csvs(out_dir: Path, tokenizer: PreTrainedTokenizerFast, n_pairs: int, seed: int) -> list[Path]:
    """Write `n_pairs` held-out pairs per task as `<task>.csv`; check that pairs have equal token counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in TASKS:
        rows = demo_tasks.task_rows(task, n_pairs, random.Random(f"{task}-{seed}"), demo_tasks.vocabulary())
        for row in rows:
            clean, corrupted = (tokenizer.tokenize(row[k]) for k in ("clean", "corrupted"))
            assert len(clean) == len(corrupted) and UNK not in clean + corrupted, row
        path = out_dir / f"{task}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["clean", "corrupted", "correct", "incorrect"])
            writer.writeheader()
            writer.writerows(rows)
        paths.append(path)
    return paths


def save_checkpoint(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Save float16 weights (small) under a float32 config (so a plain load computes in float32).

    Tied tensors (the unembedding shares the embedding) are stored once.
    """
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if all(tensor.data_ptr() != kept.data_ptr() for kept in weights.values()):
            weights[name] = tensor
    model.save_pretrained(out, state_dict={k: v.to(torch.float16) for k, v in weights.items()})
    tokenizer.save_pretrained(out)
    demo_tasks.write_word_lists(out / "word_lists.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder (save_pretrained)")
    parser.add_argument("--tasks-out", type=Path, help="write the held-out task CSVs here and evaluate on them")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-positions", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--n-pairs", type=int, default=256, help="pairs per task CSV")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=500, help="log held-out metrics every this many steps")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(args.n_positions)
    model = build_model(tokenizer, args.n_layer, args.d_model, args.n_head, args.n_positions)
    log.info("%d parameters, vocabulary %d, %d threads", model.num_parameters(), len(tokenizer), args.threads)
    start = time.perf_counter()
    train(model, tokenizer, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
          log_every=args.log_every, eval_every=args.eval_every)
    log.info("training took %.1f minutes", (time.perf_counter() - start) / 60)
    save_checkpoint(model, tokenizer, args.out)
    if args.tasks_out:
        saved = GPT2LMHeadModel.from_pretrained(args.out, dtype=torch.float32).eval()
        for path in write_task_csvs(args.tasks_out, tokenizer, args.n_pairs, args.seed):
            log.info("%s: %s", path.name, _fmt(task_metrics(saved, tokenizer, path)))


if __name__ == "__main__":
    main()
