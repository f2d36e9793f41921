"""What a transfer is: a small, serialisable description that the command line builds from its
flags and a job store can keep as JSON. Running the same spec again resumes it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy import exits
from proxy.units import parse_size

Kind = Literal["export", "import"]
MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB  # S3 refuses smaller parts (except the last)
MAX_PARTS = 10_000  # S3's limit on parts per upload


class TransferError(exits.CommandFailed):
    """The transfer as a whole cannot go on (the target is gone, the archive is broken)."""


class UsageError(TransferError, exits.UsageError):
    """A mistake in what was asked for: a bad location, an unknown tier, a missing file."""


@dataclass(frozen=True)
class TransferSpec:
    """One export or import.

    export: ``hashes`` (or ``hashes_file``, one digest a line) are read through the store, each
    once, and written to every one of ``targets`` (``target`` is the same for one). import:
    every object of ``source`` is verified against the digest in its name and written into the
    tier ``into`` (default: the first upload target).

    A location is ``s3://bucket/prefix/``, a folder, a ``.tar`` file, or ``-`` (a tar stream on
    stdout/stdin, which cannot be resumed). ``checkpoint`` defaults to a file per location in the
    cache folder named after the kind and location, so running the same spec again does only what
    is left.
    """

    kind: Kind
    target: str = ""
    targets: tuple[str, ...] = ()
    source: str = ""
    hashes: tuple[str, ...] = ()
    hashes_file: str | None = None
    into: str | None = None
    jobs: int = 8
    checkpoint: str | None = None
    endpoint_url: str | None = None
    part_size: int = 16 * MiB
    multipart_threshold: int = 64 * MiB
    memory: int = 256 * MiB  # bytes of blob data held in memory at once, all transfers together

    @property
    def locations(self) -> tuple[str, ...]:
        """Where an export writes (each target once, in order), or the one place an import reads."""
        if self.kind == "import":
            return (self.source,)
        return tuple(dict.fromkeys((self.target,) if self.target else self.targets))

    def check(self) -> None:
        """Raise UsageError naming the first field that is wrong."""
        if self.kind not in ("export", "import"):
            raise UsageError(f"kind: want 'export' or 'import', got {self.kind!r}")
        if self.kind == "export":
            if not self.target and not self.targets:
                raise UsageError("export needs a target (--to)")
            if self.target and self.targets:
                raise UsageError("targets: give target (one) or targets (a list), not both")
            if "-" in self.targets and len(self.targets) > 1:
                raise UsageError("targets: a tar stream (-) cannot be one of several targets")
            if self.source or self.into:
                raise UsageError("export takes no source or into tier")
            if not self.hashes and self.hashes_file is None:
                raise UsageError("export needs hashes (--hashes FILE or -)")
        else:
            if not self.source:
                raise UsageError("import needs a source (--from)")
            if self.target or self.targets or self.hashes or self.hashes_file is not None:
                raise UsageError("import takes no target or hashes")
        if self.jobs < 1:
            raise UsageError(f"jobs: want at least 1, got {self.jobs}")
        if self.part_size < MIN_PART_SIZE:
            raise UsageError(f"part_size: S3 wants at least 5 MiB, got {self.part_size}")
        if self.multipart_threshold < 1:
            raise UsageError(f"multipart_threshold: want at least 1 byte, got {self.multipart_threshold}")
        if self.memory < MiB:
            raise UsageError(f"memory: want at least 1 MiB, got {self.memory}")

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["hashes"] = list(self.hashes)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TransferSpec:
        """Build and check a spec from JSON (e.g. a job request); UsageError names a bad key."""
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise UsageError(f"{unknown[0]}: unknown key; known: {', '.join(fields)}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if value is None:
                continue
            if name in ("hashes", "targets"):
                if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                    raise UsageError(f"{name}: want a list of strings")
                values[name] = tuple(value)
            elif name in ("part_size", "multipart_threshold", "memory"):
                try:
                    values[name] = parse_size(value)
                except (TypeError, ValueError) as error:
                    raise UsageError(f"{name}: {error}") from None
            elif name == "jobs":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise UsageError(f"jobs: want a whole number, got {value!r}")
                values[name] = value
            elif not isinstance(value, str):
                raise UsageError(f"{name}: want a string, got {value!r}")
            else:
                values[name] = value
        if "kind" not in values:
            raise UsageError("kind: required ('export' or 'import')")
        spec = cls(**values)
        spec.check()
        return spec
