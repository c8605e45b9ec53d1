#!/usr/bin/env python3
"""The commit habit of the house: a subject of at most 72 characters, the detail in the body.

    python3 tools/subjects.py                   # every commit after a0eddb5 (exit 1 if one is long)
    python3 tools/subjects.py --since REV       # after another base
    python3 tools/subjects.py --repo DIR        # another checkout

A subject is what ``git log --oneline``, a shortlog and a review list show; past 72 characters
they cut it, and what the change is gets lost. The default base is the first commit of the
round that set the rule (issue 21), so history from before it is not judged. A base this clone
does not hold (a shallow clone) is an error of its own (exit 2), never a silent pass.
tests/test_subjects.py runs this check on a throwaway repository.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass

#: the longest subject allowed, in characters
LIMIT = 72
#: the commit the rule starts after: the start of issue 21's round
BASE = "a0eddb5"


class HistoryError(Exception):
    """The history cannot be read: not a repository, or a base it does not hold."""


@dataclass(frozen=True)
class Commit:
    sha: str
    subject: str


def commits(repo: str, since: str) -> list[Commit]:
    """The commits reachable from HEAD and not from ``since``, oldest first."""
    def git(*args: str) -> str:
        p = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                           encoding="utf-8", errors="replace")
        if p.returncode != 0:
            raise HistoryError(p.stderr.strip() or f"git {' '.join(args)} failed")
        return p.stdout

    try:
        git("rev-parse", "--verify", "--quiet", f"{since}^{{commit}}")
    except HistoryError:
        raise HistoryError(f"the base {since!r} is not a commit of {repo}: give --since a commit "
                           "this clone holds (a shallow clone needs git fetch --unshallow)") from None
    out = git("log", "--reverse", "--format=%H%x00%s%x00", f"{since}..HEAD")
    fields = out.split("\0")
    return [Commit(sha.strip(), subject) for sha, subject in zip(fields[0::2], fields[1::2])
            if sha.strip()]


def check(repo: str, since: str = BASE, limit: int = LIMIT) -> tuple[list[str], list[Commit]]:
    """(problems, the commits judged). A problem names the commit, the subject's length, the fix."""
    found = commits(repo, since)
    problems = [f"{c.sha[:10]} subject is {len(c.subject)} characters, over {limit}: "
                f"{c.subject[:limit]}... -- keep the subject to {limit} characters and put the "
                f"detail in the body (git commit --amend, or git rebase -i to reword it)"
                for c in found if len(c.subject) > limit]
    return problems, found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/subjects.py", description=__doc__.splitlines()[0])
    ap.add_argument("--since", default=BASE, help=f"the base commit (default {BASE})")
    ap.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="the repository (default: this checkout)")
    a = ap.parse_args(argv)
    try:
        problems, found = check(a.repo, a.since)
    except HistoryError as exc:
        print(f"subjects: {exc}", file=sys.stderr)
        return 2
    longest = max((len(c.subject) for c in found), default=0)
    print(f"{len(found)} commit(s) after {a.since}; longest subject {longest} characters "
          f"(bound {LIMIT})")
    for p in problems:
        print(f"subjects: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
