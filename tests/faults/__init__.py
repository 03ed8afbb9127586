"""Hostile inputs (generated, never committed) that every stage must survive."""
