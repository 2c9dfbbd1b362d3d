# libvirtd for the libvirt tests, started by the test and stopped at its end
# (Debian's libvirt-daemon-system, disabled at boot here). Source after lib.sh:
#   . "$(dirname "$0")/libvirt.sh"
#
#   libvirt_start     takes the libvirt test lock (one such test at a time:
#                     there is one system libvirtd), starts virtlogd and
#                     libvirtd in the foreground as background jobs, and
#                     waits until virsh answers; fails if a libvirtd that the
#                     test did not start is running
#   VIRSH             "virsh -c qemu:///system -q"
#
# Pools and domains the tests make are transient (pool-create-as, create), so
# nothing outlives libvirtd; libvirt_stop (registered with at_exit) destroys
# them, then stops libvirtd and virtlogd with SIGTERM and waits for them.
for t in libvirtd virtlogd virsh; do
    command -v "$t" > /dev/null || fail "'$t' is not installed (apt-get install libvirt-daemon-system libvirt-clients)"
done
VIRSH="virsh -c qemu:///system -q"
LIBVIRT_PIDS=()

libvirt_start() {
    exec 8>/var/tmp/imgfs-test-libvirt.lock
    flock 8
    [ -z "$(pgrep -x libvirtd)" ] || fail "a libvirtd not started by this test is running; stop it first"
    virtlogd > "$T/virtlogd.log" 2>&1 &
    LIBVIRT_PIDS+=($!)
    DAEMON_PID[virtlogd]=$!
    libvirtd > "$T/libvirtd.log" 2>&1 &
    LIBVIRT_PIDS+=($!)
    DAEMON_PID[libvirtd]=$!
    DAEMON_LOG[libvirtd]=$T/libvirtd.log
    at_exit libvirt_stop
    for _ in $(seq 1 300); do
        $VIRSH version > /dev/null 2>&1 && return 0
        kill -0 "${DAEMON_PID[libvirtd]}" 2>/dev/null || fail "libvirtd exited at start: $(tail -5 "$T/libvirtd.log")"
        sleep 0.1
    done
    fail "libvirtd did not answer within 30 s"
}

libvirt_stop() {
    local d p
    for d in $($VIRSH list --name 2>/dev/null); do $VIRSH destroy "$d" > /dev/null 2>&1; done
    for p in $($VIRSH pool-list --name 2>/dev/null); do $VIRSH pool-destroy "$p" > /dev/null 2>&1; done
    for p in "${LIBVIRT_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${LIBVIRT_PIDS[@]}"; do
        for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done
    LIBVIRT_PIDS=()
}
