#!/bin/bash
# make-image.sh OUT [VARIANT]: the image of the trust-v1 fixture, rebuilt the
# same way every time. Four 64 KiB chunks: text in 0, 1 and 3, zeros in 2.
# VARIANT 2 (for a second version) keeps chunk 0 and changes 1 and 3.
set -eu # no pipefail: yes ends on SIGPIPE
out=$1 variant=${2:-1}
: > "$out"
for i in 0 1 2 3; do
    if [ "$i" = 2 ]; then
        head -c 65536 /dev/zero
    elif [ "$i" = 0 ] || [ "$variant" = 1 ]; then
        yes "imgfs trust-v1 fixture, chunk $i" | head -c 65536
    else
        yes "imgfs trust-v1 fixture, version $variant, chunk $i" | head -c 65536
    fi
done >> "$out"
