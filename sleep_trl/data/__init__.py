"""Embedded, offline benchmark data: a seeded world of fictional knowledge split into continual-learning sessions."""

from .world import ATTRIBUTES, KINDS, Fact, Session, World, WorldConfig, make_world

__all__ = ["ATTRIBUTES", "KINDS", "Fact", "Session", "World", "WorldConfig", "make_world"]
