"""The instance table: every instance of one machine, by name and by id, and its change count.

One object the collaborators share instead of the machine: it is the only place that adds or
removes an instance (``add``, ``remove``), and ``changes`` counts the changes published so far,
which caches (the sweep's running list, the watchdog's watched list) key on.
"""

from __future__ import annotations

from collections.abc import Iterator

from partition.errors import NoSuchInstance
from partition.host.instance import Instance


class InstanceTable:
    """Name -> instance, with an id index checked against it on each use."""

    def __init__(self) -> None:
        #: name -> instance (the machine's ``instances`` is this dict)
        self.by_name: dict[str, Instance] = {}
        self._ids: dict[int, Instance] = {}
        #: published changes so far (host/publish.py counts them)
        self.changes = 0

    def __iter__(self) -> Iterator[Instance]:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def values(self) -> list[Instance]:
        return list(self.by_name.values())

    def find(self, name: str) -> Instance | None:
        """The instance of this name, None if there is none."""
        return self.by_name.get(name)

    def add(self, inst: Instance) -> None:
        self.by_name[inst.name] = inst

    def remove(self, inst: Instance) -> None:
        del self.by_name[inst.name]

    def by_id(self, instance_id: int) -> Instance | None:
        """The instance with this id (an index, checked against ``by_name`` on each use and
        rebuilt when it disagrees, so that no path that adds or removes one can stale it)."""
        inst = self._ids.get(instance_id)
        if inst is not None and self.by_name.get(inst.name) is inst:
            return inst
        self._ids = {i.id: i for i in self.by_name.values()}
        return self._ids.get(instance_id)

    def get(self, name: str | int) -> Instance:
        """The instance a verb names, by name or id; NoSuchInstance with the names known."""
        if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
            inst = self.by_id(int(name))
            if inst is None:
                raise NoSuchInstance(f"no instance with id {int(name)}",
                                     "mkctl show lists the instances")
            return inst
        found = self.by_name.get(name)
        if found is None:
            known = ", ".join(sorted(self.by_name)) or "none"
            raise NoSuchInstance(f"no instance named {name!r} (instances: {known})",
                                 "mkctl create NAME first, or check the spelling")
        return found
