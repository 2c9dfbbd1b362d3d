#!/bin/bash
# The man pages hold what the binaries take: every -o option of `imgfs
# --help` is in imgfs(8) and named in imgfs.conf(5), every imgfsctl
# subcommand and each of its --options is in imgfsctl(8), and the pages
# build with scdoc and render with man. A new option without its
# documentation fails here.
. "$(dirname "$0")/lib.sh"
SRC=${IMGFS_SOURCE_DIR:?}
MAN=$SRC/packaging/man
command -v scdoc > /dev/null || fail "scdoc is not installed"

missing=()
for opt in $("$IMGFS" --help | grep -oE -- '-o [a-z_]+' | awk '{ print $2 }' | sort -u); do
    grep -qE "\*(-o )?$opt(=|\*)" "$MAN/imgfs.8.scd" || missing+=("imgfs(8): -o $opt")
    [ "$opt" = debug ] || [ "$opt" = config ] || grep -q "\*$opt" "$MAN/imgfs.conf.5.scd" || missing+=("imgfs.conf(5): $opt")
done
for sub in $("$IMGFSCTL" --help | awk '/^  [a-z]/ { print $1 }'); do
    grep -qE "^\*$sub(\*| )" "$MAN/imgfsctl.8.scd" || missing+=("imgfsctl(8): $sub")
    for opt in $("$IMGFSCTL" "$sub" --help 2>&1 | grep -oE -- '--[a-z][a-z-]+' | sort -u); do
        grep -q -- "\*$opt\*" "$MAN/imgfsctl.8.scd" || missing+=("imgfsctl(8): $sub $opt")
    done
done
[ ${#missing[@]} -eq 0 ] || fail "not documented: ${missing[*]}"
ok "every imgfs -o option and every imgfsctl subcommand and option is in the man pages"

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
