"""``apr-numba chat MODEL [--system S]``: a multi-turn REPL through the model's chat template.

Each turn renders the whole conversation with the chat template and generates with prefix reuse
(:class:`~apr_numba.decoding.SequenceDecoder`): the KV cache still holds the earlier turns (prompt and
generated tokens), so only the new turn's tokens are prefilled. ``/stats`` (or ``--verbose`` after every
turn) shows the prefill / reuse counts.

Ctrl-C while an answer streams stops that answer (the partial answer stays in the conversation); at the
prompt it only prints a hint. Ctrl-D or ``/exit`` leaves. ``/reset`` forgets the conversation, ``/save FILE``
and ``/load FILE`` write / read it as JSON (``{"system": ..., "messages": [...]}``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import dataclass, field

from apr_numba.errors import AprError, ArgumentError

COMMANDS = "/reset  /save FILE  /load FILE  /stats  /exit"


def add_parser(sub, add_sampling_args) -> None:
    """Register the ``chat`` subcommand (``add_sampling_args`` adds the options shared with ``run``)."""
    p = sub.add_parser("chat", help="multi-turn chat REPL (the model's chat template, streaming)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description=f"Commands: {COMMANDS}. Ctrl-C stops the current answer, Ctrl-D exits.")
    p.add_argument("model", nargs="?", default="smollm2-135m", help="registry name, .gguf or .apr path")
    p.add_argument("--system", default=None, help="system message")
    add_sampling_args(p)
    p.add_argument("--backend", choices=("auto", "cpu", "opencl"), default="auto", help="compute backend")
    from apr_numba.quants.vnni_pack import add_activation_arg

    add_activation_arg(p)


@dataclass
class ChatSession:
    """A conversation on one model and its KV cache.

    ``messages``: the turns so far (without the system message). ``last``: the last turn's
    :class:`~apr_numba.generate.GenerationResult` (``n_prefilled`` / ``n_reused`` tokens).
    """

    model: object
    system: str | None = None
    params: object = None
    max_tokens: int = 128
    stop: tuple = ()
    messages: list[dict] = field(default_factory=list)
    last: object = None

    def conversation(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.messages

    def ask(self, text: str, on_piece=lambda s: None, cancelled=lambda: False):
        """Add a user turn, stream the answer through ``on_piece`` and return its GenerationResult."""
        from apr_numba.generation.generate import GenerationResult, generate_events, prompt_ids
        from apr_numba.generation.sampling import SamplingParams

        msgs = self.conversation() + [{"role": "user", "content": text}]
        ids = prompt_ids(self.model, msgs)
        res = GenerationResult()
        for ev in generate_events(self.model, ids, self.params or SamplingParams(), self.max_tokens, self.stop, res,
                                  cancelled=cancelled, reuse=True):
            if ev.text:
                on_piece(ev.text)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": res.text}]
        self.last = res
        return res

    def reset(self) -> None:
        self.messages = []
        self.last = None
        self.model.reset()

    def save(self, path: str) -> None:
        try:
            with open(path, "w", encoding="utf-8") as fh:
                json.dump({"system": self.system, "messages": self.messages}, fh, ensure_ascii=False, indent=1)
        except OSError as exc:
            raise ArgumentError(f"{path}: cannot save the conversation: {exc}") from exc

    def load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ArgumentError(f"{path}: cannot load a conversation: {exc}") from exc
        msgs = d.get("messages") if isinstance(d, dict) else None
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise ArgumentError(f"{path}: not a saved conversation (needs 'messages': [{{role, content}}, ...])")
        self.system = d.get("system") if isinstance(d.get("system"), str) else None
        self.messages = [{"role": m["role"], "content": m["content"]} for m in msgs]

    def stats(self) -> str:
        r = self.last
        if r is None:
            return "[no turn yet]"
        return (f"[prefill {r.n_prefilled} tokens (reused {r.n_reused} cached), {len(r.token_ids)} generated, "
                f"{r.decode_tok_s:.1f} tok/s decode, stop={r.stop_reason}]")


def _command(session: ChatSession, line: str) -> bool:
    """Run a /command; False means exit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/exit", "/quit"):
        return False
    if cmd == "/reset":
        session.reset()
        print("[conversation reset]")
    elif cmd in ("/save", "/load"):
        if not arg:
            print(f"usage: {cmd} FILE")
        else:
            (session.save if cmd == "/save" else session.load)(arg)
            print(f"[{'saved to' if cmd == '/save' else 'loaded'} {arg}: {len(session.messages)} messages]")
    elif cmd == "/stats":
        print(session.stats())
    else:
        print(f"unknown command {cmd}; commands: {COMMANDS}")
    return True


def run(a) -> int:
    """The REPL. Errors while loading propagate as AprError; errors of a turn are printed and the REPL goes on."""
    from apr_numba.generation.generate import check_max_tokens
    from apr_numba.generation.sampling import SamplingParams
    from apr_numba.model.decoder import load

    check_max_tokens(a.max_tokens)
    params = SamplingParams(a.temperature, a.top_k, a.top_p, a.repeat_penalty, seed=a.seed, min_p=a.min_p)
    params.validate()
    model = load(a.model, threads=a.threads, n_ctx=a.n_ctx, backend=a.backend)
    if model.tokenizer.chat_template is None:
        raise ArgumentError(f"{model.path}: the model has no chat template")
    session = ChatSession(model, a.system, params, a.max_tokens, tuple(a.stop))
    print(f"[apr-numba chat] {model.path.name}; {COMMANDS}; Ctrl-C stops an answer", flush=True)
    stop_flag = [False]

    def on_sigint(signum, frame):
        stop_flag[0] = True

    while True:
        try:
            line = input(">>> ")
        except KeyboardInterrupt:
            print("\n[type /exit or Ctrl-D to leave]")
            continue
        except EOFError:
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not _command(session, line):
                    return 0
                continue
            stop_flag[0] = False
            old = signal.signal(signal.SIGINT, on_sigint)
            try:
                session.ask(line, lambda s: (sys.stdout.write(s), sys.stdout.flush()), lambda: stop_flag[0])
            finally:
                signal.signal(signal.SIGINT, old)
            print("\n[stopped]" if session.last.stop_reason == "cancelled" else "", flush=True)
            if getattr(a, "verbose", False):
                print(session.stats(), flush=True)
        except AprError as exc:
            print(f"apr-numba: error: {exc}", flush=True)
