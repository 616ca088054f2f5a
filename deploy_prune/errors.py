"""Errors the CLI turns into one clear line and a non-zero exit code."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix (exit code 2)."""

    exit_code = 2


class BudgetUnreachable(UserError):
    """The requested budget cannot be met (exit code 3)."""

    exit_code = 3
