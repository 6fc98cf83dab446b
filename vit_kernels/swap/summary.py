from dataclasses import dataclass, field


@dataclass
class SwapSummary:
    """What swap_modules changed and what it left alone, module path by module path."""

    model: str
    swapped: list = field(default_factory=list)  # (path, what it became)
    skipped: list = field(default_factory=list)  # (path, why it stayed)

    def swap(self, path: str, what: str) -> None:
        self.swapped.append((path, what))

    def left_alone(self, path: str, why: str) -> None:
        self.skipped.append((path, why))

    def __str__(self) -> str:
        lines = [f"swap_modules({self.model}): {len(self.swapped)} swapped, {len(self.skipped)} left alone"]
        lines += [f"  swapped  {path or '<model>'}: {what}" for path, what in self.swapped]
        lines += [f"  left     {path or '<model>'}: {why}" for path, why in self.skipped]
        return "\n".join(lines)
