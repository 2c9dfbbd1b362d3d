#!/bin/bash
# Progress bars in a real terminal: imgfsctl publish and precopy run in tmux
# panes of 80 and of 40 columns. Every redraw of a bar (the text between
# carriage returns, as the pane received it) must be narrower than the pane,
# and no bar may have wrapped on the screen: the bar lines of tmux's capture
# with wrapped lines joined (-J) must equal those of the capture without.
. "$(dirname "$0")/lib.sh"
command -v tmux > /dev/null || fail "tmux is not installed"

SOCK=$T/tmux.sock
at_exit 'tmux -S "$SOCK" kill-server 2>/dev/null'
head -c 300M /dev/urandom > "$T/big.raw"

# run_in_pane WIDTH NAME CMD: runs CMD in a new pane WIDTH columns wide,
# keeps what the pane received in $T/NAME.raw and its screen in $T/NAME.screen.
run_in_pane() {
    local width=$1 name=$2 cmd=$3
    tmux -S "$SOCK" new-session -d -s "$name" -x "$width" -y 30 "sleep 0.5; $cmd; tmux -S '$SOCK' wait-for -S $name-done; sleep 600"
    tmux -S "$SOCK" pipe-pane -t "$name" -o "cat > '$T/$name.raw'"
    timeout 300 tmux -S "$SOCK" wait-for "$name-done" || fail "$name did not finish in its pane"
    [ "$(tmux -S "$SOCK" display -p -t "$name" '#{pane_width}')" = "$width" ] || fail "the pane is not $width wide"
    tmux -S "$SOCK" capture-pane -p -t "$name" > "$T/$name.screen"
    tmux -S "$SOCK" capture-pane -p -J -t "$name" > "$T/$name.joined"
    tmux -S "$SOCK" kill-session -t "$name"
}

# check_bars WIDTH NAME LABEL: every redraw of the bar that starts with LABEL
# fits in WIDTH - 1 columns, there were several, and nothing wrapped.
check_bars() {
    local width=$1 name=$2 label=$3
    python3 - "$T/$name.raw" "$width" "$label" <<'PY' | sed "s/^/    $name: /" || fail "$name: a bar does not fit $width columns"
import re, sys
raw = open(sys.argv[1], "rb").read().decode("utf-8", "replace")
width, label = int(sys.argv[2]), sys.argv[3]
plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)   # drop the erase-line codes
redraws = [p for line in plain.split("\n") for p in line.split("\r") if p.startswith(label[:8]) and "[" in p]
print(f"{len(redraws)} redraws, widest {max(map(len, redraws), default=0)} columns; last: {redraws[-1] if redraws else ''}")
sys.exit(0 if len(redraws) >= 2 and all(len(p) <= width - 1 for p in redraws) else 1)
PY
    local bar_lines='index($0, l) == 1'
    awk -v l="$label" "$bar_lines" "$T/$name.screen" > "$T/$name.bars"
    awk -v l="$label" "$bar_lines" "$T/$name.joined" > "$T/$name.bars-joined"
    cmp -s "$T/$name.bars" "$T/$name.bars-joined" || {
        diff "$T/$name.bars" "$T/$name.bars-joined" >&2
        fail "$name: a bar wrapped on the screen"
    }
    awk -v l="$label" 'index($0, l) == 1 { found = 1 } END { exit !found }' "$T/$name.screen" ||
        { cat "$T/$name.screen"; fail "$name: no bar on the screen"; }
}

run_in_pane 80 publish80 "'$IMGFSCTL' publish '$T/big.raw' '$T/repo' --name wide-enough-to-matter --level 1"
check_bars 80 publish80 "publishing ["
ok "publish at 80 columns: bars fit, no wrapped line"

mount_imgfs "$T/repo" "$T/mnt"
run_in_pane 80 precopy80 "'$IMGFSCTL' precopy '$T/mnt' wide-enough-to-matter --rate 100M"
check_bars 80 precopy80 "pre-copy wide-enough-"
grep -q "pre-copy of wide-enough-to-matter@1: done" "$T/precopy80.screen" || fail "the pre-copy did not finish"
ok "precopy at 80 columns: bars fit, no wrapped line"

"$IMGFSCTL" unpin "$T/mnt" wide-enough-to-matter
umount_imgfs "$T/mnt"
rm -rf "$T/cache"
mount_imgfs "$T/repo" "$T/mnt"
run_in_pane 40 precopy40 "'$IMGFSCTL' precopy '$T/mnt' wide-enough-to-matter --rate 100M"
check_bars 40 precopy40 "pre-copy wide-enough-"
ok "precopy at 40 columns: the bar shrinks and still fits"
umount_imgfs "$T/mnt"
finish
