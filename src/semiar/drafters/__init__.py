"""Drafters: one file per method, all behind `semiar.drafters.base.Drafter`."""

from .base import Drafter

__all__ = ["Drafter"]
