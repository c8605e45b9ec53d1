"""Where a client of the supervisor's socket comes from (control/peercheck.py): the host's
side is served, an instance's process (another PID namespace, an instance's cgroup) is not.
The system test of the refusal is tests/test_userland_redteam.py's; here the decisions."""

import os
import socket

from partition.control import peercheck


def test_an_instance_cgroup_of_any_machine_is_told_from_a_name_alike():
    told = peercheck._in_instance_cgroup
    assert told("0::/user.slice/multikernel-123-run-ab12/i4\n")
    assert told("12:pids:/multikernel-1-x/i12/sub\n3:memory:/\n")        # v1, deeper
    assert not told("0::/system.slice/multikernel-supervisor.service\n")  # a unit's name
    assert not told("0::/multikernel-1-x\n")                             # a machine's base
    assert not told("0::/multikernel-1-x/i12x\n0::/\n")


def test_the_pid_namespace_depth_is_read_from_nspid():
    depth = peercheck._nspid_depth
    assert depth("Name:\tsh\nNSpid:\t4242\n") == 1
    assert depth("Name:\tsh\nNSpid:\t4242\t7\n") == 2                    # a userland's
    assert depth("Name:\tsh\n") == 1                                     # no NSpid: no ns


def test_a_client_on_the_hosts_side_is_served_and_one_not_seen_is_refused():
    a, b = socket.socketpair()
    try:
        assert peercheck.refusal(a, os.getpid()) == ""
        assert "PID namespace" in peercheck.refusal(a, 0)     # SO_PEERCRED's 0: not visible
    finally:
        a.close()
        b.close()
