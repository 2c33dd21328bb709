"""Fields of Linux's ``/proc`` status files (``/proc/meminfo``, ``/proc/self/status``): one reader for the
``Name:   value unit`` lines they are made of. Standard library only."""

from __future__ import annotations


def proc_field(path: str, name: str) -> str | None:
    """The first word after ``name:`` in the ``/proc`` file ``path`` (e.g. ``"2048"`` for ``MemAvailable:
    2048 kB``), or None where the file or the field is missing (not Linux, an older kernel)."""
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"{name}:"):
                    words = line.split()
                    return words[1] if len(words) > 1 else None
    except OSError:
        pass
    return None


def proc_kib_bytes(path: str, name: str) -> int | None:
    """A ``kB`` field of a ``/proc`` file in bytes, or None where it is missing."""
    value = proc_field(path, name)
    return int(value) * 1024 if value is not None and value.isdigit() else None
