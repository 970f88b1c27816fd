"""Evaluation against a truth table: retrieval, identity, change and scope (``core.evaluate``)."""
