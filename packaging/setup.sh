#!/bin/bash
# One-command set-up of imgfs on a fresh Debian 12 machine (run as root).
#
#   packaging/setup.sh demo   install packages, build, install, run the demo
#   packaging/setup.sh test   install packages, build, run the whole test suite:
#                             normal build, ASan+UBSan build, TSan build of the
#                             concurrent tests
#   packaging/setup.sh deb [DIR]  build imgfs_VERSION_ARCH.deb (into DIR, default
#                             the top of the tree) with dpkg-buildpackage from
#                             packaging/debian/, and check it with lintian
#   packaging/setup.sh deps | build | install   the individual steps
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    # build
    build-essential cmake pkg-config
    libfuse3-dev fuse3 libqcow-dev libxxhash-dev libzstd-dev libcurl4-openssl-dev libext2fs-dev libsodium-dev libssl-dev
    # fuzzing (libFuzzer)
    clang libfuzzer-14-dev libclang-rt-14-dev
    # tests and benchmarks: real clients, servers and peers
    python3 xxhash qemu-utils qemu-system-x86 qemu-block-extra fio nginx-light
    libqcow-utils xmount debootstrap fdisk e2fsprogs dosfstools procps util-linux gdb tmux
    python3-prometheus-client jq attr socat libvirt-daemon-system libvirt-clients
    # the Debian package, its man pages and completion
    dpkg-dev debhelper lintian scdoc bash-completion
)

step() { printf '\n=== %s\n' "$*"; }

deps() {
    step "installing packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" > /var/tmp/imgfs-apt.log ||
        { tail -n 30 /var/tmp/imgfs-apt.log; exit 1; }
    # Debian starts nginx on install; tests start their own on other ports.
    systemctl disable --now nginx > /dev/null 2>&1 || true
}

build_dir() { # build_dir DIR [CMAKE ARGS...]
    local dir=$1; shift
    cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" > /dev/null
    cmake --build "$dir" -j "$(nproc)"
}

build() {
    step "building"
    build_dir build
}

install_binaries() {
    step "installing to /usr/local"
    cmake --install build > /dev/null
    command -v imgfs imgfsctl
}

# The package is built from a copy of the tree with packaging/debian/ as its
# debian/ (the top level of the tree is fixed), then checked by lintian.
deb() { # deb [OUTPUT DIR]
    local out=${1:-$PWD}
    step "building the Debian package"
    local version changelog_version
    version=$(sed -n 's/^project(imgfs VERSION \([0-9.]*\).*/\1/p' CMakeLists.txt)
    changelog_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
    [ "$version" = "$changelog_version" ] || {
        echo "CMakeLists.txt says version $version, packaging/debian/changelog $changelog_version" >&2
        exit 1
    }
    local work
    work=$(mktemp -d /var/tmp/imgfs-deb.XXXXXX)
    local src=$work/imgfs-$version
    mkdir -p "$src" "$out"
    tar --exclude='./build*' --exclude=./.git --exclude='./imgfs_*.deb' -cf - . | tar -C "$src" -xf -
    rm -rf "$src/debian"
    cp -a packaging/debian "$src/debian"
    if ! (cd "$src" && dpkg-buildpackage -b -us -uc -j"$(nproc)") > "$work/build.log" 2>&1; then
        tail -n 40 "$work/build.log" >&2
        echo "dpkg-buildpackage failed; the whole log is $work/build.log" >&2
        exit 1
    fi
    local deb
    deb=$(ls "$work"/imgfs_"$version"_*.deb)
    mv "$deb" "$out/"
    deb=$out/${deb##*/}
    step "lintian $deb"
    lintian --fail-on error --info "$deb"
    rm -rf "$work"
    echo "built $deb"
}

run_ctest() { # run_ctest DIR [CTEST ARGS...]
    local dir=$1; shift
    ctest --test-dir "$dir" --output-on-failure --timeout 900 "$@"
}

run_tests() {
    # Sanitizer reports must fail the tests, and LeakSanitizer must see exits.
    export ASAN_OPTIONS=abort_on_error=1:detect_leaks=1
    export LSAN_OPTIONS="suppressions=$PWD/tests/sanitizers/lsan.supp"
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
    step "test suite (release build)"
    run_ctest build
    step "test suite under AddressSanitizer + UndefinedBehaviorSanitizer (all but guest boots)"
    build_dir build-asan -DIMGFS_SANITIZE=address,undefined
    run_ctest build-asan -LE 'guest|package'
    step "concurrency tests under ThreadSanitizer"
    build_dir build-tsan -DIMGFS_SANITIZE=thread
    run_ctest build-tsan -L concurrency
    # One seed for every harness, printed: IMGFS_FUZZ_SEED=N replays the stage.
    export IMGFS_FUZZ_SEED=${IMGFS_FUZZ_SEED:-$(($(od -An -N4 -tu4 /dev/urandom) % 4294967295 + 1))}
    step "fuzzing every parser of outside input (libFuzzer, ${IMGFS_FUZZ_SECONDS:-30} s each, seed $IMGFS_FUZZ_SEED: IMGFS_FUZZ_SEED=$IMGFS_FUZZ_SEED packaging/setup.sh test replays it)"
    CC=clang build_dir build-fuzz -DIMGFS_FUZZ=ON -DIMGFS_FUZZ_SECONDS="${IMGFS_FUZZ_SECONDS:-30}"
    run_ctest build-fuzz -L fuzz
}

case "${1:-}" in
deps) deps ;;
build) build ;;
install) build && install_binaries ;;
deb) deb "${2:-}" ;;
demo) deps && build && install_binaries && bash packaging/demo.sh ;;
# The tests run this build's binaries by path (test_package installs the .deb).
test) deps && build && run_tests ;;
*)
    echo "usage: $0 demo|test|deb [DIR]|deps|build|install" >&2
    exit 2
    ;;
esac
