"""The fixed words of the key model (tiers, roles), importable without SQLAlchemy: the
CLI's argument parser and the stage settings need them, a gateway without a database
should not pay for importing the ORM to get them."""

TIERS = ("free", "starter", "pro", "enterprise")
ROLES = ("admin", "member")
