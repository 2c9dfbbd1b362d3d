#!/usr/bin/env python3
"""offcpu.py: where the threads of one process spent their time, from a
system-wide record of scheduler switches:

    perf record -a -e sched:sched_switch -g -o DATA -- COMMAND
    perf script -i DATA -F pid,tid,time,event,trace,ip,sym | offcpu.py PID [STACKS]

Prints one line: the seconds its threads (all but PID's main thread) were on
a CPU, runnable but waiting for one (R: preempted), in uninterruptible sleep
(D: the disk, a buffer lock) and sleeping (S: a lock, a condition), summed
over the threads. With STACKS, also the STACKS kernel stacks that the most
D and S time went off the CPU at. A benchmark helper, not a test.
"""
import collections
import re
import sys

SWITCH = re.compile(r'prev_comm=.+? prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> '
                    r'next_comm=.+? next_pid=(\d+)')
SKIP = {'__schedule', 'schedule', 'schedule_timeout', 'io_schedule', '__traceiter_sched_switch'}


def events(lines):
    """(time, tid of the process or None, prev tid, state, next tid, stack) per switch."""
    cur = None
    for line in lines:
        # A switch's line starts with its pid (padded with spaces when short),
        # the lines of its stack with a tab.
        m = re.match(r'\s*(\d+)/(\d+)\s+(\d+\.\d+):\s+sched:sched_switch:(.*)', line)
        if m or (line[:1] not in (' ', '\t') and line.strip()):
            if cur:
                yield cur
            s = m and SWITCH.search(m.group(4))
            cur = (float(m.group(3)), int(m.group(1)), int(s.group(1)), s.group(2)[0],
                   int(s.group(3)), []) if s else None
        elif cur and line.strip() and len(cur[5]) < 6:
            sym = line.split()[1].split('+')[0] if len(line.split()) > 1 else '?'
            if sym not in SKIP:
                cur[5].append(sym)
    if cur:
        yield cur


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ('-h', '--help'):
        print(__doc__.strip())
        return 0 if len(sys.argv) > 1 else 2
    pid = int(sys.argv[1])
    stacks = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    evs = list(events(sys.stdin))
    # A switch runs in the context of the task leaving the CPU: its pid says
    # whose threads those are.
    tids = {e[2] for e in evs if e[1] == pid} - {pid}
    if not tids:
        print('offcpu.py: no switch of a thread of process %d in the record' % pid, file=sys.stderr)
        return 1
    on_since, off_since = {}, {}
    on, off, by_stack = 0.0, collections.Counter(), collections.Counter()
    for t, _, prev, state, nxt, stack in evs:
        if prev in tids:
            if prev in on_since:
                on += t - on_since.pop(prev)
            off_since[prev] = (t, state, stack)
        if nxt in tids:
            on_since[nxt] = t
            if nxt in off_since:
                t0, st, stk = off_since.pop(nxt)
                off[st] += t - t0
                if st in 'DS':
                    by_stack[st + ' ' + ';'.join(stk)] += t - t0
    print('on a CPU %.2f s, runnable %.2f s, D %.2f s, S %.2f s (%d threads)'
          % (on, off['R'], off['D'], off['S'], len(tids)))
    for stack, seconds in by_stack.most_common(stacks):
        print('  %6.2f s  %s' % (seconds, stack))
    return 0


if __name__ == '__main__':
    sys.exit(main())
