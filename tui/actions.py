"""What the dashboard's keys and commands do (the ``action_*`` methods of :class:`tui.app.Dashboard`): send the
prompt, stop, leave the prompt box, start a conversation over (``/new``, ``/system TEXT``), switch chat mode,
bisect, gates, save, help. The app's layout, view state, workers and engine-message handlers are in
:mod:`tui.app`; this mixin only reads and sets that state and starts its workers.
"""

from __future__ import annotations

import time

from tui.widgets import GatesPanel, HelpScreen, OutputView, PromptArea


class DashboardActions:
    """The ``action_*`` methods of :class:`tui.app.Dashboard` (a mixin: it runs on the app's own state)."""

    def action_generate(self) -> None:
        if self.loaded is None:
            self.send_when_loaded = True
            self.note = "the model is still loading: the prompt is sent when it is ready"
            return
        if self.generating:
            self.notify("already generating (Escape stops)", severity="warning")
            return
        area = self.query_one(PromptArea)
        prompt = area.text
        if not prompt.strip():
            self.notify("type a prompt first", severity="warning")
            return
        area.remember(prompt)
        if self._slash(prompt.strip()):
            area.load_text("")
            return
        self.gen_chat = self.chat
        self._reset_view(f"{self.transcript}you: {prompt}\nmodel: " if self.chat else prompt)
        if self.chat:
            area.load_text("")
        self.parity = None
        self.generating = True
        self.note = f"up to {self.max_tokens} tokens; Escape stops"
        self.mark("output", "speed", "history")
        self.run_generate(prompt, self.chat)

    def _slash(self, text: str) -> bool:
        """``/new`` starts the conversation over; ``/system TEXT`` does so with a system prompt."""
        if text == "/new" or text.startswith("/system"):
            self.action_new_chat(text[len("/system"):].strip() if text.startswith("/system") else None)
            return True
        return False

    def action_escape(self) -> None:
        """Stop a generation; otherwise leave the prompt box so that single letters are commands."""
        if self.generating:
            self.action_stop()
        elif isinstance(self.focused, PromptArea):
            self.query_one(OutputView).focus()
            self.note = "keys: i prompt, c chat, n new, g gates, b bisect, s save, q quit, ? help"

    def action_stop(self) -> None:
        if self.generating:
            self.workers.cancel_group(self, "generate")
            self.note = "stopping ..."

    def action_new_chat(self, system: str | None = None) -> None:
        """Start the conversation over (keeps the current system prompt unless one is given)."""
        if self.generating:
            self.notify("stop the generation first (Escape)", severity="warning")
            return
        conv = getattr(self.engine, "conversation", None)
        keep = conv.system if conv is not None and system is None else system
        if hasattr(self.engine, "new_conversation"):
            self.engine.new_conversation(keep)
        self.transcript = ""
        self._reset_view("")
        self.mark("output", "speed", "history")
        self.note = "new conversation" + (f", system prompt: {keep}" if keep else "")

    def action_focus_prompt(self) -> None:
        area = self.query_one(PromptArea)
        area.focus()
        area.move_cursor(area.document.end)

    def action_toggle_chat(self) -> None:
        info = getattr(self.engine, "info", None)
        if not self.chat and info is not None and not info.has_chat_template:
            self.notify("this model has no chat template", severity="warning")
            return
        self.chat = not self.chat

    def action_bisect(self) -> None:
        if self.loaded is None:
            return
        self.note = "bisect: starting ..."
        self.run_bisect()

    def action_gates(self) -> None:
        if self.loaded is None:
            return
        note = self.engine.gates_note()
        if note is not None:
            self.notify(f"gates: {note}", severity="warning")
            self.query_one(GatesPanel).note(note)
            return
        self.query_one(GatesPanel).note("running the fast gates ...")
        self.run_gates()

    def check_action(self, action: str, parameters) -> bool | None:
        """The generate binding (Enter) only outside the prompt box (inside, the box sends its text)."""
        return not (action == "generate" and isinstance(self.focused, PromptArea))

    def action_save(self) -> None:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / f"apr-tui-session-{time.strftime('%Y%m%d-%H%M%S')}.json"
        try:
            self.last_save = self.engine.save(path)
        except (OSError, ValueError, TypeError) as exc:
            self._failed("save", f"{type(exc).__name__}: {exc}", None)
            return
        self.note = f"session saved to {path}"
        self.notify(f"saved {path}")

    def action_help(self) -> None:
        self.push_screen(HelpScreen())
