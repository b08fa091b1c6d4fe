"""The ``rwkvpy`` command. Subcommands are thin wrappers over library calls.

Errors a user can cause print one line (``rwkvpy: error: ...``) and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from .checkpoint import FORMATS, convert_checkpoint, describe_checkpoint, read_checkpoint
from .errors import RwkvpyError
from .generation import FORMATS as CHAT_FORMATS
from .generation import ChatSession, SamplingParams, generate
from .loading import default_model_path, load, load_initial_state, quantize_checkpoint
from .models import RWKV4Config, build_model, random_state_dict
from .ops.allocator import keep_freed_memory
from .tokenizers import tokenizer_for_model


def cmd_convert(args) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise RwkvpyError(f"{dst}: already exists (pass --overwrite to replace it)")
    if dst.resolve() == src.resolve():
        raise RwkvpyError(f"{dst}: destination is the source")
    r = convert_checkpoint(src, dst, args.to)
    print(f"read {src} ({r['source_format']}): {_describe(r['config'], r['state_dict'])}")
    print(f"wrote {dst} ({args.to}): {r['identical']}/{r['tensors']} tensors bit-identical")
    if r["left_out"]:
        print(f"left out {len(r['left_out'])} tensors no computation uses: {', '.join(r['left_out'])}")
    print(f"probe: max |logit difference| = {r['max_logit_diff']:.3g} over {r['probe_tokens']} tokens (fp32)")
    return 0


def cmd_quantize(args) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise RwkvpyError(f"{dst}: already exists (pass --overwrite to replace it)")
    quantize_checkpoint(src, dst, data=args.data, tokenizer=args.tokenizer, ctx_len=args.ctx_len,
                        max_loss_increase=None if args.force else args.max_loss_increase, log=print)
    return 0


def cmd_bench(args) -> int:
    from . import bench

    def ints(text, name):
        try:
            return tuple(int(v) for v in text.split(","))
        except ValueError:
            raise RwkvpyError(f"--{name}: expected comma-separated integers, got {text!r}") from None

    kinds = tuple(args.kinds.split(","))
    unknown = [k for k in kinds if k not in bench.KINDS]
    if unknown:
        raise RwkvpyError(f"--kinds: unknown {unknown[0]!r}; choose from {', '.join(bench.KINDS)}")
    path = args.model or default_model_path()
    read_checkpoint(path)  # a bad path fails here, in one line
    if args.plan:
        for kind in kinds:
            print_plan(path, "fp32" if kind == "int8" else kind, kind == "int8")
    result = bench.run(path, kinds=kinds, batches=ints(args.batches, "batches"), prompt=args.prompt,
                       decode_tokens=args.decode_tokens, repeats=args.repeats, peers=not args.no_peers,
                       long_context=args.long_context, compiled=args.compile)
    if args.json:
        bench.write_json(result, args.json)
    return 0


def cmd_info(args) -> int:
    cfg, sd, fmt = read_checkpoint(args.model)
    print(f"{args.model}: {fmt}")
    for k, v in cfg.to_dict().items():
        print(f"  {k:15s} {v}")
    print(f"  {'parameters':15s} {sum(t.numel() for t in sd.values()):,}")
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in sd.values())
    print(f"  {'dtypes':15s} {', '.join(f'{d} ({n})' for d, n in dtypes.items())}")
    if args.plan:
        print_plan(args.model, args.dtype, args.int8)
    return 0


def print_plan(model_path, dtype: str, int8: bool) -> None:
    """The kernel plan of this machine for the model, and the timings behind it."""
    from .ops.plan import cache_path, cpu_flags, kernels_mode

    if kernels_mode() == "safe":
        print("kernels: RWKVPY_KERNELS=safe: plain F.linear everywhere, nothing planned")
        return
    report: list[str] = []
    load(model_path, dtype=dtype, quantize="int8" if int8 else None, plan_report=report)
    print(f"kernel plan ({dtype}{', int8' if int8 else ''}; CPU flags: {cpu_flags()}; {torch.get_num_threads()} "
          f"threads; cache {cache_path()}); '*' marks the kernel used for each rows class:")
    for line in report:
        print(line)


@torch.no_grad()
def cmd_demo(args) -> int:
    try:
        path = default_model_path()
        model = load(path)
        print(f"The bundled model: RWKV-4 trained on tinyshakespeare (bytes), {path}")
    except RwkvpyError:
        print("No bundled model found: using a small RANDOM byte-level RWKV-4, so its text is noise.")
        cfg = RWKV4Config(vocab_size=256, n_embd=128, n_layer=4)
        model = build_model(cfg, random_state_dict(cfg, seed=args.seed))
    c = model.config
    print(f"{c.n_layer} layers, width {c.n_embd}, {sum(p.numel() for p in model.parameters()):,} parameters\n")

    gen = generate(model, tokenizer_for_model(c.vocab_size), args.prompt, max_new_tokens=args.tokens,
                   temperature=0.8, top_p=0.9, seed=args.seed)
    t0 = time.perf_counter()
    sys.stdout.write(args.prompt)
    for piece in gen:  # parallel form over the prompt, then the recurrent form token by token
        sys.stdout.write(piece)
        sys.stdout.flush()
    dt = time.perf_counter() - t0
    print(f"\n\n[{len(gen.tokens)} tokens in {dt:.2f}s: {len(gen.tokens) / dt:.0f} tokens/s, recurrent form]")

    tokens = torch.tensor([gen.prompt_tokens + gen.tokens])
    whole, state = model(tokens)  # the same text in one parallel call
    rows, s = [], None
    for t in range(tokens.shape[1]):
        row, s = model.step(tokens[:, t], s)
        rows.append(row)
    diff = (torch.stack(rows, 1) - whole).abs().max().item()
    print(f"[parallel vs recurrent form over all {tokens.shape[1]} tokens: max |logit difference| = {diff:.1g}]")
    return 0


def unescape(text: str) -> str:
    """Backslash escapes typed on a command line: \\n, \\t, \\r and \\\\."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def load_model_and_tokenizer(args):
    if args.model is None:
        args.model = default_model_path()
    model = load(args.model, dtype=args.dtype, quantize="int8" if args.int8 else None)
    if args.compile:
        model.compile_step()
    return model, tokenizer_for_model(model.config.vocab_size, args.tokenizer, args.model)


def sampling_from(args) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        penalty_decay=args.penalty_decay, banned_tokens=tuple(args.ban), stop_tokens=tuple(args.stop_token),
        stop_strings=tuple(unescape(s) for s in args.stop), max_new_tokens=args.max_tokens, seed=args.seed,
    )


def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else unescape(args.prompt)
    model, tokenizer = load_model_and_tokenizer(args)
    if args.decode == "recompute":
        from .models.gpt import GPT, RecomputeGPT

        if not isinstance(model, GPT):
            raise RwkvpyError(f"--decode recompute is for the GPT baseline; {args.model} is {model.config.arch}")
        model = RecomputeGPT(model)
    state = load_initial_state(args.state_in, model) if args.state_in else None
    gen = generate(model, tokenizer, prompt, state=state, params=sampling_from(args))
    t0 = time.perf_counter()
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    if args.state_out:
        gen.state.save(args.state_out, text=prompt + gen.text)
    if args.verbose:
        print(f"[{len(gen.prompt_tokens)} prompt + {len(gen.tokens)} new tokens in {dt:.2f}s, "
              f"stopped by {gen.finish_reason}]", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from .serve import Server

    if args.compile:
        # torch.compile specialises on the batch: every new number of running streams would
        # stop all of them for a new compilation (60-120 s for RWKV-7 on 2 cores), and with
        # a dynamic batch the compiled step ran slower than the eager one (docs/design.md)
        raise RwkvpyError("serve: --compile is not supported (each number of concurrent streams would "
                          "compile anew, for a minute or more, while serving)")
    model, tokenizer = load_model_and_tokenizer(args)
    name = args.model_name or Path(str(args.model)).name.removesuffix(".pth")
    server = Server(model, tokenizer, name, host=args.host, port=args.port, chat_format=args.chat_format,
                    api_key=args.api_key, max_streams=args.max_streams, max_queue=args.max_queue,
                    cache_mib=args.cache_mib, prefill_chunk=args.prefill_chunk,
                    max_prompt_tokens=args.max_prompt_tokens, log_level="info")
    print(f"rwkvpy serve: {name} at http://{args.host}:{args.port}/v1 (max {args.max_streams} streams, "
          f"cache {args.cache_mib} MiB, prefill segments of {server.engine.prefill_chunk} tokens)", file=sys.stderr)
    server.run()
    return 0


CHAT_HELP = """commands: /reset  /save FILE  /load FILE  /regenerate  /help  /quit"""


def cmd_chat(args) -> int:
    model, tokenizer = load_model_and_tokenizer(args)
    session = ChatSession(model, tokenizer, format=args.format, system=args.system,
                          params=sampling_from(args),
                          initial_state=load_initial_state(args.state_in, model) if args.state_in else None)
    user, bot = {"world": ("User", "Assistant"), "raven": ("Bob", "Alice"),
                 "alpaca": ("Instruction", "Response")}.get(args.format, ("User", "Assistant"))
    print(f"rwkvpy chat ({args.format} format). {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input(f"{user}: ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        command, _, arg = line.strip().partition(" ")
        try:
            if command in ("/quit", "/exit"):
                return 0
            if command == "/help":
                print(CHAT_HELP)
                continue
            if command == "/reset":
                session.reset()
                print("[conversation reset]")
                continue
            if command in ("/save", "/load"):
                if not arg:
                    print(f"[usage: {command} FILE]")
                    continue
                getattr(session, command[1:])(arg.strip())
                print(f"[{'saved to' if command == '/save' else 'loaded'} {arg.strip()}]")
                continue
            if command == "/regenerate":
                stream = session.regenerate()
            elif command.startswith("/"):
                print(f"[unknown command {command}; {CHAT_HELP}]")
                continue
            elif not line.strip():
                continue
            else:
                stream = session.send(line)
            sys.stdout.write(f"{bot}:")
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        except RwkvpyError as e:
            print(f"[error: {e}]")
        except KeyboardInterrupt:
            print("\n[interrupted]")


def cmd_train(args) -> int:
    from dataclasses import fields

    from .train import TrainConfig, Trainer

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    trainer = Trainer(TrainConfig(**given), resume=args.resume)
    if trainer.rank == 0:
        print(f"{trainer.cfg.arch}: {trainer.n_params:,} parameters; data {len(trainer.data.train):,} train / "
              f"{len(trainer.data.val):,} val tokens; writing {trainer.out}", file=sys.stderr)
    result = trainer.fit()
    if trainer.rank == 0:
        print(json.dumps(result))
    return 0


def cmd_eval(args) -> int:
    from .train.evaluate import evaluate_file

    if args.model is None:
        args.model = default_model_path()
    model, tokenizer = load(args.model, dtype=args.dtype, quantize="int8" if args.int8 else None), None
    if model.config.vocab_size != 256 or args.tokenizer:
        tokenizer = tokenizer_for_model(model.config.vocab_size, args.tokenizer, args.model)
    r = evaluate_file(model, args.data, tokenizer, ctx_len=args.ctx_len, val_fraction=args.val_fraction,
                      split=args.split)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['split']} loss {r['loss']:.4f} nats/token, {r['bits_per_byte']:.4f} bits/byte "
              f"({r['tokens']:,} tokens, windows of {r['ctx_len']})")
    return 0


def _describe(cfg, sd) -> str:
    return describe_checkpoint(cfg, sd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rwkvpy", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a checkpoint between formats and verify it")
    c.add_argument("src", help="official .pth, Hugging Face folder, or rwkvpy folder/.safetensors")
    c.add_argument("dst", help="output path (a folder for native and hf, a file for pth)")
    c.add_argument("--to", required=True, choices=FORMATS)
    c.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    c.set_defaults(func=cmd_convert)

    qz = sub.add_parser("quantize", help="write an int8 copy of a checkpoint, with a quality report")
    qz.add_argument("src", help="checkpoint: .pth, Hugging Face folder or rwkvpy format")
    qz.add_argument("dst", help="output folder (rwkvpy format)")
    qz.add_argument("--int8", action="store_true", required=True, help="weight-only int8, per-row scales")
    qz.add_argument("--data", help="text file: compare validation loss (last 10%%) before and after")
    qz.add_argument("--tokenizer", help="for --data (default: the model folder's, else by vocabulary)")
    qz.add_argument("--ctx-len", type=int, default=128, help="evaluation window (default 128)")
    qz.add_argument("--max-loss-increase", type=float, default=1.0, metavar="PERCENT",
                    help="refuse to write if the loss rises more than this (default 1%%)")
    qz.add_argument("--force", action="store_true", help="write even past --max-loss-increase")
    qz.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    qz.set_defaults(func=cmd_quantize)

    b = sub.add_parser("bench", help="decode/prefill speed, memory and bandwidth floor, with peers")
    b.add_argument("--model", help="default: the bundled model")
    b.add_argument("--kinds", default="fp32,bf16,int8", help="weight storages to measure (fp32,bf16,fp16,int8)")
    b.add_argument("--batches", default="1,16,64", help="decode batch sizes (default 1,16,64)")
    b.add_argument("--prompt", type=int, default=1024, help="prefill length (default 1024)")
    b.add_argument("--decode-tokens", type=int, default=16, help="tokens per decode measurement")
    b.add_argument("--repeats", type=int, default=5, help="rounds; medians are reported")
    b.add_argument("--no-peers", action="store_true", help="skip the official rwkv package and transformers")
    b.add_argument("--long-context", type=int, default=0, metavar="N",
                   help="also compare RSS while decoding after N tokens of context with after 1000")
    b.add_argument("--compile", action="store_true",
                   help="also measure decode batch 1 through torch.compile (~30 s to compile per kind)")
    b.add_argument("--plan", action="store_true", help="print the kernel plan for each kind, then measure")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="print a checkpoint's format, shapes and size (and the kernel plan)")
    i.add_argument("model")
    i.add_argument("--plan", action="store_true", help="also print this machine's kernel plan and its timings")
    i.add_argument("--dtype", default="fp32", help="for --plan: how matrices are stored (fp32, bf16, fp16)")
    i.add_argument("--int8", action="store_true", help="for --plan: int8 projections")
    i.set_defaults(func=cmd_info)

    def model_args(q):
        q.add_argument("--model", help="checkpoint: .pth, HF folder or rwkvpy format (default: the bundled "
                       "tinyshakespeare model)")
        q.add_argument("--tokenizer", help="tokenizer.json, World vocab .txt, or 'bytes' (default: "
                       "the model folder's, else implied by the vocabulary size)")
        q.add_argument("--dtype", default="fp32", help="how matrices are stored: fp32 (default), bf16, fp16")
        q.add_argument("--int8", action="store_true", help="quantize projections to int8 on load")
        q.add_argument("--compile", action="store_true",
                       help="decode through torch.compile (~30 s to start, faster tokens; needs a C++ compiler)")

    def sampling_args(q, temperature, top_p, max_tokens):
        q.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
        q.add_argument("--top-p", type=float, default=top_p)
        q.add_argument("--top-k", type=int, default=0)
        q.add_argument("--min-p", type=float, default=0.0)
        q.add_argument("--presence-penalty", type=float, default=0.0)
        q.add_argument("--frequency-penalty", type=float, default=0.0)
        q.add_argument("--penalty-decay", type=float, default=1.0)
        q.add_argument("--ban", type=int, action="append", default=[], metavar="ID", help="banned token id")
        q.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (\\n ok)")
        q.add_argument("--stop-token", type=int, action="append", default=[], metavar="ID")
        q.add_argument("--max-tokens", type=int, default=max_tokens)
        q.add_argument("--seed", type=int, default=None)

    g = sub.add_parser("generate", help="continue a prompt, streaming to stdout")
    model_args(g)
    g.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    sampling_args(g, temperature=1.0, top_p=0.85, max_tokens=200)
    g.add_argument("--state-in", metavar="FILE",
                   help="start from a saved state, or an RWKV-7 state-tuned file (att.time_state)")
    g.add_argument("--state-out", metavar="FILE", help="save the final state")
    g.add_argument("--decode", choices=("state", "recompute"), default="state",
                   help="recompute: a GPT decoded from its token ids alone (attention as an RNN; time ~ t^layers)")
    g.add_argument("-v", "--verbose", action="store_true", help="print token counts and time to stderr")
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="interactive chat (World, Raven or Alpaca format)")
    model_args(ch)
    ch.add_argument("--format", choices=list(CHAT_FORMATS), default="world")
    ch.add_argument("--system", help="system prompt")
    ch.add_argument("--state-in", metavar="FILE",
                    help="start (and /reset) from a saved state or an RWKV-7 state-tuned file")
    sampling_args(ch, temperature=1.0, top_p=0.3, max_tokens=500)
    ch.set_defaults(func=cmd_chat, presence_penalty=0.4, frequency_penalty=0.4, penalty_decay=0.996)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching, prefix cache)")
    model_args(sv)
    sv.add_argument("--model-name", help="the id clients ask for (default: the model's file or folder name)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (401 otherwise)")
    sv.add_argument("--chat-format", choices=list(CHAT_FORMATS), help="default: from the tokenizer (World: world)")
    sv.add_argument("--max-streams", type=int, default=32, help="streams decoded together (default 32)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests that may wait; beyond: 429 (default 64)")
    sv.add_argument("--cache-mib", type=int, default=512, help="prefix state cache budget (default 512 MiB)")
    sv.add_argument("--prefill-chunk", type=int,
                    help="prompt tokens per prefill segment, read between decode steps (default: measured at "
                         "start, the longest of 8-128 that costs <= 1.5 decode steps)")
    sv.add_argument("--max-prompt-tokens", type=int, default=16384)
    sv.set_defaults(func=cmd_serve)

    from .train import ARCHS, PRECISIONS, TrainConfig

    t = sub.add_parser("train", help="train a language model (RWKV-4, RWKV-7, RetNet or the GPT baseline)")
    t.add_argument("--data", required=True, help="a text file (bytes unless --tokenizer is given)")
    t.add_argument("--out", dest="out_dir", help="output folder (checkpoints, log.csv, curves.png, model/)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    t.add_argument("--tokenizer")
    t.add_argument("--arch", choices=ARCHS)
    defaults = TrainConfig(data="")
    for name in ("n_layer", "n_embd", "dim_ffn", "n_head", "head_size", "ctx_len", "batch_size", "grad_accum", "max_iters",
                 "warmup_iters", "eval_interval", "eval_windows", "ckpt_interval", "log_interval", "seed"):
        t.add_argument("--" + name.replace("_", "-"), type=int, dest=name,
                       help=f"default {getattr(defaults, name)}")
    for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "val_fraction"):
        t.add_argument("--" + name.replace("_", "-"), type=float, dest=name,
                       help=f"default {getattr(defaults, name)}")
    t.add_argument("--precision", choices=PRECISIONS,
                   help="fp32, bf16 (autocast), or auto (default): bf16 where a short probe finds it faster here")
    t.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model: 0.5-2 minutes to start; on a CPU RWKV-4 steps measured "
                        "faster at small widths, slower at 512 (docs/benchmarks.md)")
    t.add_argument("--device", help="cpu (default) or cuda")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="validation loss and bits per byte of a model on a text file")
    e.add_argument("--model", help="default: the bundled model")
    e.add_argument("--data", required=True)
    e.add_argument("--tokenizer")
    e.add_argument("--dtype", default="fp32")
    e.add_argument("--int8", action="store_true", help="quantize projections to int8 on load")
    e.add_argument("--ctx-len", type=int, default=64, help="window length (state reset per window)")
    e.add_argument("--split", choices=["val", "all"], default="val")
    e.add_argument("--val-fraction", type=float, default=0.1)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="generate from the bundled model and check the two forms agree")
    d.add_argument("--prompt", default="ROMEO:")
    d.add_argument("--tokens", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return args.func(args)
    except RwkvpyError as e:
        print(f"rwkvpy: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rwkvpy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
