#!/usr/bin/env bash
# Drive the real dashboard in a real terminal (tmux) as a user would: start `apr-tui` with no -p (the prompt box
# has the focus and is empty), type a prompt and press Enter while it loads or after, wait until the generated
# text, the engine's tok/s, the per-layer cosine cells and the gate ids are on screen, then Escape and q quit.
# With CHAT=1 it holds a two-turn conversation instead on qwen2.5-coder-0.5b-instruct, greedy ("My name is Ada."
# then "What is my name?"; smollm2-135m answers with another name) and checks
# that the second answer uses the first and that turn two prefilled only its new tokens.
# Exit 0 when all checks hold; the screens are left in OUT_DIR (screen-final.txt, screen-turn1.txt).
#
#   scripts/tmux_smoke.sh [OUT_DIR]   (env: APR_TUI=path/to/apr-tui, APR_TUI_ARGS="...", TIMEOUT_S=240, CHAT=1)
#
# CI needs tmux: apt-get install -y tmux
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
APR_TUI=${APR_TUI:-$ROOT/.venv/bin/apr-tui}
CHAT=${CHAT:-0}
if [[ $CHAT == 1 ]]; then
    # smollm2-135m answers "My name is Elena" (greedy); the 0.5B instruct model keeps the conversation
    APR_TUI_ARGS=${APR_TUI_ARGS:-"qwen2.5-coder-0.5b --chat --no-gates -n 30 --n-ctx 512"}
else
    APR_TUI_ARGS=${APR_TUI_ARGS:-"smollm2-135m -n 40 --n-ctx 512"}
fi
PROMPT=${PROMPT:-"Write two sentences about lighthouses."}
TIMEOUT_S=${TIMEOUT_S:-240}
OUT_DIR=${1:-$(mktemp -d)}
SOCK=apr-tui-smoke-$$
SESSION=smoke

if ! command -v tmux >/dev/null; then
    echo "tmux_smoke: tmux is not installed (apt-get install -y tmux)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
SCREEN="$OUT_DIR/screen.txt"
cleanup() { tmux -L "$SOCK" kill-server 2>/dev/null || true; }
trap cleanup EXIT

capture() { tmux -L "$SOCK" capture-pane -p -t "$SESSION" > "$SCREEN" 2>/dev/null || true; }
keys() { tmux -L "$SOCK" send-keys -t "$SESSION" "$@"; }
# type text as a user does: one key at a time (-l: literally, so no key names are looked up)
type_text() { local s=$1 i; for ((i = 0; i < ${#s}; i++)); do keys -l "${s:i:1}"; sleep 0.03; done; }

# wait_for DESCRIPTION COMMAND...: poll the screen until COMMAND (run on the captured screen) succeeds
wait_for() {
    local what=$1; shift
    local t0=$SECONDS
    while true; do
        capture
        if "$@"; then
            echo "tmux_smoke: $what after $((SECONDS - t0)) s"
            return 0
        fi
        if (( SECONDS - t0 > TIMEOUT_S )); then
            echo "tmux_smoke: FAILED waiting for $what (${TIMEOUT_S} s); last screen:" >&2
            cat "$SCREEN" >&2
            exit 1
        fi
        sleep 0.5
    done
}
check() {  # check DESCRIPTION COMMAND...: the screen holds it now
    local what=$1; shift
    capture
    if ! "$@"; then echo "tmux_smoke: FAILED: $what not on screen:" >&2; cat "$SCREEN" >&2; exit 1; fi
    echo "tmux_smoke: $what: ok"
}

n_done() { grep -Eo "done: [0-9]+ tokens" "$SCREEN" | wc -l; }
finished() { grep -Eq "done: [1-9][0-9]* tokens|\[[1-9][0-9]* tokens, stop=" "$SCREEN"; }
typed() { grep -Fq "│ $PROMPT" "$SCREEN"; }
# a cells row of layer 0 whose first cell holds a cosine ("1-3e-13", "0.99987", "1"), not "·"
has_cells() { grep -Eq "│ +0│ *(1-[0-9]e-[0-9]+|0\.[0-9]{5}|1 )" "$SCREEN"; }
# the shadow has caught up with a generated token (the cells name a token, not a prompt position)
cells_on_token() { has_cells && grep -Eq "position [0-9]+ \(token [0-9]+" "$SCREEN"; }
tok_s() { grep -Eq "decode [0-9]+\.[0-9] tok/s" "$SCREEN"; }
gate_ids() { grep -Eq "│ [A-Z]+-[0-9]{3} +(PASS|FAIL|N/A)" "$SCREEN"; }
# after q the app restores the terminal: its footer is gone from the pane (or the pane is gone)
quit_done() { ! tmux -L "$SOCK" has-session -t "$SESSION" 2>/dev/null || ! grep -q "Quit" "$SCREEN"; }

tmux -L "$SOCK" -f /dev/null new-session -d -s "$SESSION" -x 120 -y 40 \
    "env TERM=xterm-256color COLORTERM=truecolor $APR_TUI $APR_TUI_ARGS; sleep 5"
wait_for "the dashboard drawn" grep -q "Quit" "$SCREEN"
sleep 1

if [[ $CHAT == 1 ]]; then
    type_text "My name is Ada."
    keys Enter
    wait_for "turn one finished" finished
    cp "$SCREEN" "$OUT_DIR/screen-turn1.txt"
    PROMPT="What is my name?"
    type_text "$PROMPT"
    keys Enter
    second() { [[ $(grep -c "done: " "$SCREEN") -ge 1 ]] && grep -q "reused from the KV cache" "$SCREEN"; }
    wait_for "turn two finished" second
    after_q2() { awk '/you: What is my name\?/{f=1} f' "$SCREEN" | grep -Eq "model: .*Ada"; }
    check "a second answer that uses the first (names Ada)" after_q2
    check "turn two prefilled only its new tokens" grep -Eq "prefilled [0-9]+ new tokens, [0-9]+ reused" "$SCREEN"
else
    type_text "$PROMPT"  # the model may still be loading: the box takes the keys, Enter sends once it is ready
    wait_for "the typed prompt in the box (no key ran a command)" typed
    keys Enter
    wait_for "generation finished" finished
    check "engine tok/s" tok_s
    wait_for "per-layer cells for a generated token" cells_on_token
    wait_for "gate ids" gate_ids
    grep -iEq "lighthouse|light|sea|ship|coast" "$SCREEN" || { echo "tmux_smoke: FAILED: no text about the prompt" >&2; cat "$SCREEN" >&2; exit 1; }
fi
cp "$SCREEN" "$OUT_DIR/screen-final.txt"
keys Escape
sleep 0.5
keys q
wait_for "the app quit" quit_done
echo "tmux_smoke: OK (screen in $OUT_DIR/screen-final.txt)"
