"""The door to a target: parse its YAML (``config``, pure), then resolve what only the target's
backend can say. ``resolve`` is the one place a target asks a backend anything; today that is
``channel_multiple: auto`` (the channel block of the backend's layout on this machine).
"""

from __future__ import annotations

from typing import Any

from deploy_prune.backends import channel_block
from deploy_prune.config import AUTO, Target, parse_target, parse_target_dict
from deploy_prune.errors import UserError


def resolve(target: Target) -> Target:
    """``target`` with every setting the backend decides filled in (in place; returned)."""
    if target.channel_multiple_from == AUTO:
        target.channel_multiple, target.channel_multiple_from = channel_block(target)
    wide = [n for n in target.narrow_widths or () if n >= target.channel_multiple]
    if wide:
        raise UserError(f"target {target.source or target.name!r}: narrow_widths {wide} are not below the channel multiple "
                        f"{target.channel_multiple}; narrow widths are the ones under it (the multiples are allowed already)")
    return target


def load_target(name_or_path: str) -> Target:
    """A target by name (``targets/``, ``$DEPLOY_PRUNE_TARGETS``) or YAML path, validated and resolved."""
    return resolve(parse_target(name_or_path))


def target_from_dict(raw: Any, source: str = "<dict>") -> Target:
    """A target from a mapping (a parsed YAML), validated and resolved."""
    return resolve(parse_target_dict(raw, source))
