"""Benchmark of compatibility scoring (not a test): the engine against a naive per-example loop, in one run.

Prints tokens/s of both, their ratio, achieved FLOP/s against this machine's dense matmul FLOP/s
measured in the same run (interleaved with the work, chunk by chunk, and taken as the median, so that the
share repeats from run to run), the attention FLOPs beside the nominal figure, the padding share, and peak
memory on 2K vs 20K examples.

    python benchmarks/bench_compatibility.py [--examples 160] [--device cpu]

Model: a randomly initialised Llama, by default of 42M parameters (hidden 512, 8 layers, vocabulary 16,384),
responses of 20 to 1,000 tokens (log-uniform), built offline. FLOPs are counted as 2 x parameters x
tokens (the nominal figure) and as the matmul work actually done (the engine applies the output
layer only at response positions, the naive loop everywhere).
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch


def matmul_flops(device: str, dtype: torch.dtype = torch.float32, seconds: float = 0.5) -> float:
    """Dense matmul FLOP/s in the model's DTYPE: as many square products as fit in ``seconds``, timed together (a
    sustained rate, steadier than the best of a few single products); 1024x1024 on the CPU, 8192x8192 on a GPU
    (small products leave a GPU's tensor cores idle: the reference would understate its peak)."""
    n = 8192 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.startswith("cuda") and count % 10 == 0:
            sync(device)
    sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_texts(tokenizer, n: int, seed: int) -> tuple[list[str], list[str]]:
    """Instructions and responses of real words, response lengths log-uniform in [20, 1000] tokens."""
    from magpie_teach.tiny import shipped_texts

    words = " ".join(shipped_texts()).split()
    rng = np.random.default_rng(seed)
    instructions, responses = [], []
    for _ in range(n):
        target = int(math.exp(rng.uniform(math.log(20), math.log(1000))))
        start = int(rng.integers(0, len(words)))
        chunk = []
        while len(chunk) < target:  # about 1 token per word with the tiny tokenizer; trimmed below
            chunk += words[start : start + target]
            start = 0
        ids = tokenizer(" ".join(chunk), add_special_tokens=False)["input_ids"][:target]
        responses.append(tokenizer.decode(ids))
        begin = int(rng.integers(0, len(words) - 30))
        instructions.append(" ".join(words[begin : begin + int(rng.integers(5, 30))]) + "?")
    return instructions, responses


def build_model(tokenizer, hidden: int, layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64, intermediate_size=int(hidden * 2.6875), max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def naive_loop(model, examples, device: str) -> float:
    """Batch 1, full logits at every position, then the loss over the response tokens."""
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for example in examples:
            ids = torch.from_numpy(example.input_ids).to(device)[None]
            mask = torch.from_numpy(example.loss_mask[1:]).to(device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits[mask], ids[0, 1:][mask])
            nll.item()
    sync(device)
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would count the parent's peak before exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(n: int) -> None:
    """Runs in a subprocess: score n examples with a small model, print peak RSS (MB) after load and at the end."""
    from magpie_teach.chat import prepare_tokenizer
    from magpie_teach.scoring.compatibility import score_compatibility
    from magpie_teach.tiny import build_tiny_causal_lm, build_tiny_tokenizer

    tokenizer = prepare_tokenizer(build_tiny_tokenizer())
    model = build_tiny_causal_lm(tokenizer, "xs").eval()
    instructions, responses = make_texts(tokenizer, n, seed=1)
    loaded = peak_rss_mb()
    score_compatibility(model, tokenizer, instructions, responses, show_progress=False)
    peak = peak_rss_mb()
    print(json.dumps({"after_inputs_mb": loaded, "peak_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-tokens", type=int, default=None, help="default: 8192 on CPU, 65536 on GPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16384, help="e.g. 151936 (Qwen2) to see the output layer's share")
    parser.add_argument("--chunks", type=int, default=8, help="interleavings of the two paths and the reference")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return

    from magpie_teach.chat import prepare_tokenizer, tokenize_conversation
    from magpie_teach.scoring.compatibility import score_compatibility
    from magpie_teach.tiny import build_tiny_tokenizer

    device = args.device
    batch_tokens = args.batch_tokens or (65536 if device.startswith("cuda") else 8192)
    tokenizer = prepare_tokenizer(build_tiny_tokenizer())
    model = build_model(tokenizer, args.hidden, args.layers, args.vocab).to(device, getattr(torch, args.dtype))
    params = model.num_parameters()
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    body = params - head - embed
    instructions, responses = make_texts(tokenizer, args.examples, seed=0)
    examples = [tokenize_conversation(tokenizer, x, y) for x, y in zip(instructions, responses)]
    tokens = sum(len(e.input_ids) for e in examples)
    scored = sum(int(e.loss_mask.sum()) for e in examples)
    lengths = [e.n_response_tokens for e in examples]
    print(f"device {device} ({torch.get_num_threads()} threads), dtype {args.dtype}, model {params / 1e6:.1f}M parameters "
          f"({body / 1e6:.1f}M in the blocks, output layer {head / 1e6:.1f}M)")  # fmt: skip
    print(
        f"{len(examples)} examples, {tokens} tokens ({scored} response tokens, {min(lengths)}-{max(lengths)} per response)"
    )

    ids = torch.randint(0, 512, (1, 256), device=device)
    with torch.inference_mode():
        model(input_ids=ids)
        sync(device)
        start = time.perf_counter()
        for _ in range(5):
            model(input_ids=ids).logits.sum().item()
        forward = (time.perf_counter() - start) / 5
    plain_forward = 2 * params * 256 / forward

    # warm-up of both paths on a few examples
    naive_loop(model, examples[:3], device)
    score_compatibility(
        model, tokenizer, instructions[:3], responses[:3], unconditioned_loss=False, show_progress=False
    )

    # The two paths and the matmul reference interleaved, chunk by chunk (the order of the paths alternating), so
    # that all three see the same machine: the reference is the median of its measurements over the run.
    naive_s = engine_s = 0.0
    references, real, padded = [], 0, 0
    chunks = np.array_split(np.arange(len(examples)), args.chunks)
    for index, chunk in enumerate(chunks):
        references.append(matmul_flops(device, getattr(torch, args.dtype)))
        for path in ("naive", "engine") if index % 2 == 0 else ("engine", "naive"):
            if path == "naive":
                naive_s += naive_loop(model, [examples[i] for i in chunk], device)
                continue
            sync(device)
            start = time.perf_counter()
            out = score_compatibility(
                model,
                tokenizer,
                [instructions[i] for i in chunk],
                [responses[i] for i in chunk],
                unconditioned_loss=False,
                batch_tokens=batch_tokens,
                show_progress=False,
            )
            sync(device)
            engine_s += time.perf_counter() - start
            chunk_tokens = sum(len(examples[i].input_ids) for i in chunk)
            real += chunk_tokens
            padded += chunk_tokens / (1 - out.attrs["padding_fraction"])
    references.append(matmul_flops(device, getattr(torch, args.dtype)))
    peak = float(np.median(references))
    padding = 1 - real / padded
    side = 8192 if device.startswith("cuda") else 1024
    print(f"dense matmul ({side}x{side} {args.dtype}), median of {len(references)} measurements interleaved with the work: "
          f"{peak / 1e9:.1f} GFLOP/s (range {min(references) / 1e9:.1f}-{max(references) / 1e9:.1f})")  # fmt: skip
    print(f"plain forward, batch 1, length 256: {plain_forward / peak:.0%} of matmul")

    nominal = 2 * params * tokens
    engine_work = 2 * body * tokens / (1 - padding) + 2 * head * scored
    naive_work = 2 * (body + head) * tokens
    print()
    print(
        f"{'':28s}{'tokens/s':>10s}{'nominal FLOP/s':>16s}{'of matmul':>11s}{'actual FLOP/s':>15s}{'of matmul':>11s}"
    )
    for name, seconds, work in (
        ("naive loop (batch 1)", naive_s, naive_work),
        ("engine (end to end)", engine_s, engine_work),
    ):
        print(f"{name:28s}{tokens / seconds:10.0f}{nominal / seconds / 1e9:13.1f} G {nominal / seconds / peak:10.0%}"
              f"{work / seconds / 1e9:12.1f} G {work / seconds / peak:10.0%}")  # fmt: skip
    print(f"engine / naive speed: {naive_s / engine_s:.2f}x; padding {padding:.1%} of computed tokens; "
          f"logits at {scored / tokens:.0%} of positions")  # fmt: skip
    # causal attention (QK^T and AV, half the square) beside the 2 x parameters x tokens figure
    config = model.config
    attention = sum(2 * config.num_hidden_layers * config.hidden_size * len(e.input_ids) ** 2 for e in examples)
    longest = max(len(e.input_ids) for e in examples)
    print(f"attention FLOPs: {attention / nominal:.1%} on top of 2 x parameters x tokens for these examples; "
          f"{2 * config.num_hidden_layers * config.hidden_size * longest / (2 * params):.1%} for the longest "
          f"({longest} tokens), {2 * config.num_hidden_layers * config.hidden_size * 4096 / (2 * params):.1%} "
          "at 4,096 tokens")  # fmt: skip

    if not args.skip_memory:
        print()
        results = {}
        for n in (2000, 20000):
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(n)], capture_output=True, text=True, check=True
            )
            results[n] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"memory, {n:6d} examples (tiny xs model): peak RSS {results[n]['peak_mb']:.0f} MB "
                  f"(inputs and model loaded: {results[n]['after_inputs_mb']:.0f} MB)")  # fmt: skip
        print(f"peak memory 20K / 2K: {results[20000]['peak_mb'] / results[2000]['peak_mb']:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tempfile.tempdir = tempfile.gettempdir()
    main()
