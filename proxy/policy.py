"""Where generated state lives and where uploads go by default: rules over the tier protocol that
the service and the transfer tool share (so neither imports the other)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from proxy.tier import Tier


def state_dir(tiers: Sequence[Tier]) -> str:
    """The first tier's private folder (the disk cache's, 0700), else ./data."""
    return next((tier.state_dir for tier in tiers if tier.state_dir), None) or os.path.abspath("./data")


def default_targets(tiers: Sequence[Tier]) -> list[Tier]:
    """With no uploads.targets, uploads go to the first source that can store blobs."""
    return [tier for tier in tiers if tier.role == "source" and tier.can_store][:1]
