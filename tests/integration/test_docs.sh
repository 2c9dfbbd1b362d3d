#!/bin/bash
# The documentation holds what the binaries take, read from their --help:
# every -o option and flag of `imgfs --help` is an entry of imgfs(8) that
# states its default, and is named in imgfs.conf(5); every imgfsctl
# subcommand (and action, such as `vm rm` or `key generate`) is an entry of
# imgfsctl(8) that names each of its options, and an optional option that
# takes a value says its default there; every exit status the binaries
# return for success, failure and a usage error is in EXIT STATUS; the bash
# completion offers every subcommand, action and option; README.md shows
# every subcommand and has a row for every -o option. The pages build with scdoc and render with man. A new
# option or subcommand without its documentation fails here.
. "$(dirname "$0")/lib.sh"
SRC=${IMGFS_SOURCE_DIR:?}
MAN=$SRC/packaging/man
command -v scdoc > /dev/null || fail "scdoc is not installed"
[ -r /usr/share/bash-completion/bash_completion ] || fail "bash-completion is not installed"

# entry PAGE HEADER-REGEX: the text (header and indented body, joined into
# one line) of every entry of PAGE whose header line matches the regex;
# body PAGE HEADER-REGEX: the same without the header lines.
entry() {
    awk -v re="$2" '
        /^[^\t]/ { on = ($0 ~ re) }
        on && NF { printf "%s ", $0 }
        END { print "" }' "$MAN/$1.scd"
}
body() {
    awk -v re="$2" '
        /^[^\t]/ { on = ($0 ~ re); next }
        on && NF { printf "%s ", $0 }
        END { print "" }' "$MAN/$1.scd"
}
# section PAGE TITLE: the text of the section "# TITLE" of PAGE.
section() {
    awk -v t="# $2" '/^# / { on = ($0 == t); next } on' "$MAN/$1.scd"
}
# states_default TEXT OPTION: one sentence of TEXT that holds OPTION also
# says its default (or that there is none).
states_default() {
    printf '%s\n' "$1" | sed 's/\. /.\n/g' | grep -F -- "$2" | grep -qiE 'default|required'
}

missing=()

# imgfs: -o options, each an entry of MOUNT OPTIONS with its default.
imgfs_help=$("$IMGFS" --help)
opts=$(grep -oE -- '-o [a-z_]+' <<< "$imgfs_help" | awk '{ print $2 }' | sort -u)
[ "$(wc -w <<< "$opts")" -ge 15 ] || fail "imgfs --help lists only: $opts"
for opt in $opts; do
    [ "$opt" = debug ] && continue # -d, below
    text=$(entry imgfs.8 "^\\*$opt(=|\\*)")
    [ -n "${text// /}" ] || { missing+=("imgfs(8): entry -o $opt"); continue; }
    grep -qi default <<< "$(body imgfs.8 "^\\*$opt(=|\\*)")" || missing+=("imgfs(8): the default of -o $opt")
    [ "$opt" = config ] || grep -q "\*$opt" "$MAN/imgfs.conf.5.scd" || missing+=("imgfs.conf(5): $opt")
    grep -qE "^\| \`$opt(=|\`)" "$SRC/README.md" || missing+=("README.md options table: $opt")
done
for flag in $(grep -oE -- '(^| |, )(-[a-zA-Z]|--[a-z]+)\b' <<< "$imgfs_help" | tr -d ' ,' | grep -vx -- -o | sort -u); do
    grep -qE -- "^\\*$flag\\*|, \\*$flag\\*" "$MAN/imgfs.8.scd" || missing+=("imgfs(8): $flag")
done

# imgfsctl: subcommands, actions, options.
subs=$("$IMGFSCTL" --help | awk '/^  [a-z]/ { print $1 }')
[ "$(wc -w <<< "$subs")" -ge 14 ] || fail "imgfsctl --help lists only: $subs"
for sub in $subs; do
    help=$("$IMGFSCTL" "$sub" --help 2>&1) || fail "imgfsctl $sub --help failed"
    grep -qE "(^|[ \`])imgfsctl $sub( |\$)" "$SRC/README.md" || missing+=("README.md: imgfsctl $sub")
    # Usage lines: "usage: imgfsctl SUB ..." or "       imgfsctl SUB ...",
    # with continuation lines indented further.
    usage=$(awk '/^(usage: +| +)imgfsctl / { if (cur) print cur; sub(/^(usage: +| +)/, ""); cur = $0; next }
                 cur && /^ +\[/ { sub(/^ +/, " "); cur = cur $0; next }
                 { if (cur) print cur; cur = "" }
                 END { if (cur) print cur }' <<< "$help")
    actions=$(awk '{ print $3 }' <<< "$usage" | grep -E '^[a-z][a-z-]*$' | sort -u || true)
    if [ -n "$actions" ]; then
        for action in $actions; do
            text=$(entry imgfsctl.8 "^\\*$sub $action\\*")
            [ -n "${text// /}" ] || { missing+=("imgfsctl(8): entry $sub $action"); continue; }
            for opt in $(grep -E "^imgfsctl $sub $action " <<< "$usage" | grep -oE -- '--[a-z][a-z-]+' | sort -u); do
                grep -qF -- "*$opt*" <<< "$text" || missing+=("imgfsctl(8): $sub $action $opt")
            done
            for opt in $(grep -E "^imgfsctl $sub $action " <<< "$usage" | grep -oE -- '\[--[a-z][a-z-]+ [A-Z]' | tr -d '[' | awk '{ print $1 }' | sort -u); do
                states_default "$(body imgfsctl.8 "^\\*$sub $action\\*")" "*$opt*" || missing+=("imgfsctl(8): the default of $sub $action $opt")
            done
        done
    else
        text=$(entry imgfsctl.8 "^\\*$sub\\*")
        [ -n "${text// /}" ] || { missing+=("imgfsctl(8): entry $sub"); continue; }
        for opt in $(grep -oE -- '--[a-z][a-z-]+' <<< "$help" | sort -u); do
            [ "$opt" = --help ] && continue
            grep -qF -- "*$opt*" <<< "$text" || missing+=("imgfsctl(8): $sub $opt")
        done
        for opt in $(grep -oE -- '\[--[a-z][a-z-]+ [A-Z]' <<< "$usage" | tr -d '[' | awk '{ print $1 }' | sort -u); do
            states_default "$(body imgfsctl.8 "^\\*$sub\\*")" "*$opt*" || missing+=("imgfsctl(8): the default of $sub $opt")
        done
    fi
done
[ ${#missing[@]} -eq 0 ] || fail "not documented: ${missing[*]}"
ok "every imgfs option and flag, and every imgfsctl subcommand, action and option, is in the man pages (with defaults) and README.md"

# Exit statuses the binaries really return, each in the page's EXIT STATUS.
declare -A seen
run_status() { # PAGE CMD...: records the exit status of CMD for PAGE
    local page=$1 rc=0
    shift
    "$@" > /dev/null 2>&1 || rc=$?
    seen[$page]+=" $rc"
}
run_status imgfs.8 "$IMGFS" --help
run_status imgfs.8 "$IMGFS" "$T" "$T" -o no_such_option
# A state and a cache directory of its own: the defaults (/var/lib/imgfs,
# /var/cache/imgfs) are the machine's, and this mount attempt would hold the
# state for a moment (a test mounting beside this one then fails on 'the
# state directory is in use').
mkdir -p "$T/docs-state" "$T/docs-cache"
run_status imgfs.8 "$IMGFS" "$T/none" "$T" -o "state=$T/docs-state,cache=$T/docs-cache"
run_status imgfsctl.8 "$IMGFSCTL" --help
run_status imgfsctl.8 "$IMGFSCTL" no-such-subcommand
run_status imgfsctl.8 "$IMGFSCTL" vm create
run_status imgfsctl.8 "$IMGFSCTL" gc "$T/none"
run_status imgfsctl.8 "$IMGFSCTL" status "$T" --no-such-option
for page in imgfs.8 imgfsctl.8; do
    statuses=$(section "$page" "EXIT STATUS")
    [ -n "$statuses" ] || fail "$page has no EXIT STATUS section"
    for rc in $(tr ' ' '\n' <<< "${seen[$page]}" | sort -u); do
        grep -qx "\*$rc\*" <<< "$statuses" || fail "$page does not document exit status $rc"
    done
done
[[ " ${seen[imgfsctl.8]} " == *" 2 "* ]] || fail "imgfsctl returned no usage error (2): ${seen[imgfsctl.8]}"
ok "exit statuses returned ($(tr ' ' '\n' <<< "${seen[imgfs.8]} ${seen[imgfsctl.8]}" | sort -u | xargs)) are in EXIT STATUS"

# The bash completion, run against this build's imgfsctl.
complete_words() { # WORD...: what the completion offers for the last word
    bash -c 'source /usr/share/bash-completion/bash_completion
        source "$1"/packaging/completion/imgfsctl; shift
        COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
        _imgfsctl; printf "%s\n" "${COMPREPLY[@]}"' _ "$SRC" "$@"
}
offered=$(complete_words "$IMGFSCTL" '')
for sub in $subs; do
    grep -qx "$sub" <<< "$offered" || missing+=("completion: $sub")
    help=$("$IMGFSCTL" "$sub" --help 2>&1)
    actions=$(grep -oE "imgfsctl $sub [a-z][a-z-]*" <<< "$help" | awk '{ print $3 }' | sort -u || true)
    if [ -n "$actions" ]; then
        offered_actions=$(complete_words "$IMGFSCTL" "$sub" '')
        for action in $actions; do
            grep -qx "$action" <<< "$offered_actions" || missing+=("completion: $sub $action")
            offered_opts=$(complete_words "$IMGFSCTL" "$sub" "$action" --)
            for opt in $(grep -E "imgfsctl $sub $action " <<< "$help" | grep -oE -- '--[a-z][a-z-]+' | sort -u); do
                grep -qx -- "$opt" <<< "$offered_opts" || missing+=("completion: $sub $action $opt")
            done
        done
    else
        offered_opts=$(complete_words "$IMGFSCTL" "$sub" --)
        for opt in $(grep -oE -- '--[a-z][a-z-]+' <<< "$help" | sort -u); do
            grep -qx -- "$opt" <<< "$offered_opts" || missing+=("completion: $sub $opt")
        done
    fi
done
[ ${#missing[@]} -eq 0 ] || fail "not completed: ${missing[*]}"
ok "bash completion offers every subcommand, action and option"

for page in imgfs.8 imgfsctl.8 imgfs.conf.5; do
    scdoc < "$MAN/$page.scd" > "$T/$page" || fail "scdoc cannot build $page"
    MANWIDTH=80 man -l "$T/$page" > "$T/$page.txt" 2> "$T/$page.err" || fail "man cannot render $page"
    [ -s "$T/$page.err" ] && { cat "$T/$page.err"; fail "man warns about $page"; }
    for section in NAME SYNOPSIS DESCRIPTION FILES "SEE ALSO"; do
        grep -q "^$section" "$T/$page.txt" || fail "$page has no $section section"
    done
done
grep -q '^EXIT STATUS' "$T/imgfs.8.txt" && grep -q '^EXIT STATUS' "$T/imgfsctl.8.txt" || fail "an exit status section is missing"
ok "the man pages build and render, with NAME, SYNOPSIS, DESCRIPTION, FILES, SEE ALSO and EXIT STATUS"
finish
