"""A stopped node's process group is gone once nothing in it runs: a member that has exited
and waits only to be reaped (a zombie) does not keep ``LocalCluster.stop`` waiting."""

from __future__ import annotations

import subprocess
import sys
import time

from balancectl.toolkit.cluster import group_alive


def test_a_running_member_keeps_its_group_alive() -> None:
    member = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                              start_new_session=True)  # fmt: skip
    try:
        assert group_alive(member.pid)
    finally:
        member.kill()
        member.wait()
    assert not group_alive(member.pid)


def test_a_group_whose_only_member_exited_unreaped_is_gone() -> None:
    member = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    try:
        with open(f"/proc/{member.pid}/stat") as stat:
            while stat.read().rsplit(")", 1)[1].split()[0] != "Z":  # exited, not yet reaped
                time.sleep(0.01)
                stat.seek(0)
        assert not group_alive(member.pid)
    finally:
        member.wait()
