"""Billing fixtures: the fleet's vendor (a tenant with an owner, a token and a product)."""

from tests.fleet.fixtures import vendor  # noqa: F401
