"""Recovery policy and restart intensity, as Erlang/OTP supervisors count it.

``none``: a failed instance stays ``loaded`` (the real system's behaviour). ``restart``: the
host scrubs its partition (unless ``preserve_memory``) and re-execs it from its loaded image, at
most ``max_restarts`` times in any ``restart_window`` seconds; one more failure inside the
window and the instance goes to ``failed`` and stays there. ``standby``: an active instance
created with ``standby_for`` this one takes over its role: messages addressed to the failed
instance's id reach the standby (active-backup)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from partition.errors import InvalidSpec

POLICIES = ("none", "restart", "standby")


@dataclass
class RecoveryPolicy:
    policy: str = "none"
    max_restarts: int = 3
    restart_window: float = 5.0
    watchdog: float = 0.0               # seconds without progress before "hung"; 0: off
    preserve_memory: bool = False       # restart keeps the partition instead of scrubbing it
    _restarts: deque = field(default_factory=deque, repr=False)

    @classmethod
    def build(cls, policy: str = "none", max_restarts: int = 3, restart_window: float = 5.0,
              watchdog: float = 0.0, preserve_memory: bool = False) -> RecoveryPolicy:
        p = cls()
        p.update(policy=policy, max_restarts=max_restarts, restart_window=restart_window,
                 watchdog=watchdog, preserve_memory=preserve_memory)
        return p

    def update(self, **changes: object) -> None:
        """Validate every change first; apply all or none."""
        new = {"policy": self.policy, "max_restarts": self.max_restarts,
               "restart_window": self.restart_window, "watchdog": self.watchdog,
               "preserve_memory": self.preserve_memory}
        for k, v in changes.items():
            if v is not None:
                new[k] = v
        if new["policy"] not in POLICIES:
            raise InvalidSpec(f"unknown recovery policy {new['policy']!r}",
                              f"one of: {', '.join(POLICIES)}")
        mr = new["max_restarts"]
        if isinstance(mr, bool) or not isinstance(mr, int) or not 0 <= mr <= 1000:
            raise InvalidSpec(f"max_restarts must be an integer in 0..1000, got {mr!r}", "e.g. 3")
        for key, lo in (("restart_window", 0.001), ("watchdog", 0.0)):
            v = new[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= 86400:
                raise InvalidSpec(f"{key} must be a number of seconds in {lo}..86400, got {v!r}",
                                  "e.g. 5" if key == "restart_window" else "e.g. 1 (0 disables it)")
        if not isinstance(new["preserve_memory"], bool):
            raise InvalidSpec(f"preserve_memory must be true or false, got {new['preserve_memory']!r}",
                              "e.g. preserve_memory=true")
        self.preserve_memory = new["preserve_memory"]
        self.policy, self.max_restarts = str(new["policy"]), int(mr)
        window, watchdog = new["restart_window"], new["watchdog"]
        assert isinstance(window, (int, float)) and isinstance(watchdog, (int, float))
        self.restart_window, self.watchdog = float(window), float(watchdog)

    def allow_restart(self, now: float) -> bool:
        """Record a restart if the intensity allows it."""
        while self._restarts and now - self._restarts[0] > self.restart_window:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return False
        self._restarts.append(now)
        return True

    def to_dict(self) -> dict[str, object]:
        return {"policy": self.policy, "max_restarts": self.max_restarts,
                "restart_window": self.restart_window, "watchdog": self.watchdog,
                "preserve_memory": self.preserve_memory, "recent_restarts": len(self._restarts)}
