"""CLI subcommands ``trace``, ``diff`` and ``bisect`` (registered in :data:`apr_numba.cli.main.COMMANDS`).

Exit codes: 0 success (``bisect``: nothing diverges), 1 ``bisect`` named a stage, 2 a user error.
"""

from __future__ import annotations

import json

from apr_numba.errors import AprError

DEFAULT_MODEL = "smollm2-135m"


def _load(name):
    from apr_numba.model.decoder import load

    return load(name, backend="cpu", n_ctx=512)


def add_trace(sub) -> None:
    p = sub.add_parser("trace", help="save intermediate tensors (APRT files) of one prefill pass")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name or .gguf path")
    p.add_argument("-p", "--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--save-tensor", default="all", metavar="STAGES", help="comma list of stages, or all")
    p.add_argument("--save-tensor-layers", default=None, metavar="A..B", help="layers, inclusive (default all)")
    p.add_argument("--save-tensor-dir", required=True, metavar="DIR", help="output folder")
    p.add_argument("--backend", default="cpu", choices=("cpu", "opencl", "reference"))
    p.add_argument("--inject", default=None, metavar="FAULT[@LAYER]", help="teaching fault (apr_numba.debug.faults)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def cmd_trace(a) -> int:
    from apr_numba.debug.tracing import trace
    from apr_numba.generation.generate import prompt_ids

    model = _load(a.model)
    tr = trace(model, tokens=prompt_ids(model, a.prompt, a.chat), stages=a.save_tensor,
               layers=a.save_tensor_layers, backend=a.backend, inject=a.inject, save_dir=a.save_tensor_dir)
    keys = tr.keys()

    def rel(layer, stage):
        return f"{stage}.bin" if layer is None else f"layer-{layer}/{stage}.bin"

    if a.json:
        print(json.dumps({"dir": a.save_tensor_dir, "backend": a.backend, "tokens": tr.tokens, "fault": a.inject,
                          "notes": tr.notes, "files": {rel(la, st): list(tr.tensors[(la, st)].shape)
                                                       for la, st in keys}}))
        return 0
    for n in tr.notes:
        print(f"note: {n}")
    layers = sorted({la for la, _ in keys if la is not None})
    stages = list(dict.fromkeys(st for _, st in keys))
    span = f"{layers[0]}..{layers[-1]}" if layers else "-"
    print(f"{a.backend}: {len(tr.tokens)} tokens -> {len(keys)} APRT files in {a.save_tensor_dir}/ "
          f"(layers {span}, {len(stages)} stages)")
    shown = set()
    for la, st in keys:
        if st not in shown:
            shown.add(st)
            shape = "x".join(map(str, tr.tensors[(la, st)].shape))
            print(f"  {st:<19} {shape:>12}  {rel(la, st) if la is None or st == 'embedding' else rel('N', st)}")
    return 0


def add_diff(sub) -> None:
    p = sub.add_parser("diff", help="compare two APRT tensor files, or two trace folders stage by stage")
    p.add_argument("a", help="APRT file or trace folder")
    p.add_argument("b", help="APRT file or trace folder")
    p.add_argument("--values", action="store_true", help="list the largest differences")
    p.add_argument("--limit", type=int, default=10, metavar="K", help="how many differences (default 10)")
    p.add_argument("--json", action="store_true", help="JSON (schema apr-stage-diff-v1)")


def cmd_diff(a) -> int:
    from apr_numba.debug.stage_diff import diff_paths, format_diff, format_dir_diff

    if a.limit < 0:
        raise AprError(f"--limit must be >= 0, got {a.limit}")
    r = diff_paths(a.a, a.b, a.limit if a.values else 0)
    if isinstance(r, list):  # two trace folders
        if a.json:
            out = []
            for (layer, stage), d, note in r:
                obj = d.to_json() if d is not None else {"note": note}
                obj.update(stage=stage, layer=layer)
                out.append(obj)
            print(json.dumps(out))
        else:
            print(format_dir_diff(r))
        return 0
    print(json.dumps(r.to_json()) if a.json else format_diff(r, a.values))
    return 0


def add_bisect(sub) -> None:
    p = sub.add_parser("bisect", help="name the first stage where a backend diverges from a reference")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name or .gguf path")
    p.add_argument("-p", "--prompt", default=None, help="prompt text (default: the tokens of a --b trace folder)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--a", dest="side_a", default="cpu", help="backend under test: cpu, opencl, reference")
    p.add_argument("--b", dest="side_b", default="reference", help="clean side: cpu, opencl, reference or a "
                   "trace folder")
    p.add_argument("--inject", default=None, metavar="FAULT[@LAYER]", help="teaching fault on side A")
    p.add_argument("--threshold", type=float, default=0.999, help="cosine a stage must reach (default 0.999)")
    p.add_argument("--cosine-only", action="store_true", help="aprender's rule exactly (no norm check)")
    p.add_argument("--full", action="store_true", help="print every stage, not only those around the find")
    p.add_argument("--json", action="store_true")


def cmd_bisect(a) -> int:
    from apr_numba.debug.bisection import bisect, format_bisect
    from apr_numba.generation.generate import prompt_ids

    model = _load(a.model)
    tokens = prompt_ids(model, a.prompt, a.chat) if a.prompt is not None else None
    res = bisect(model, tokens=tokens, a=a.side_a, b=a.side_b, inject=a.inject, threshold=a.threshold,
                 cosine_only=a.cosine_only)
    print(json.dumps(res.to_dict()) if a.json else format_bisect(res, full=a.full))
    return 1 if res.diverged else 0
