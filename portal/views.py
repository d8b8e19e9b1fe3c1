"""The ``portal`` blueprint with all its pages; ``app.py`` registers :data:`bp`."""

from portal import (  # noqa: F401 - imported for the routes they add to the blueprint
    admin_catalogue_views,
    admin_views,
    audit_views,
    auth_views,
    billing_labels,
    billing_views,
    claim_views,
    device_views,
    fleet_views,
    home_views,
    import_views,
    invitation_views,
    notification_views,
    product_views,
    settings_views,
    team_views,
    token_views,
    two_factor_views,
    usage_views,
    vendor,
)
from portal.blueprint import bp

__all__ = ["bp"]
