"""Train a small decoder LM on associative recall at long context, with Stream-CQSA attention.

    python examples/train_long_context.py                  # CPU defaults: ends at 8192 tokens, a few minutes
    python examples/train_long_context.py --seq-len 65536 --d-model 256 --heads 8 --kv-heads 2 \\
        --layers 2 --tokens-per-step 262144 --num-chunks 31            # a GPU

The task. Each sequence is filler tokens with key-value pairs ``k v`` scattered
over the whole context, followed by queries ``k v k v ...`` that repeat some of
the keys: at every query key the model must predict the value that followed
that key, possibly thousands of tokens back. Accuracy is measured on those
predictions only; chance is ``1 / num_values``. Every batch is freshly sampled,
so the accuracy printed per step is on unseen sequences.

The model. Token embeddings, a token shift (each position adds a learned
projection of its predecessor's embedding, so one attention layer can match a
query key against the key *before* each value), then pre-norm blocks of
`stream_cqsa_jax.nnx.StreamCQSAAttention` (causal, grouped-query) and an MLP.
The attention's plan is forced to cut the sequence into `--num-chunks` chunks,
so forward and backward really run as quorum subproblems (the plan is printed).

Training follows a length curriculum: the recall mechanism is learned cheaply
on short sequences, then the context grows by `--growth` per stage up to
`--seq-len`, where the last stage trains and the final evaluation runs.
Everything is deterministic given `--seed`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import stream_cqsa_jax as sc


# -- data -------------------------------------------------------------------------------------------


class RecallTask:
    """Token ids: keys [0, K), values [K, K + V), filler [K + V, K + V + F)."""

    def __init__(self, num_keys: int, num_values: int, num_filler: int, queries: int):
        if queries < 1 or queries > num_keys:
            raise ValueError(f"--queries must be in [1, --num-keys={num_keys}], got {queries}")
        self.num_keys, self.num_values, self.num_filler, self.queries = num_keys, num_values, num_filler, queries
        self.vocab = num_keys + num_values + num_filler

    def pairs_for(self, seq_len: int) -> int:
        """Key-value pairs in a context of `seq_len` tokens: more for longer contexts, at most one per key."""
        return int(min(self.num_keys, max(self.queries, (seq_len - 2 * self.queries) // 64)))

    def batch(self, rng: np.random.Generator, batch: int, seq_len: int):
        """(tokens int32 [B, T], targets int32 [B, T], weights float32 [B, T]): weight 1 where a value is due."""
        q = self.queries
        context = seq_len - 2 * q
        pairs = self.pairs_for(seq_len)
        if context < 2 * pairs:
            raise ValueError(f"sequence length {seq_len} is too short for {q} queries")
        first_filler = self.num_keys + self.num_values
        tokens = rng.integers(first_filler, self.vocab, size=(batch, seq_len))
        targets = np.zeros((batch, seq_len), np.int32)
        weights = np.zeros((batch, seq_len), np.float32)
        query_pos = context + 2 * np.arange(q)
        for b in range(batch):
            keys = rng.choice(self.num_keys, pairs, replace=False)
            values = self.num_keys + rng.integers(0, self.num_values, pairs)
            slots = 2 * rng.choice(context // 2, pairs, replace=False)
            tokens[b, slots], tokens[b, slots + 1] = keys, values
            asked = rng.choice(pairs, q, replace=False)
            tokens[b, query_pos], tokens[b, query_pos + 1] = keys[asked], values[asked]
            targets[b, query_pos], weights[b, query_pos] = values[asked], 1.0
        return jnp.asarray(tokens, jnp.int32), jnp.asarray(targets), jnp.asarray(weights)


# -- model ------------------------------------------------------------------------------------------


class Block(nnx.Module):
    """Pre-norm decoder block: causal Stream-CQSA attention, then a GELU MLP."""

    def __init__(self, d_model: int, heads: int, kv_heads: int, attention: dict, *, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.attn = sc.nnx.StreamCQSAAttention(
            heads, d_model, num_kv_heads=kv_heads, use_bias=False, is_causal=True, rngs=rngs, **attention
        )
        self.mlp_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        """h [B, T, D] -> [B, T, D]."""
        h = h + self.attn(self.attn_norm(h))
        return h + self.down(jax.nn.gelu(self.up(self.mlp_norm(h))))


class DecoderLM(nnx.Module):
    """Embedding, token shift, `layers` blocks, final norm, output projection."""

    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, kv_heads: int, attention: dict, *, rngs):
        self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
        self.shift = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)
        self.blocks = nnx.List([Block(d_model, heads, kv_heads, attention, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.unembed = nnx.Linear(d_model, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens int [B, T] -> logits [B, T, vocab]."""
        h = self.embed(tokens)
        h = h + self.shift(jnp.pad(h[:, :-1], ((0, 0), (1, 0), (0, 0))))
        for block in self.blocks:
            h = block(h)
        return self.unembed(self.norm(h))


def loss_and_accuracy(model: DecoderLM, tokens, targets, weights):
    """Cross-entropy and accuracy over the weighted (query) positions."""
    logits = model(tokens)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    total = jnp.maximum(weights.sum(), 1.0)
    accuracy = ((logits.argmax(-1) == targets) * weights).sum() / total
    return (ce * weights).sum() / total, accuracy


@nnx.jit
def train_step(model: DecoderLM, optimizer: nnx.Optimizer, tokens, targets, weights):
    (loss, accuracy), grads = nnx.value_and_grad(loss_and_accuracy, has_aux=True)(model, tokens, targets, weights)
    optimizer.update(model, grads)
    return loss, accuracy


@nnx.jit
def eval_step(model: DecoderLM, tokens, targets, weights):
    return loss_and_accuracy(model, tokens, targets, weights)


# -- driver -----------------------------------------------------------------------------------------


def stage_lengths(start: int, final: int, growth: int) -> list[int]:
    """start, start * growth, ... (below final), final."""
    lengths, length = [], start
    while length < final:
        lengths.append(length)
        length *= growth
    return lengths + [final]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=8192, help="final context length")
    p.add_argument("--start-len", type=int, default=64, help="context length of the first stage")
    p.add_argument("--growth", type=int, default=16, help="context grows by this factor per stage")
    p.add_argument("--first-steps", type=int, default=200, help="steps of the first (short) stage")
    p.add_argument("--stage-steps", type=int, default=15, help="steps of each longer stage")
    p.add_argument("--tokens-per-step", type=int, default=8192, help="batch = max(1, this // context length)")
    p.add_argument("--eval-batches", type=int, default=4, help="fresh sequences evaluated at --seq-len at the end")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1, help="grouped-query attention")
    p.add_argument("--num-keys", type=int, default=64)
    p.add_argument("--num-values", type=int, default=64)
    p.add_argument("--num-filler", type=int, default=16)
    p.add_argument("--queries", type=int, default=8, help="queries per sequence")
    p.add_argument("--num-chunks", type=int, default=7, help="chunks per sequence (0: let --memory-budget decide)")
    p.add_argument("--memory-budget", default=None, help="device memory one attention call may add, e.g. 2GiB")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("seq_len", "start_len", "growth", "first_steps", "tokens_per_step", "d_model", "layers", "heads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.eval_batches < 0 or args.stage_steps < 0:
        p.error("--eval-batches and --stage-steps must not be negative")
    if args.start_len > args.seq_len:
        p.error("--start-len must not exceed --seq-len")
    return args


def main(argv=None) -> dict:
    """Trains, prints one line per step, and returns the final figures."""
    args = parse_args(argv)
    task = RecallTask(args.num_keys, args.num_values, args.num_filler, args.queries)
    attention = {"memory_budget": args.memory_budget}
    if args.num_chunks:
        attention["num_chunks"] = args.num_chunks
    model = DecoderLM(
        task.vocab, args.d_model, args.layers, args.heads, args.kv_heads, attention, rngs=nnx.Rngs(args.seed)
    )
    lengths = stage_lengths(args.start_len, args.seq_len, args.growth)
    total_steps = args.first_steps + args.stage_steps * (len(lengths) - 1)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(20, total_steps), max(total_steps, 21), end_value=0.1 * args.lr
    )
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.0), wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    chance = 1.0 / args.num_values

    head_dim = args.d_model // args.heads
    final_batch = max(1, args.tokens_per_step // args.seq_len)
    plan = sc.plan(
        q_len=args.seq_len,
        num_q_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=head_dim,
        batch=final_batch,
        is_causal=True,
        memory_budget=args.memory_budget,
        num_chunks=args.num_chunks or None,
    )
    backward = plan.backward()
    print(plan.summary())
    print(f"  backward   : C = {backward.num_chunks}, {len(backward.subproblems)} subproblems")
    print(
        f"\nrecall task: {task.pairs_for(args.seq_len)} pairs and {args.queries} queries per "
        f"{args.seq_len}-token sequence, {args.num_values} values (chance accuracy {chance:.3f}); "
        f"stages {lengths} on {jax.devices()[0].platform}\n"
    )

    start = time.perf_counter()
    step = 0
    for stage, length in enumerate(lengths):
        batch = max(1, args.tokens_per_step // length)
        for _ in range(args.first_steps if stage == 0 else args.stage_steps):
            loss, accuracy = train_step(model, optimizer, *task.batch(rng, batch, length))
            loss, accuracy = float(loss), float(accuracy)
            print(
                f"step {step:4d}  len {length:6d}  batch {batch:4d}  loss {loss:7.4f}  accuracy {accuracy:6.3f}  "
                f"elapsed {time.perf_counter() - start:6.1f} s",
                flush=True,
            )
            step += 1

    final = float("nan")
    if args.eval_batches:
        hits = [float(eval_step(model, *task.batch(rng, 1, args.seq_len))[1]) for _ in range(args.eval_batches)]
        final = sum(hits) / len(hits)
        print(
            f"\nfinal accuracy on {args.eval_batches} fresh {args.seq_len}-token sequences: {final:.3f} "
            f"(chance {chance:.3f})"
        )
    elapsed = time.perf_counter() - start
    print(f"{step} steps in {elapsed:.1f} s")
    return {"accuracy": final, "chance": chance, "steps": step, "seconds": elapsed, "loss": loss}


if __name__ == "__main__":
    main()
