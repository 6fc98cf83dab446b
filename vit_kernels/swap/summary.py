from collections import Counter
from dataclasses import dataclass, field

KINDS = ("attention", "mlp", "layer_norm", "block", "patch_embed", "model")


@dataclass
class SwapSummary:
    """What swap_modules changed, what it left alone (and why) and what was swapped before,
    module path by module path, with a count per module kind."""

    model: str
    swapped: list = field(default_factory=list)  # (path, what it became)
    skipped: list = field(default_factory=list)  # (path, why it stayed)
    already: list = field(default_factory=list)  # paths swapped by an earlier call
    kinds: dict = field(default_factory=dict)  # path -> kind, for every entry above

    def swap(self, path: str, kind: str, what: str) -> None:
        self.swapped.append((path, what))
        self.kinds[path] = kind

    def left_alone(self, path: str, kind: str, why: str) -> None:
        self.skipped.append((path, why))
        self.kinds.setdefault(path, kind)

    def already_swapped(self, path: str, kind: str) -> None:
        self.already.append(path)
        self.kinds.setdefault(path, kind)

    def counts(self) -> dict:
        """{kind: {"swapped": n, "left alone": n, "already swapped": n}}, kinds with any entry."""
        tally = {}
        for label, paths in (("swapped", [p for p, _ in self.swapped]), ("left alone", [p for p, _ in self.skipped]),
                             ("already swapped", self.already)):
            for kind, n in Counter(self.kinds.get(p, "model") for p in paths).items():
                tally.setdefault(kind, {})[label] = n
        return {kind: tally[kind] for kind in sorted(tally, key=lambda k: KINDS.index(k) if k in KINDS else 99)}

    def __str__(self) -> str:
        head = (f"swap_modules({self.model}): {len(self.swapped)} swapped, {len(self.skipped)} left alone, "
                f"{len(self.already)} already swapped")
        lines = [head]
        for kind, tally in self.counts().items():
            lines.append(f"  {kind}: " + ", ".join(f"{n} {label}" for label, n in tally.items()))
        lines += [f"  swapped  {path or '<model>'}: {what}" for path, what in self.swapped]
        lines += [f"  left     {path or '<model>'}: {why}" for path, why in self.skipped]
        if self.already:
            lines.append(f"  already swapped (a second call changes nothing): {', '.join(p or '<model>' for p in self.already)}")
        return "\n".join(lines)
